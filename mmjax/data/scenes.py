"""Seeded synthetic sources for Qwen2-VL-style experiments: variable-size scenes and videos.

`ScenesSource` draws `ShapesSource`-like scenes on images whose size and aspect ratio vary from
record to record (native dynamic resolution); `MovingShapesSource` draws short videos of one
shape moving in a constant direction past a static distractor (motion questions). Both reuse
the shapes source's colours, kinds, relations and drawing, and record i depends only on
(seed, split, i), so access is random and deterministic.
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from mmjax.data.sources import (
    _SHAPES_SPLIT_IDS,
    BUILDERS,
    SHAPE_CLASS_NAMES,
    SHAPE_COLOURS,
    SHAPE_KINDS,
    SHAPE_RELATIONS,
    Record,
    Source,
    _check_split,
    _draw_shapes,
)
from mmjax.errors import UserError

# (height, width) of ScenesSource images, aspect ratios 1:2 to 2:1; most are multiples of 28
# (whole 2x2 merges of 14-px patches), 100 is not, so resizing / padding paths get exercised.
SCENE_SIZES: tuple[tuple[int, int], ...] = (
    (56, 56),
    (84, 84),
    (112, 112),
    (140, 140),
    (168, 168),
    (224, 224),
    (56, 112),
    (84, 168),
    (112, 224),
    (112, 56),
    (168, 84),
    (224, 112),
    (84, 112),
    (112, 84),
    (112, 168),
    (168, 112),
    (140, 224),
    (224, 140),
    (100, 100),
    (100, 140),
)
# An object's side as a fraction of the image's shorter side.
OBJECT_FRACTION = (0.15, 0.35)
# Pixels between two objects (one 14-px patch), so they never share a patch along that axis.
OBJECT_GAP = 14
_MIN_OBJECT = 4  # px: smaller shapes lose their outline.

DIRECTIONS = ("left", "right", "up", "down")
VIDEO_SIZE = (56, 84)  # (height, width)
VIDEO_FRAMES = 4
# px per frame: at least 8 so the motion shows at 14-px patch resolution.
VIDEO_MIN_STEP = 8
VIDEO_MAX_STEP = 16
_SCENES_SEED = 0
_SCENE_STREAM, _VIDEO_STREAM = 1, 2  # Separate random streams from ShapesSource's.


def _object_sizes(short: int, path: int = 0) -> tuple[int, int]:
    """(min, max) object side for an image whose shorter side is `short`: within
    OBJECT_FRACTION of it, two fit side by side with OBJECT_GAP between, and one still fits
    with `path` extra pixels (a video's travel) on the shorter axis. max < min: none fits."""
    lo = max(_MIN_OBJECT, math.ceil(OBJECT_FRACTION[0] * short))
    hi = min(int(OBJECT_FRACTION[1] * short), (short - OBJECT_GAP) // 2, short - path)
    return lo, hi


def _distinct_classes(rng: np.random.Generator, num_objects: int) -> list[tuple[str, str]]:
    """(colour, shape) of each object; two objects differ in both colour and shape, so either
    word alone names one."""
    colours = rng.choice(len(SHAPE_COLOURS), size=num_objects, replace=False)
    kinds = rng.choice(len(SHAPE_KINDS), size=num_objects, replace=False)
    names = list(SHAPE_COLOURS)
    return [(names[c], SHAPE_KINDS[k]) for c, k in zip(colours, kinds, strict=True)]


def _apart(rng: np.random.Generator, length: int, low: int, high: int) -> tuple[int, int]:
    """Starts of a `low`-px object and a `high`-px one after it on a `length`-px axis, at least
    OBJECT_GAP apart; the free space is split uniformly (symmetric in the two objects)."""
    slack = length - low - OBJECT_GAP - high
    a, b = sorted(int(v) for v in rng.integers(0, slack + 1, size=2))
    return a, b + low + OBJECT_GAP


def _object(colour: str, shape: str, x0: int, y0: int, w: int, h: int) -> dict[str, Any]:
    return {"shape": shape, "colour": colour, "bbox": [x0, y0, x0 + w, y0 + h]}


def _check_sizes(sizes: Sequence[tuple[int, int]], path: int, what: str) -> None:
    if not sizes:
        raise UserError(f"{what}: no image sizes given")
    for size in sizes:
        height, width = size
        lo, hi = _object_sizes(min(height, width), path)
        if lo > hi:
            raise UserError(
                f"{what}: (height, width) {tuple(size)} is too small for its shapes "
                f"(objects of {lo}+ px, {OBJECT_GAP} px apart"
                + (f", moving {path} px)" if path else ")")
            )


def _check_num_records(source: str, split: str, num_records: int) -> None:
    if num_records < 1:
        raise UserError(
            f"data.{source}_num_{split} must be positive (set it for data.source '{source}'), "
            f"got {num_records}"
        )


# ----------------------------------------------------------------------------------- scenes


def _scene(
    seed: int, split_id: int, index: int, sizes: Sequence[tuple[int, int]]
) -> tuple[tuple[int, int], list[dict[str, Any]], str]:
    """Samples a scene's (height, width), objects and caption from (seed, split, index).

    Two-object scenes order the objects along the relation's axis with OBJECT_GAP between, so
    the caption's relation holds for the bounding boxes without ambiguity.
    """
    rng = np.random.default_rng([seed, split_id, index, _SCENE_STREAM])
    height, width = (int(v) for v in sizes[int(rng.integers(len(sizes)))])
    lo, hi = _object_sizes(min(height, width))
    num_objects = 1 if rng.random() < 0.25 else 2
    classes = _distinct_classes(rng, num_objects)
    sides = [int(v) for v in rng.integers(lo, hi + 1, size=num_objects)]
    if num_objects == 1:
        (colour, shape), (w,) = classes[0], sides
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - w + 1))
        objects = [_object(colour, shape, x0, y0, w, w)]
        return (height, width), objects, f"a {colour} {shape}"
    relation = SHAPE_RELATIONS[int(rng.integers(len(SHAPE_RELATIONS)))]
    horizontal = relation in ("left of", "right of")
    along, across = (width, height) if horizontal else (height, width)
    first_low = relation in ("left of", "above")  # Object 0 is `relation` object 1.
    low, high = (0, 1) if first_low else (1, 0)
    starts = dict(zip((low, high), _apart(rng, along, sides[low], sides[high]), strict=True))
    objects = []
    for k, ((colour, shape), w) in enumerate(zip(classes, sides, strict=True)):
        a, b = starts[k], int(rng.integers(0, across - w + 1))
        x0, y0 = (a, b) if horizontal else (b, a)
        objects.append(_object(colour, shape, x0, y0, w, w))
    names = [f"a {o['colour']} {o['shape']}" for o in objects]
    return (height, width), objects, f"{names[0]} {relation} {names[1]}"


