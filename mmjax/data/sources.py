"""Random-access data sources of image-caption records, usable as grain data sources.

Every record is a dict: `image` uint8 [H, W, 3] (RGB), `caption` str, `label` int (-1 when the
source has no labels) and `index` int (the record's position in the source). Sources also offer
`caption(index)`, which skips image decoding, for tokenizer training.
"""

import abc
import bisect
import functools
import itertools
import json
import math
import pathlib
import struct
from collections.abc import Callable
from typing import Any

import grain
import numpy as np
from ml_collections import ConfigDict
from PIL import Image, ImageDraw

from mmjax.data.image_ops import ImageDecodeError, decode_image
from mmjax.errors import UserError

Record = dict[str, Any]

SOURCES = ("digits", "skimage", "shapes", "scenes", "moving_shapes", "array_record", "tfds")


class Source(abc.ABC):
    """A grain RandomAccessDataSource of caption records."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __getitem__(self, index: int) -> Record: ...

    def caption(self, index: int) -> str:
        """Returns the caption of record `index`; subclasses avoid decoding the image."""
        return self[index]["caption"]

    def _check(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record index {index} out of range for {self!r}")
        return index


def _check_split(source: str, split: str, valid: tuple[str, ...]) -> None:
    if split not in valid:
        raise UserError(f"unknown split '{split}' for data.source '{source}' (valid: {valid})")


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """Converts bool / grayscale / RGBA arrays to uint8 RGB [H, W, 3]."""
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.shape[-1] == 4:  # Composite onto white.
        alpha = image[..., 3:].astype(np.float32) / 255.0
        image = np.round(image[..., :3] * alpha + 255.0 * (1.0 - alpha))
    return np.ascontiguousarray(image, dtype=np.uint8)


# ----------------------------------------------------------------------------------- digits

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Zero-shot prompts; each also appears (with the digit word) among the training captions.
DIGIT_PROMPT_TEMPLATES = [
    "a photo of the digit {}",
    "a handwritten {}",
    "an image of the number {}",
]
_DIGIT_CAPTION_TEMPLATES = (
    "a photo of the digit {word}",
    "a handwritten {word}",
    "an image of the number {word}",
    "the digit {numeral}",
    "a handwritten digit {word}",
    "the number {word}, written by hand",
)
DIGITS_NUM_TEST = 360  # 20% of scikit-learn's 1,797 digits.
_DIGITS_SEED = 0


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray, tuple[str, ...], np.ndarray]:
    """Loads all digits once: images uint8 [N, 8, 8, 3], labels, captions, split permutation."""
    from sklearn.datasets import load_digits  # Lazy: sklearn is slow to import.

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(_DIGITS_SEED)
    choice = rng.integers(len(_DIGIT_CAPTION_TEMPLATES), size=len(labels))
    captions = tuple(
        _DIGIT_CAPTION_TEMPLATES[t].format(word=DIGIT_NAMES[y], numeral=y)
        for t, y in zip(choice, labels, strict=True)
    )
    permutation = rng.permutation(len(labels))
    return images, labels, captions, permutation


def _digit_captions(label: int) -> tuple[str, ...]:
    """Every template's caption of a digit: training samples one per visit, as with COCO's five."""
    return tuple(t.format(word=DIGIT_NAMES[label], numeral=label) for t in _DIGIT_CAPTION_TEMPLATES)


class DigitsSource(Source):
    """scikit-learn's 8x8 digits with templated captions; a fixed 1437 / 360 train / test split."""

    def __init__(self, split: str) -> None:
        _check_split("digits", split, ("train", "test"))
        self.split = split
        _, _, _, permutation = _digits()
        test, train = permutation[:DIGITS_NUM_TEST], permutation[DIGITS_NUM_TEST:]
        self._ids = np.sort(train if split == "train" else test)

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int) -> Record:
        index = self._check(index)
        images, labels, captions, _ = _digits()
        i = self._ids[index]
        return {
            "image": images[i],
            "caption": captions[i],
            "captions": _digit_captions(int(labels[i])),
            "label": int(labels[i]),
            "index": index,
        }

    def caption(self, index: int) -> str:
        return _digits()[2][self._ids[self._check(index)]]

    def dataset_ids(self) -> np.ndarray:
        """Indices into scikit-learn's full digits array, for checking split disjointness."""
        return self._ids.copy()

    def __repr__(self) -> str:
        return f"DigitsSource(split={self.split!r}, len={len(self)})"


# ---------------------------------------------------------------------------------- skimage

