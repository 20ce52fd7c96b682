"""Rotary position embeddings (Su et al., 2021), as in Llama: rotate-half convention, with the
frequency scalings of long-context checkpoints (`rope_scaling`, Hugging Face's names),
Qwen2-VL's multimodal RoPE (M-RoPE: `sections`) and its ViT's 2D RoPE (`axial_rope_angles`).
A model computes the angles once per forward pass and every layer `rotate`s by them."""

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp

ROPE_SCALINGS = ("linear", "llama3")


def rope_frequencies(
    head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None
) -> jnp.ndarray:
    """The rotation frequencies theta^(-2i/head_dim), i < head_dim/2, as f32 [head_dim/2].

    `scaling` ({"rope_type": ..., "factor": ...}, as a Hugging Face config's `rope_scaling`):
    "linear" divides every frequency by `factor` (position interpolation); "llama3" divides
    the low frequencies by `factor`, keeps the high ones and interpolates between them
    (Llama 3.1, with low_freq_factor, high_freq_factor, original_max_position_embeddings).
    """
    half = head_dim // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if scaling is None:
        return freqs
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return freqs / factor
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported; valid: {ROPE_SCALINGS}")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / freqs
    scaled = jnp.where(wavelength > context / low, freqs / factor, freqs)
    smooth = (context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return jnp.where(medium, smoothed, scaled)


def rope_angles(
    positions: jnp.ndarray,
    head_dim: int,
    theta: float = 10_000.0,
    scaling: Mapping[str, Any] | None = None,
    sections: Sequence[int] | None = None,
) -> jnp.ndarray:
    """The rotation angles [batch, seq, head_dim/2] (f32) of token `positions` [batch, seq]:
    positions * frequency i (`rope_frequencies`).

    M-RoPE (Qwen2-VL, Wang et al., 2024, Sec. 2.1): with `sections` (e.g. [16, 24, 24], summing
    to head_dim/2), `positions` is [3, batch, seq] (temporal, height, width ids), and the k-th
    run of `sections[k]` frequencies turns by id k % 3 (transformers' mrope_section).
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    freqs = rope_frequencies(head_dim, theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [(3,) B, S, half]
    if sections is not None:
        return _sectioned(angles, sections, head_dim // 2)
    if positions.ndim != 2:
        raise ValueError(f"positions must be [batch, seq] without sections, got {positions.shape}")
    return angles


def axial_rope_angles(
    positions: jnp.ndarray, head_dim: int, theta: float = 10_000.0
) -> jnp.ndarray:
    """2D RoPE on a patch grid (Qwen2-VL's ViT, Sec. 2.1): `positions` [..., 2] (row, column)
    -> angles [..., head_dim/2], the first half turned by the row and the second by the column,
    both with the head_dim/4 frequencies of a head_dim/2 RoPE."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    freqs = rope_frequencies(head_dim // 2, theta)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [..., 2, head_dim/4]
    return angles.reshape(*angles.shape[:-2], head_dim // 2)


def rotate(x: jnp.ndarray, angles: jnp.ndarray) -> jnp.ndarray:
    """Rotates q or k [batch, seq, heads, head_dim] by `angles` [batch, seq, head_dim/2]: pairs
    dimension i with i + head_dim/2 (Llama's rotate-half convention); computed in f32,
    returned in x's dtype."""
    half = x.shape[-1] // 2
    if angles.shape[-1] != half:
        raise ValueError(f"{angles.shape[-1]} RoPE angles for head_dim {x.shape[-1]}")
    angles = angles[..., None, :]  # [B, S, 1, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def apply_rope(
    x: jnp.ndarray,
    positions: jnp.ndarray,
    theta: float = 10_000.0,
    scaling: Mapping[str, Any] | None = None,
    sections: Sequence[int] | None = None,
) -> jnp.ndarray:
    """Rotates q or k [batch, seq, heads, head_dim] by its token `positions` ([batch, seq], or
    [3, batch, seq] with M-RoPE `sections`): `rotate` by `rope_angles`."""
    return rotate(x, rope_angles(positions, x.shape[-1], theta, scaling, sections))


def _sectioned(angles: jnp.ndarray, sections: Sequence[int], half: int) -> jnp.ndarray:
    """[3, B, S, half] angles of the three position ids -> [B, S, half]: run k of `sections`
    from id k % 3."""
    if sum(sections) != half:
        raise ValueError(f"M-RoPE sections {list(sections)} must sum to head_dim / 2 = {half}")
    if angles.ndim != 4 or angles.shape[0] != 3:
        raise ValueError(f"M-RoPE positions must be [3, batch, seq], got {angles.shape[:-1]}")
    bounds = [0, *itertools.accumulate(sections)]
    runs = [angles[k % 3, ..., a:b] for k, (a, b) in enumerate(itertools.pairwise(bounds))]
    return jnp.concatenate(runs, axis=-1)
