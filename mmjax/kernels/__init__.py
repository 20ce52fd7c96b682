"""Attention kernels: the one public `attention` entry point, its mask semantics, backends.

`attention` validates inputs, gathers the mask keywords into one `MaskSpec` and dispatches
on `impl`: "xla" is the materialised-mask reference, "pallas" the block-sparse
flash-attention kernel (Mosaic on TPU, Triton on GPU, interpret mode on CPU), and "auto"
the fastest per platform. The platform's variant is chosen when the program is lowered, and
under a device mesh the kernels run inside `jax.shard_map` (`dispatch`).
"""

from __future__ import annotations

import jax.numpy as jnp

from mmjax.kernels.dispatch import CPU_PALLAS_MIN_PAIRS, Partition, attention_on_mesh
from mmjax.kernels.flash_common import check_soft_cap
from mmjax.kernels.masks import MaskSpec, attention_mask
from mmjax.kernels.reference import attention_reference

__all__ = ["CPU_PALLAS_MIN_PAIRS", "IMPLS", "MaskSpec", "attention", "attention_mask"]

Array = jnp.ndarray

# Every accepted value of `impl`. "auto": per platform, decided at lowering -- TPU the
# Mosaic kernel; GPU cuDNN where it applies, else the Triton kernel; CPU the interpret-mode
# kernel from `CPU_PALLAS_MIN_PAIRS` query x key pairs on, else the XLA reference.
IMPLS: tuple[str, ...] = ("auto", "xla", "pallas")


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
    logits_soft_cap: float | None = None,
    q_offset: int | Array = 0,
    impl: str = "auto",
    partition: Partition = None,
) -> Array:
    """Masked multi-head attention, q [B, Sq, H, D], k/v [B, Sk, Hkv, D] -> [B, Sq, H, D].

    Hkv must divide H (grouped-query: query head h reads kv head h // (H // Hkv)). Token i
    (position `q_offset + i`) may see key j iff both share a non-zero segment id (0 = padding;
    no ids = all in segment 1), and, when `causal`, j <= i or both carry the same non-zero
    span id (a bidirectional span, e.g. one image), and, with `window` w, |i - j| < w. Ids are
    int [B, seq]; `kv_*` default to the query ones when Sq == Sk. `q_offset` is an int or an
    int array [B] (decoding against a KV cache). Rows that see nothing return 0. `scale`
    defaults to 1 / sqrt(D). `logits_soft_cap` c > 0 (Gemma 2; default none) maps the scaled
    logits s = q.k * scale to c * tanh(s / c) before masking and softmax, in every impl.
    `impl` is one of `IMPLS`. `partition` says how q/k/v's four axes lie on the active
    device mesh (a PartitionSpec-like 4-tuple of mesh axis names; `mmjax.nn` passes its
    logical rules' mapping): the kernels then run per shard.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; valid choices: {', '.join(IMPLS)}")
    logits_soft_cap = check_soft_cap(logits_soft_cap)
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
    mask = mask.resolve(q.shape[1], k.shape[1])
    if impl == "xla":
        return attention_reference(q, k, v, mask, scale=scale, logits_soft_cap=logits_soft_cap)
    return attention_on_mesh(
        q, k, v, mask, scale=scale, impl=impl, partition=partition,
        logits_soft_cap=logits_soft_cap,
    )  # fmt: skip
