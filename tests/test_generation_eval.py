"""Generation-quality eval: the judges on real held-out data, prompt parsing, the sample grid."""

import numpy as np
import pytest
from PIL import Image

from mmjax.data.sources import DigitsSource, ShapesSource
from mmjax.errors import UserError
from mmjax.evals import generation as gen

NUM_SCENES = 300
_FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _as_generated(images: np.ndarray) -> np.ndarray:
    """uint8 records -> what generators produce: float32 in [-1, 1] (the pipeline's range)."""
    return images.astype(np.float32) / 127.5 - 1.0


@pytest.fixture(scope="module")
def digits():
    source = DigitsSource("test")
    records = [source[i] for i in range(len(source))]
    images = _as_generated(np.stack([r["image"] for r in records]))
    return images, np.array([r["label"] for r in records]), [r["caption"] for r in records]


@pytest.fixture(scope="module")
def scenes():
    source = ShapesSource("test", NUM_SCENES)
    records = [source[i] for i in range(NUM_SCENES)]
    return _as_generated(np.stack([r["image"] for r in records])), records


def test_digit_judge_labels_held_out_real_digits(digits):
    images, labels, captions = digits
    assert gen.digit_judge().held_out_accuracy >= 0.95
    assert gen.generation_accuracy(images, labels) >= 0.95
    assert gen.generation_accuracy(images[..., :1], captions) >= 0.95  # 1 channel, text prompts
    assert gen.generation_accuracy(images, (labels + 1) % 10) < 0.05  # wrong prompts


def test_digit_caption_accuracy(digits):
    _, labels, captions = digits
    assert gen.caption_accuracy(captions, labels) == 1.0
    assert gen.caption_accuracy(captions, (labels + 3) % 10) == 0.0
    assert gen.digit_from_caption("The digit 7.") == 7
    assert gen.digit_from_caption("the number four, written by hand") == 4
    assert gen.digit_from_caption("a one or a seven") is None  # names two digits
    assert gen.digit_from_caption("the digit 17") is None
    with pytest.raises(UserError, match="does not name one digit"):
        gen.generation_accuracy(images=digits[0][:1], prompts=["a picture"])


def test_parse_shapes_caption_round_trips_the_source_captions():
    for split in ("train", "test"):
        source = ShapesSource(split, 200)
        for i in range(len(source)):
            record = source[i]
            spec = gen.parse_shapes_caption(record["caption"])
            assert spec.caption() == record["caption"]
            assert spec.objects == tuple((o["colour"], o["shape"]) for o in record["shapes"])
            assert gen.scene_spec(record) == spec
            structured = {"shapes": record["shapes"], "relation": spec.relation}
            assert gen.scene_spec(structured) == spec
    spec = gen.parse_shapes_caption("A picture of a red circle  left of a blue square.")
    assert spec == gen.SceneSpec((("red", "circle"), ("blue", "square")), "left of")
    assert spec.same_scene(gen.parse_shapes_caption("a blue square right of a red circle"))
    assert not spec.same_scene(gen.parse_shapes_caption("a blue square left of a red circle"))
    for bad in ("a red circle left of", "a pink circle", "two red circles", ""):
        with pytest.raises(ValueError):
            gen.parse_shapes_caption(bad)


def test_shapes_judge_scores_held_out_scenes_and_rejects_mismatched_prompts(scenes):
    images, records = scenes
    captions = [r["caption"] for r in records]
    metrics = gen.compositional_metrics(images, captions)
    print("shapes judge on held-out scenes:", metrics)
    assert metrics["compositional_accuracy"] >= 0.95
    for name in ("colour", "shape", "count", "object", "relation"):
        assert metrics[f"{name}_accuracy"] >= 0.95
    assert gen.compositional_accuracy(images, records) >= 0.95  # records: shapes + caption
    no_caption = [{"shapes": r["shapes"]} for r in records]  # relation read from the bboxes
    assert gen.compositional_accuracy(images, no_caption) >= 0.95

    mismatched = gen.compositional_metrics(images, captions[1:] + captions[:1])
    print("mismatched captions:", mismatched)
    assert mismatched["compositional_accuracy"] <= 0.05

    # Only the relation wrong: every two-object scene fails, on its relation alone.
    pairs = [i for i, r in enumerate(records) if len(r["shapes"]) == 2]
    flipped = []
    for i in pairs:
        spec = gen.parse_shapes_caption(captions[i])
        flipped.append(gen.SceneSpec(spec.objects, _FLIP[spec.relation]))
    wrong = gen.compositional_metrics(images[pairs], flipped)
    assert wrong["compositional_accuracy"] <= 0.05 and wrong["relation_accuracy"] <= 0.05
    assert wrong["object_accuracy"] >= 0.95

    # Robust to decoder-like blur and noise.
    rng = np.random.default_rng(1)
    uint8 = np.round((images + 1.0) * 127.5).astype(np.uint8)
    degraded = np.stack([gen._degrade(image, rng) for image in uint8])
    assert gen.compositional_accuracy(_as_generated(degraded), captions) >= 0.9


