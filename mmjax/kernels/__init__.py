"""Attention kernels: the one public `attention` entry point, its mask semantics, backends.

`attention` validates inputs and dispatches on `impl`: "xla" is the materialised-mask
reference, "pallas" the block-sparse flash-attention kernel (Mosaic on TPU, interpret mode
on CPU), and "auto" picks per backend (see `_resolve_impl`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mmjax.kernels.masks import attention_mask
from mmjax.kernels.pallas_attention import pallas_attention
from mmjax.kernels.reference import attention_reference

__all__ = ["IMPLS", "attention", "attention_mask"]

Array = jnp.ndarray

_BACKENDS: dict[str, Callable[..., Array]] = {
    "xla": attention_reference,
    "pallas": pallas_attention,
}

# Every accepted value of `impl`: "auto" plus one name per backend.
IMPLS: tuple[str, ...] = ("auto", *_BACKENDS)


def _resolve_impl(impl: str) -> str:
    """Maps `impl` to a backend name; "auto" picks the faster one on the default backend.

    TPU: "pallas" (Mosaic). CPU: "xla" -- the kernel only runs in interpret mode there, a
    while loop over grid steps, measured 1.2-3.5x slower than the reference (forward and
    forward+backward, S=1024-4096, benchmarks/attention.py), though ~13x lighter in memory.
    GPU: "xla" until the kernel has a Triton / Mosaic GPU lowering: its scalar-prefetched
    block lists are a TPU grid feature that Triton lacks.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; valid choices: {', '.join(IMPLS)}")
    if impl == "auto":
        return "pallas" if jax.default_backend() == "tpu" else "xla"
    return impl


def _check_shapes(
    q: Array,
    k: Array,
    v: Array,
    q_ids: dict[str, Array | None],
    kv_ids: dict[str, Array | None],
    q_offset: int | Array,
) -> None:
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
    for ids, seq_len in ((q_ids, q_len), (kv_ids, kv_len)):
        for name, x in ids.items():
            if x is not None and jnp.shape(x) != (batch, seq_len):
                raise ValueError(f"{name} must be shaped {(batch, seq_len)}, got {jnp.shape(x)}")
    if jnp.shape(q_offset) not in ((), (batch,)):
        raise ValueError(f"q_offset must be an int or shaped ({batch},), got {jnp.shape(q_offset)}")


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
    backend = _resolve_impl(impl)
    _check_shapes(
        q,
        k,
        v,
        q_ids={"segment_ids": segment_ids, "span_ids": span_ids},
        kv_ids={"kv_segment_ids": kv_segment_ids, "kv_span_ids": kv_span_ids},
        q_offset=q_offset,
    )
    return _BACKENDS[backend](
        q,
        k,
        v,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        span_ids=span_ids,
        kv_span_ids=kv_span_ids,
        causal=causal,
        window=window,
        q_offset=q_offset,
        scale=scale,
    )
