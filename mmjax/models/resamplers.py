"""Connectors: how an image encoder's tokens reach a language model.

Every connector maps image tokens [B, N, D_in] to visual tokens [B, M, out_dim] for the
decoder, and is built from a config dict by `build_connector(dict(type=..., out_dim=...,
...))`:

- `linear`: one projection (LLaVA, Liu et al., 2023).
- `mlp`: Linear -> GELU -> Linear (LLaVA-1.5, Liu et al., 2023b, Sec. 3.1).
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmjax.nn.dense import DenseGeneral
from mmjax.nn.mlp import gelu

ACT = ("batch", "length", "act_embed")


class LinearProjector(nn.Module):
    """Image tokens [B, N, D_in] -> [B, N, out_dim] by one linear layer (LLaVA)."""

    out_dim: int
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image_tokens: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = DenseGeneral((self.out_dim,), ("embed", "embed"), name="proj", **kw)(image_tokens)
        return nn.with_logical_constraint(y, ACT)


class MlpProjector(nn.Module):
    """Image tokens [B, N, D_in] -> Linear -> GELU -> Linear -> [B, N, out_dim] (LLaVA-1.5)."""

    out_dim: int
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image_tokens: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = DenseGeneral((self.out_dim,), ("embed", "mlp"), name="fc1", **kw)(image_tokens)
        y = DenseGeneral((self.out_dim,), ("mlp", "embed"), name="fc2", **kw)(gelu(h))
        return nn.with_logical_constraint(y, ACT)


CONNECTORS: dict[str, type[nn.Module]] = {"linear": LinearProjector, "mlp": MlpProjector}


def build_connector(cfg: Mapping[str, Any], **kw: Any) -> nn.Module:
    """The connector `cfg["type"]` with the rest of `cfg` (and `kw`: dtypes, name) as fields."""
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind not in CONNECTORS:
        raise ValueError(f"unknown connector type {kind!r}; valid: {sorted(CONNECTORS)}")
    return CONNECTORS[kind](**cfg, **kw)
