"""Shape-scene edit pairs (colour, shape, move) for the image-editing task."""

import copy
import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmjax.data.edits import EDIT_KINDS, Edit, edit_pair, edit_texts, heldout_edits, sample_edit
from mmjax.data.sources import SHAPES_IMAGE_SIZE, ShapesSource, _draw_shapes
from mmjax.evals.generation import compositional_verdicts, parse_shapes_caption, scene_spec

_FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_NUM_TRAIN = 300


@functools.cache
def _train() -> ShapesSource:
    return ShapesSource("train", _NUM_TRAIN)


def _names(objects):
    return [(o["colour"], o["shape"]) for o in objects]


def _in_opposite_halves(objects, relation: str) -> bool:
    """Whether object 0 lies wholly in the half of the image that `relation` names, and
    object 1 in the other half (the separation `_shapes_scene` draws scenes with)."""
    axis = 0 if relation in ("left of", "right of") else 1
    (a0, a1), (b0, b1) = ((o["bbox"][axis], o["bbox"][axis + 2]) for o in objects)
    half = SHAPES_IMAGE_SIZE // 2
    if relation in ("left of", "above"):
        return a1 <= half <= b0
    return b1 <= half <= a0


def _edit(index: int, kind: str, seed: int) -> tuple[dict, Edit]:
    record = _train()[index]
    return record, sample_edit(
        record["shapes"], record["caption"], np.random.default_rng(seed), (kind,)
    )


def _check_attribute_edit(record: dict, edit: Edit, key: str) -> None:
    """Exactly one object's `key` changed; everything else kept; objects stay distinct."""
    before, after = record["shapes"], edit.objects
    assert len(after) == len(before)
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a[key] != b[key]]
    assert len(changed) == 1
    other = "shape" if key == "colour" else "colour"
    assert [o[other] for o in after] == [o[other] for o in before]
    assert [o["bbox"] for o in after] == [o["bbox"] for o in before]
    assert len(set(_names(after))) == len(after)
    old = before[changed[0]]
    new_value = after[changed[0]][key]
    words = new_value if key == "colour" else f"a {new_value}"
    assert edit.instruction == f"make the {old['colour']} {old['shape']} {words}"


@settings(max_examples=120, deadline=None)
@given(
    index=st.integers(0, _NUM_TRAIN - 1),
    seed=st.integers(0, 2**32 - 1),
    key=st.sampled_from(["colour", "shape"]),
)
def test_an_attribute_edit_changes_exactly_that_attribute_of_one_object(index, seed, key):
    record, edit = _edit(index, key, seed)
    assert edit.kind == key
    _check_attribute_edit(record, edit, key)


@settings(max_examples=60, deadline=None)
@given(index=st.integers(0, _NUM_TRAIN - 1), seed=st.integers(0, 2**32 - 1))
def test_move_edit_flips_the_relation_and_keeps_the_objects(index, seed):
    record = _train()[index]
    if len(record["shapes"]) == 1:
        with pytest.raises(ValueError, match="no edit"):
            _edit(index, "move", seed)
        return
    _, edit = _edit(index, "move", seed)
    source_spec, target_spec = scene_spec(record), parse_shapes_caption(edit.caption)
    assert _names(edit.objects) == _names(record["shapes"])
    assert target_spec.objects == source_spec.objects
    assert target_spec.relation == _FLIP[source_spec.relation]
    (c0, s0), (c1, s1) = source_spec.objects
    assert edit.instruction == f"move the {c0} {s0} {target_spec.relation} the {c1} {s1}"
    # The objects lie in the halves the new relation names, keep their sizes, stay in the image.
    assert _in_opposite_halves(edit.objects, target_spec.relation)
    for old, new in zip(record["shapes"], edit.objects, strict=True):
        (a0, b0, a1, b1), (x0, y0, x1, y1) = old["bbox"], new["bbox"]
        assert (x1 - x0, y1 - y0) == (a1 - a0, b1 - b0)
        assert min(x0, y0) >= 0 and max(x1, y1) <= SHAPES_IMAGE_SIZE


@settings(max_examples=60, deadline=None)
@given(index=st.integers(0, _NUM_TRAIN - 1), seed=st.integers(0, 2**32 - 1))
def test_target_captions_parse_and_match_the_target_objects(index, seed):
    record = _train()[index]
    before = copy.deepcopy(record["shapes"])
    edit = sample_edit(record["shapes"], record["caption"], np.random.default_rng(seed))
    assert record["shapes"] == before  # the source scene is left alone
    spec = scene_spec(edit.caption)
    assert spec.objects == tuple(_names(edit.objects))
    assert scene_spec({"shapes": edit.objects, "caption": edit.caption}) == spec
    if edit.kind != "move":  # the caption's structure (relation, object order) is kept
        assert spec.relation == scene_spec(record).relation


