"""Image decoding and small registered preprocessing ops (in the style of big_vision pp ops).

An op factory takes an `ImageSpec` (the target side, the resize rule, the normalisation) and
returns a function from one image array to another. Configs name ops by their registry key
(`data.image_ops`), so a pipeline is a list of strings rather than code; `data.image_resize`,
`data.image_mean` and `data.image_std` say how `resize` and `value_range` work, so a checkpoint's
own preprocessing is three config values (an import writes them: mmjax.convert).
"""

import dataclasses
import io
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmjax.errors import UserError

ImageOp = Callable[[np.ndarray], np.ndarray]
RandomImageOp = Callable[[np.ndarray, np.random.Generator], np.ndarray]

IMAGE_OPS: dict[str, Callable[["ImageSpec"], ImageOp]] = {}
# Train-time augmentations: applied after `image_ops`, with a per-example seeded generator.
AUGMENT_OPS: dict[str, Callable[[int], RandomImageOp]] = {}
# Resize geometries: `data.image_resize` is "<geometry>_<PIL filter>", e.g. "squash_bilinear".
RESIZES: dict[str, Callable[[int, Image.Resampling], ImageOp]] = {}

DEFAULT_IMAGE_OPS = ("resize", "value_range")
DEFAULT_IMAGE_RESIZE = "crop_bilinear"
# (x / 255 - 0.5) / 0.5: pixels in [-1, 1], what mmjax's own towers train on
DEFAULT_IMAGE_MEAN = (0.5, 0.5, 0.5)
DEFAULT_IMAGE_STD = (0.5, 0.5, 0.5)


def _registrar(registry: dict[str, Callable]) -> Callable[[str], Callable]:
    """A decorator factory adding op factories to `registry` under a name configs can use."""

    def register_as(name: str) -> Callable[[Callable], Callable]:
        def wrap(factory: Callable) -> Callable:
            registry[name] = factory
            return factory

        return wrap

    return register_as


register = _registrar(IMAGE_OPS)
_register_augment = _registrar(AUGMENT_OPS)
_register_resize = _registrar(RESIZES)


def split_resize(rule: str) -> tuple[str, Image.Resampling]:
    """A `data.image_resize` rule's geometry (RESIZES) and PIL filter; a UserError if unknown."""
    geometry, _, name = rule.rpartition("_")
    filters = {f.name.lower(): f for f in Image.Resampling}
    if geometry not in RESIZES or name not in filters:
        raise UserError(
            f"data.image_resize {rule!r} is not <geometry>_<filter> with a geometry in "
            f"{sorted(RESIZES)} and a filter in {sorted(filters)}"
        )
    return geometry, filters[name]


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """How records' images become model inputs: resized to `size` x `size` by the rule
    `resize`, then normalised per channel as (x / 255 - mean) / std."""

    size: int
    resize: str = DEFAULT_IMAGE_RESIZE
    mean: tuple[float, ...] = DEFAULT_IMAGE_MEAN
    std: tuple[float, ...] = DEFAULT_IMAGE_STD

    def __post_init__(self) -> None:
        split_resize(self.resize)
        for key, values in (("image_mean", self.mean), ("image_std", self.std)):
            if len(values) not in (1, 3):
                raise UserError(f"data.{key} needs 1 or 3 values (per channel), got {values}")
        if min(self.std) <= 0:
            raise UserError(f"data.image_std must be positive, got {self.std}")

    @classmethod
    def from_config(cls, data_cfg: Mapping[str, Any]) -> "ImageSpec":
        """The spec of a `config.data` (configs written before these keys get the defaults)."""
        return cls(
            size=int(data_cfg["image_size"]),
            resize=str(data_cfg.get("image_resize", DEFAULT_IMAGE_RESIZE)),
            mean=tuple(float(m) for m in data_cfg.get("image_mean", DEFAULT_IMAGE_MEAN)),
            std=tuple(float(s) for s in data_cfg.get("image_std", DEFAULT_IMAGE_STD)),
        )


class ImageDecodeError(ValueError):
    """Encoded image bytes that PIL cannot decode; the message is PIL's reason."""


