"""Model families as declared specs: one registered `Family` per `config.model.name`.

A family names what used to be an unwritten agreement between config keys: its model class
(built with the rest of `config.model`), the objectives it trains with (`objective.name`),
the `data.sequence.kind` its batches are laid out by (data/kinds.py; "" for image-text
pairs), the evaluators it supports (`evals.*.type`), its sampler for `python -m mmjax.sample`
(sampling/sampler.py) and the batch keys its model and objective read, with their ranks and
dtypes. `train/build.py` resolves a config's family and checks the config against it; the
trainer checks the first batch against it, so a pipeline that lays out other keys fails with
one line naming the key. Nothing outside a family's own files branches on its name.

Adding a family (docs/architecture.md): a model file, an objective (or a reused one), a
spec registered here (`register`), an experiment file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from mmjax import evals, models, objectives
from mmjax.data import kinds
from mmjax.errors import UserError
from mmjax.sampling import bagel as bagel_sampling
from mmjax.sampling import blip3o as blip3o_sampling
from mmjax.sampling import transfusion as transfusion_sampling
from mmjax.sampling import unifluid as unifluid_sampling
from mmjax.sampling.sampler import Sampler

DTYPE_KINDS = {"float": np.floating, "int": np.integer}


@dataclasses.dataclass(frozen=True)
class BatchKey:
    """One batch entry a family reads: its allowed ranks (batch axis included) and dtype kind
    ("float" or "int"); `optional` keys may be absent (a mode that does not use them)."""

    ranks: tuple[int, ...]
    dtype: str
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family's declared spec (module docstring)."""

    name: str  # config.model.name
    model: Callable[..., nn.Module]
    objectives: tuple[str, ...]  # the objective.name values it trains with
    batch: Mapping[str, BatchKey]
    sequence: str = ""  # data.sequence.kind ("" : image-text pairs)
    evaluators: tuple[str, ...] = ()  # the evals.*.type values it supports
    sampler: Sampler | None = None


FAMILIES: dict[str, Family] = {}


def register(family: Family, **losses: Callable[..., objectives.LossFn]) -> Family:
    """Registers `family` (replacing one of the same name) and makes its model buildable by
    name; `losses` registers objectives of its own by name (`objectives.OBJECTIVES`)."""
    objectives.OBJECTIVES.update(losses)
    unknown = [
        *(f"objective {o!r}" for o in family.objectives if o not in objectives.OBJECTIVES),
        *(f"evaluator {e!r}" for e in family.evaluators if e not in evals.EVALUATORS),
    ]
    if family.sequence and family.sequence not in kinds.SEQUENCE_KINDS:
        unknown.append(f"sequence kind {family.sequence!r}")
    if unknown:
        raise ValueError(f"family {family.name!r}: unknown {', '.join(unknown)}")
    FAMILIES[family.name] = family
    models.MODELS[family.name] = family.model
    return family


def get(name: str) -> Family:
    """The family registered as `name` (config.model.name); UserError naming the known ones."""
    if name not in FAMILIES:
        raise UserError(f"unknown model.name {name!r}; the families are {sorted(FAMILIES)}")
    return FAMILIES[name]


def check_config(family: Family, config: Any) -> None:
    """One UserError line when the config's objective, sequence kind or evals do not belong
    to `family`."""
    where = f"model.name {family.name!r}"
    objective = config.objective.name
    if objective not in family.objectives:
        raise UserError(
            f"objective.name {objective!r} does not train {where}; it trains with "
            f"{list(family.objectives)}"
        )
    kind = (config.data.get("sequence") or {}).get("kind") or ""
    if kind != family.sequence:
        want = repr(family.sequence) if family.sequence else "'' (image-text pairs)"
        raise UserError(f"data.sequence.kind {kind!r} does not feed {where}; it reads {want}")
    for name, cfg in config.get("evals", {}).items():
        if cfg.get("type") not in family.evaluators:
            raise UserError(
                f"evals.{name}.type {cfg.get('type')!r} does not evaluate {where}; its "
                f"evaluators are {list(family.evaluators)}"
            )


def check_batch(family: Family, batch: Mapping[str, Any]) -> None:
    """One UserError line naming the first key of `batch` that is missing or whose rank or
    dtype is not what `family` reads (arrays or shapes, batch axis first)."""
    for key, spec in family.batch.items():
        if key not in batch:
            if spec.optional:
                continue
            raise UserError(
                f"the batch has no {key!r}, which model.name {family.name!r} reads; it has "
                f"{sorted(batch)}"
            )
        value = batch[key]
        shape, dtype = np.shape(value), np.dtype(getattr(value, "dtype", np.asarray(value).dtype))
        if len(shape) not in spec.ranks or not np.issubdtype(dtype, DTYPE_KINDS[spec.dtype]):
            ranks = " or ".join(map(str, spec.ranks))
            raise UserError(
                f"batch[{key!r}] is {dtype.name} of shape {tuple(shape)}, but model.name "
                f"{family.name!r} reads a {spec.dtype} array of rank {ranks}"
            )


