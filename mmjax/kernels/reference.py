"""XLA reference attention: a dense, materialised-mask softmax with the contract's semantics.

It is the ground truth the Pallas kernel is tested against and the fallback backend
("xla") of `mmjax.kernels.attention`: simple rather than fast, f32 logits and softmax,
grouped-query heads, an optional logit soft cap (Gemma 2: scaled logits s -> cap * tanh(s /
cap) before the mask), and rows that see nothing return exactly 0 (value and gradient).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mmjax.kernels.flash_common import check_soft_cap
from mmjax.kernels.masks import MaskSpec

Array = jnp.ndarray

# Finite stand-in for -inf on masked logits: exp() of it underflows to 0, and unlike -inf it
# never produces inf - inf = NaN when a whole row is masked.
_MASKED_LOGIT = -0.5 * float(jnp.finfo(jnp.float32).max)


def _reference(
    q: Array, k: Array, v: Array, mask: MaskSpec | None, scale: float | None,
    soft_cap: float | None = None,
) -> tuple[Array, Array]:  # fmt: skip
    """(out [B, Sq, H, D] in q's dtype, row log-sum-exp [B, H, Sq] f32, 0 on empty rows)."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    soft_cap = check_soft_cap(soft_cap)
    mask = (MaskSpec() if mask is None else mask).dense(q_len, kv_len)
    mask = mask[:, None, None]  # [b, 1, 1, Sq, Sk] against logits [B, Hkv, G, Sq, Sk]

    highest = jax.lax.Precision.HIGHEST
    qg = q.astype(jnp.float32).reshape(batch, q_len, kv_heads, groups, head_dim)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k.astype(jnp.float32), precision=highest)
    logits = logits * scale
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    logits = jnp.where(mask, logits, _MASKED_LOGIT)
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.where(mask, jnp.exp(logits - row_max), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    # A row with no visible key has total 0: divide by 1 so it stays exactly 0, NaN-free.
    seen = total > 0
    probs = weights / jnp.where(seen, total, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v.astype(jnp.float32), precision=highest)
    lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, total, 1.0)), 0.0)
    return (
        out.reshape(batch, q_len, heads, v.shape[-1]).astype(q.dtype),
        lse.reshape(batch, heads, q_len),
    )


def attention_reference(
    q: Array, k: Array, v: Array, mask: MaskSpec | None = None, *, scale: float | None = None,
    logits_soft_cap: float | None = None,
) -> Array:  # fmt: skip
    """Masked softmax attention, q [B, Sq, H, D], k/v [B, Sk, Hkv, D] -> [B, Sq, H, D].

    Query head h reads kv head h // (H // Hkv); `mask` (default: none) is materialised by
    `MaskSpec.dense`. Logits and softmax run in f32 (matmuls at highest precision); the
    result has q's dtype. `scale` defaults to 1 / sqrt(D); `logits_soft_cap` c (default
    none) maps the scaled logits s to c * tanh(s / c) before masking. Shapes are assumed
    valid: `mmjax.kernels.attention` checks them.
    """
    return _reference(q, k, v, mask, scale, logits_soft_cap)[0]


def reference_forward(
    q: Array, k: Array, v: Array, mask: MaskSpec, *, scale: float | None = None,
    logits_soft_cap: float | None = None,
) -> tuple[Array, Array]:  # fmt: skip
    """`attention_reference` as a flash backend's forward: (out, lse [B, H, Sq] f32)."""
    return _reference(q, k, v, mask, scale, logits_soft_cap)


def reference_backward(
    q: Array, k: Array, v: Array, mask: MaskSpec, o: Array, lse: Array, do: Array,
    *, scale: float | None = None, logits_soft_cap: float | None = None,
) -> tuple[Array, Array, Array]:  # fmt: skip
    """(dq, dk, dv) of `attention_reference` for the cotangent `do`, recomputing the
    forward (the dispatcher uses it only below `CPU_PALLAS_MIN_PAIRS`, where that is cheap)."""
    del o, lse
    _, pullback = jax.vjp(
        lambda q, k, v: attention_reference(
            q, k, v, mask, scale=scale, logits_soft_cap=logits_soft_cap
        ),
        q, k, v,
    )  # fmt: skip
    return pullback(do)
