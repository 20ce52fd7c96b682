"""Attention kernels: the one public `attention` entry point, its mask semantics, backends.

`attention` validates inputs, gathers the mask keywords into one `MaskSpec` and dispatches
on `impl`: "xla" is the materialised-mask reference, "pallas" the block-sparse
flash-attention kernel (Mosaic on TPU, Triton on GPU, interpret mode on CPU), and "auto"
picks per backend and size (see `_resolve_impl`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mmjax.kernels.masks import MaskSpec, attention_mask
from mmjax.kernels.pallas_attention import pallas_attention
from mmjax.kernels.reference import attention_reference

__all__ = ["CPU_PALLAS_MIN_PAIRS", "IMPLS", "MaskSpec", "attention", "attention_mask"]

Array = jnp.ndarray

_BACKENDS: dict[str, Callable[..., Array]] = {
    "xla": attention_reference,
    "pallas": pallas_attention,
}

# Every accepted value of `impl`: "auto" plus one name per backend.
IMPLS: tuple[str, ...] = ("auto", *_BACKENDS)


# On CPU, "auto" runs the Pallas kernel (interpret mode) from this many query x key pairs on.
# Measured (benchmarks/attention.py, 8 heads, head_dim 64, causal, fwd+bwd per step): 128^2
# 12 vs 10 ms, 256^2 82 vs 46 ms, 512^2 272 vs 121 ms, 1024^2 1.3 s vs 0.30 s (xla vs
# pallas); the kernel compiles ~3 s slower, so below 512^2 the reference wins overall, and
# above it the reference's S x S temporaries grow (1 GB at S = 4096) while the kernel's don't.
CPU_PALLAS_MIN_PAIRS = 512 * 512


def _resolve_impl(impl: str, q_len: int, kv_len: int) -> str:
    """Maps `impl` to a backend name; "auto" picks the faster one on the default backend.

    TPU: "pallas" (Mosaic, grid variant). GPU: "pallas" (Triton, loop variant). CPU:
    "pallas" (interpret mode, loop variant) from `CPU_PALLAS_MIN_PAIRS` on, else "xla".
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; valid choices: {', '.join(IMPLS)}")
    if impl != "auto":
        return impl
    if jax.default_backend() in ("tpu", "gpu"):
        return "pallas"
    return "pallas" if q_len * kv_len >= CPU_PALLAS_MIN_PAIRS else "xla"


def _check_shapes(q: Array, k: Array, v: Array, mask: MaskSpec) -> None:
    """Raises ValueError for q/k/v or id shapes that break the contract of `attention`."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(
                f"{name} must be rank 4 [batch, seq, heads, head_dim], got shape {jnp.shape(x)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    batch, q_len, heads, head_dim = q.shape
    kv_batch, kv_len, kv_heads, kv_dim = k.shape
    if kv_batch != batch:
        raise ValueError(f"q and k/v batch sizes differ: {batch} vs {kv_batch}")
    if kv_dim != head_dim:
        raise ValueError(f"q and k/v head_dim differ: {head_dim} vs {kv_dim}")
    if min(q_len, kv_len, heads, head_dim, kv_heads) < 1:
        raise ValueError(f"q {q.shape} and k/v {k.shape} must have non-empty dimensions")
    if heads % kv_heads:
        raise ValueError(f"kv heads ({kv_heads}) must divide q heads ({heads})")
    for name in mask.array_fields():
        x = getattr(mask, name)
        if name == "q_offset":
            expected = (batch,)
        else:
            expected = (batch, kv_len if name.startswith("kv_") else q_len)
        if jnp.shape(x) != expected:
            raise ValueError(f"{name} must be shaped {expected}, got {jnp.shape(x)}")
    if jnp.ndim(mask.q_offset) > 1:
        raise ValueError(
            f"q_offset must be an int or shaped ({batch},), got {jnp.shape(mask.q_offset)}"
        )


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
    span_ids: Array | None = None,
    kv_span_ids: Array | None = None,
    causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    q_offset: int | Array = 0,
    impl: str = "auto",
) -> Array:
    """Masked multi-head attention, q [B, Sq, H, D], k/v [B, Sk, Hkv, D] -> [B, Sq, H, D].

    Hkv must divide H (grouped-query: query head h reads kv head h // (H // Hkv)). Token i
    (position `q_offset + i`) may see key j iff both share a non-zero segment id (0 = padding;
    no ids = all in segment 1), and, when `causal`, j <= i or both carry the same non-zero
    span id (a bidirectional span, e.g. one image), and, with `window` w, |i - j| < w. Ids are
    int [B, seq]; `kv_*` default to the query ones when Sq == Sk. `q_offset` is an int or an
    int array [B] (decoding against a KV cache). Rows that see nothing return 0. `scale`
    defaults to 1 / sqrt(D); `impl` is one of `IMPLS`.
    """
    mask = MaskSpec(
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        span_ids=span_ids,
        kv_span_ids=kv_span_ids,
        q_offset=q_offset,
        causal=causal,
        window=window,
    )
    _check_shapes(q, k, v, mask)
    backend = _resolve_impl(impl, q.shape[1], k.shape[1])
    return _BACKENDS[backend](q, k, v, mask.resolve(q.shape[1], k.shape[1]), scale=scale)
