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

It also builds compact lists for the kernels: for each q block the indices of its
non-empty kv blocks (forward and dq), and for each kv block the indices of its non-empty q
blocks (dk / dv), with their counts. Each list holds its FULL blocks first, then its PARTIAL
ones (each group in increasing order), and says how many are FULL: a kernel runs two
branch-free loops, the first without a mask (Triton's fused-attention tutorial splits its
causal loop the same way), instead of deciding per block. The loop variant iterates exactly
`count` entries; for the grid variant each list is padded by repeating its last entry, so
that a grid step past the end maps to an already-resident block (no new copy on TPU) and is
skipped by a `pl.when`. The code is written against an array module `xp`: jax.numpy
(jit-able, traced ids) or numpy (concrete ids: no compile, and the grid is sized from the
counts).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.kernels.masks import MaskSpec

Array = jnp.ndarray

EMPTY, PARTIAL, FULL = 0, 1, 2


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMap:
    """Per-batch block classification and the compact visiting lists derived from it.

    Attributes:
      kind: [B, nq, nk] int32, EMPTY / PARTIAL / FULL of each (q block, kv block).
      kv_index: [B, nq, nk] int32, the non-empty kv blocks of each q block: the FULL ones,
        then the PARTIAL ones (each in increasing order), then the last one repeated (0 for
        a q block that sees nothing).
      kv_full: [B, nq] int32, how many leading `kv_index` entries are FULL.
      kv_count: [B, nq] int32, how many kv blocks of each q block are non-empty.
      q_index, q_full: [B, nk, nq] and [B, nk], q_count [B, nk]: the same lists per kv
        block (for the dk / dv kernel, which loops over q blocks).
    """

    kind: Array
    kv_index: Array
    kv_full: Array
    kv_count: Array
    q_index: Array
    q_full: Array
    q_count: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenMeta:
    """The token metadata as the kernels read it: int32, padded to whole blocks.

    Attributes:
      q_segment, q_span, q_position: [B, Sq_padded]; segment 0 on padding, span 0 where
        there is none, positions absolute (q_offset applied).
      kv_segment, kv_span: [B, Sk_padded]; key positions are 0..Sk-1 implicitly.
    """

    q_segment: Array
    q_span: Array
    q_position: Array
    kv_segment: Array
    kv_span: Array


# Sentinels of the per-block summaries: larger than any id, and positions far enough out to
# stay clear of int32 overflow in the differences of `block_map`.
_BIG = int(np.iinfo(np.int32).max)
_FAR = 1 << 28


