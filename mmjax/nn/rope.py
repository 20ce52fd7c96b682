"""Rotary position embeddings (Su et al., 2021), as in Llama: rotate-half convention."""

import jax.numpy as jnp


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, theta: float = 10_000.0) -> jnp.ndarray:
    """Rotates q or k [batch, seq, heads, head_dim] by its token positions [batch, seq].

    Pairs dimension i with i + head_dim/2 and rotates it by positions * theta^(-2i/head_dim);
    computed in f32, returned in x's dtype.
    """
    half = x.shape[-1] // 2
    if x.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {x.shape[-1]}")
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None, None] * freqs  # [B, S, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
