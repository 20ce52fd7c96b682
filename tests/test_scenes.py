"""ScenesSource (variable-size shape scenes) and MovingShapesSource (short videos)."""

import collections
import re

import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmjax.data.scenes import (
    DIRECTIONS,
    OBJECT_FRACTION,
    SCENE_SIZES,
    VIDEO_FRAMES,
    VIDEO_MIN_STEP,
    VIDEO_SIZE,
    MovingShapesSource,
    ScenesSource,
)
from mmjax.data.sources import (
    SHAPE_CLASS_NAMES,
    SHAPE_COLOURS,
    SHAPE_KINDS,
    SHAPE_RELATIONS,
    build_source,
)
from mmjax.errors import UserError

N = 400
SCENES = ScenesSource("train", N)
VIDEOS = MovingShapesSource("train", N)
SCENE_CAPTION = re.compile(r"a (\w+) (\w+)(?: (left of|right of|above|below) a (\w+) (\w+))?")
VIDEO_CAPTION = re.compile(r"a (\w+) (\w+) moves (left|right|up|down)")


def centre(bbox: list[int]) -> tuple[float, float]:
    x0, y0, x1, y1 = bbox
    return (x0 + x1) / 2, (y0 + y1) / 2


def disjoint(a: list[int], b: list[int]) -> bool:
    return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def check_drawn(image: np.ndarray, objects: list[dict]) -> None:
    """Boxes inside the image, centre pixels of the object's colour, black outside every box."""
    height, width, _ = image.shape
    outside = np.ones((height, width), bool)
    for obj in objects:
        x0, y0, x1, y1 = obj["bbox"]
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (obj, image.shape)
        assert obj["shape"] in SHAPE_KINDS
        pixel = image[(y0 + y1) // 2, (x0 + x1 - 1) // 2]
        assert tuple(pixel) == SHAPE_COLOURS[obj["colour"]], obj
        outside[y0:y1, x0:x1] = False
    assert not image[outside].any()


# ----------------------------------------------------------------------------------- scenes


def test_scene_records_are_deterministic_and_splits_differ():
    other = ScenesSource("train", N)
    for i in (0, 17, N - 1):
        a, b = SCENES[i], other[i]
        np.testing.assert_array_equal(a["image"], b["image"])
        assert (a["caption"], a["shapes"], a["label"]) == (b["caption"], b["shapes"], b["label"])
        assert a["index"] == i
    test = ScenesSource("test", N)
    assert [SCENES.caption(i) for i in range(50)] != [test.caption(i) for i in range(50)]
    reseeded = ScenesSource("train", N, seed=1)
    assert [SCENES.caption(i) for i in range(50)] != [reseeded.caption(i) for i in range(50)]


def test_scene_sizes_vary_in_size_and_aspect_ratio():
    sizes = {SCENES[i]["image"].shape[:2] for i in range(100)}
    assert len(sizes) >= 8
    ratios = {h / w for h, w in sizes}
    assert any(r > 1 for r in ratios) and any(r < 1 for r in ratios) and 1.0 in ratios
    assert sizes <= set(SCENE_SIZES)
    assert all(0.5 <= h / w <= 2 for h, w in SCENE_SIZES)
    assert any(h % 28 or w % 28 for h, w in SCENE_SIZES)
    assert sum(h % 28 == 0 and w % 28 == 0 for h, w in SCENE_SIZES) > len(SCENE_SIZES) / 2


@settings(max_examples=150, deadline=None)
@given(st.integers(0, N - 1))
def test_scene_boxes_colours_and_relations_agree(i):
    record = SCENES[i]
    image, objects = record["image"], record["shapes"]
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    check_drawn(image, objects)
    short = min(image.shape[:2])
    for obj in objects:
        x0, y0, x1, y1 = obj["bbox"]
        assert x1 - x0 == y1 - y0
        assert OBJECT_FRACTION[0] * short <= x1 - x0 <= OBJECT_FRACTION[1] * short
    match = SCENE_CAPTION.fullmatch(record["caption"])
    assert match, record["caption"]
    assert record["caption"] == SCENES.caption(i)
    words = [w for w in match.groups() if w is not None]
    named = [(words[0], words[1])] + ([(words[3], words[4])] if len(words) > 2 else [])
    assert named == [(o["colour"], o["shape"]) for o in objects]
    assert record["label"] == SHAPE_CLASS_NAMES.index(" ".join(named[0]))
    if len(objects) == 2:
        a, b = (o["bbox"] for o in objects)
        assert disjoint(a, b)
        assert objects[0]["colour"] != objects[1]["colour"]
        assert objects[0]["shape"] != objects[1]["shape"]
        holds = (a[2] < b[0], b[2] < a[0], a[3] < b[1], b[3] < a[1])  # strictly apart
        assert dict(zip(SHAPE_RELATIONS, holds, strict=True))[match.group(3)], record


def test_scenes_have_one_and_two_objects_and_every_relation():
    counts = collections.Counter(len(SCENES[i]["shapes"]) for i in range(200))
    assert counts[1] > 20 and counts[2] > 100
    relations = {SCENE_CAPTION.fullmatch(SCENES.caption(i)).group(3) for i in range(200)}
    assert relations == {*SHAPE_RELATIONS, None}


def test_scenes_take_custom_sizes():
    source = ScenesSource("test", 20, sizes=[(28, 60)])
    assert {source[i]["image"].shape for i in range(20)} == {(28, 60, 3)}


# ----------------------------------------------------------------------------------- videos


def test_video_records_are_deterministic_and_splits_differ():
    other = MovingShapesSource("train", N)
    for i in (0, 17, N - 1):
        a, b = VIDEOS[i], other[i]
        np.testing.assert_array_equal(a["video"], b["video"])
        assert (a["caption"], a["shapes"], a["question"]) == (
            b["caption"],
            b["shapes"],
            b["question"],
        )
    test = MovingShapesSource("test", N)
    assert [VIDEOS.caption(i) for i in range(50)] != [test.caption(i) for i in range(50)]


@settings(max_examples=150, deadline=None)
@given(st.integers(0, N - 1))
def test_video_motion_follows_the_stated_direction(i):
    record = VIDEOS[i]
    video = record["video"]
    assert video.dtype == np.uint8 and video.shape == (VIDEO_FRAMES, *VIDEO_SIZE, 3)
    np.testing.assert_array_equal(record["image"], video[0])
    frames = record["shapes"]
    assert len(frames) == VIDEO_FRAMES
    for image, objects in zip(video, frames, strict=True):
        assert len(objects) == 2
        check_drawn(image, objects)
        assert disjoint(objects[0]["bbox"], objects[1]["bbox"])
    match = VIDEO_CAPTION.fullmatch(record["caption"])
    assert match, record["caption"]
    assert record["caption"] == VIDEOS.caption(i)
    colour, shape, direction = match.groups()
    assert direction == record["direction"] == record["answer"] == DIRECTIONS[record["label"]]
    assert record["question"] == f"which way does the {colour} {shape} move?"
    mover = [objects[0] for objects in frames]
    distractor = [objects[1] for objects in frames]
    assert {(o["colour"], o["shape"]) for o in mover} == {(colour, shape)}
    assert len({(o["colour"], o["shape"], tuple(o["bbox"])) for o in distractor}) == 1
    assert distractor[0]["colour"] != colour and distractor[0]["shape"] != shape
    # The distractor is clear of the mover's whole path, not only of each frame's box.
    assert all(disjoint(m["bbox"], distractor[0]["bbox"]) for m in mover)
    x0, y0, x1, y1 = distractor[0]["bbox"]
    assert (video[:, y0:y1, x0:x1] == video[0, y0:y1, x0:x1]).all()
    axis, sign = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}[direction]
    centres = np.array([centre(o["bbox"]) for o in mover])
    steps = np.diff(centres, axis=0)
    assert (sign * steps[:, axis] >= VIDEO_MIN_STEP).all(), centres
    assert (steps[:, 1 - axis] == 0).all(), centres
    assert len(set(np.round(steps[:, axis], 6))) == 1  # a constant step