def _summaries(segment: Array, span: Array, position: Array, block: int, xp) -> dict[str, Array]:
    """Per-block summaries of one side's token metadata, [B, n] each.

    For segment and span ids: the min / max of the non-zero ids and whether the block has /
    is all zeros; the lowest / highest position of the non-padding (segment != 0) tokens.
    Computed as one min and one max reduction over stacked features (a cheap compile).
    """
    batch, length = segment.shape
    seg, spn, pos = (x.reshape(batch, length // block, block) for x in (segment, span, position))
    seg_zero, span_zero = (seg == 0).astype(xp.int32), (spn == 0).astype(xp.int32)
    low = xp.min(
        xp.stack(
            [
                xp.where(seg_zero == 1, _BIG, seg),
                xp.where(span_zero == 1, _BIG, spn),
                seg_zero,
                span_zero,
                xp.where(seg_zero == 1, _FAR, pos),
            ]
        ),
        axis=-1,
    )
    high = xp.max(
        xp.stack(
            [
                xp.where(seg_zero == 1, -1, seg),
                xp.where(span_zero == 1, -1, spn),
                seg_zero,
                span_zero,
                xp.where(seg_zero == 1, -_FAR, pos),
            ]
        ),
        axis=-1,
    )
    return {
        "segment": {
            "min": low[0],
            "max": high[0],
            "any_zero": high[2] == 1,
            "all_zero": low[2] == 1,
        },
        "span": {"min": low[1], "max": high[1], "any_zero": high[3] == 1, "all_zero": low[3] == 1},
        "lo": low[4],
        "hi": high[4],
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


def _compact(kind: Array, xp) -> tuple[Array, Array, Array]:
    """Lists the non-empty entries of the last axis, FULL ones first: (index, full, count)."""
    count = xp.sum(kind != EMPTY, axis=-1, dtype=xp.int32)
    full = xp.sum(kind == FULL, axis=-1, dtype=xp.int32)
    # A stable sort on (FULL, PARTIAL, EMPTY) keeps each group's indices in increasing order.
    rank = xp.where(kind == FULL, 0, xp.where(kind == PARTIAL, 1, 2))
    order = xp.argsort(rank, axis=-1, stable=True).astype(xp.int32)
    slots = xp.arange(kind.shape[-1], dtype=xp.int32)
    last = xp.take_along_axis(order, xp.maximum(count - 1, 0)[..., None], axis=-1)
    return xp.where(slots < count[..., None], order, last), full, count


def block_map(
    meta: TokenMeta, *, block_q: int, block_kv: int, causal: bool, window: int | None, xp=jnp
) -> BlockMap:
    """Classifies every (q block, kv block) and lists the non-empty ones.

    `meta` is the kernels' padded token metadata (`padded_token_metadata`); its lengths must
    be multiples of `block_q` and `block_kv`. Span ids only matter when `causal`. `xp` is
    the array module: jax.numpy (traceable), or numpy for concrete metadata (no compile).
    """
    batch, q_len = meta.q_segment.shape
    kv_len = meta.kv_segment.shape[1]
    if q_len % block_q or kv_len % block_kv:
        raise ValueError(f"lengths {q_len}, {kv_len} not multiples of {block_q}, {block_kv}")
    k_pos = xp.broadcast_to(xp.arange(kv_len, dtype=xp.int32), (batch, kv_len))
    qs = _summaries(meta.q_segment, meta.q_span, meta.q_position, block_q, xp)
    ks = _summaries(meta.kv_segment, meta.kv_span, k_pos, block_kv, xp)
    empty, full = _same_nonzero_blocks(qs["segment"], ks["segment"])

    # Position ranges cover the non-padding tokens (segment != 0) of each block only, so a
    # block's padding never makes it look visible; all-padding blocks are EMPTY already.
    q_lo, q_hi = qs["lo"][:, :, None], qs["hi"][:, :, None]  # [B, nq, 1]
    k_lo, k_hi = ks["lo"][:, None, :], ks["hi"][:, None, :]  # [B, 1, nk]
    if causal:
        span_none, span_all = _same_nonzero_blocks(qs["span"], ks["span"])
        empty = empty | ((k_lo > q_hi) & span_none)
        full = full & ((k_hi <= q_lo) | span_all)
    if window is not None:
        empty = empty | (k_lo - q_hi >= window) | (q_lo - k_hi >= window)
        full = full & (xp.maximum(q_hi - k_lo, k_hi - q_lo) < window)
    kind = xp.where(empty, EMPTY, xp.where(full, FULL, PARTIAL)).astype(xp.int32)
    kv_index, kv_full, kv_count = _compact(kind, xp)
    q_index, q_full, q_count = _compact(xp.swapaxes(kind, 1, 2), xp)
    return BlockMap(kind, kv_index, kv_full, kv_count, q_index, q_full, q_count)


def padded_token_metadata(
    mask: MaskSpec, batch: int, q_len: int, kv_len: int, q_padded: int, kv_padded: int, xp=jnp
) -> TokenMeta:
    """The metadata of a resolved `mask` (`MaskSpec.resolve`) as the kernels read it.

    Missing segment ids become 1 (one segment), missing span ids 0, and the padding up to
    `q_padded` / `kv_padded` gets segment 0 so that it sees, and is seen by, nothing. `xp`
    as in `block_map`.
    """

    def ids(x: Array | None, length: int, padded: int, fill: int) -> Array:
        x = xp.full((batch, length), fill, xp.int32) if x is None else xp.asarray(x, xp.int32)
        return xp.pad(xp.broadcast_to(x, (batch, length)), ((0, 0), (0, padded - length)))

    return TokenMeta(
        q_segment=ids(mask.segment_ids, q_len, q_padded, 1),
        q_span=ids(mask.span_ids, q_len, q_padded, 0),
        q_position=xp.broadcast_to(mask.query_positions(q_padded, xp), (batch, q_padded)),
        kv_segment=ids(mask.kv_segment_ids, kv_len, kv_padded, 1),
        kv_span=ids(mask.kv_span_ids, kv_len, kv_padded, 0),
    )
