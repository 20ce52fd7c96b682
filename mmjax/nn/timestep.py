"""Diffusion timestep embeddings: sinusoidal features then an MLP (DDPM, Ho et al. 2020)."""

import flax.linen as nn
import jax.numpy as jnp

from mmjax.nn.dense import DenseGeneral, dtypes


def sinusoidal(t: jnp.ndarray, dim: int, max_period: float = 10_000.0) -> jnp.ndarray:
    """[..., dim] features cos(t w_i), sin(t w_i) with w_i = max_period^(-i / (dim/2))."""
    half = dim // 2
    freqs = max_period ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimestepEmbed(nn.Module):
    """t (any shape, in diffusion steps 0..T) -> [..., width]: sinusoid, Dense, SiLU, Dense."""

    width: int
    frequency_dim: int = 256
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jnp.ndarray) -> jnp.ndarray:
        kw = dtypes(self)
        h = DenseGeneral((self.width,), (None, "embed"), name="fc1", **kw)(
            sinusoidal(t, self.frequency_dim)
        )
        return DenseGeneral((self.width,), ("mlp", "embed"), name="fc2", **kw)(nn.silu(h))