def test_video_directions_are_balanced():
    counts = collections.Counter(VIDEOS[i]["direction"] for i in range(200))
    assert set(counts) == set(DIRECTIONS)
    assert all(0.15 * 200 <= c <= 0.35 * 200 for c in counts.values()), counts


def test_video_frames_and_size_are_configurable():
    source = MovingShapesSource("test", 4, frames=6, size=(112, 84))
    record = source[3]
    assert record["video"].shape == (6, 112, 84, 3)
    assert len(record["shapes"]) == 6


# ---------------------------------------------------------------------------------- builder


def data_cfg(**values: object) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(values)


def test_build_source_builds_both():
    cfg = data_cfg(source="scenes", scenes_num_train=30, scenes_num_test=7)
    train, test = build_source(cfg, "train"), build_source(cfg, "test")
    assert isinstance(train, ScenesSource) and (len(train), len(test)) == (30, 7)
    assert [train.caption(i) for i in range(7)] != [test.caption(i) for i in range(7)]
    cfg = data_cfg(source="moving_shapes", moving_shapes_num_train=5, moving_shapes_num_test=3)
    train, test = build_source(cfg, "train"), build_source(cfg, "test")
    assert isinstance(test, MovingShapesSource) and (len(train), len(test)) == (5, 3)
    assert train[0]["video"].shape[0] == VIDEO_FRAMES
    cfg.video_frames = 3
    assert build_source(cfg, "train")[0]["video"].shape[0] == 3


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ScenesSource("train", 0), "data.scenes_num_train must be positive"),
        (lambda: MovingShapesSource("test", -1), "data.moving_shapes_num_test must be positive"),
        (lambda: ScenesSource("validation", 5), "unknown split 'validation'"),
        (lambda: MovingShapesSource("val", 5), "unknown split 'val'"),
        (lambda: MovingShapesSource("train", 5, frames=1), "data.video_frames must be at least 2"),
        (lambda: MovingShapesSource("train", 5, frames=8), "too small"),
        (lambda: ScenesSource("train", 5, sizes=[(56, 56), (16, 40)]), "too small"),
        (lambda: ScenesSource("train", 5, sizes=[]), "no image sizes"),
        (lambda: build_source(data_cfg(source="scenes"), "train"), "data.scenes_num_train"),
        (lambda: build_source(data_cfg(source="moving_shapes"), "dev"), "unknown split 'dev'"),
    ],
)
def test_bad_config_is_a_user_error(build, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build()
