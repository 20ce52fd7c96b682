"""The per-token diffusion head of MAR (Li et al., 2024, Sec. 3.2 and 5.1: "SimpleMLPAdaLN").

A small MLP denoises one continuous token at a time: it predicts the noise in x_t given the
timestep t and a condition z (the autoregressive decoder's output at that position). x_t is
projected to the head's width; t's embedding plus z's projection is the condition c, which
modulates every residual block through AdaLN (shift, scale and gate from c, as DiT's adaLN-Zero:
zero-initialised, so each block starts as the identity) and the final layer (shift, scale; the
output projection zero-initialised, so the first prediction is 0).
"""

import flax.linen as nn
import jax.numpy as jnp

from mmjax.nn.dense import DenseGeneral, dtypes
from mmjax.nn.norms import plain_layer_norm
from mmjax.nn.timestep import TimestepEmbed


def _modulate(x: jnp.ndarray, shift: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    return x * (1.0 + scale) + shift


class AdaLNResBlock(nn.Module):
    """x + gate(c) * MLP(LN(x) * (1 + scale(c)) + shift(c)) (MAR's ResBlock)."""

    width: int
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
        kw = dtypes(self)
        mod = DenseGeneral((3, self.width), ("mlp", None, None), init="zeros", name="ada", **kw)
        shift, scale, gate = jnp.moveaxis(mod(nn.silu(c)), -2, 0)
        h = nn.LayerNorm(epsilon=self.norm_eps, name="norm", **kw)(x)
        h = _modulate(h, shift, scale)
        h = DenseGeneral((self.width,), (None, "mlp"), name="fc1", **kw)(h)
        h = DenseGeneral((self.width,), ("mlp", None), name="fc2", **kw)(nn.silu(h))
        return x + gate * h


class DiffusionHead(nn.Module):
    """(x_t [..., token_dim], t [...], z [..., z_dim]) -> predicted noise [..., token_dim] (f32).

    `depth` AdaLN residual blocks of `width` units (MAR: 3 blocks; 1,024 units for MAR-B/L,
    1,280 for MAR-H). `t` is in diffusion steps (0..T).
    """

    token_dim: int
    width: int
    depth: int = 3
    norm_eps: float = 1e-6
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_t: jnp.ndarray, t: jnp.ndarray, z: jnp.ndarray) -> jnp.ndarray:
        kw = dtypes(self)
        x = DenseGeneral((self.width,), ("patch", "mlp"), name="proj_in", **kw)(x_t)
        c = TimestepEmbed(self.width, name="time_embed", **kw)(t)
        c = c + DenseGeneral((self.width,), ("embed", "mlp"), name="cond", **kw)(z)
        for i in range(self.depth):
            x = AdaLNResBlock(self.width, self.norm_eps, name=f"block{i}", **kw)(x, c)
        mod = DenseGeneral((2, self.width), ("mlp", None, None), init="zeros", name="ada_out", **kw)
        shift, scale = jnp.moveaxis(mod(nn.silu(c)), -2, 0)
        x = _modulate(plain_layer_norm(x, self.norm_eps), shift, scale)
        out = DenseGeneral(
            (self.token_dim,), ("mlp", "patch"), init="zeros", name="proj_out", **kw
        )(x)
        return out.astype(jnp.float32)