def test_kinds_are_drawn_uniformly_among_those_that_apply():
    rng = np.random.default_rng(0)
    counts = {(n, k): 0 for n in (1, 2) for k in EDIT_KINDS}
    for index in range(_NUM_TRAIN):
        record = _train()[index]
        edit = sample_edit(record["shapes"], record["caption"], rng)
        counts[len(record["shapes"]), edit.kind] += 1
    assert counts[1, "move"] == 0
    singles = counts[1, "colour"] + counts[1, "shape"]
    assert 0.3 < counts[1, "colour"] / singles < 0.7
    pairs = sum(counts[2, k] for k in EDIT_KINDS)
    assert all(0.2 < counts[2, k] / pairs < 0.47 for k in EDIT_KINDS)


@functools.cache
def _judged_edits() -> list[tuple[dict, np.ndarray, Edit]]:
    """Every kind that applies, on each of 30 test records."""
    source, out = ShapesSource("test", 30), []
    for index in range(len(source)):
        record = source[index]
        for kind in EDIT_KINDS:
            if kind == "move" and len(record["shapes"]) == 1:
                continue
            edit = sample_edit(
                record["shapes"], record["caption"], np.random.default_rng(index), (kind,)
            )
            out.append((record, _draw_shapes(edit.objects), edit))
    return out


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_the_shapes_judge_accepts_drawn_targets_against_their_captions(kind):
    pairs = [(r, image, e) for r, image, e in _judged_edits() if e.kind == kind]
    assert len(pairs) >= 20
    images = np.stack([image for _, image, _ in pairs])
    verdicts = compositional_verdicts(images, [e.caption for _, _, e in pairs])
    assert all(v["all"] for v in verdicts), [
        e.caption for v, (_, _, e) in zip(verdicts, pairs, strict=True) if not v["all"]
    ]


def test_the_shapes_judge_rejects_colour_edits_against_the_source_caption():
    pairs = [(r, image) for r, image, e in _judged_edits() if e.kind == "colour"]
    images = np.stack([image for _, image in pairs])
    verdicts = compositional_verdicts(images, [r["caption"] for r, _ in pairs])
    assert not any(v["all"] for v in verdicts)
    assert not any(v["colour"] for v in verdicts)


def test_edit_pair_draws_the_target_scene():
    record = ShapesSource("test", 5)[3]
    image, edit = edit_pair(record, np.random.default_rng(7))
    assert image.dtype == np.uint8 and image.shape == (SHAPES_IMAGE_SIZE, SHAPES_IMAGE_SIZE, 3)
    np.testing.assert_array_equal(image, _draw_shapes(edit.objects))
    assert not np.array_equal(image, record["image"])


def test_heldout_edits_are_deterministic_and_seeded():
    source = ShapesSource("test", 40)
    first, again = heldout_edits(source, 25), heldout_edits(source, 25)
    assert len(first) == 25
    assert [r["index"] for r, _, _ in first] == list(range(25))
    for (r, image, edit), (r2, image2, edit2) in zip(first, again, strict=True):
        assert edit == edit2 and r["caption"] == r2["caption"]
        np.testing.assert_array_equal(image, image2)
    other = heldout_edits(source, 25, seed=1)
    assert [e for _, _, e in other] != [e for _, _, e in first]
    with pytest.raises(ValueError, match="records"):
        heldout_edits(source, 41)


def test_edit_texts_cover_every_sampled_instruction():
    source = ShapesSource("train", 4000)
    known = set(edit_texts(source, 2000))
    for index in range(0, 4000, 2):
        record = source[index]
        edit = sample_edit(record["shapes"], record["caption"], np.random.default_rng(index))
        assert {edit.instruction, edit.caption} <= known


def test_impossible_requests_raise_clear_errors():
    single = next(r for r in (_train()[i] for i in range(_NUM_TRAIN)) if len(r["shapes"]) == 1)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="no edit of kinds \\('move',\\) applies"):
        sample_edit(single["shapes"], single["caption"], rng, ("move",))
    with pytest.raises(ValueError, match="non-empty subset"):
        sample_edit(single["shapes"], single["caption"], rng, ())
    with pytest.raises(ValueError, match="non-empty subset"):
        sample_edit(single["shapes"], single["caption"], rng, ("colour", "rotate"))
    with pytest.raises(ValueError, match="does not describe"):
        sample_edit(single["shapes"], "a purple circle left of a red square", rng)
