"""What a config builds, once for every entry point: `build(config) -> Bundle`.

Training, evaluation, sampling, ablations and `mmjax.aot` all start here. `build` is pure in
its config: it returns the resolved config (every `vocab_size: 0` filled from the tokenizer, an
imported checkpoint's architecture in `model`, the frozen VAE's workdir and scaling factor in
`latents`) as a new object and never changes the one it is given. The resolved config is what
a run writes to `config.json`, so a fresh run and its resumption write the same bytes.

The bundle holds the model, tokenizer, mesh and logical-axis rules, the frozen helpers a family
needs (a VAE's latent space, imported weights) and the abstract parameters with their
shardings. It holds no optimizer and no data iterator: the trainer adds those
(train/loop.py), and reading a trained workdir (`load_trained`) needs neither.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from mmjax import convert, evals, families, models, objectives, parallel
from mmjax import data as mmdata
from mmjax.errors import UserError
from mmjax.models.vae import LatentSpace
from mmjax.parallel import layout
from mmjax.train.checkpoint import abstract_like
from mmjax.train.latents import load_latent_space, resolved_latents
from mmjax.train.stages import param_paths, replace_leaves
from mmjax.train.workdir import (
    WORKDIR_FORMAT,
    check_workdir_source,
    import_sources,
    read_config,
    read_params,
    workdir_sources,
)


def fill_vocab_size(model_cfg: ml_collections.ConfigDict, vocab_size: int) -> None:
    """Sets every `vocab_size: 0` in the model config to the tokenizer's size rounded up to 128."""
    padded = -(-vocab_size // 128) * 128
    for key, value in model_cfg.items():
        if isinstance(value, ml_collections.ConfigDict):
            fill_vocab_size(value, vocab_size)
        elif key == "vocab_size" and value == 0:
            model_cfg[key] = padded


@dataclasses.dataclass(frozen=True)
class Bundle:
    """Everything a resolved config builds except the optimizer and the data iterator."""

    config: ml_collections.ConfigDict  # resolved: what config.json holds
    family: families.Family
    model: nn.Module
    tokenizer: mmdata.Tokenizer
    mesh: jax.sharding.Mesh
    rules: tuple
    latents: LatentSpace | None  # a frozen VAE's latent space; None: pixel space
    imported: convert.Imported | None  # converted weights that replace the model's
    # init_from.more sources of converted weights: {label: (imported, {dst: src} subtrees)}
    imported_more: Mapping[str, tuple[convert.Imported, Mapping[str, str]]] = dataclasses.field(
        default_factory=dict
    )

    @property
    def from_workdir(self) -> bool:
        """True when `init_from` names earlier runs' workdirs (train/workdir.py)."""
        return bool(workdir_sources(self.config.get("init_from", {})))

    def init_params(self, seed: int, example: Mapping[str, Any]) -> Any:
        """Fresh parameters from one example batch (batch dimension 1), boxed with their
        logical axes. Traced only: the key is made inside, so no device op runs eagerly."""
        if self.latents is not None:
            example = objectives.encode_images(example, self.latents, jax.random.key(0))
        return self.model.init(jax.random.key(seed), example)["params"]

    def example(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The shapes of one training example (batch dimension 1): the train split's first
        record as the config's preprocessing lays it out."""
        example = mmdata.first_example(self.config.data, self.tokenizer)
        return {
            k: jax.ShapeDtypeStruct((1, *np.shape(v)), np.asarray(v).dtype)
            for k, v in example.items()
        }

    def abstract_params(self, example: Mapping[str, Any] | None = None) -> Any:
        """The parameters' shapes and dtypes carrying their shardings on the mesh, computed
        from `example` (arrays or shapes; default `self.example()`), not initialised."""
        return self.abstract(self.init_params, self.example() if example is None else example)

    def boxed_params(self, example: Mapping[str, Any]) -> Any:
        """The parameters' shapes inside their logical-axis boxes (no shardings)."""
        return self._shapes(self.init_params, example)

    def abstract(self, init_fn: Callable[[int, Any], Any], example: Mapping[str, Any]) -> Any:
        """What `init_fn(seed, example)` returns (boxed with logical axes), as shapes and
        dtypes carrying their shardings on the mesh: computed, never initialised. `example`
        holds arrays or shapes, batch axis first."""
        boxed = self._shapes(init_fn, example)
        try:
            shardings = parallel.logical_shardings(boxed, self.mesh, self.rules)
        except parallel.UnevenShardingError as e:
            raise UserError(f"mesh: {e}") from None
        return abstract_like(nn.meta.unbox(boxed), shardings)

    def _shapes(self, init_fn: Callable[[int, Any], Any], example: Mapping[str, Any]) -> Any:
        one = {k: jax.ShapeDtypeStruct((1, *v.shape[1:]), v.dtype) for k, v in example.items()}
        with jax.set_mesh(self.mesh):
            return jax.eval_shape(init_fn, self.config.seed, one)

    def evaluators(self, workdir: str | None) -> dict:
        """`config.evals` built for this model, tokenizer, data, mesh and latents (call inside
        the mesh and logical-axis-rules context)."""
        return evals.build_evaluators(
            self.config.evals,
            self.model,
            self.tokenizer,
            self.config.data,
            self.mesh,
            workdir,
            latents=self.latents,
        )

    def imported_params(
        self, example_batch: Mapping[str, np.ndarray], params: Any, shardings: Any
    ) -> Any:
        """The imported parameters placed with `shardings`, once the data is known to fit
        them; stacks the converters wrote unscanned are stacked for a scanned model. An LLM
        (`init_from.format=hf_llm`) replaces the `lm/` subtree of `params` only."""
        if self.config.init_from.format == convert.LM_FORMAT:
            return self._imported_lm(params, shardings)
        if self.config.init_from.format == convert.QWEN_VL_FORMAT:
            return self._imported_qwen_vl(params, shardings)
        got = tuple(example_batch["image"].shape[1:])
        want = (*self.imported.image_size, self.imported.channels)
        if got != want:
            raise UserError(
                f"the data gives {'x'.join(map(str, got))} images but the imported model was "
                f"trained on {'x'.join(map(str, want))}: set data.image_size"
            )
        abstract = self.abstract_params(example_batch)
        try:
            values = layout.to_layout(param_paths(self.imported.params), param_paths(abstract))
        except ValueError as e:
            raise UserError(f"init_from: {e}") from None
        return jax.device_put(replace_leaves(abstract, values), shardings)

    def imported_subtrees(self, params: Any, shardings: Any) -> Any:
        """`params` with the subtrees each `init_from.more` import source loads replaced by
        the converted model's (`load`: {our prefix: the import's prefix})."""
        if not self.imported_more:
            return params
        ours, values = param_paths(params), {}
        for label, (imported, load) in self.imported_more.items():
            theirs, before = param_paths(imported.params), len(values)
            for dst, src in load.items():
                values.update(_load_subtree(ours, theirs, dst, src, f"{label}.load"))
            count = len(values) - before
            print(f"Initialised {count} parameters from {label} ({imported.model['name']})")
        return jax.device_put(replace_leaves(params, {**ours, **values}), shardings)

    def _imported_lm(self, params: Any, shardings: Any) -> Any:
        """`params` with `lm/` the imported LLM's, its token rows extended for the specials
        the run's tokenizer adds (new rows: the mean of the checkpoint's, as HF's
        resize_token_embeddings)."""
        imported = convert.from_hf_llm(self.config.init_from.path)
        ours = param_paths(params)
        values = _load_subtree(ours, param_paths(imported.params), "lm", "", "init_from", rows=True)
        return jax.device_put(replace_leaves(params, {**ours, **values}), shardings)

    def _imported_qwen_vl(self, params: Any, shardings: Any) -> Any:
        """`params` replaced by the imported Qwen2-VL's (`vision/` and `lm/`; token rows
        extended as `_imported_lm`'s)."""
        imported = convert.hf_qwen2_vl.convert(self.config.init_from.path)
        ours, theirs = param_paths(params), param_paths(imported.params)
        values = _load_subtree(ours, theirs, "lm", "lm", "init_from", rows=True)
        values.update(_load_subtree(ours, theirs, "vision", "vision", "init_from"))
        return jax.device_put(replace_leaves(params, {**ours, **values}), shardings)


def _load_subtree(
    ours: Mapping[str, Any],
    theirs: Mapping[str, Any],
    dst: str,
    src: str,
    label: str,
    rows: bool = False,
) -> dict[str, Any]:
    """{our path under `dst`: the imported value under `src`}, stacked where our stacks are
    scanned (parallel/layout.py); `rows`: token embeddings and heads grown to our rows."""
    target = _under(ours, dst, f"{label}: this model has no {dst!r}")
    source = _under(theirs, src, f"{label}: the import has no {src!r}")
    target = {_join(dst, k): v for k, v in target.items()}
    source = {_join(dst, k): v for k, v in source.items()}
    if rows:
        for path in (_join(dst, "token_embedding/embedding"), _join(dst, "lm_head/kernel")):
            if path in source and path in target:
                source[path] = _extend_rows(source[path], target[path].shape, path)
    try:
        return layout.to_layout(source, target)
    except ValueError as e:
        raise UserError(f"{label} {dst!r}: {e}") from None


def _join(prefix: str, path: str) -> str:
    return f"{prefix.strip('/')}/{path}" if prefix.strip("/") else path


def _under(paths: Mapping[str, Any], prefix: str, error: str) -> dict[str, Any]:
    """{relative path: leaf} of the leaves under `prefix` ("" or "/": all); none: `error`."""
    prefix = prefix.strip("/")
    if not prefix:
        return dict(paths)
    found = {k[len(prefix) + 1 :]: v for k, v in paths.items() if k.startswith(prefix + "/")}
    if not found:
        raise UserError(error)
    return found


def _extend_rows(x: Any, shape: Sequence[int], path: str) -> np.ndarray:
    """An embedding [rows, width] (or head [width, rows]) grown to `shape` with mean rows."""
    x = np.asarray(x)
    axis = 0 if path.endswith("embedding") else 1
    extra = shape[axis] - x.shape[axis]
    if extra <= 0:
        return x
    mean = x.mean(axis=axis, keepdims=True)
    return np.concatenate([x, np.repeat(mean, extra, axis=axis)], axis=axis)


def build(
    config: ml_collections.ConfigDict,
    workdir: str | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
    tokenizer: mmdata.Tokenizer | None = None,
    precomputed_latents: bool = False,
) -> Bundle:
    """Builds `config` (left unchanged) into a Bundle holding the resolved config.

    `workdir` is where a tokenizer trained from the data is kept (written by process 0);
    `tokenizer` replaces the config's own, and `precomputed_latents` says batches hold a
    latent-diffusion model's latents already (no VAE is loaded): how `mmjax.aot` builds a
    config without its data."""
    config = copy.deepcopy(config)
    rules = parallel.validate_rules(config.mesh.rules)
    try:
        mesh = parallel.make_mesh({k: v for k, v in config.mesh.items() if k != "rules"}, devices)
    except ValueError as e:
        raise UserError(f"mesh: {e}") from None
    is_main = jax.process_index() == 0
    # config.init_from: converted weights that replace the model (mmjax.convert), an LLM into
    # its `lm/` subtree, or subtrees of earlier runs' params copied in after init (workdir.py)
    init_from = config.get("init_from", {})
    fmt = init_from.get("format")
    lm_fields = _checkpoint_lm(config) if fmt == convert.LM_FORMAT else None
    if fmt == convert.QWEN_VL_FORMAT:
        lm_fields = _checkpoint_qwen_vl(config)
    tokenizer = tokenizer or mmdata.load_or_train_tokenizer(
        config.data, workdir, write=is_main and workdir is not None
    )
    if lm_fields is not None:
        _import_lm_architecture(config, tokenizer, lm_fields)
    fill_vocab_size(config.model, tokenizer.vocab_size)
    if init_from.get("more") and not fmt:
        raise UserError("init_from.more (further sources) needs a first source: init_from.format")
    check_workdir_source(init_from)
    imported = _import(config, tokenizer) if fmt in convert.CONVERTERS else None
    imported_more = {
        label: (_import_source(config, label, source), source["load"])
        for label, source in import_sources(init_from)
    }
    latents = None if precomputed_latents else load_latent_space(config, mesh)
    if latents is not None:
        config.latents = resolved_latents(config.latents, latents)
    family = families.get(config.model.name)
    families.check_config(family, config)
    return Bundle(
        config=config,
        family=family,
        model=models.build_model(config.model),
        tokenizer=tokenizer,
        mesh=mesh,
        rules=rules,
        latents=latents,
        imported=imported,
        imported_more=imported_more,
    )


def _import_source(
    config: ml_collections.ConfigDict, label: str, source: Mapping[str, Any]
) -> convert.Imported:
    """A `more` source of converted weights (train/workdir.py), its image preprocessing
    recorded in `config.data` as a first source's is."""
    if source.get("format") not in convert.CONVERTERS:
        valid = sorted((WORKDIR_FORMAT, *convert.CONVERTERS))
        raise UserError(f"{label}.format {source.get('format')!r} is not one of {valid}")
    if not source.get("load"):
        raise UserError(f"{label} needs load={{dst: src}}: the subtrees of the import to use")
    try:
        imported = convert.load(source)
    except UserError as e:
        raise UserError(f"{label}: {e}") from None
    config.data.update(imported.data_settings(config.data))
    return imported


def _import(config: ml_collections.ConfigDict, tokenizer: mmdata.Tokenizer) -> convert.Imported:
    """Imports `config.init_from` and puts its architecture in `config.model` (the copy
    `build` resolves), keeping how this run executes it (EXECUTION_KEYS)."""
    imported = convert.load(config.init_from)
    convert.check_vocab(imported, tokenizer.vocab_size, repr(tokenizer))
    if config.data.max_text_len > imported.text_len:
        raise UserError(
            f"data.max_text_len {config.data.max_text_len} exceeds the imported text context of "
            f"{imported.text_len} tokens"
        )
    config.model = ml_collections.ConfigDict(_keep_execution(imported.model, config.model))
    # the checkpoint's image preprocessing, unless the run chose its own (Imported.data_settings)
    config.data.update(imported.data_settings(config.data))
    return imported


def _checkpoint_lm(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The CausalLM fields of the HF LLM `init_from` names (its config.json), checked to fit
    this config's model; its tokenizer becomes the run's (data.tokenizer=hf at the
    checkpoint), unless the config names a tokenizer file or directory of its own."""
    if not models.holds_causal_lm(config.model.name):
        raise UserError(
            f"init_from.format=hf_llm needs a model holding a causal LM (vlm, lm, unifluid), "
            f"not {config.model.name!r}"
        )
    path = _checkpoint_dir(config)
    fields = convert.hf_llm.lm_fields(convert.hf_llm.read_config(path))  # another model: first
    _use_checkpoint_tokenizer(config, path)
    return fields


def _checkpoint_dir(config: ml_collections.ConfigDict) -> str:
    """init_from.path, checked to be a directory (an HF checkpoint's)."""
    path = config.init_from.get("path", "")
    if not path or not os.path.exists(path):
        raise UserError(f"init_from.path {path!r} does not exist")
    if not os.path.isdir(path):
        raise UserError(f"init_from.path {path!r} is not a directory (an HF checkpoint's)")
    return path


def _use_checkpoint_tokenizer(config: ml_collections.ConfigDict, path: str) -> None:
    """The checkpoint's tokenizer becomes the run's (data.tokenizer=hf at `path`), unless the
    config names a tokenizer file or directory of its own."""
    if config.data.get("tokenizer_path"):
        return
    files = convert.hf_llm.TOKENIZER_MODELS
    if not any(os.path.exists(os.path.join(path, f)) for f in files):
        raise UserError(
            f"init_from.path {path!r} holds no tokenizer ({' or '.join(files)}): set "
            "data.tokenizer and data.tokenizer_path"
        )
    config.data.tokenizer, config.data.tokenizer_path = "hf", path


def _checkpoint_qwen_vl(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """QwenVL's fields of the HF Qwen2-VL / Qwen2.5-VL `init_from` names; its tokenizer and
    the data.sequence keys its architecture fixes (patch size, windows, temporal rate)
    become the run's. The run keeps its own pixel bounds and box format."""
    if config.model.name != "qwen_vl":
        raise UserError(
            f"init_from.format={convert.QWEN_VL_FORMAT} needs model.name 'qwen_vl', not "
            f"{config.model.name!r}"
        )
    path = _checkpoint_dir(config)
    hf = convert.hf_llm.read_config(path)
    fields = convert.hf_qwen2_vl.architecture(hf)
    config.data.sequence.update(convert.hf_qwen2_vl.sequence_settings(hf))
    _use_checkpoint_tokenizer(config, path)
    return fields


def _import_lm_architecture(
    config: ml_collections.ConfigDict, tokenizer: mmdata.Tokenizer, fields: dict[str, Any]
) -> None:
    """Puts an HF LLM checkpoint's architecture (`_checkpoint_lm`'s fields) into
    `config.model`: vocab_size becomes the checkpoint's rows, or more when the run's tokenizer
    adds specials (a VLM's <image>)."""
    fields = dict(fields)
    rows = fields["vocab_size"]
    base = getattr(tokenizer, "base", tokenizer)
    if base.vocab_size > rows:
        raise UserError(
            f"tokenizer {base!r} has {base.vocab_size} ids but the checkpoint's embedding has "
            f"{rows} rows: use the checkpoint's own tokenizer"
        )
    if tokenizer.vocab_size > rows:  # the specials of the run's sequence kind
        fields["vocab_size"] = -(-tokenizer.vocab_size // 128) * 128
    model = dict(config.model.to_dict(), **fields)
    config.model = ml_collections.ConfigDict(_keep_execution(model, config.model))


# How a model runs, not what it computes: the run's own settings win over an import's
EXECUTION_KEYS = ("dtype", "attention_impl", "scan_layers", "remat_policy")


def _keep_execution(imported: Mapping[str, Any], ours: Mapping[str, Any]) -> dict:
    """The imported architecture with this config's EXECUTION_KEYS wherever both have them
    (a tower's `scan_layers`, the model's `dtype`)."""
    merged = dict(imported)
    for key, value in ours.items():
        if key in EXECUTION_KEYS:
            merged[key] = value
        elif hasattr(value, "items") and hasattr(imported.get(key), "items"):
            merged[key] = _keep_execution(imported[key], value)
    return merged


@dataclasses.dataclass
class Trained:
    """A workdir's resolved config (with overrides), its bundle and the newest complete
    checkpoint's parameters."""

    config: ml_collections.ConfigDict
    bundle: Bundle
    step: int
    params: Any


def load_trained(workdir: str, overrides: Sequence[str] = (), step: int = -1) -> Trained:
    """Reads `workdir/config.json`, applies `--config.*` overrides, builds it and reads the
    parameters of the newest complete checkpoint (or of `step`; only those: no optimizer
    state, no data iterator) onto this machine's devices."""
    from mmjax.train.config_cli import apply_overrides

    config = read_config(workdir)
    apply_overrides(config, overrides)
    # config.json is resolved already (an import's architecture is in `model`), and the
    # parameters are the checkpoint's: nothing is imported or copied in again
    plain = copy.deepcopy(config)
    plain.init_from = ml_collections.ConfigDict({"format": ""})
    bundle = build(plain, workdir)
    step, params = read_params(workdir, bundle.abstract_params(), step)
    return Trained(config, bundle, step, params)
