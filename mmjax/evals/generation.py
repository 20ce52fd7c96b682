"""Generation quality: judges that label generated images, and captioning accuracy.

- Digits: an RBF SVM trained on scikit-learn's real digits (train split) labels generated 8x8
  images; `generation_accuracy` is the fraction labelled as the prompted digit.
- Shapes: pixels are assigned to the known palette (or background), connected components of
  each colour are objects, a classifier trained on components of rendered training scenes names
  each one's shape, and its centroid places it. `compositional_accuracy` (GenEval-style) is the
  fraction of scenes in which every prompted attribute is right: the objects' colours and
  shapes, their count, and the relation between them.
- Captions, the other way: `caption_accuracy` (the caption names the right digit) and
  `shapes_caption_accuracy` (the caption's parsed scene equals the true one).

Images are what the generators produce: [N, H, W, C] float in [-1, 1] (uint8 [0, 255] is also
accepted), C in {1, 3}. Judges are trained once per process (`functools.cache`).
"""

import dataclasses
import functools
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from mmjax.data.sources import (
    DIGIT_NAMES,
    SHAPE_COLOURS,
    SHAPE_KINDS,
    SHAPE_RELATIONS,
    SHAPES_IMAGE_SIZE,
    DigitsSource,
    ShapesSource,
)
from mmjax.errors import UserError
from mmjax.evals.blas_threads import blas_threads_for

DIGITS_IMAGE_SIZE = 8


def to_uint8_rgb(images: Any, size: int | None = None) -> np.ndarray:
    """[N, H, W, C] float in [-1, 1] (or uint8), C in {1, 3} -> uint8 RGB [N, H, W, 3]."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"generated images must be [N, H, W, C] with C in {{1, 3}}, got {x.shape}")
    if size is not None and x.shape[1:3] != (size, size):
        raise UserError(f"generated images must be {size}x{size}, got {x.shape[1]}x{x.shape[2]}")
    if x.dtype != np.uint8:
        x = np.round((np.clip(x.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


# ----------------------------------------------------------------------------------- digits


def _digit_features(images: Any) -> np.ndarray:
    """[N, 64]: grey level in [0, 1] (the channel mean) of each pixel."""
    x = to_uint8_rgb(images, DIGITS_IMAGE_SIZE).astype(np.float32).mean(axis=-1) / 255.0
    return x.reshape(len(x), -1)


def _digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    source = DigitsSource(split)
    records = [source[i] for i in range(len(source))]
    return np.stack([r["image"] for r in records]), np.array([r["label"] for r in records])


@dataclasses.dataclass(frozen=True)
class DigitJudge:
    """A classifier of 8x8 digit images; `held_out_accuracy` is on the real test split."""

    model: Any
    held_out_accuracy: float

    def predict(self, images: Any) -> np.ndarray:
        """Digit labels int64 [N] of images [N, 8, 8, C]."""
        if len(images) == 0:
            return np.zeros((0,), np.int64)
        return self.model.predict(_digit_features(images)).astype(np.int64)


@functools.cache
def digit_judge() -> DigitJudge:
    """An RBF SVM trained on the real digits' train split (deterministic, ~0.1 s, cached)."""
    from sklearn.svm import SVC  # Lazy: sklearn is slow to import.

    train_x, train_y = _digits_split("train")
    model = SVC(C=10.0, gamma="scale").fit(_digit_features(train_x), train_y)
    test_x, test_y = _digits_split("test")
    accuracy = float(np.mean(model.predict(_digit_features(test_x)) == test_y))
    return DigitJudge(model, accuracy)


def digit_from_caption(caption: str) -> int | None:
    """The digit a caption names (word or numeral); None if it names none or several."""
    tokens = re.findall(r"[a-z]+|\d+", caption.lower())
    named = {DIGIT_NAMES.index(t) for t in tokens if t in DIGIT_NAMES}
    named |= {int(t) for t in tokens if len(t) == 1 and t.isdigit()}
    return named.pop() if len(named) == 1 else None


def _prompted_digits(prompts: Sequence[int | str]) -> np.ndarray:
    labels = []
    for p in prompts:
        label = digit_from_caption(p) if isinstance(p, str) else int(p)
        if label is None or not 0 <= label <= 9:
            raise UserError(f"prompt {p!r} does not name one digit")
        labels.append(label)
    return np.array(labels, np.int64)