def test_judge_scene_per_attribute():
    red_circle = gen.Detection("red", "circle", (5.0, 5.0), 30, (2, 2, 9, 9))
    blue_square = gen.Detection("blue", "square", (20.0, 6.0), 40, (17, 3, 24, 10))
    spec = gen.parse_shapes_caption("a red circle left of a blue square")
    assert gen.judge_scene([red_circle, blue_square], spec)["all"]
    extra = gen.judge_scene([red_circle, blue_square, red_circle], spec)
    assert not extra["count"] and not extra["all"] and extra["relation"]
    verdict = gen.judge_scene([red_circle], spec)
    assert not verdict["count"] and not verdict["relation"] and not verdict["all"]
    empty = np.full((2, 32, 32, 3), -1.0, np.float32)  # black: no objects
    metrics = gen.compositional_metrics(empty, ["a red circle", "a green triangle"])
    assert metrics["compositional_accuracy"] == 0.0 and "relation_accuracy" not in metrics


def test_shapes_caption_accuracy(scenes):
    _, records = scenes
    captions = [r["caption"] for r in records]
    assert gen.shapes_caption_accuracy(captions, records) == 1.0
    rolled = captions[1:] + captions[:1]
    assert gen.shapes_caption_accuracy(rolled, records) <= 0.05
    assert gen.shapes_caption_accuracy(["a a a", "a red"], captions[:2]) == 0.0
    swapped = "a blue square right of a red circle"
    assert gen.shapes_caption_accuracy([swapped], ["a red circle left of a blue square"]) == 1.0


def test_sample_grid_writes_a_png_of_the_right_size(tmp_path, scenes, digits):
    images, records = scenes
    prompts = [r["caption"] for r in records[:10]]
    verdicts = [v["all"] for v in gen.compositional_verdicts(images[:10], prompts)]
    path = tmp_path / "samples" / "grid.png"
    grid = gen.write_sample_grid(path, images[:10], prompts, verdicts, columns=4, scale=3)
    cell_w, cell_h = 32 * 3 + 4, 32 * 3 + 4 + 40
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (4 * cell_w, 3 * cell_h)
    assert grid.shape == (3 * cell_h, 4 * cell_w, 3)
    assert tuple(grid[0, 0]) == (40, 200, 60)  # judged right: green border

    digit_images = digits[0][:3]
    grid = gen.write_sample_grid(tmp_path / "d.png", digit_images, correct=[False, None, True])
    assert grid.shape == (8 * 12 + 4, 3 * (8 * 12 + 4), 3)  # no prompts: no text band
    assert tuple(grid[0, 0]) == (230, 40, 40)
    with pytest.raises(UserError, match="prompts"):
        gen.write_sample_grid(tmp_path / "x.png", digit_images, ["one"])


def test_bad_images_are_a_clear_error():
    with pytest.raises(UserError, match=r"\[N, H, W, C\]"):
        gen.generation_accuracy(np.zeros((2, 8, 8, 4)), [0, 1])
    with pytest.raises(UserError, match="8x8"):
        gen.generation_accuracy(np.zeros((2, 32, 32, 3)), [0, 1])
    with pytest.raises(UserError, match="not a shapes caption"):
        gen.compositional_accuracy(np.zeros((1, 32, 32, 3)), ["a cat on a mat"])
    with pytest.raises(UserError, match="2 images but 1 prompts"):
        gen.compositional_accuracy(np.zeros((2, 32, 32, 3)), ["a red circle"])