class ScenesSource(Source):
    """Scenes of one or two coloured shapes on images of varying size and aspect ratio.

    Each record's (height, width) is one of `sizes` (default SCENE_SIZES), for native dynamic
    resolution: records are `ShapesSource`'s (`image` uint8 [H, W, 3], `caption`, `label` = the
    index in SHAPE_CLASS_NAMES of the first object, `index`, `shapes` = [{shape, colour, bbox
    [x0, y0, x1, y1] px, end exclusive}]), with objects 15-35% of the shorter side, never
    overlapping, and two objects differing in colour and shape.
    """

    def __init__(
        self,
        split: str,
        num_records: int,
        seed: int = _SCENES_SEED,
        sizes: Sequence[tuple[int, int]] = SCENE_SIZES,
    ) -> None:
        _check_split("scenes", split, tuple(_SHAPES_SPLIT_IDS))
        _check_num_records("scenes", split, num_records)
        _check_sizes(sizes, 0, "ScenesSource")
        self.split, self.num_records, self.seed = split, num_records, seed
        self.sizes = tuple((int(h), int(w)) for h, w in sizes)

    def __len__(self) -> int:
        return self.num_records

    def _scene(self, index: int) -> tuple[tuple[int, int], list[dict[str, Any]], str]:
        return _scene(self.seed, _SHAPES_SPLIT_IDS[self.split], self._check(index), self.sizes)

    def __getitem__(self, index: int) -> Record:
        size, objects, caption = self._scene(index)
        label = SHAPE_CLASS_NAMES.index(f"{objects[0]['colour']} {objects[0]['shape']}")
        return {
            "image": _draw_shapes(objects, size),
            "caption": caption,
            "label": label,
            "index": int(index),
            "shapes": objects,
        }

    def caption(self, index: int) -> str:
        return self._scene(index)[2]

    def __repr__(self) -> str:
        return f"ScenesSource(split={self.split!r}, len={len(self)}, seed={self.seed})"


# ----------------------------------------------------------------------------------- videos


