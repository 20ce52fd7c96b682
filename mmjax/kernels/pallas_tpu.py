"""Grid variant of the block-sparse flash attention: one grid step per listed block (TPU).

The block lists of `block_mask.block_map` are scalar-prefetched, so the grid's index maps
fetch only listed blocks (splash attention's recipe) and Mosaic double-buffers those copies.
The reduction axis runs over list slots: its extent is the largest non-empty count (static
when the metadata is known at trace time, else a dynamic grid bound, the traced maximum),
not all kv blocks; slots past a block's own count re-map to the block already resident (no
new copy) and are skipped by `pl.when`.

- forward, grid (B, H, nq, kv slots): o and the row log-sum-exp;
- dq, grid (B, H, nq, kv slots);
- dk/dv, grid (B, Hkv, nk, groups, q slots): one kv head accumulates over every query head
  of its group and every listed q block, so grouped-query attention needs no repeat.

Metadata is packed TPU-friendly: q side [B, Sq, 3] (segment, span, position) columns, kv
side [B, 2, Sk] (segment, span) rows. lse and delta are [B, H, Sq, 1].
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mmjax.kernels import flash_common as fc
from mmjax.kernels.block_mask import BlockMap, TokenMeta

Array = jnp.ndarray

# q/k/v/o are laid out [B, heads, S, D]: blocks (None, None, rows, D) tile VMEM well.
HEADS_FIRST = True


def _q_ids(q_meta: Array) -> tuple[Array, Array, Array]:
    return q_meta[:, 0:1], q_meta[:, 1:2], q_meta[:, 2:3]


def _kv_ids(kv_meta: Array) -> tuple[Array, Array]:
    return kv_meta[0:1, :], kv_meta[1:2, :]


def _run_listed(is_full: Array, update: Callable, make_mask: Callable, refs: tuple) -> None:
    """Reads the running state from `refs`, applies one listed block, writes it back."""
    state = fc.full_or_masked(is_full, update, make_mask, tuple(r[...] for r in refs))
    for ref, value in zip(refs, state, strict=True):
        ref[...] = value


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(
    kv_index_ref, kv_full_ref, kv_count_ref,  # scalar prefetch: flattened block lists
    q_ref, k_ref, v_ref, q_meta_ref, kv_meta_ref,  # inputs
    *refs,  # outputs o, lse[, visits], then scratch m, l, acc
    cfg: fc.Config,
) -> None:  # fmt: skip
    """One (b, h, q block, kv slot) step of the online-softmax forward."""
    if cfg.debug:
        o_ref, lse_ref, visits_ref, *scratch = refs
    else:
        (o_ref, lse_ref, *scratch), visits_ref = refs, None
    b, i, slot = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * cfg.num_q_blocks + i
    entry = row * cfg.num_kv_blocks + slot

    @pl.when(slot == 0)
    def _init():
        for ref, value in zip(scratch, fc.init_softmax(*scratch[2].shape), strict=True):
            ref[...] = value
        if visits_ref is not None:
            visits_ref[...] = jnp.zeros_like(visits_ref)

    @pl.when(slot < kv_count_ref[row])
    def _visit():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        j = kv_index_ref[entry]
        _run_listed(
            slot < kv_full_ref[row],
            lambda state, mask: fc.softmax_update(state, q, k, v, mask, cfg.scale, cfg.soft_cap),
            lambda: fc.token_mask(
                _q_ids(q_meta_ref[...]), _kv_ids(kv_meta_ref[...]), j * cfg.block_kv, cfg
            ),
            tuple(scratch),
        )
        if visits_ref is not None:
            visits_ref[...] += 1

    @pl.when(slot == pl.num_programs(3) - 1)
    def _finish():
        o, lse = fc.finish_softmax(tuple(r[...] for r in scratch))
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse


def _dq_kernel(
    kv_index_ref, kv_full_ref, kv_count_ref,
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_meta_ref, kv_meta_ref,
    dq_ref, dq_sc,
    *, cfg: fc.Config,
) -> None:  # fmt: skip
    """One (b, h, q block, kv slot) step of dq = scale * sum_kv dS K."""
    b, i, slot = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * cfg.num_q_blocks + i
    entry = row * cfg.num_kv_blocks + slot

    @pl.when(slot == 0)
    def _init():
        dq_sc[...] = jnp.zeros_like(dq_sc)

    @pl.when(slot < kv_count_ref[row])
    def _visit():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        lse, delta = lse_ref[...], delta_ref[...]
        j = kv_index_ref[entry]
        _run_listed(
            slot < kv_full_ref[row],
            lambda st, mask: (
                fc.dq_update(st[0], q, k, v, do, lse, delta, mask, cfg.scale, cfg.soft_cap),
            ),
            lambda: fc.token_mask(
                _q_ids(q_meta_ref[...]), _kv_ids(kv_meta_ref[...]), j * cfg.block_kv, cfg
            ),
            (dq_sc,),
        )

    @pl.when(slot == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_index_ref, q_full_ref, q_count_ref,
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_meta_ref, kv_meta_ref,
    dk_ref, dv_ref, dk_sc, dv_sc,
    *, cfg: fc.Config,
) -> None:  # fmt: skip
    """One (b, kv head, kv block, group head, q slot) step of dk and dv."""
    b, j, head, slot = (pl.program_id(a) for a in (0, 2, 3, 4))
    col = b * cfg.num_kv_blocks + j

    @pl.when((head == 0) & (slot == 0))
    def _init():
        dk_sc[...] = jnp.zeros_like(dk_sc)
        dv_sc[...] = jnp.zeros_like(dv_sc)

    @pl.when(slot < q_count_ref[col])
    def _visit():
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        lse, delta = lse_ref[...], delta_ref[...]
        _run_listed(
            slot < q_full_ref[col],
            lambda st, mask: fc.dkv_update(
                st, q, k, v, do, lse, delta, mask, cfg.scale, cfg.soft_cap
            ),
            lambda: fc.token_mask(
                _q_ids(q_meta_ref[...]), _kv_ids(kv_meta_ref[...]), j * cfg.block_kv, cfg
            ),
            (dk_sc, dv_sc),
        )

    last = (head == pl.num_programs(3) - 1) & (slot == pl.num_programs(4) - 1)

    @pl.when(last)
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas_calls


def _lists(bm: BlockMap, by_q: bool) -> tuple[Array, Array, Array]:
    """The scalar-prefetch operands: flattened index lists, FULL counts and counts."""
    if by_q:
        return bm.kv_index.reshape(-1), bm.kv_full.reshape(-1), bm.kv_count.reshape(-1)
    return bm.q_index.reshape(-1), bm.q_full.reshape(-1), bm.q_count.reshape(-1)


def _slots(static: int | None, count: Array) -> int | Array:
    """Reduction-axis extent: the static maximum, or the traced one (a dynamic grid bound)."""
    return static if static is not None else jnp.maximum(jnp.max(count), 1)


def _packed_meta(meta: TokenMeta) -> tuple[Array, Array]:
    """q_meta [B, Sq, 3] (segment, span, position) and kv_meta [B, 2, Sk] (segment, span)."""
    return (
        jnp.stack([meta.q_segment, meta.q_span, meta.q_position], axis=-1),
        jnp.stack([meta.kv_segment, meta.kv_span], axis=1),
    )


def _by_q_specs(cfg: fc.Config) -> tuple[Callable, Callable, list[pl.BlockSpec]]:
    """Index maps of the (b, h, q block, kv slot) grids: q-side blocks, listed kv blocks and
    the two metadata blocks."""
    nq, nk, g, bq, bk = (
        cfg.num_q_blocks, cfg.num_kv_blocks, cfg.groups, cfg.block_q, cfg.block_kv,
    )  # fmt: skip

    def kv_block(b, i, s, kv_index):
        return kv_index[(b * nq + i) * nk + s]

    def q_side(width):
        return pl.BlockSpec((None, None, bq, width), lambda b, h, i, s, *_: (b, h, i, 0))

    def kv_side(width):
        return pl.BlockSpec(
            (None, None, bk, width),
            # lax.div, not //: floor division lowers through sign, which Mosaic lowers per chip
            lambda b, h, i, s, ki, *_: (b, jax.lax.div(h, g), kv_block(b, i, s, ki), 0),
        )

    meta = [
        pl.BlockSpec((None, bq, 3), lambda b, h, i, s, *_: (b, i, 0)),
        pl.BlockSpec((None, 2, bk), lambda b, h, i, s, ki, *_: (b, 0, kv_block(b, i, s, ki))),
    ]
    return q_side, kv_side, meta


def _semantics(grid_rank: int) -> pltpu.CompilerParams:
    return pltpu.CompilerParams(
        dimension_semantics=("parallel",) * 3 + ("arbitrary",) * (grid_rank - 3)
    )


def forward(
    cfg: fc.Config, q: Array, k: Array, v: Array, meta: TokenMeta, bm: BlockMap,
    cost: pl.CostEstimate | None = None,
) -> tuple[Array, ...]:  # fmt: skip
    """(o [B,H,Sq,D], lse [B,H,Sq,1][, visits [B,H,Sq,1]: per row, its q block's count])."""
    batch, heads, q_len, d = q.shape
    bq = cfg.block_q
    q_side, kv_side, meta_specs = _by_q_specs(cfg)
    out_specs = [q_side(d), q_side(1)]
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((batch, heads, q_len, 1), jnp.float32),
    ]
    if cfg.debug:
        out_specs.append(q_side(1))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, q_len, 1), jnp.int32))
    grid = (batch, heads, cfg.num_q_blocks, _slots(cfg.kv_slots, bm.kv_count))
    outs = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=grid,
            in_specs=[q_side(d), kv_side(d), kv_side(d), *meta_specs],
            out_specs=out_specs,
            scratch_shapes=[
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, 1), jnp.float32),
                pltpu.VMEM((bq, d), jnp.float32),
            ],
        ),
        out_shape=out_shape,
        compiler_params=_semantics(len(grid)),
        interpret=cfg.interpret,
        cost_estimate=cost,
        name="flash_attention_fwd",
    )(*_lists(bm, by_q=True), q, k, v, *_packed_meta(meta))
    return tuple(outs)


