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


def _compose(registry: dict[str, Callable], key: str, names: Sequence[str], image_size: int):
    """The registered ops `names` applied in order; extra call arguments go to every op."""
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise UserError(f"unknown data.{key} {unknown} (valid: {', '.join(sorted(registry))})")
    ops = [registry[n](image_size) for n in names]

    def apply(image: np.ndarray, *args) -> np.ndarray:
        for op in ops:
            image = op(image, *args)
        return image

    return apply


def build_augment_ops(names: Sequence[str], image_size: int) -> RandomImageOp:
    """Composes the registered augmentations `names`: `apply(image, rng)`."""
    return _compose(AUGMENT_OPS, "augment", names, image_size)


def build_image_ops(names: Sequence[str], image_size: int) -> ImageOp:
    """Composes the registered ops `names` (applied in order) for images of `image_size`."""
    return _compose(IMAGE_OPS, "image_ops", names, image_size)
