"""Normalisation layers with logically partitioned parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.initializers import logical


class LayerNorm(nn.Module):
    """LayerNorm over the last axis; scale/bias are labelled `embed`. Statistics in f32."""

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return nn.LayerNorm(
            epsilon=self.epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scale_init=logical(nn.initializers.ones_init(), "embed"),
            bias_init=logical(nn.initializers.zeros_init(), "embed"),
        )(x)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, 2019) as in Llama; scale labelled `embed`."""

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return nn.RMSNorm(
            epsilon=self.epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scale_init=logical(nn.initializers.ones_init(), "embed"),
        )(x)


def plain_layer_norm(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """LayerNorm without affine parameters (an adaptive layer supplies them), statistics in
    f32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.var(x32, axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


NORMS = {"layer": LayerNorm, "rms": RMSNorm}


def make_norm(kind: str, **kwargs) -> nn.Module:
    """`NORMS[kind](**kwargs)`, with a clear error for an unknown kind."""
    if kind not in NORMS:
        raise ValueError(f"unknown norm {kind!r}; valid: {sorted(NORMS)}")
    return NORMS[kind](**kwargs)