# (skimage.data loader, caption); all ship inside the scikit-image wheel (no download).
_SKIMAGE_PHOTOS = (
    ("astronaut", "a smiling astronaut in a white spacesuit in front of a flag"),
    ("brick", "a grey brick wall"),
    ("camera", "a man standing behind a camera on a tripod"),
    ("cell", "a microscope image of a single cell"),
    ("chelsea", "a ginger cat looking to the side"),
    ("checkerboard", "a black and white checkerboard"),
    ("clock", "a wall clock blurred by motion"),
    ("coffee", "a cup of coffee on a saucer"),
    ("coins", "old coins laid out in rows"),
    ("colorwheel", "a colour wheel showing every hue"),
    ("grass", "a close up of grass"),
    ("gravel", "a close up of gravel stones"),
    ("horse", "the black silhouette of a horse"),
    ("hubble_deep_field", "distant galaxies in the hubble deep field"),
    ("immunohistochemistry", "a stained tissue sample under a microscope"),
    ("logo", "the scikit-image logo"),
    ("microaneurysms", "a close up of a retina with microaneurysms"),
    ("moon", "the cratered surface of the moon"),
    ("page", "a scanned page of printed text"),
    ("retina", "a photo of the retina of a human eye"),
    ("rocket", "a rocket standing on its launch pad"),
    ("text", "printed text photographed under uneven light"),
)


@functools.cache
def _skimage_images() -> tuple[np.ndarray, ...]:
    import skimage.data  # Lazy: only this source needs scikit-image.

    return tuple(_to_rgb(getattr(skimage.data, name)()) for name, _ in _SKIMAGE_PHOTOS)


class SkimageSource(Source):
    """scikit-image's bundled photos, one handwritten caption each; label = photo index.

    The collection is too small to hold out photos, so `train` and `test` are the same records:
    useful for smoke tests and for checking that a model can fit (memorise) a set.
    """

    def __init__(self, split: str) -> None:
        _check_split("skimage", split, ("train", "test"))
        self.split = split

    def __len__(self) -> int:
        return len(_SKIMAGE_PHOTOS)

    def __getitem__(self, index: int) -> Record:
        index = self._check(index)
        image = _skimage_images()[index]
        return {
            "image": image,
            "caption": _SKIMAGE_PHOTOS[index][1],
            "label": index,
            "index": index,
        }

    def caption(self, index: int) -> str:
        return _SKIMAGE_PHOTOS[self._check(index)][1]

    def __repr__(self) -> str:
        return f"SkimageSource(split={self.split!r}, len={len(self)})"


# ----------------------------------------------------------------------------------- shapes

SHAPE_KINDS = ("circle", "square", "triangle")
# No colour starts with a vowel, so "a {colour} {shape}" is always grammatical.
SHAPE_COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (245, 225, 40),
    "purple": (160, 60, 210),
    "white": (245, 245, 245),
}
SHAPE_CLASS_NAMES = [f"{c} {s}" for c in SHAPE_COLOURS for s in SHAPE_KINDS]
SHAPE_PROMPT_TEMPLATES = ["a {}", "a picture of a {}", "an image with a {}"]
SHAPE_RELATIONS = ("left of", "right of", "above", "below")
SHAPES_IMAGE_SIZE = 32
_SHAPES_SPLIT_IDS = {"train": 0, "test": 1}
_SHAPES_SEED = 0


def _shapes_scene(seed: int, split_id: int, index: int) -> tuple[list[dict[str, Any]], str]:
    """Samples a scene (objects with shape, colour, bbox) and its caption from (seed, split, i).

    Two-object scenes place the objects in opposite halves of the image along the relation's
    axis, so the relation in the caption holds for the bounding boxes without ambiguity.
    """
    rng = np.random.default_rng([seed, split_id, index])
    size = SHAPES_IMAGE_SIZE
    half = size // 2
    num_objects = 1 if rng.random() < 0.25 else 2
    classes = rng.choice(len(SHAPE_CLASS_NAMES), size=num_objects, replace=False)
    relation = SHAPE_RELATIONS[rng.integers(len(SHAPE_RELATIONS))]
    objects = []
    for k, cls in enumerate(classes):
        colour, shape = SHAPE_CLASS_NAMES[cls].split(" ")
        w = int(rng.integers(7, 14))
        if num_objects == 1:
            x0, y0 = (int(v) for v in rng.integers(0, size - w + 1, size=2))
        else:
            # Object 0 is `relation` object 1: pick each object's half along the relation axis.
            first_low = relation in ("left of", "above")
            low = (k == 0) == first_low
            lo_range = (0, half - w + 1) if low else (half, size - w + 1)
            a = int(rng.integers(*lo_range))
            b = int(rng.integers(0, size - w + 1))
            x0, y0 = (a, b) if relation in ("left of", "right of") else (b, a)
        objects.append({"shape": shape, "colour": colour, "bbox": [x0, y0, x0 + w, y0 + w]})
    names = [f"a {o['colour']} {o['shape']}" for o in objects]
    caption = names[0] if num_objects == 1 else f"{names[0]} {relation} {names[1]}"
    return objects, caption


