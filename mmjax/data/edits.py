"""Seeded image-editing pairs from the synthetic shapes scenes (BAGEL-style editing task).

An edit turns a source scene (a ShapesSource record) into a target scene plus an instruction:

- colour: one object gets another colour ("make the red circle blue");
- shape: one object gets another shape ("make the red circle a square");
- move: in a two-object scene, both objects are mirrored across the image centre along the
  caption's relation axis, so the relation flips ("move the red circle right of the blue square").

Target scenes never hold two identical (colour, shape) objects, and target captions keep the
source caption grammar, so `mmjax.evals.generation.scene_spec` parses them and the shapes judge
can score an edited image against them. Pure numpy; no jax.
"""

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmjax.data.sources import (
    SHAPE_COLOURS,
    SHAPE_KINDS,
    SHAPE_RELATIONS,
    SHAPES_IMAGE_SIZE,
    Source,
    _draw_shapes,
)

EDIT_KINDS = ("colour", "shape", "move")
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclasses.dataclass(frozen=True)
class Edit:
    """One edit: its kind, the instruction, and the target scene's objects and caption."""

    kind: str
    instruction: str
    objects: list
    caption: str


def _name(obj: Mapping[str, Any]) -> str:
    return f"{obj['colour']} {obj['shape']}"


def _caption(objects: list[dict], relation: str | None) -> str:
    """The shapes caption grammar: "a red circle" or "a red circle left of a blue square"."""
    names = [f"a {_name(o)}" for o in objects]
    return names[0] if relation is None else f"{names[0]} {relation} {names[1]}"


def _relation(objects: list[dict], caption: str) -> str | None:
    """The relation of object 0 to object 1 in `caption` (None for a one-object scene)."""
    if len(objects) == 1 and caption == _caption(objects, None):
        return None
    for relation in SHAPE_RELATIONS:
        if len(objects) == 2 and caption == _caption(objects, relation):
            return relation
    raise ValueError(f"caption {caption!r} does not describe the objects {objects}")


def _mirrored(objects: list[dict], relation: str) -> list[dict]:
    """Both objects mirrored across the image centre along the relation's axis (sizes kept)."""
    new, n = copy.deepcopy(objects), SHAPES_IMAGE_SIZE
    for obj in new:
        x0, y0, x1, y1 = obj["bbox"]
        flip_x = relation in ("left of", "right of")
        obj["bbox"] = [n - x1, y0, n - x0, y1] if flip_x else [x0, n - y1, x1, n - y0]
    return new


def _options(objects: list[dict], relation: str | None, kind: str) -> list[list[Edit]]:
    """Every edit of `kind` of the scene, grouped by edited object (one group for a move)."""
    if kind == "move":
        if relation is None:
            return []
        new_rel, (a, b) = _OPPOSITE[relation], objects
        instruction = f"move the {_name(a)} {new_rel} the {_name(b)}"
        target = _mirrored(objects, relation)
        return [[Edit("move", instruction, target, _caption(target, new_rel))]]
    key, values = {"colour": ("colour", SHAPE_COLOURS), "shape": ("shape", SHAPE_KINDS)}[kind]
    groups = []
    for i, obj in enumerate(objects):
        taken = {_name(o) for j, o in enumerate(objects) if j != i}
        group = []
        for value in values:
            target = copy.deepcopy(objects)
            target[i][key] = value
            if value == obj[key] or _name(target[i]) in taken:
                continue
            words = value if kind == "colour" else f"a {value}"
            instruction = f"make the {_name(obj)} {words}"
            group.append(Edit(kind, instruction, target, _caption(target, relation)))
        groups.append(group)
    return groups


def sample_edit(
    objects: list[dict],
    caption: str,
    rng: np.random.Generator,
    kinds: Sequence[str] = EDIT_KINDS,
) -> Edit:
    """A random edit of the scene: a kind uniformly among the allowed ones that apply, then
    (colour / shape) an object uniformly and a new value uniformly among the valid ones."""
    unknown = [k for k in kinds if k not in EDIT_KINDS]
    if not kinds or unknown:
        raise ValueError(f"edit kinds must be a non-empty subset of {EDIT_KINDS}, got {kinds}")
    relation = _relation(objects, caption)
    options = {k: _options(objects, relation, k) for k in dict.fromkeys(kinds)}
    usable = [k for k, groups in options.items() if any(groups)]
    if not usable:
        raise ValueError(f"no edit of kinds {tuple(kinds)} applies to the scene {caption!r}")
    groups = [g for g in options[usable[rng.integers(len(usable))]] if g]
    group = groups[rng.integers(len(groups))]
    return group[rng.integers(len(group))]


def edit_pair(record: Mapping[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, Edit]:
    """(target image uint8 [32, 32, 3], edit) for a ShapesSource record; the record's `image`
    is the source image of the pair."""
    edit = sample_edit(record["shapes"], record["caption"], rng)
    return _draw_shapes(edit.objects), edit


def edit_texts(source: Source, max_records: int) -> list[str]:
    """Every possible instruction, and its target caption, of up to `max_records` records
    evenly spaced over `source`: the editing words a tokenizer must know."""
    step = max(1, math.ceil(len(source) / max_records))
    texts = []
    for index in range(0, len(source), step):
        record = source[index]
        relation = _relation(record["shapes"], record["caption"])
        for kind in EDIT_KINDS:
            for group in _options(record["shapes"], relation, kind):
                texts += [t for e in group for t in (e.instruction, e.caption)]
    return texts


def heldout_edits(source: Source, num: int, seed: int = 0) -> list[tuple[dict, np.ndarray, Edit]]:
    """(record, target image, edit) for the first `num` records, the edit of record i drawn by
    `default_rng([seed, i])`: a fixed, deterministic eval set of edit pairs."""
    if not 0 < num <= len(source):
        raise ValueError(f"heldout_edits needs 1..{len(source)} records, got {num}")
    out = []
    for index in range(num):
        record = source[index]
        out.append((record, *edit_pair(record, np.random.default_rng([seed, index]))))
    return out
