"""Block maps: which (q block, kv block) tiles of the attention mask are empty, partial or full.

A flash-attention kernel tiles the [Sq, Sk] mask into [bq, bk] blocks. This module decides,
from per-token metadata only (never a materialised S x S mask), whether a block is

- EMPTY: no query of the block sees any key of it -> the kernel neither loads nor computes it;
- FULL: every query sees every key -> the kernel skips building the mask;
- PARTIAL: anything else -> the kernel builds the token mask of `masks.py`'s rule.

The classification is conservative (sound): EMPTY and FULL are only claimed when the
per-block summaries (min / max of the non-zero ids, position ranges) prove them; when in
doubt a block is PARTIAL, which is always correct, just slower. It is exact for causal and
window masks with padding, and for packed sequences whose segments are contiguous.

It also builds compact lists for the kernels' grids: for each q block the indices of its
non-empty kv blocks (forward and dq), and for each kv block the indices of its non-empty q
blocks (dk / dv), each padded by repeating its last entry so that a grid step past the end
maps to an already-resident block (no new copy on TPU) and is skipped by a `pl.when`.
Everything is jnp and jit-able; with concrete inputs it also runs eagerly to size the grid.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mmjax.kernels.masks import _kv_ids, _query_positions

Array = jnp.ndarray

EMPTY, PARTIAL, FULL = 0, 1, 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMap:
    """Per-batch block classification and the compact visiting lists derived from it.

    Attributes:
      kind: [B, nq, nk] int32, EMPTY / PARTIAL / FULL of each (q block, kv block).
      kv_index: [B, nq, nk] int32, the non-empty kv blocks of each q block in increasing
        order, then the last one repeated (0 for a q block that sees nothing).
      kv_kind: [B, nq, nk] int32, `kind` of each `kv_index` entry (EMPTY past the count).
      kv_count: [B, nq] int32, how many kv blocks of each q block are non-empty.
      q_index, q_kind: [B, nk, nq] and q_count [B, nk]: the same lists per kv block (for
        the dk / dv kernel, which loops over q blocks).
    """

    kind: Array
    kv_index: Array
    kv_kind: Array
    kv_count: Array
    q_index: Array
    q_kind: Array
    q_count: Array


def _summaries(ids: Array, block: int) -> dict[str, Array]:
    """Per-block min / max of the non-zero ids and whether the block has / is all zeros."""
    batch, length = ids.shape
    x = ids.reshape(batch, length // block, block)
    nonzero = x != 0
    big = jnp.iinfo(jnp.int32).max
    return {
        "min": jnp.min(jnp.where(nonzero, x, big), axis=-1),
        "max": jnp.max(jnp.where(nonzero, x, -1), axis=-1),
        "any_zero": jnp.any(~nonzero, axis=-1),
        "all_zero": jnp.all(~nonzero, axis=-1),
    }


def _same_nonzero_blocks(qs: dict[str, Array], ks: dict[str, Array]) -> tuple[Array, Array]:
    """(none, all) [B, nq, nk]: no pair / every pair shares an equal non-zero id (sound)."""
    qmin, qmax = qs["min"][:, :, None], qs["max"][:, :, None]
    kmin, kmax = ks["min"][:, None, :], ks["max"][:, None, :]
    none = qs["all_zero"][:, :, None] | ks["all_zero"][:, None, :] | (qmax < kmin) | (kmax < qmin)
    every = (
        ~qs["any_zero"][:, :, None]
        & ~ks["any_zero"][:, None, :]
        & (qmin == qmax)
        & (kmin == kmax)
        & (qmin == kmin)
    )
    return none, every


def _position_range(
    positions: Array, segment_ids: Array, block: int, far: int
) -> tuple[Array, Array]:
    """Per-block (lowest, highest) position of the non-padding tokens: [B, n] each."""
    batch, length = positions.shape
    pos = positions.reshape(batch, length // block, block)
    real = segment_ids.reshape(pos.shape) != 0
    return (
        jnp.min(jnp.where(real, pos, far), axis=-1),
        jnp.max(jnp.where(real, pos, -far), axis=-1),
    )


def _compact(kind: Array) -> tuple[Array, Array, Array]:
    """Lists the non-empty entries of the last axis: (index, kind of index, count)."""
    nonempty = kind != EMPTY
    count = jnp.sum(nonempty, axis=-1, dtype=jnp.int32)
    # Stable sort on "is empty" keeps the non-empty indices first, in increasing order.
    order = jnp.argsort(~nonempty, axis=-1, stable=True).astype(jnp.int32)
    slots = jnp.arange(kind.shape[-1], dtype=jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
    index = jnp.where(slots < count[..., None], order, last)
    index_kind = jnp.where(
        slots < count[..., None], jnp.take_along_axis(kind, index, axis=-1), EMPTY
    )
    return index, index_kind, count


def block_map(
    q_segment_ids: Array,
    kv_segment_ids: Array,
    q_span_ids: Array,
    kv_span_ids: Array,
    q_positions: Array,
    *,
    block_q: int,
    block_kv: int,
    causal: bool,
    window: int | None,
) -> BlockMap:
    """Classifies every (q block, kv block) and lists the non-empty ones.

    Inputs are the kernel's padded token metadata: int32 [B, Sq] (q_*) and [B, Sk] (kv_*),
    with segment id 0 on padding and span id 0 where there is no span; `q_positions` are the
    absolute query positions (q_offset applied), key positions are 0..Sk-1. Sq and Sk must
    be multiples of `block_q` and `block_kv`.
    """
    batch, q_len = q_segment_ids.shape
    kv_len = kv_segment_ids.shape[1]
    if q_len % block_q or kv_len % block_kv:
        raise ValueError(f"lengths {q_len}, {kv_len} not multiples of {block_q}, {block_kv}")
    seg_none, seg_all = _same_nonzero_blocks(
        _summaries(q_segment_ids, block_q), _summaries(kv_segment_ids, block_kv)
    )
    empty, full = seg_none, seg_all

    # Position ranges over the non-padding tokens (segment != 0) of each block only, so a
    # block's padding never makes it look visible. All-padding blocks are EMPTY already;
    # the sentinels stay far from int32 overflow in the differences below.
    far = 1 << 28
    k_pos = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))
    q_lo, q_hi = _position_range(q_positions, q_segment_ids, block_q, far)
    k_lo, k_hi = _position_range(k_pos, kv_segment_ids, block_kv, far)
    q_lo, q_hi = q_lo[:, :, None], q_hi[:, :, None]  # [B, nq, 1]
    k_lo, k_hi = k_lo[:, None, :], k_hi[:, None, :]  # [B, 1, nk]
    if causal:
        span_none, span_all = _same_nonzero_blocks(
            _summaries(q_span_ids, block_q), _summaries(kv_span_ids, block_kv)
        )
        empty = empty | ((k_lo > q_hi) & span_none)
        full = full & ((k_hi <= q_lo) | span_all)
    if window is not None:
        empty = empty | (k_lo - q_hi >= window) | (q_lo - k_hi >= window)
        full = full & (jnp.maximum(q_hi - k_lo, k_hi - q_lo) < window)
    kind = jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL)).astype(jnp.int32)
    kv_index, kv_kind, kv_count = _compact(kind)
    q_index, q_kind, q_count = _compact(jnp.swapaxes(kind, 1, 2))
    return BlockMap(kind, kv_index, kv_kind, kv_count, q_index, q_kind, q_count)


def padded_token_metadata(
    batch: int,
    q_len: int,
    kv_len: int,
    q_padded: int,
    kv_padded: int,
    *,
    segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
    span_ids: Array | None = None,
    kv_span_ids: Array | None = None,
    q_offset: int | Array = 0,
) -> tuple[Array, Array, Array, Array, Array]:
    """The contract's metadata as the kernels read it, padded to whole blocks.

    Returns int32 (q_segment, kv_segment, q_span, kv_span, q_positions), [B, q_padded] or
    [B, kv_padded]: missing segment ids become 1 (one segment), missing span ids 0, kv ids
    default to the query ones as in `masks.attention_mask`, and padding gets segment 0 so
    that it sees, and is seen by, nothing.
    """
    kv_segment_ids = _kv_ids("segment_ids", segment_ids, kv_segment_ids, q_len, kv_len)
    kv_span_ids = _kv_ids("span_ids", span_ids, kv_span_ids, q_len, kv_len)

    def ids(x: Array | None, length: int, padded: int, fill: int) -> Array:
        x = jnp.full((batch, length), fill, jnp.int32) if x is None else x.astype(jnp.int32)
        return jnp.pad(jnp.broadcast_to(x, (batch, length)), ((0, 0), (0, padded - length)))

    return (
        ids(segment_ids, q_len, q_padded, 1),
        ids(kv_segment_ids, kv_len, kv_padded, 1),
        ids(span_ids, q_len, q_padded, 0),
        ids(kv_span_ids, kv_len, kv_padded, 0),
        jnp.broadcast_to(_query_positions(q_padded, q_offset), (batch, q_padded)),
    )