def _draw_shapes(
    objects: list[dict[str, Any]], size: tuple[int, int] = (SHAPES_IMAGE_SIZE, SHAPES_IMAGE_SIZE)
) -> np.ndarray:
    """Draws `objects` on a black canvas of `size` (height, width): uint8 [H, W, 3]."""
    height, width = size
    image = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x0, y0, x1, y1 = obj["bbox"]
        box = (x0, y0, x1 - 1, y1 - 1)  # PIL boxes include the end pixel.
        fill = SHAPE_COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    return np.asarray(image, dtype=np.uint8)


class ShapesSource(Source):
    """Synthetic 32x32 scenes of coloured shapes with compositional captions.

    Record i depends only on (seed, split, i), so access is random and deterministic. Records
    carry `shapes` (list of {shape, colour, bbox [x0, y0, x1, y1] in pixels, end exclusive});
    `label` is the index in `SHAPE_CLASS_NAMES` of the first object's "colour shape".
    """

    def __init__(self, split: str, num_records: int, seed: int = _SHAPES_SEED) -> None:
        _check_split("shapes", split, tuple(_SHAPES_SPLIT_IDS))
        if num_records < 1:
            raise UserError(f"data.shapes_num_{split} must be positive, got {num_records}")
        self.split, self.num_records, self.seed = split, num_records, seed

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> Record:
        index = self._check(index)
        objects, caption = _shapes_scene(self.seed, _SHAPES_SPLIT_IDS[self.split], index)
        label = SHAPE_CLASS_NAMES.index(f"{objects[0]['colour']} {objects[0]['shape']}")
        return {
            "image": _draw_shapes(objects),
            "caption": caption,
            "label": label,
            "index": index,
            "shapes": objects,
        }

    def caption(self, index: int) -> str:
        return _shapes_scene(self.seed, _SHAPES_SPLIT_IDS[self.split], self._check(index))[1]

    def __repr__(self) -> str:
        return f"ShapesSource(split={self.split!r}, len={len(self)}, seed={self.seed})"


# ----------------------------------------------------------------------------- array_record

_HEADER_LEN = struct.Struct("<I")


def pack_record(image_bytes: bytes, caption: str, label: int, filename: str) -> bytes:
    """Serialises one example: uint32 LE header length, JSON header, encoded image bytes.

    The header is UTF-8 JSON {"caption": str, "label": int (-1 if none), "filename": str}.
    """
    header = json.dumps({"caption": caption, "label": label, "filename": filename}).encode()
    return _HEADER_LEN.pack(len(header)) + header + image_bytes


def unpack_record(record: bytes) -> tuple[dict[str, Any], bytes]:
    """Inverse of `pack_record`: returns (header dict, encoded image bytes)."""
    if len(record) < _HEADER_LEN.size:
        raise ValueError("record shorter than its 4-byte header length")
    (n,) = _HEADER_LEN.unpack_from(record)
    end = _HEADER_LEN.size + n
    header = json.loads(record[_HEADER_LEN.size : end].decode())
    if not isinstance(header, dict) or not isinstance(header.get("caption"), str):
        raise ValueError("header is not a JSON object with a string 'caption'")
    return header, record[end:]


def _array_record_shards(path: str, split: str) -> list[str]:
    """`path` is a shard file or a directory of `*.array_record` shards; a `split` subdirectory
    of it, when present, holds that split's shards (otherwise all splits read the same ones)."""
    root = pathlib.Path(path)
    if not path or not root.exists():
        raise UserError(f"data.path '{path}' does not exist")
    if root.is_file():
        return [str(root)]
    if (root / split).is_dir():
        root = root / split
    shards = sorted(str(p) for p in root.glob("*.array_record"))
    if not shards:
        raise UserError(f"data.path '{root}' holds no *.array_record files")
    return shards


class ArrayRecordSource(Source):
    """Users' own data: ArrayRecord shards written by `mmjax.data.build_array_record`."""

    def __init__(self, path: str, split: str) -> None:
        self.path, self.split = path, split
        self._shards = _array_record_shards(path, split)
        self._readers = [grain.sources.ArrayRecordDataSource(s) for s in self._shards]
        self._ends = list(itertools.accumulate(len(r) for r in self._readers))
        if not self._ends[-1]:
            raise UserError(f"data.path '{path}' holds no records")

    def __len__(self) -> int:
        return self._ends[-1]

    def _read(self, index: int) -> tuple[dict[str, Any], bytes, str, int]:
        index = self._check(index)
        shard = bisect.bisect_right(self._ends, index)
        position = index - (self._ends[shard - 1] if shard else 0)
        try:
            header, image_bytes = unpack_record(self._readers[shard][position])
        except ValueError as e:  # Includes JSON and UTF-8 errors.
            raise UserError(
                f"record {position} of shard '{self._shards[shard]}' is malformed: {e}"
            ) from e
        return header, image_bytes, self._shards[shard], position

    def __getitem__(self, index: int) -> Record:
        header, image_bytes, shard, position = self._read(index)
        try:
            image = decode_image(image_bytes)
        except ImageDecodeError as e:
            raise UserError(
                f"cannot decode the image of record {position} of shard '{shard}': {e}"
            ) from e
        label = header.get("label")
        return {
            "image": image,
            "caption": header["caption"],
            "label": -1 if label is None else int(label),
            "index": int(index),
        }

    def caption(self, index: int) -> str:
        return self._read(index)[0]["caption"]

    def __repr__(self) -> str:
        return f"ArrayRecordSource(path={self.path!r}, shards={len(self._shards)}, len={len(self)})"