def generation_accuracy(images: Any, prompts: Sequence[int | str]) -> float:
    """Fraction of generated digits [N, 8, 8, C] the judge labels as the prompted digit.

    `prompts` are digit labels or prompt captions naming one digit ("a handwritten seven").
    """
    labels = _prompted_digits(prompts)
    if len(labels) != len(images):
        raise UserError(f"{len(images)} images but {len(labels)} prompts")
    return float(np.mean(digit_judge().predict(images) == labels)) if len(labels) else 0.0


def caption_accuracy(captions: Sequence[str], labels: Sequence[int]) -> float:
    """Fraction of captions (of digit images) that name exactly the true digit."""
    if len(captions) != len(labels):
        raise UserError(f"{len(captions)} captions but {len(labels)} labels")
    hits = [digit_from_caption(c) == int(y) for c, y in zip(captions, labels, strict=True)]
    return float(np.mean(hits)) if hits else 0.0


# ------------------------------------------------------------------------------ scene specs

_COLOUR = "|".join(SHAPE_COLOURS)
_SHAPE = "|".join(SHAPE_KINDS)
_RELATION = "|".join(SHAPE_RELATIONS)
_CAPTION_RE = re.compile(rf"a ({_COLOUR}) ({_SHAPE})(?: ({_RELATION}) a ({_COLOUR}) ({_SHAPE}))?")
_PREFIXES = ("a picture of ", "an image with ", "an image of ", "a photo of ")
_FLIPPED = {"right of": "left of", "below": "above"}


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """What a shapes prompt asks for: objects (colour, shape), and for two objects the
    relation of `objects[0]` to `objects[1]` ("left of", "right of", "above", "below")."""

    objects: tuple[tuple[str, str], ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        for colour, shape in self.objects:
            if colour not in SHAPE_COLOURS or shape not in SHAPE_KINDS:
                raise ValueError(f"unknown object {colour!r} {shape!r}")
        if self.relation is not None and (
            self.relation not in SHAPE_RELATIONS or len(self.objects) != 2
        ):
            raise ValueError(
                f"relation {self.relation!r} needs one of {SHAPE_RELATIONS} and 2 objects"
            )

    def caption(self) -> str:
        """The source's caption template: "a red circle left of a blue square" (objects without
        a relation are joined by "and", which is outside the template for two or more)."""
        names = [f"a {c} {s}" for c, s in self.objects]
        if self.relation is None:
            return " and ".join(names)
        return f"{names[0]} {self.relation} {names[1]}"

    def canonical(self) -> "SceneSpec":
        """The same scene written one way: "right of"/"below" flipped, unrelated objects sorted."""
        if self.relation is None:
            return SceneSpec(tuple(sorted(self.objects)))
        if self.relation in _FLIPPED:
            return SceneSpec(self.objects[::-1], _FLIPPED[self.relation])
        return self

    def same_scene(self, other: "SceneSpec") -> bool:
        """Whether two specs describe the same scene ("a left of b" == "b right of a")."""
        return self.canonical() == other.canonical()


def parse_shapes_caption(caption: str) -> SceneSpec:
    """Inverts the shapes caption template; raises ValueError for text outside its grammar.

    Case, surrounding space, a final full stop and prompt prefixes ("a picture of ...") are
    ignored.
    """
    text = " ".join(caption.lower().split()).rstrip(".").strip()
    for prefix in _PREFIXES:
        if text.startswith(prefix + "a "):
            text = text[len(prefix) :]
    match = _CAPTION_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a shapes caption: {caption!r}")
    c0, s0, relation, c1, s1 = match.groups()
    if relation is None:
        return SceneSpec(((c0, s0),))
    return SceneSpec(((c0, s0), (c1, s1)), relation)


def _relation_from_bboxes(objects: Sequence[Mapping[str, Any]]) -> str:
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = (o["bbox"] for o in objects)
    dx, dy = (ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


SceneLike = str | SceneSpec | Mapping[str, Any]


def scene_spec(prompt: SceneLike) -> SceneSpec:
    """A SceneSpec from a caption, a SceneSpec, or a shapes record / structured spec.

    A mapping gives its objects as `shapes` ([{shape, colour, bbox}], as in ShapesSource
    records) and its relation as `relation`, else from its `caption`, else from the bboxes.
    """
    if isinstance(prompt, SceneSpec):
        return prompt
    if isinstance(prompt, str):
        return parse_shapes_caption(prompt)
    if "shapes" not in prompt:
        return parse_shapes_caption(prompt["caption"])
    objects = tuple((o["colour"], o["shape"]) for o in prompt["shapes"])
    relation = prompt.get("relation")
    if relation is None and len(objects) == 2:
        if "caption" in prompt:
            parsed = parse_shapes_caption(prompt["caption"])
            if not SceneSpec(parsed.objects).same_scene(SceneSpec(objects)):
                raise ValueError(f"caption {prompt['caption']!r} does not match its shapes")
            return parsed
        relation = _relation_from_bboxes(prompt["shapes"])
    return SceneSpec(objects, relation)


def shapes_caption_accuracy(captions: Sequence[str], scenes: Sequence[SceneLike]) -> float:
    """Fraction of captions whose parsed scene equals the image's true scene."""
    if len(captions) != len(scenes):
        raise UserError(f"{len(captions)} captions but {len(scenes)} scenes")
    hits = []
    for caption, scene in zip(captions, scenes, strict=True):
        truth = scene_spec(scene)
        try:
            hits.append(parse_shapes_caption(caption).same_scene(truth))
        except ValueError:  # outside the caption grammar: wrong
            hits.append(False)
    return float(np.mean(hits)) if hits else 0.0


# ----------------------------------------------------------------------------- shapes judge

_PALETTE_NAMES = (None, *SHAPE_COLOURS)  # index 0: the black background
_PALETTE = np.array([(0, 0, 0), *SHAPE_COLOURS.values()], np.float32)
_EIGHT_CONNECTED = np.ones((3, 3), bool)
_MASK_SIZE = 8
_MAX_DISTANCE = 100.0  # RGB distance beyond which a pixel is no palette colour


@dataclasses.dataclass(frozen=True)
class Detection:
    """One object found in an image; centroid (x, y) and bbox [x0, y0, x1, y1) in pixels."""

    colour: str
    shape: str
    centroid: tuple[float, float]
    area: int
    bbox: tuple[int, int, int, int]


def _palette_index(images: np.ndarray) -> np.ndarray:
    """[..., H, W] index into the palette (0: background) of each pixel of uint8 RGB images."""
    x = images.astype(np.float32)
    dist = np.sum(x * x, axis=-1, keepdims=True) - 2 * x @ _PALETTE.T + np.sum(_PALETTE**2, -1)
    index = np.argmin(dist, axis=-1)
    index[np.min(dist, axis=-1) > _MAX_DISTANCE**2] = 0  # far from every colour: background
    return index


def _components(index: np.ndarray, min_area: int):
    """Yields (colour, mask crop, centroid, area, bbox) per component of one palette index map."""
    for k in np.unique(index):
        if k == 0:
            continue
        labels, _ = ndimage.label(index == k, structure=_EIGHT_CONNECTED)
        for j, box in enumerate(ndimage.find_objects(labels), start=1):
            mask = labels[box] == j
            area = int(mask.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(mask)
            y0, x0 = box[0].start, box[1].start
            centroid = (float(xs.mean() + x0), float(ys.mean() + y0))
            bbox = (x0, y0, box[1].stop, box[0].stop)
            yield _PALETTE_NAMES[k], mask, centroid, area, bbox


def _shape_features(mask: np.ndarray) -> np.ndarray:
    """The mask resized to 8x8 (exact area average), its fill ratio and log aspect ratio."""
    h, w = mask.shape
    big = np.repeat(np.repeat(mask.astype(np.float32), _MASK_SIZE, 0), _MASK_SIZE, 1)
    grid = big.reshape(_MASK_SIZE, h, _MASK_SIZE, w).mean(axis=(1, 3))
    return np.concatenate([grid.ravel(), [mask.mean(), math.log(h / w)]]).astype(np.float32)


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A rendered scene blurred and noised a little, as a decoder's output might be."""
    x = ndimage.gaussian_filter(image.astype(np.float32), sigma=(rng.uniform(0.3, 1.2),) * 2 + (0,))
    x += rng.normal(0.0, rng.uniform(0.0, 20.0), size=x.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


class ShapesJudge:
    """Finds the objects of 32x32 shapes scenes: palette segmentation + a shape classifier."""

    def __init__(
        self,
        num_train_scenes: int = 600,
        min_area: int = 12,
        seed: int = 0,
    ) -> None:
        from sklearn.linear_model import LogisticRegression  # Lazy: sklearn is slow to import.

        self.min_area = min_area
        source = ShapesSource("train", num_train_scenes)
        records = [source[i] for i in range(num_train_scenes)]
        rng = np.random.default_rng(seed)
        images = [r["image"] for r in records] + [_degrade(r["image"], rng) for r in records]
        features, targets = [], []
        for k, index in enumerate(_palette_index(np.stack(images))):
            for colour, mask, (cx, cy), _, _ in _components(index, min_area):
                shape = _true_shape(records[k % len(records)]["shapes"], colour, cx, cy)
                if shape is not None:
                    features.append(_shape_features(mask))
                    targets.append(SHAPE_KINDS.index(shape))
        self.classifier = LogisticRegression(C=10.0, max_iter=2000)
        train_x = np.stack(features)
        with blas_threads_for(train_x):
            self.classifier.fit(train_x, np.array(targets))

    def predict(self, images: Any) -> list[list[Detection]]:
        """The objects found in each image of [N, 32, 32, C] in [-1, 1] (or uint8)."""
        indices = _palette_index(to_uint8_rgb(images, SHAPES_IMAGE_SIZE))
        found = [list(_components(index, self.min_area)) for index in indices]
        flat = [f for image in found for f in image]
        if not flat:
            return [[] for _ in found]
        kinds = iter(self.classifier.predict(np.stack([_shape_features(f[1]) for f in flat])))
        return [
            [Detection(c, SHAPE_KINDS[next(kinds)], xy, a, box) for c, _, xy, a, box in image]
            for image in found
        ]

    def detect(self, image: Any) -> list[Detection]:
        """The objects found in one image [32, 32, C]."""
        return self.predict(np.asarray(image)[None])[0]


def _true_shape(objects: Sequence[Mapping[str, Any]], colour: str, cx: float, cy: float):
    """The shape of the record object of `colour` whose bbox holds (cx, cy), if one does."""
    for o in objects:
        x0, y0, x1, y1 = o["bbox"]
        if o["colour"] == colour and x0 <= cx < x1 and y0 <= cy < y1:
            return o["shape"]
    return None


@functools.cache
def shapes_judge() -> ShapesJudge:
    """The shapes judge, trained on 600 rendered training scenes, clean and degraded (cached)."""
    return ShapesJudge()


def _holds(a: Detection, b: Detection, relation: str) -> bool:
    (ax, ay), (bx, by) = a.centroid, b.centroid
    return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[relation]


def judge_scene(detections: Sequence[Detection], spec: SceneSpec) -> dict[str, bool]:
    """Per attribute, whether the detections fulfil the spec; `all` is every one at once.

    colour / shape: the multisets of colours / shapes match; count: the number of objects does;
    objects: the multiset of (colour, shape) does; relation (only for specs with one): a
    detection of the first object stands in the relation to one of the second.
    """
    found = [(d.colour, d.shape) for d in detections]
    verdict = {
        "colour": Counter(c for c, _ in found) == Counter(c for c, _ in spec.objects),
        "shape": Counter(s for _, s in found) == Counter(s for _, s in spec.objects),
        "count": len(found) == len(spec.objects),
        "objects": Counter(found) == Counter(spec.objects),
    }
    if spec.relation is not None:
        first = [d for d in detections if (d.colour, d.shape) == spec.objects[0]]
        second = [d for d in detections if (d.colour, d.shape) == spec.objects[1]]
        verdict["relation"] = any(
            a is not b and _holds(a, b, spec.relation) for a in first for b in second
        )
    verdict["all"] = all(verdict.values())
    return verdict


def compositional_verdicts(images: Any, prompts: Sequence[SceneLike]) -> list[dict[str, bool]]:
    """`judge_scene` of each generated scene [N, 32, 32, 3] against its prompt."""
    if len(images) != len(prompts):
        raise UserError(f"{len(images)} images but {len(prompts)} prompts")
    try:
        specs = [scene_spec(p) for p in prompts]
    except ValueError as e:
        raise UserError(f"shapes prompt: {e}") from e
    detections = shapes_judge().predict(images) if specs else []
    return [judge_scene(d, s) for d, s in zip(detections, specs, strict=True)]


def compositional_metrics(images: Any, prompts: Sequence[SceneLike]) -> dict[str, float]:
    """`compositional_accuracy` (every prompted attribute right) and per-attribute accuracies:
    `colour_accuracy`, `shape_accuracy`, `count_accuracy`, `object_accuracy`, and
    `relation_accuracy` over the prompts with a relation (absent when none has one)."""
    verdicts = compositional_verdicts(images, prompts)
    names = {"all": "compositional_accuracy", "colour": "colour_accuracy"}
    names |= {"shape": "shape_accuracy", "count": "count_accuracy"}
    names |= {"objects": "object_accuracy", "relation": "relation_accuracy"}
    metrics = {}
    for key, name in names.items():
        hits = [v[key] for v in verdicts if key in v]
        if hits or key != "relation":
            metrics[name] = float(np.mean(hits)) if hits else 0.0
    return metrics


def compositional_accuracy(images: Any, prompts: Sequence[SceneLike]) -> float:
    """Fraction of generated scenes in which every prompted attribute is right (GenEval-style)."""
    return compositional_metrics(images, prompts)["compositional_accuracy"]


# ------------------------------------------------------------------------------ sample grid

_VERDICT_COLOURS = {True: (40, 200, 60), False: (230, 40, 40), None: (128, 128, 128)}


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to lines at most `width` pixels wide (a longer word gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def answers_stem(workdir: str, name: str, step: int) -> str:
    """`workdir/samples/<name>_<step>` (the folder made): where an eval's k-th answers go."""
    stem = os.path.join(workdir, "samples", f"{name}_{step:03d}")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    return stem


def write_answers(path: str, examples: Sequence[tuple[Any, str, float]]) -> None:
    """One line per (question, answer, score): the task, record, instruction, answer and
    reference of a question holding `record` and a `vlm_tasks.TaskPair` `pair`."""
    lines = [
        f"[{q.pair.task}] record {q.record}: {q.pair.instruction!r} -> {answer!r} "
        f"(reference {q.pair.answer!r}, score {score:.2f})"
        for q, answer, score in examples
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_sample_grid(
    path: str | os.PathLike,
    images: Any,
    prompts: Sequence[str] | None = None,
    correct: Sequence[bool | None] | None = None,
    *,
    columns: int = 8,
    scale: int | None = None,
    border: int = 2,
    text_height: int = 40,
) -> np.ndarray:
    """Writes a PNG grid of images [N, H, W, C], each framed green (judged right), red (wrong)
    or grey (not judged), its prompt below; returns the grid, uint8 RGB.

    A cell is `W * scale + 2 * border` wide and `H * scale + 2 * border + text_height` tall
    (`text_height` is 0 without prompts; `scale` defaults to a ~96-pixel image).
    """
    rgb = to_uint8_rgb(images)
    n, h, w, _ = rgb.shape
    if n == 0:
        raise UserError("no images to write")
    for name, values in (("prompts", prompts), ("verdicts", correct)):
        if values is not None and len(values) != n:
            raise UserError(f"{n} images but {len(values)} {name}")
    scale = scale or max(1, math.ceil(96 / max(h, w)))
    text_height = text_height if prompts is not None else 0
    cell_w, image_h = w * scale + 2 * border, h * scale + 2 * border
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    grid = Image.new("RGB", (columns * cell_w, rows * (image_h + text_height)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    line = font.getbbox("Ag")[3] + 1  # text line height in pixels
    for i in range(n):
        x, y = (i % columns) * cell_w, (i // columns) * (image_h + text_height)
        verdict = None if correct is None or correct[i] is None else bool(correct[i])
        draw.rectangle((x, y, x + cell_w - 1, y + image_h - 1), fill=_VERDICT_COLOURS[verdict])
        big = Image.fromarray(rgb[i]).resize((w * scale, h * scale), Image.Resampling.NEAREST)
        grid.paste(big, (x + border, y + border))
        if text_height:
            label = Image.new("RGB", (cell_w, text_height), (255, 255, 255))
            lines = _wrap(str(prompts[i]), font, cell_w - 4)[: max(1, text_height // line)]
            ImageDraw.Draw(label).multiline_text(
                (2, 0), "\n".join(lines), (0, 0, 0), font, spacing=1
            )
            grid.paste(label, (x, y + image_h))  # pasted, so long words are clipped to the cell
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path, format="PNG")
    return np.asarray(grid)