def dq(
    cfg: fc.Config, q: Array, k: Array, v: Array, do: Array, lse: Array, delta: Array,
    meta: TokenMeta, bm: BlockMap, cost: pl.CostEstimate | None = None,
) -> Array:  # fmt: skip
    """dq [B,H,Sq,D] from lse and delta = rowsum(dO * O), both [B, H, Sq, 1]."""
    d = q.shape[-1]
    q_side, kv_side, meta_specs = _by_q_specs(cfg)
    grid = (q.shape[0], q.shape[1], cfg.num_q_blocks, _slots(cfg.kv_slots, bm.kv_count))
    row_specs = [q_side(d), kv_side(d), kv_side(d), q_side(d), q_side(1), q_side(1)]
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=grid,
            in_specs=[*row_specs, *meta_specs],
            out_specs=q_side(d),
            scratch_shapes=[pltpu.VMEM((cfg.block_q, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_semantics(len(grid)),
        interpret=cfg.interpret,
        cost_estimate=cost,
        name="flash_attention_dq",
    )(*_lists(bm, by_q=True), q, k, v, do, lse, delta, *_packed_meta(meta))


def dkv(
    cfg: fc.Config, q: Array, k: Array, v: Array, do: Array, lse: Array, delta: Array,
    meta: TokenMeta, bm: BlockMap, cost: pl.CostEstimate | None = None,
) -> tuple[Array, Array]:  # fmt: skip
    """dk, dv [B,Hkv,Sk,D]: each kv head over its group's query heads and listed q blocks."""
    batch, _, _, d = q.shape
    kv_heads = k.shape[1]
    bq, bk, g, nq, nk = (
        cfg.block_q, cfg.block_kv, cfg.groups, cfg.num_q_blocks, cfg.num_kv_blocks,
    )  # fmt: skip

    def q_block(b, j, t, qi):
        return qi[(b * nk + j) * nq + t]

    def q_of(width):  # query head `head` of kv head h's group, the t-th listed q block
        return pl.BlockSpec(
            (None, None, bq, width),
            lambda b, h, j, head, t, qi, *_: (b, h * g + head, q_block(b, j, t, qi), 0),
        )

    def kv_of(width):
        return pl.BlockSpec((None, None, bk, width), lambda b, h, j, *_: (b, h, j, 0))

    meta_specs = [
        pl.BlockSpec((None, bq, 3), lambda b, h, j, head, t, qi, *_: (b, q_block(b, j, t, qi), 0)),
        pl.BlockSpec((None, 2, bk), lambda b, h, j, *_: (b, 0, j)),
    ]
    grid = (batch, kv_heads, nk, g, _slots(cfg.q_slots, bm.q_count))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=grid,
            in_specs=[q_of(d), kv_of(d), kv_of(d), q_of(d), q_of(1), q_of(1), *meta_specs],
            out_specs=[kv_of(d), kv_of(d)],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_semantics(len(grid)),
        interpret=cfg.interpret,
        cost_estimate=cost,
        name="flash_attention_dkv",
    )(*_lists(bm, by_q=False), q, k, v, do, lse, delta, *_packed_meta(meta))
    return dk, dv
