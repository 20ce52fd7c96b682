"""Reading a workdir: its config, its complete checkpoint steps, parameters only (onto the
target shardings, nothing else of the checkpoint), and the earlier runs `init_from` names.

Nothing here writes to a workdir, builds an optimizer or a data iterator, or imports the loop:
evaluation, sampling, latent loading and `init_from` all read through this module.

`config.init_from = dict(format="workdir", path=EARLIER_WORKDIR, step=-1, load={dst: src})`:
after this run's own initialisation, each subtree `dst` of its params is replaced by the subtree
`src` of the earlier run's params at checkpoint `step` (-1: the latest complete one); empty
`load` copies the whole tree. Both subtrees must hold the same paths and shapes (dtypes are cast
to this run's), or the same transformer stacks scanned on one side and unscanned on the other
(converted by mmjax.parallel.layout, through host memory). The earlier workdir is only read.
A source's `family` (a model.name, e.g. "vlm") refuses an earlier run of another family.
Resuming this run's own workdir takes precedence: a run initialises from `init_from` only when
it has no checkpoint yet (`initial_params`).

More earlier runs: `init_from.more` names further sources, each `{path, step, load}` read the
same way (step defaults to -1; no load: the whole tree). A source with another `format` (one of
mmjax.convert's, e.g. `hf_clip`) imports converted weights instead, its `load` mapping subtrees
of the converted model (LLaVA: `load={"vision": "image_tower"}`); the first source may itself
be an import (`format="hf_llm"`: an LLM into `lm/`). BLIP-2 stage 2 takes the ViT and the
Q-Former from stage 1 and its frozen LM from a text-only LM run:

  init_from = dict(format="workdir", path="/tmp/blip2_stage1", load={"vision": "vision", ...},
                   more=dict(lm=dict(path="/tmp/lm_digits", step=-1, load={"lm": "lm"})))

Named sources keep the command line simple: `--config.init_from.more.lm.path=/x` moves one,
and the group, replaced whole by a dict literal, adds or drops sources
(`--config.init_from.more="{'lm': {'path': '/x', 'load': {'lm': 'lm'}}}"`, or `{}`). Errors
name their source: `init_from.path: ...` for the first, `init_from.more.lm.path: ...` for the
others. Every source is opened and checked before anything is computed, and a parameter that two
sources load is an error naming it and both workdirs. The sources are disjoint, so their order
does not matter.

Vocabulary: a source that fills a parameter with a "vocab" logical axis (token embeddings, LM
heads) must have been trained with this run's tokenizer, piece for piece: `check_load` compares
the earlier run's tokenizer (from its workdir and config.json) with this run's. Two runs of
data.sequence kind "vlm" with the same data.source and data.vocab_size train the same
SentencePiece model (data/tokenizer.py), whatever their tasks.
"""

import contextlib
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mmjax.errors import UserError
from mmjax.parallel import layout
from mmjax.train.checkpoint import COMMIT_MARKER
from mmjax.train.stages import is_box, param_paths, replace_leaves, top_level

WORKDIR_FORMAT = "workdir"
MAX_LISTED = 3  # mismatches named in one error line
FIRST = "init_from"  # the name of the first source in errors; the others: init_from.more.NAME
SOURCE_KEYS = ("path", "step", "load", "family")
IMPORT_KEYS = ("format", "name")  # a `more` source of converted weights: mmjax.convert
VOCAB_AXIS = "vocab"  # a parameter with this logical axis needs the same tokenizer
# The data settings a tokenizer depends on, named in a vocabulary mismatch
TOKENIZER_KEYS = ("source", "tokenizer", "tokenizer_path", "vocab_size", "split_train")