# ------------------------------------------------------------------------------------- tfds


class TfdsSource(Source):
    """Any TFDS dataset through `tfds.data_source` (ArrayRecord-backed random access).

    Field names come from the config: `tfds_image_key`, `tfds_text_key` (empty: the caption is
    the label's class name, for datasets that name their classes) and `tfds_label_key` (empty:
    no labels).
    """

    def __init__(self, data_cfg: ConfigDict, split: str) -> None:
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise UserError(
                "data.source 'tfds' needs tensorflow_datasets: pip install tensorflow-datasets"
            ) from e
        if not data_cfg.tfds_name:
            raise UserError("data.tfds_name must name a TFDS dataset for data.source 'tfds'")
        self.name, self.split = data_cfg.tfds_name, split
        self._keys = {
            "tfds_image_key": data_cfg.tfds_image_key,
            "tfds_text_key": data_cfg.tfds_text_key,
            "tfds_label_key": data_cfg.tfds_label_key,
        }
        self._source = tfds.data_source(self.name, split=split, data_dir=data_cfg.path or None)
        self._label_name: Callable[[int], str] | None = None
        if not data_cfg.tfds_text_key:
            info = getattr(self._source, "dataset_info", None)
            key = data_cfg.tfds_label_key
            feature = info.features[key] if info is not None and key in info.features else None
            if not getattr(feature, "names", None):
                raise UserError(
                    f"TFDS '{self.name}' has no class names for data.tfds_label_key '{key}': "
                    "set data.tfds_text_key to its caption field"
                )
            self._label_name = feature.int2str

    def __len__(self) -> int:
        return len(self._source)

    def _field(self, example: dict[str, Any], config_key: str) -> Any:
        key = self._keys[config_key]
        if key not in example:
            raise UserError(
                f"TFDS '{self.name}' has no field data.{config_key} '{key}' "
                f"(fields: {', '.join(sorted(example))})"
            )
        return example[key]

    def __getitem__(self, index: int) -> Record:
        index = self._check(index)
        example = self._source[index]
        image = _to_rgb(np.asarray(self._field(example, "tfds_image_key")))
        label = int(self._field(example, "tfds_label_key")) if self._keys["tfds_label_key"] else -1
        if self._label_name is not None:
            caption = self._label_name(label)
        else:
            text = self._field(example, "tfds_text_key")
            caption = text.decode() if isinstance(text, bytes) else str(text)
        return {"image": image, "caption": caption, "label": label, "index": index}

    def __repr__(self) -> str:
        return f"TfdsSource(name={self.name!r}, split={self.split!r}, len={len(self)})"


# ---------------------------------------------------------------------------------- builder


# Sources defined in modules that build on this one (mmjax.data.scenes), registered by them:
# {data.source: (data config, split) -> Source}
BUILDERS: dict[str, Callable[[ConfigDict, str], Source]] = {}


def build_source(data_cfg: ConfigDict, split: str) -> Source:
    """Builds the source named by `data_cfg.source` for `split`."""
    source = data_cfg.source
    if source == "digits":
        return DigitsSource(split)
    if source == "skimage":
        return SkimageSource(split)
    if source == "shapes":
        _check_split("shapes", split, tuple(_SHAPES_SPLIT_IDS))
        return ShapesSource(split, int(data_cfg[f"shapes_num_{split}"]))
    if source in BUILDERS:
        return BUILDERS[source](data_cfg, split)
    if source == "array_record":
        return ArrayRecordSource(data_cfg.path, split)
    if source == "tfds":
        return TfdsSource(data_cfg, split)
    raise UserError(f"unknown data.source '{source}' (valid: {', '.join(SOURCES)})")


def sample_captions(source: Source, max_captions: int) -> list[str]:
    """Captions of up to `max_captions` records, evenly spaced over the source (deterministic)."""
    n = len(source)
    step = max(1, math.ceil(n / max_captions))
    return [source.caption(i) for i in range(0, n, step)]
