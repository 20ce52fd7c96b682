"""What a converter returns: an mmjax model config, its parameters, and the input it expects."""

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.convert.torch_layers import check_against_model
from mmjax.data.config import DATA_DEFAULTS
from mmjax.data.image_ops import (
    DEFAULT_IMAGE_MEAN,
    DEFAULT_IMAGE_RESIZE,
    DEFAULT_IMAGE_STD,
    ImageSpec,
)
from mmjax.errors import UserError
from mmjax.models import build_model

log = logging.getLogger("mmjax.convert")

# Hugging Face / open_clip activation names -> mmjax.nn.mlp.ACTIVATIONS
ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
}


# Published image preprocessing (finish's keywords) for checkpoints that ship none: OpenAI
# CLIP's (HF CLIPImageProcessor's and open_clip's defaults) and HF SiglipImageProcessor's
OPENAI_CLIP_PREPROCESSING = dict(
    image_mean=(0.48145466, 0.4578275, 0.40821073),
    image_std=(0.26862954, 0.26130258, 0.27577711),
    image_resize="shortest_side_bicubic",
)
HF_SIGLIP_PREPROCESSING = dict(
    image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), image_resize="squash_bicubic"
)
IMAGE_KEYS = ("image_mean", "image_std", "image_resize")


def activation(name: str, source: str) -> str:
    if name not in ACTIVATIONS:
        raise UserError(f"{source}: activation {name!r} has no mmjax equivalent")
    return ACTIVATIONS[name]


@dataclasses.dataclass(frozen=True)
class Imported:
    """An imported two-tower model: `model` is an experiment's `config.model` dict.

    `image_size` is (height, width) and `channels` the colour channels the position
    embeddings and patch projection were trained for; `text_len` the text context length;
    `image_mean`, `image_std` and `image_resize` the preprocessing the checkpoint was trained
    with, as `config.data` keys (mmjax.data.image_ops).
    """

    model: dict[str, Any]
    params: dict[str, Any]
    image_size: tuple[int, int]
    channels: int
    text_len: int
    image_mean: tuple[float, ...] = DEFAULT_IMAGE_MEAN
    image_std: tuple[float, ...] = DEFAULT_IMAGE_STD
    image_resize: str = DEFAULT_IMAGE_RESIZE

    def module(self) -> nn.Module:
        return build_model(self.model)

    def example_batch(self, batch: int = 1) -> dict[str, jax.Array]:
        return {
            "image": jnp.zeros((batch, *self.image_size, self.channels), jnp.float32),
            "text": jnp.zeros((batch, self.text_len), jnp.int32),
        }

    def data_settings(self, data_cfg: Mapping[str, Any]) -> dict[str, Any]:
        """The checkpoint's preprocessing as `config.data` keys, for `build` to record.

        A key `data_cfg` sets to other than its mmjax default (DATA_DEFAULTS) is the run's own
        choice and is kept (with a warning); at its default, the checkpoint's value wins.
        """
        settings = {}
        for key in IMAGE_KEYS:
            ours, theirs = data_cfg.get(key, DATA_DEFAULTS[key]), getattr(self, key)
            if _value(ours) in (_value(DATA_DEFAULTS[key]), _value(theirs)):
                settings[key] = theirs
            else:
                log.warning("data.%s %s kept over the imported checkpoint's %s", key, ours, theirs)
                settings[key] = ours
        return settings


def _value(setting: Any) -> Any:
    """A setting comparable across tuples, lists and ints (a resize rule stays a string)."""
    return setting if isinstance(setting, str) else tuple(float(v) for v in setting)


def finish(
    model: dict,
    params: dict,
    image_size: Any,
    channels: int,
    source: str,
    *,
    image_mean: Any = DEFAULT_IMAGE_MEAN,
    image_std: Any = DEFAULT_IMAGE_STD,
    image_resize: str = DEFAULT_IMAGE_RESIZE,
) -> Imported:
    """Checks `params` against the model `model` describes and packs the result with the
    checkpoint's image preprocessing (`OPENAI_CLIP_PREPROCESSING`, ...; default mmjax's own)."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    mean, std = (tuple(float(v) for v in np.atleast_1d(x)) for x in (image_mean, image_std))
    try:
        ImageSpec(int(image_size[0]), image_resize, mean, std)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    imported = Imported(
        model=model,
        params={},
        image_size=tuple(int(s) for s in image_size),
        channels=channels,
        text_len=model["text"]["max_len"],
        image_mean=mean,
        image_std=std,
        image_resize=image_resize,
    )
    module = imported.module()
    example = imported.example_batch()
    checked = check_against_model(params, lambda: module.init(jax.random.key(0), example), source)
    return dataclasses.replace(imported, params=checked)


def check_vocab(imported: Imported, vocab_size: int, tokenizer: str) -> None:
    """A tokenizer whose ids do not index the imported embedding table is an error."""
    rows = imported.model["text"]["vocab_size"]
    if vocab_size != rows:
        raise UserError(
            f"tokenizer {tokenizer} has {vocab_size} ids but the imported text embedding has "
            f"{rows} rows: use the tokenizer the checkpoint was trained with"
        )