# ------------------------------------------------------------------------ init from workdir
def workdir_sources(init_from: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """[(name, {path, step, load})] of the earlier workdirs an init_from names: the first
    source as "init_from" when its format is "workdir" (the default), then each of
    `init_from.more` whose format is "workdir" as "init_from.more.NAME"."""
    init_from = _plain(init_from)
    sources = []
    if init_from.get("format", WORKDIR_FORMAT) == WORKDIR_FORMAT:
        sources.append((FIRST, {k: init_from[k] for k in SOURCE_KEYS if k in init_from}))
    return sources + [
        (label, {k: v for k, v in source.items() if k != "format"})
        for label, source in more_sources(init_from)
        if source.get("format", WORKDIR_FORMAT) == WORKDIR_FORMAT
    ]


def import_sources(init_from: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """[(name, {format, path, load, ...})] of the `init_from.more` sources that import
    converted weights (a format of mmjax.convert) rather than read an earlier workdir."""
    return [
        (label, source)
        for label, source in more_sources(_plain(init_from))
        if source.get("format", WORKDIR_FORMAT) != WORKDIR_FORMAT
    ]


def more_sources(init_from: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """[("init_from.more.NAME", source)] of every further source, its keys checked."""
    sources = []
    more = init_from.get("more") or {}
    if not isinstance(more, Mapping):
        raise UserError(
            f"init_from.more maps source names to {{path, step, load}} dicts, got {more!r}"
        )
    for name, source in more.items():
        label = f"{FIRST}.more.{name}"
        if not isinstance(source, Mapping):
            raise UserError(f"{label} must be a dict of {list(SOURCE_KEYS)}, got {source!r}")
        unknown = sorted(set(source) - {*SOURCE_KEYS, *IMPORT_KEYS})
        if unknown:
            valid = [*SOURCE_KEYS, *IMPORT_KEYS]
            raise UserError(f"{label}: unknown keys {unknown}; a source has {valid}")
        sources.append((label, dict(source)))
    return sources


def _plain(value: Any) -> Any:
    """ConfigDicts as plain dicts, all the way down."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def check_workdir_source(init_from: Mapping[str, Any]) -> None:
    """Early checks of a `format="workdir"` init_from and its `more` (before any model is
    built)."""
    for label, source in workdir_sources(init_from):
        if not source.get("path", ""):
            if label == FIRST:
                raise UserError(
                    "init_from.format=workdir needs init_from.path (an earlier run's workdir)"
                )
            raise UserError(f"{label} needs a path (an earlier run's workdir)")
        step = source.get("step", -1)
        if isinstance(step, bool) or not isinstance(step, int):
            raise UserError(f"{label}.step must be an int (-1: the latest), got {step!r}")
        load = source.get("load") or {}
        if not isinstance(load, Mapping):
            raise UserError(f"{label}.load must map param prefixes to prefixes, got {load!r}")
        for dst, src in load.items():
            if not isinstance(src, str):
                raise UserError(f"{label}.load maps {dst!r} to {src!r}: expected a param path")


def check_load(
    init_from: Mapping[str, Any],
    params: Any,
    tokenizer: Any = None,
    data: Mapping[str, Any] | None = None,
) -> None:
    """Checks, before anything is computed, that `load_from_workdir` can fill `params` (or
    their shapes) from every source: one UserError line for a missing workdir, checkpoint,
    prefix, a mismatch or a parameter two sources load. With this run's `tokenizer` (and its
    `data` config, named in the error), a source that fills a parameter boxed with a "vocab"
    logical axis must have been trained with the same tokenizer (module docstring)."""
    with contextlib.ExitStack() as stack:
        for earlier, pairs, relayouts in _plan(init_from, params, stack):
            if tokenizer is not None:
                loaded = [*pairs, *(p for r in relayouts for p in r.dst.values())]
                earlier.check_vocabulary(loaded, params, tokenizer, data)


def load_from_workdir(init_from: Mapping[str, Any], params: Any, shardings: Any) -> Any:
    """`params` with the subtrees every source's `load` names replaced by that earlier run's
    (module docstring), placed with `shardings`; one UserError line for any mismatch."""
    values = {}
    with contextlib.ExitStack() as stack:
        for earlier, pairs, relayouts in _plan(init_from, params, stack):
            values.update(earlier.read_loaded(pairs, relayouts, params, shardings))
            count = len(pairs) + sum(len(r.dst) for r in relayouts)
            how = " (stacks converted between scanned and unscanned)" if relayouts else ""
            print(f"Initialised {count} parameters from {earlier.model} in {earlier.where}{how}")
    return replace_leaves(params, values)


def _plan(
    init_from: Mapping[str, Any], params: Any, stack: contextlib.ExitStack
) -> list[tuple["_EarlierRun", dict[str, str], list["_Relayout"]]]:
    """Every source opened (closed with `stack`) with its checked {dst: src} pairs and the
    subtrees it converts between layouts; an error for a parameter that two sources load."""
    plan, owner, overlaps = [], {}, []
    for label, source in workdir_sources(init_from):
        earlier = stack.enter_context(_EarlierRun(source, label))
        pairs, relayouts = earlier.pairs(params)
        for dst in [*pairs, *(p for r in relayouts for p in r.dst.values())]:
            if dst in owner:
                first = owner[dst]
                overlaps.append(
                    f"{dst} is loaded by both {first.label} ({first.workdir}) and "
                    f"{earlier.label} ({earlier.workdir})"
                )
            owner[dst] = earlier
        plan.append((earlier, pairs, relayouts))
    _raise(overlaps, FIRST)
    return plan


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a training run wrote to `workdir/config.json`."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: is {workdir!r} a training workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(_tuples(json.load(f)))


def _tuples(value: Any) -> Any:
    """JSON's lists back to the tuples configs hold (modules with tuple fields stay hashable,
    e.g. a Transfusion's `image_shape` for the jitted samplers)."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def complete_steps(workdir: str) -> list[int]:
    """The steps of `workdir/checkpoints` whose save finished (commit markers of the step and
    of its state), oldest first."""
    directory = os.path.join(workdir, "checkpoints")
    return sorted(
        int(s)
        for s in (os.listdir(directory) if os.path.isdir(directory) else ())
        if s.isdigit()
        and all(
            os.path.exists(os.path.join(directory, s, *item, COMMIT_MARKER))
            for item in ((), ("state",))
        )
    )


class StoredRun:
    """A workdir's complete checkpoint at `step` (-1: the latest), opened read-only: its
    config, and its parameters read onto any shardings. Errors start with `label`."""

    def __init__(self, workdir: str, step: int = -1, label: str = "workdir", where: str = ""):
        self.label = label
        self.workdir = os.path.abspath(workdir)
        try:
            self.config = read_config(self.workdir)
        except UserError as e:
            raise UserError(f"{where or label}: {e}") from None
        self.model = self.config.model.get("name", "?")
        self.load = {"": ""}  # {dst prefix: src prefix} `pairs` maps: the whole tree
        directory = os.path.join(self.workdir, "checkpoints")
        self.step = _pick_step(complete_steps(self.workdir), directory, step, label)
        self.where = f"{self.workdir} step {self.step}"
        # Orbax's item handler, not a CheckpointManager: nothing is created, locked or logged
        self.state_dir = epath.Path(directory) / str(self.step) / "state"
        self.handler = ocp.PyTreeCheckpointHandler()
        self.saved = param_paths(self.handler.metadata(self.state_dir).tree["params"])

    def __enter__(self) -> "StoredRun":
        return self

    def __exit__(self, *exc) -> None:
        self.handler.close()

    def pairs(self, params: Any) -> tuple[dict[str, str], list["_Relayout"]]:
        """{dst path: src path} of every parameter the load copies as it is, and the subtrees
        it converts between a scanned and an unscanned stack, all checked."""
        here = param_paths(params)
        pairs, relayouts = _pair(self.load, here, self.saved, self.where, self.label)
        _check_shapes(pairs, params, self.saved, self.where, self.label)
        for relayout in relayouts:
            source = {
                r: jax.ShapeDtypeStruct(self.saved[p].shape, self.saved[p].dtype)
                for r, p in relayout.src.items()
            }
            target = {r: here[p] for r, p in relayout.dst.items()}
            try:
                jax.eval_shape(lambda s, target=target: layout.to_layout(s, target), source)
            except ValueError as e:
                raise UserError(f"{self.label}: {self.where}: {e}") from None
        return pairs, relayouts

    def read_relayout(
        self, relayout: "_Relayout", params: Any, shardings: Any
    ) -> dict[str, jax.Array]:
        """{dst path: array} of a subtree saved in the other layout (scanned or unscanned): read
        whole to host memory, converted (mmjax.parallel.layout), placed with `shardings`."""
        here, placed = param_paths(params), param_paths(shardings)
        item: dict = {}
        for src in relayout.src.values():
            node = item.setdefault("params", {})
            *parents, leaf = src.split("/")
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = jax.ShapeDtypeStruct(self.saved[src].shape, self.saved[src].dtype)
        restore_args = jax.tree.map(lambda a: ocp.RestoreArgs(restore_type=np.ndarray), item)
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        saved = param_paths(self.handler.restore(self.state_dir, args=args)["params"])
        source = {r: saved[p] for r, p in relayout.src.items()}
        target = {r: here[p] for r, p in relayout.dst.items()}
        converted = layout.to_layout(source, target)
        return {
            p: jax.device_put(np.asarray(converted[r], nn.meta.unbox(here[p]).dtype), placed[p])
            for r, p in relayout.dst.items()
        }

    def read_loaded(
        self,
        pairs: Mapping[str, str],
        relayouts: Sequence["_Relayout"],
        params: Any,
        shardings: Any,
    ) -> dict[str, jax.Array]:
        """{dst path: array} of everything `pairs(params)` said to load, placed with
        `shardings`."""
        restored = self.read(pairs, params, shardings)
        values = {dst: restored[src] for dst, src in pairs.items()}
        for relayout in relayouts:
            values.update(self.read_relayout(relayout, params, shardings))
        return values

    def read_params(self, params: Any) -> Any:
        """The whole saved params tree, checked against `params` (ShapeDtypeStructs with
        shardings: paths and shapes must match) and read straight onto their shardings and
        dtypes (a stack saved scanned for a model built unscanned, or the other way, is
        converted). The optimizer state and the data iterator are not read."""
        shardings = jax.tree.map(lambda a: a.sharding, params)
        return replace_leaves(params, self.read_loaded(*self.pairs(params), params, shardings))

    def read(self, pairs: Mapping[str, str], params: Any, shardings: Any) -> dict[str, jax.Array]:
        """{src path: array} of the source parameters in `pairs`, read straight onto the
        shardings and dtypes of their destinations; nothing else of the checkpoint is read."""
        if not pairs:
            return {}
        here, placed = param_paths(params), param_paths(shardings)
        item: dict = {}
        for dst, src in pairs.items():
            node = item.setdefault("params", {})
            *parents, leaf = src.split("/")
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = jax.ShapeDtypeStruct(
                here[dst].shape, here[dst].dtype, sharding=placed[dst]
            )
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(
                sharding=a.sharding, global_shape=a.shape, dtype=a.dtype
            ),
            item,
        )
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        return param_paths(self.handler.restore(self.state_dir, args=args)["params"])


def read_params(workdir: str, params: Any, step: int = -1) -> tuple[int, Any]:
    """(step, params) of `workdir`'s complete checkpoint at `step` (-1: the latest), read onto
    the shardings of `params` (ShapeDtypeStructs); the optimizer state is never read."""
    with StoredRun(workdir, step) as run:
        return run.step, run.read_params(params)


@dataclasses.dataclass(frozen=True)
class InitialParams:
    """Where a run's first parameters come from, and why: one of SOURCES."""

    source: str
    reason: str


SOURCES = ("resume", "import", "workdir", "fresh")


def initial_params(init_from: Mapping[str, Any], latest_step: int | None) -> InitialParams:
    """The one decision of where a run's parameters start: its own latest checkpoint (resume)
    > converted weights (`init_from.format` of mmjax.convert) > an earlier run's workdir
    (`init_from.format=workdir`) > a fresh initialisation from the seed."""
    fmt = (init_from or {}).get("format") or ""
    if latest_step is not None:
        how = f"resuming this workdir's checkpoint at step {latest_step}"
        if fmt:
            how += f" (init_from.format={fmt!r} applies to a run's first start only)"
        return InitialParams("resume", how)
    if fmt and fmt != WORKDIR_FORMAT:
        return InitialParams(
            "import", f"no checkpoint yet: importing {fmt} weights from {init_from.get('path')!r}"
        )
    if fmt == WORKDIR_FORMAT:
        names = ", ".join(label for label, _ in workdir_sources(init_from))
        return InitialParams(
            "workdir", f"no checkpoint yet: initialising from earlier runs ({names})"
        )
    return InitialParams("fresh", "no checkpoint yet and no init_from: initialising from the seed")


class _EarlierRun(StoredRun):
    """An `init_from` source: an earlier run's checkpoint at `source.step` and the subtrees
    its `load` copies; errors start with `label` (the source's name in the config)."""

    def __init__(self, source: Mapping[str, Any], label: str = FIRST):
        super().__init__(source["path"], int(source.get("step", -1)), label, f"{label}.path")
        self.load = dict(source.get("load") or {"": ""})
        family = source.get("family", "")
        if family and self.model != family:
            raise UserError(
                f"{label}.path {self.workdir} holds a {self.model!r} run, but {label}.family "
                f"asks for a {family!r} run to load from"
            )

    def check_vocabulary(
        self,
        pairs: Mapping[str, str],
        params: Any,
        tokenizer: Any,
        data: Mapping[str, Any] | None,
    ) -> None:
        """A UserError if a loaded parameter has a "vocab" axis and this earlier run's
        tokenizer differs from `tokenizer` in any piece."""
        here = param_paths(params)
        token_params = [
            dst
            for dst in pairs
            if is_box(here[dst]) and VOCAB_AXIS in (getattr(here[dst], "names", None) or ())
        ]
        if not token_params:
            return
        from mmjax.data import load_or_train_tokenizer  # the earlier run's own tokenizer

        theirs = load_or_train_tokenizer(self.config.data, self.workdir, write=False).pieces()
        ours = tokenizer.pieces()
        if theirs == ours:
            return
        if len(theirs) != len(ours):
            difference = f"{len(theirs)} ids there, {len(ours)} here"
        else:
            i = next(i for i, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b)
            difference = f"id {i} is {theirs[i]!r} there but {ours[i]!r} here"
        settings = _tokenizer_settings(self.config.data, data)
        raise UserError(
            f"{self.label}: {token_params[0]} (a {VOCAB_AXIS!r} axis) is loaded from "
            f"{self.workdir}, which was trained with another tokenizer ({difference}); "
            f"{settings}"
        )


def _tokenizer_settings(theirs: Mapping[str, Any], ours: Mapping[str, Any] | None) -> str:
    """The data settings that differ between two runs' tokenizers, for an error line."""

    def get(data: Mapping[str, Any], key: str) -> Any:
        if key == "sequence.kind":
            return (data.get("sequence") or {}).get("kind")
        return data.get(key)

    keys = (*TOKENIZER_KEYS, "sequence.kind")
    if ours is None:
        return "its data settings: " + ", ".join(f"{k}={get(theirs, k)!r}" for k in keys)
    differ = [
        f"data.{k} {get(theirs, k)!r} there, {get(ours, k)!r} here"
        for k in keys
        if get(theirs, k) != get(ours, k)
    ]
    if not differ:
        return "with the same data settings: was its tokenizer.model replaced?"
    return "; ".join(differ)


def _pick_step(complete: Sequence[int], directory: str, step: int, label: str = FIRST) -> int:
    """`step`, or the latest complete checkpoint for -1."""
    if not complete:
        raise UserError(f"{label}: no complete checkpoint in {directory}")
    if step == -1:
        return max(complete)
    if step not in complete:
        raise UserError(
            f"{label}.step {step} has no complete checkpoint in {directory}; "
            f"available: {sorted(complete)}"
        )
    return step


def _under(prefix: str, paths: Mapping[str, Any]) -> dict[str, str]:
    """{relative path: path} of the paths at or under `prefix` ("" is the root)."""
    prefix = prefix.strip("/")
    if not prefix:
        return {p: p for p in paths}
    out = {p[len(prefix) + 1 :]: p for p in paths if p.startswith(prefix + "/")}
    if prefix in paths:
        out[""] = prefix
    return out


@dataclasses.dataclass(frozen=True)
class _Relayout:
    """A `load` entry whose two sides hold the same stacks, scanned on one side and unscanned
    on the other: {relative path: path} of its destination and of its source."""

    dst: dict[str, str]
    src: dict[str, str]


def _pair(
    load: Mapping[str, str],
    here: Mapping[str, Any],
    saved: Mapping[str, Any],
    where: str,
    label: str = FIRST,
) -> tuple[dict[str, str], list[_Relayout]]:
    """{dst path: src path} for every parameter `load` copies as it is, and the entries that
    convert between a scanned and an unscanned layout."""
    pairs: dict[str, str] = {}
    relayouts: list[_Relayout] = []
    problems = []
    for dst_prefix, src_prefix in load.items():
        dst, src = _under(dst_prefix, here), _under(src_prefix, saved)
        if not dst:
            raise UserError(
                f"{label}.load: {dst_prefix!r} names no parameter of this model; its top-level "
                f"names are {top_level(here)}"
            )
        if not src:
            raise UserError(
                f"{label}.load: {src_prefix!r} is not in {where}; its top-level names are "
                f"{top_level(saved)}"
            )
        if layout.differs_by_layout(src, dst):
            relayouts.append(_Relayout(dst, src))
            continue
        problems += [
            f"{src[r]} is in {where} but {_join(dst_prefix, r)} is not here"
            for r in sorted(src.keys() - dst.keys())
        ]
        problems += [
            f"{dst[r]} is here but {_join(src_prefix, r)} is not in {where}"
            for r in sorted(dst.keys() - src.keys())
        ]
        for r in sorted(dst.keys() & src.keys()):
            if dst[r] in pairs:
                raise UserError(f"{label}.load: {dst[r]} is loaded by two entries of {load}")
            pairs[dst[r]] = src[r]
    _raise(problems, label)
    return pairs, relayouts


def _check_shapes(
    pairs: Mapping[str, str], params: Any, saved: Mapping[str, Any], where: str, label: str
) -> None:
    """One UserError line naming the loaded parameters whose saved shape is not theirs."""
    here = param_paths(params)
    problems = []
    for dst, src in pairs.items():
        want, got = tuple(nn.meta.unbox(here[dst]).shape), tuple(saved[src].shape)
        if want != got:
            name = dst if dst == src else f"{src} (for {dst})"
            problems.append(f"{name} is {got} in {where} but {want} here")
    _raise(problems, label)


def _raise(problems: Sequence[str], label: str) -> None:
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise UserError(f"{label}: " + "; ".join(problems[:MAX_LISTED]) + more)


def _join(prefix: str, relative: str) -> str:
    return "/".join(p for p in (prefix.strip("/"), relative) if p)
