"""CLIP (Radford et al., 2021): ViT image tower + causal text tower + linear projections.

The same two-tower module, configured differently, is SigLIP (models/siglip.py).
"""

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models.text import TextTransformer
from mmjax.models.vit import VisionTransformer
from mmjax.nn.dense import DenseGeneral
from mmjax.nn.initializers import logical


class CLIP(nn.Module):
    """Dual encoder; `__call__(batch)` returns unit-norm embeddings and the logit scale.

    `image` and `text` hold the keyword arguments of VisionTransformer / TextTransformer.
    The temperature is learned as log(1/T), initialised at log(1/0.07) and its exponent
    clipped at 100 (Sec. 2.5 of the paper). `logit_bias_init` adds SigLIP's learned bias;
    `image_proj=False` uses the pooled image features as the embedding (SigLIP's MAP head).
    """

    image: Mapping[str, Any]
    text: Mapping[str, Any]
    embed_dim: int
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float | None = 100.0
    logit_bias_init: float | None = None
    image_proj: bool = True
    proj_bias: bool = False
    attention_impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        kw = dict(
            attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype
        )
        self.image_tower = VisionTransformer(**self.image, **kw)
        self.text_tower = TextTransformer(**self.text, **kw)
        proj = dict(
            features=(self.embed_dim,),
            kernel_axes=("embed", "proj"),
            use_bias=self.proj_bias,
            init="lecun_normal",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if self.image_proj:
            self.image_head = DenseGeneral(**proj)
        elif self.image["width"] != self.embed_dim:
            raise ValueError(
                f"image_proj=False needs image width {self.image['width']} == embed_dim "
                f"{self.embed_dim}"
            )
        self.text_head = DenseGeneral(**proj)
        self.logit_scale = self.param(
            "logit_scale", logical(nn.initializers.constant(self.logit_scale_init)), ()
        )
        if self.logit_bias_init is not None:
            self.logit_bias = self.param(
                "logit_bias", logical(nn.initializers.constant(self.logit_bias_init)), ()
            )

    def encode_image(self, images: jnp.ndarray) -> jnp.ndarray:
        """Images [B, H, W, C] -> L2-normalised embeddings [B, embed_dim] in f32."""
        pooled, _ = self.image_tower(images, pooled_only=True)
        return _normalize(self.image_head(pooled) if self.image_proj else pooled)

    def image_features(self, images: jnp.ndarray) -> jnp.ndarray:
        """Pooled image-tower features [B, width] in f32: what a linear probe reads."""
        pooled, _ = self.image_tower(images, pooled_only=True)
        return pooled.astype(jnp.float32)

    def encode_text(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """Token ids [B, L] -> L2-normalised embeddings [B, embed_dim] in f32."""
        pooled, _ = self.text_tower(tokens, pooled_only=True)
        return _normalize(self.text_head(pooled))

    def __call__(self, batch: Mapping[str, jnp.ndarray], *, train: bool = False) -> dict:
        del train  # no dropout in CLIP
        scale = self.logit_scale
        if self.logit_scale_max is not None:
            scale = jnp.minimum(scale, math.log(self.logit_scale_max))
        out = {
            "image_emb": self.encode_image(batch["image"]),
            "text_emb": self.encode_text(batch["text"]),
            "logit_scale": jnp.exp(scale),
        }
        if self.logit_bias_init is not None:
            out["logit_bias"] = self.logit_bias
        return out


def _normalize(x: jnp.ndarray) -> jnp.ndarray:
    x = x.astype(jnp.float32)
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


Model = CLIP
