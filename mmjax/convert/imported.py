"""What a converter returns: an mmjax model config, its parameters, and the input it expects."""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.convert.torch_layers import check_against_model
from mmjax.errors import UserError
from mmjax.models import build_model

# Hugging Face / open_clip activation names -> mmjax.nn.mlp.ACTIVATIONS
ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
}


def activation(name: str, source: str) -> str:
    if name not in ACTIVATIONS:
        raise UserError(f"{source}: activation {name!r} has no mmjax equivalent")
    return ACTIVATIONS[name]


@dataclasses.dataclass(frozen=True)
class Imported:
    """An imported two-tower model: `model` is an experiment's `config.model` dict.

    `image_size` is (height, width) and `channels` the colour channels the position
    embeddings and patch projection were trained for; `text_len` the text context length.
    """

    model: dict[str, Any]
    params: dict[str, Any]
    image_size: tuple[int, int]
    channels: int
    text_len: int

    def module(self) -> nn.Module:
        return build_model(self.model)

    def example_batch(self, batch: int = 1) -> dict[str, jax.Array]:
        return {
            "image": jnp.zeros((batch, *self.image_size, self.channels), jnp.float32),
            "text": jnp.zeros((batch, self.text_len), jnp.int32),
        }


def finish(model: dict, params: dict, image_size: Any, channels: int, source: str) -> Imported:
    """Checks `params` against the model `model` describes and packs the result."""
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    imported = Imported(
        model=model,
        params={},
        image_size=tuple(int(s) for s in image_size),
        channels=channels,
        text_len=model["text"]["max_len"],
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
