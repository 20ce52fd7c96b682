"""Image decoding and small registered preprocessing ops (in the style of big_vision pp ops).

An op factory takes the target `image_size` and returns a function from one image array to
another. Configs name ops by their registry key (`data.image_ops`), so a pipeline is a list of
strings rather than code.
"""

import io
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from mmjax.errors import UserError

ImageOp = Callable[[np.ndarray], np.ndarray]
RandomImageOp = Callable[[np.ndarray, np.random.Generator], np.ndarray]

IMAGE_OPS: dict[str, Callable[[int], ImageOp]] = {}
# Train-time augmentations: applied after `image_ops`, with a per-example seeded generator.
AUGMENT_OPS: dict[str, Callable[[int], RandomImageOp]] = {}

DEFAULT_IMAGE_OPS = ("central_crop", "resize", "value_range")


def register(name: str) -> Callable[[Callable[[int], ImageOp]], Callable[[int], ImageOp]]:
    """Registers an op factory under `name` so that configs can refer to it."""

    def wrap(factory: Callable[[int], ImageOp]) -> Callable[[int], ImageOp]:
        IMAGE_OPS[name] = factory
        return factory

    return wrap


def _register_augment(
    name: str,
) -> Callable[[Callable[[int], RandomImageOp]], Callable[[int], RandomImageOp]]:
    def wrap(factory: Callable[[int], RandomImageOp]) -> Callable[[int], RandomImageOp]:
        AUGMENT_OPS[name] = factory
        return factory

    return wrap


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


@register("central_crop")
def central_crop(image_size: int) -> ImageOp:
    """Crops the largest centred square, so a later resize keeps the aspect ratio."""
    del image_size

    def op(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        return image[top : top + side, left : left + side]

    return op


@register("resize")
def resize(image_size: int) -> ImageOp:
    """Resizes a uint8 image to [image_size, image_size] with PIL (bilinear, antialiased)."""

    def op(image: np.ndarray) -> np.ndarray:
        if image.shape[:2] == (image_size, image_size):
            return image
        pil = Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(pil, dtype=np.uint8)

    return op


@register("value_range")
def value_range(image_size: int) -> ImageOp:
    """Maps uint8 [0, 255] to float32 [-1, 1], the range the image towers expect."""
    del image_size

    def op(image: np.ndarray) -> np.ndarray:
        return image.astype(np.float32) / 127.5 - 1.0

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


def build_augment_ops(names: Sequence[str], image_size: int) -> RandomImageOp:
    """Composes the registered augmentations `names` (applied in order)."""
    unknown = [n for n in names if n not in AUGMENT_OPS]
    if unknown:
        raise UserError(f"unknown data.augment {unknown} (valid: {', '.join(sorted(AUGMENT_OPS))})")
    ops = [AUGMENT_OPS[n](image_size) for n in names]

    def apply(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        for op in ops:
            image = op(image, rng)
        return image

    return apply


def build_image_ops(names: Sequence[str], image_size: int) -> ImageOp:
    """Composes the registered ops `names` (applied in order) for images of `image_size`."""
    unknown = [n for n in names if n not in IMAGE_OPS]
    if unknown:
        raise UserError(f"unknown data.image_ops {unknown} (valid: {', '.join(sorted(IMAGE_OPS))})")
    ops = [IMAGE_OPS[n](image_size) for n in names]

    def apply(image: np.ndarray) -> np.ndarray:
        for op in ops:
            image = op(image)
        return image

    return apply