IMAGE = BatchKey((4,), "float")  # [B, H, W, C] in [-1, 1]
TEXT = BatchKey((2,), "int")  # [B, L] token ids
PAIRS = dict(image=IMAGE, text=TEXT)
CONTRASTIVE_EVALS = ("zero_shot", "retrieval", "linear_probe")
INT_TOKENS = BatchKey((2,), "int")
FLOAT_TOKENS = BatchKey((2,), "float")
SEQUENCE = dict(tokens=INT_TOKENS, positions=INT_TOKENS, segment_ids=INT_TOKENS)
# A VLM row (data/sequences.py): prefix mode has visual_positions [B, V] and images
# [B, H, W, C]; flamingo mode has media_ids [B, L] and images [B, M, H, W, C]
VLM_BATCH = dict(
    **SEQUENCE,
    targets=INT_TOKENS,
    loss_mask=FLOAT_TOKENS,
    images=BatchKey((4, 5), "float"),
    visual_positions=BatchKey((2,), "int", optional=True),
    media_ids=BatchKey((2,), "int", optional=True),
)
# A Qwen2-VL row (data/qwen_tasks.py): M-RoPE positions [B, 3, L]; the row's images packed
# into patches [B, N, D] with per-patch layout, merged tokens at visual_positions [B, N / 4]
QWEN_VL_BATCH = dict(
    tokens=INT_TOKENS,
    segment_ids=INT_TOKENS,
    positions=BatchKey((3,), "int"),
    targets=INT_TOKENS,
    loss_mask=FLOAT_TOKENS,
    patches=BatchKey((3,), "float"),
    patch_positions=BatchKey((3,), "int"),
    patch_segment_ids=INT_TOKENS,
    patch_window_ids=BatchKey((2,), "int", optional=True),
    patch_order=BatchKey((2,), "int", optional=True),
    visual_positions=INT_TOKENS,
)
# A Transfusion row: images [B, M, H, W, C] at image_positions [B, M, P]
TRANSFUSION_BATCH = dict(
    **SEQUENCE,
    span_ids=INT_TOKENS,
    lm_mask=FLOAT_TOKENS,
    images=BatchKey((5,), "float"),
    image_positions=BatchKey((3,), "int"),
    image_valid=BatchKey((2,), "float"),
    image_first=BatchKey((2,), "float", optional=True),
)

# A BAGEL row (data/bagel_tasks.py): latents to generate or condition on at image_positions,
# ViT inputs at vit_positions
BAGEL_BATCH = dict(
    **SEQUENCE,
    span_ids=INT_TOKENS,
    lm_mask=FLOAT_TOKENS,
    images=BatchKey((5,), "float"),
    image_positions=BatchKey((3,), "int"),
    image_valid=BatchKey((2,), "float"),
    image_noised=BatchKey((2,), "float"),
    vit_images=BatchKey((5,), "float"),
    vit_positions=BatchKey((3,), "int"),
)

# A BLIP3-o row (data/blip3o_rows.py): the prompt with query slots, the target image
# (joint training: also a VLM row of the backbone, its keys prefixed und_)
BLIP3O_BATCH = dict(
    **SEQUENCE,
    query_positions=INT_TOKENS,
    images=BatchKey((5,), "float"),
    **{
        f"und_{k}": dataclasses.replace(v, optional=True)
        for k, v in VLM_BATCH.items()
        if k != "media_ids"
    },
)

for _family in (
    Family("clip", models.clip.Model, ("clip",), PAIRS, evaluators=CONTRASTIVE_EVALS),
    Family("siglip", models.siglip.Model, ("siglip",), PAIRS, evaluators=CONTRASTIVE_EVALS),
    Family("blip", models.blip.Blip, ("blip",), PAIRS),
    Family("blip2", models.blip.Blip2, ("blip",), PAIRS),
    Family("vae", models.vae.Model, ("vae",), dict(image=IMAGE)),
    Family("clip_decoder", models.clip_decoder.Model, ("clip_decoder",), dict(image=IMAGE)),
    Family("vlm", models.vlm.Model, ("vlm",), VLM_BATCH, "vlm", ("vlm",)),
    Family("lm", models.lm.Model, ("vlm",), VLM_BATCH, "vlm", ("vlm",)),
    Family("qwen_vl", models.qwen_vl.Model, ("vlm",), QWEN_VL_BATCH, "qwen_vl", ("qwen_vl",)),
    Family(
        "transfusion",
        models.transfusion.Model,
        ("transfusion",),
        TRANSFUSION_BATCH,
        "transfusion",
        ("transfusion",),
        transfusion_sampling.SAMPLER,
    ),
    Family(
        "unifluid",
        models.unifluid.Model,
        ("unifluid",),
        dict(
            **TRANSFUSION_BATCH,
            query_positions=BatchKey((3,), "int"),
            feature_positions=BatchKey((3,), "int"),
            understand_images=BatchKey((5,), "float"),
        ),
        "unifluid",
        ("unifluid",),
        unifluid_sampling.SAMPLER,
    ),
    Family(
        "blip3o",
        models.blip3o.Model,
        ("blip3o",),
        BLIP3O_BATCH,
        "blip3o",
        ("blip3o",),
        blip3o_sampling.SAMPLER,
    ),
    Family(
        "bagel",
        models.bagel.Model,
        ("bagel",),
        BAGEL_BATCH,
        "bagel",
        ("bagel",),
        bagel_sampling.SAMPLER,
    ),
):
    register(_family)