def decode_image(data: bytes) -> np.ndarray:
    """Decodes encoded image bytes (PNG, JPEG, ...) to uint8 RGB [H, W, 3].

    Raises ImageDecodeError for corrupt data (PIL raises many types); callers add the location.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError as e:
        raise ImageDecodeError("cannot identify image file") from e
    except Exception as e:
        raise ImageDecodeError(f"{type(e).__name__}: {e}") from e


def _square_crop(image: np.ndarray, side: int) -> np.ndarray:
    """The centred `side` x `side` window (offsets rounded down, as HF's center_crop)."""
    h, w = image.shape[:2]
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


def _largest_square(image: np.ndarray) -> np.ndarray:
    return _square_crop(image, min(image.shape[:2]))


def _pil_resize(image: np.ndarray, hw: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """uint8 [H, W, 3] resized to `hw` by PIL (its filters are antialiased when shrinking)."""
    if image.shape[:2] == hw:
        return image
    pil = Image.fromarray(image).resize((hw[1], hw[0]), resample)
    return np.asarray(pil, dtype=np.uint8)


@_register_resize("crop")
def _crop_resize(size: int, resample: Image.Resampling) -> ImageOp:
    """The largest centred square resized to size x size: mmjax's default ("crop_bilinear")."""
    return lambda image: _pil_resize(_largest_square(image), (size, size), resample)


@_register_resize("shortest_side")
def _shortest_side_resize(size: int, resample: Image.Resampling) -> ImageOp:
    """The shortest side resized to `size` (the other to int(size * long / short)), then the
    centred square: CLIP's rule ("shortest_side_bicubic": HF CLIPImageProcessor, open_clip,
    whose torchvision crop rounds an odd margin's half to even where HF and mmjax floor it)."""

    def op(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        short, long = min(h, w), max(h, w)
        other = int(size * long / short)
        resized = _pil_resize(image, (size, other) if h <= w else (other, size), resample)
        return _square_crop(resized, size)

    return op


@_register_resize("squash")
def _squash_resize(size: int, resample: Image.Resampling) -> ImageOp:
    """Resized to size x size, the aspect ratio not kept: SigLIP's rule ("squash_bicubic" in
    HF SiglipImageProcessor; big_vision resizes bilinear)."""
    return lambda image: _pil_resize(image, (size, size), resample)


@register("central_crop")
def central_crop(spec: ImageSpec) -> ImageOp:
    """Crops the largest centred square, so a later resize keeps the aspect ratio."""
    del spec
    return _largest_square


@register("resize")
def resize(spec: ImageSpec) -> ImageOp:
    """Resizes a uint8 image to [size, size] by the rule `data.image_resize` (RESIZES)."""
    geometry, resample = split_resize(spec.resize)
    return RESIZES[geometry](spec.size, resample)


@register("value_range")
def value_range(spec: ImageSpec) -> ImageOp:
    """Maps uint8 [0, 255] to float32 (x / 255 - mean) / std per channel: [-1, 1] for the
    default 0.5 / 0.5, an imported checkpoint's own statistics once `build` records them."""
    std = np.asarray(spec.std, np.float64)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    offset = (np.asarray(spec.mean, np.float64) / std).astype(np.float32)

    def op(image: np.ndarray) -> np.ndarray:
        return image.astype(np.float32) * scale - offset

    return op


@_register_augment("random_shift")
def random_shift(image_size: int) -> RandomImageOp:
    """Translates by up to 1/8 of the side in x and y, repeating edge pixels into the gap."""
    pad = max(1, round(image_size / 8))

    def op(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape[:2]
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        top, left = rng.integers(0, 2 * pad + 1, size=2)
        return padded[top : top + h, left : left + w]

    return op


def _compose(registry: dict[str, Callable], key: str, names: Sequence[str], setting: Any):
    """The registered ops `names`, each made from `setting`, applied in order; extra call
    arguments go to every op."""
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise UserError(f"unknown data.{key} {unknown} (valid: {', '.join(sorted(registry))})")
    ops = [registry[n](setting) for n in names]

    def apply(image: np.ndarray, *args) -> np.ndarray:
        for op in ops:
            image = op(image, *args)
        return image

    return apply


def build_augment_ops(names: Sequence[str], image_size: int) -> RandomImageOp:
    """Composes the registered augmentations `names`: `apply(image, rng)`."""
    return _compose(AUGMENT_OPS, "augment", names, image_size)


def build_image_ops(names: Sequence[str], spec: ImageSpec) -> ImageOp:
    """Composes the registered ops `names` (applied in order) for images of `spec`."""
    return _compose(IMAGE_OPS, "image_ops", names, spec)


def image_preprocessor(data_cfg: Mapping[str, Any]) -> ImageOp:
    """A `config.data`'s image ops with its resize rule and normalisation: the one path from a
    record's uint8 image to model input (training, evals, sampling)."""
    ops = tuple(data_cfg.get("image_ops", DEFAULT_IMAGE_OPS))
    return build_image_ops(ops, ImageSpec.from_config(data_cfg))


def read_image_file(path: str, flag: str) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an image file of any size; one UserError naming the command-line
    `flag` when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path!r}: no such file")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{flag} {path!r}: not an image PIL can read ({e})") from None