def _video(
    seed: int, split_id: int, index: int, frames: int, size: tuple[int, int]
) -> tuple[str, list[list[dict[str, Any]]], str]:
    """Samples a video's direction, per-frame objects (mover first) and caption.

    The mover travels a constant step (VIDEO_MIN_STEP..VIDEO_MAX_STEP px) per frame from a
    start that keeps its whole path inside the frame; the distractor sits beside the path,
    OBJECT_GAP away across the motion axis, so it never overlaps any of the mover's boxes.
    """
    rng = np.random.default_rng([seed, split_id, index, _VIDEO_STREAM])
    height, width = size
    travel = VIDEO_MIN_STEP * (frames - 1)
    lo, hi = _object_sizes(min(height, width), travel)
    direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    mover, distractor = _distinct_classes(rng, 2)
    w, wd = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    horizontal = direction in ("left", "right")
    along, across = (width, height) if horizontal else (height, width)
    max_step = min(VIDEO_MAX_STEP, (along - w) // (frames - 1))
    step = int(rng.integers(VIDEO_MIN_STEP, max_step + 1))
    start = int(rng.integers(0, along - w - step * (frames - 1) + 1))
    if rng.random() < 0.5:  # Which side of the path the distractor sits on.
        mover_across, distractor_across = _apart(rng, across, w, wd)
    else:
        distractor_across, mover_across = _apart(rng, across, wd, w)
    distractor_along = int(rng.integers(0, along - wd + 1))
    forward = direction in ("right", "down")

    def place(colour_shape: tuple[str, str], a: int, b: int, side: int) -> dict[str, Any]:
        x0, y0 = (a, b) if horizontal else (b, a)
        return _object(*colour_shape, x0, y0, side, side)

    static = place(distractor, distractor_along, distractor_across, wd)
    per_frame = []
    for t in range(frames):
        a = start + step * (t if forward else frames - 1 - t)
        per_frame.append(
            [place(mover, a, mover_across, w), dict(static, bbox=list(static["bbox"]))]
        )
    return direction, per_frame, f"a {mover[0]} {mover[1]} moves {direction}"


class MovingShapesSource(Source):
    """Short videos of a coloured shape moving left, right, up or down past a static one.

    Records: `video` uint8 [T, H, W, 3] (T = `frames`), `image` (its first frame, for code that
    reads images), `caption` ("a red circle moves left"), `label` (index in DIRECTIONS),
    `index`, `direction`, `question` ("which way does the red circle move?"), `answer` (the
    direction) and `shapes`: per frame, that frame's objects ({shape, colour, bbox [x0, y0, x1,
    y1] px, end exclusive}), the mover first and the static distractor (different colour and
    shape) second.
    """

    def __init__(
        self,
        split: str,
        num_records: int,
        seed: int = _SCENES_SEED,
        frames: int = VIDEO_FRAMES,
        size: tuple[int, int] = VIDEO_SIZE,
    ) -> None:
        _check_split("moving_shapes", split, tuple(_SHAPES_SPLIT_IDS))
        _check_num_records("moving_shapes", split, num_records)
        if frames < 2:
            raise UserError(f"data.video_frames must be at least 2 to show motion, got {frames}")
        _check_sizes([size], VIDEO_MIN_STEP * (frames - 1), f"MovingShapesSource ({frames} frames)")
        self.split, self.num_records, self.seed = split, num_records, seed
        self.frames, self.size = frames, (int(size[0]), int(size[1]))

    def __len__(self) -> int:
        return self.num_records

    def _video(self, index: int) -> tuple[str, list[list[dict[str, Any]]], str]:
        split_id = _SHAPES_SPLIT_IDS[self.split]
        return _video(self.seed, split_id, self._check(index), self.frames, self.size)

    def __getitem__(self, index: int) -> Record:
        direction, per_frame, caption = self._video(index)
        video = np.stack([_draw_shapes(objects, self.size) for objects in per_frame])
        mover = per_frame[0][0]
        return {
            "video": video,
            "image": video[0],
            "caption": caption,
            "label": DIRECTIONS.index(direction),
            "index": int(index),
            "direction": direction,
            "question": f"which way does the {mover['colour']} {mover['shape']} move?",
            "answer": direction,
            "shapes": per_frame,
        }

    def caption(self, index: int) -> str:
        return self._video(index)[2]

    def __repr__(self) -> str:
        return (
            f"MovingShapesSource(split={self.split!r}, len={len(self)}, seed={self.seed}, "
            f"frames={self.frames}, size={self.size})"
        )


def _build_scenes(data_cfg: ConfigDict, split: str) -> ScenesSource:
    _check_split("scenes", split, tuple(_SHAPES_SPLIT_IDS))
    return ScenesSource(split, int(data_cfg.get(f"scenes_num_{split}", 0)))


def _build_moving_shapes(data_cfg: ConfigDict, split: str) -> MovingShapesSource:
    _check_split("moving_shapes", split, tuple(_SHAPES_SPLIT_IDS))
    num_records = int(data_cfg.get(f"moving_shapes_num_{split}", 0))
    return MovingShapesSource(split, num_records, frames=int(data_cfg.get("video_frames", 4)))


BUILDERS.update(scenes=_build_scenes, moving_shapes=_build_moving_shapes)
