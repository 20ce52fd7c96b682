"""Loop variant of the block-sparse flash attention: a loop over listed blocks (GPU, CPU).

Triton has no scalar prefetch and no dynamic grid bounds, so the grid covers only the
output blocks and each program walks its own list of non-empty blocks with a `fori_loop`
whose trip count is read from the lists (ordinary int32 inputs):

- forward, grid (B, H, nq): loops over the q block's listed kv blocks (online softmax);
- dq, grid (B, H, nq): the same loop;
- dk/dv, grid (B, Hkv x split, nk): loops over the query heads of (a share of) the kv
  head's group and, for each, the kv block's listed q blocks (the transposed lists); with
  few kv heads each group is split over several programs whose partial sums are added
  after (GQA would otherwise leave most of an H100's 132 SMs idle).

Every input is passed whole (a block equal to the array) and the kernel slices its tiles
with `pl.ds`: on GPU these are plain global-memory loads; in interpret mode on CPU (where
this variant is the default) it keeps the interpreter from copying the inputs back at every
grid step. Empty blocks are never loaded. Each list holds its FULL blocks first, so a
program runs two loops, the first over FULL blocks without a mask, the second over PARTIAL
ones with it: the loop bodies hold no branch (a `cond` around the dots becomes an `scf.if`
that keeps Triton from pipelining loads and matmuls, Hopper's async wgmma included).
q/k/v/o stay in the caller's [B, S, heads, D] layout (a tile is rows x D of one head: no
transposes); lse /
delta are [B, H, Sq]; the metadata is `TokenMeta`'s five [B, S] arrays, read as [bq] / [bk]
vectors.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mmjax.kernels import flash_common as fc
from mmjax.kernels.block_mask import BlockMap, TokenMeta

Array = jnp.ndarray

HEADS_FIRST = False  # q/k/v/o are [B, S, heads, D]


def _whole(x: Array) -> pl.BlockSpec:
    """A block that is the whole array, whatever the program: the kernel slices it."""
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _rows(block: Array, size: int) -> pl.Slice:
    """Rows block * size ... + size - 1, aligned for the compiler."""
    return pl.ds(pl.multiple_of(block * size, size), size)


def _q_ids(meta: TokenMeta, b: Array, rows: pl.Slice) -> tuple[Array, Array, Array]:
    """(segment, span, position) columns [bq, 1] of the q block at `rows`."""
    return tuple(r[b, rows][:, None] for r in (meta.q_segment, meta.q_span, meta.q_position))


def _kv_ids(meta: TokenMeta, b: Array, rows: pl.Slice) -> tuple[Array, Array]:
    """(segment, span) rows [1, bk] of the kv block at `rows`."""
    return meta.kv_segment[b, rows][None, :], meta.kv_span[b, rows][None, :]


def _compiler_params(cfg: fc.Config):
    """Triton launch parameters of `cfg` (None in interpret mode)."""
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _call(kernel, cfg: fc.Config, grid, out_specs, out_shape, name: str, cost, *args: Array):
    """pallas_call of a loop-variant kernel: every input whole, `cfg` bound."""
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid=grid,
        in_specs=[_whole(x) for x in args],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(cfg),
        interpret=cfg.interpret,
        cost_estimate=cost,
        name=name,
    )(*args)


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(
    kv_index_ref, kv_full_ref, kv_count_ref, q_ref, k_ref, v_ref, *refs, cfg: fc.Config
) -> None:
    """Program (b, h, q block i): online softmax over the q block's listed kv blocks."""
    meta = TokenMeta(*refs[:5])
    o_ref, lse_ref, *visits_ref = refs[5:]
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk, kvh = cfg.block_q, cfg.block_kv, h // cfg.groups
    q_rows = _rows(i, bq)
    q = q_ref[b, q_rows, h, :]
    q_ids = _q_ids(meta, b, q_rows)

    def body(t, carry, masked: bool):
        state, visits = carry
        j = kv_index_ref[b, i, t]
        kv_rows = _rows(j, bk)
        k, v = k_ref[b, kv_rows, kvh, :], v_ref[b, kv_rows, kvh, :]
        mask = fc.token_mask(q_ids, _kv_ids(meta, b, kv_rows), j * bk, cfg) if masked else None
        return fc.softmax_update(state, q, k, v, mask, cfg.scale, cfg.soft_cap), visits + 1

    init = (fc.init_softmax(bq, q.shape[-1]), jnp.int32(0))
    state, visits = fc.full_then_partial(kv_full_ref[b, i], kv_count_ref[b, i], body, init)
    o, lse = fc.finish_softmax(state)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]
    if visits_ref:
        visits_ref[0][...] = jnp.full((bq,), visits, jnp.int32)


def _dq_kernel(
    kv_index_ref, kv_full_ref, kv_count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
    *refs, cfg: fc.Config,
) -> None:  # fmt: skip
    """Program (b, h, q block i): dq = scale * sum over its listed kv blocks of dS K."""
    meta, dq_ref = TokenMeta(*refs[:5]), refs[5]
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk, kvh = cfg.block_q, cfg.block_kv, h // cfg.groups
    q_rows = _rows(i, bq)
    q, do = q_ref[b, q_rows, h, :], do_ref[b, q_rows, h, :]
    lse, delta = lse_ref[b, h, q_rows][:, None], delta_ref[b, h, q_rows][:, None]
    q_ids = _q_ids(meta, b, q_rows)

    def body(t, dq, masked: bool):
        j = kv_index_ref[b, i, t]
        kv_rows = _rows(j, bk)
        k, v = k_ref[b, kv_rows, kvh, :], v_ref[b, kv_rows, kvh, :]
        mask = fc.token_mask(q_ids, _kv_ids(meta, b, kv_rows), j * bk, cfg) if masked else None
        return fc.dq_update(dq, q, k, v, do, lse, delta, mask, cfg.scale, cfg.soft_cap)

    zeros = jnp.zeros(q.shape, jnp.float32)
    dq = fc.full_then_partial(kv_full_ref[b, i], kv_count_ref[b, i], body, zeros)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_index_ref, q_full_ref, q_count_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
    *refs, cfg: fc.Config,
) -> None:  # fmt: skip
    """Program (b, s, kv block j): dk, dv of kv head s // split over its share s % split of
    the group's query heads and their listed q blocks (the whole group when split is 1)."""
    meta, dk_ref, dv_ref = TokenMeta(*refs[:5]), refs[5], refs[6]
    b, s, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bq, bk, split = cfg.block_q, cfg.block_kv, cfg.kv_head_split
    h, share = jax.lax.div(s, split), jax.lax.rem(s, split)
    heads = cfg.groups // split
    kv_rows = _rows(j, bk)
    k, v = k_ref[b, kv_rows, h, :], v_ref[b, kv_rows, h, :]
    kv_ids = _kv_ids(meta, b, kv_rows)

    def per_head(head, dkv):
        qh = h * cfg.groups + share * heads + head

        def body(t, dkv, masked: bool):
            i = q_index_ref[b, j, t]
            q_rows = _rows(i, bq)
            q, do = q_ref[b, q_rows, qh, :], do_ref[b, q_rows, qh, :]
            lse, delta = lse_ref[b, qh, q_rows][:, None], delta_ref[b, qh, q_rows][:, None]
            mask = fc.token_mask(_q_ids(meta, b, q_rows), kv_ids, j * bk, cfg) if masked else None
            return fc.dkv_update(dkv, q, k, v, do, lse, delta, mask, cfg.scale, cfg.soft_cap)

        return fc.full_then_partial(q_full_ref[b, j], q_count_ref[b, j], body, dkv)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, heads, per_head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas_calls


def _meta_arrays(meta: TokenMeta) -> tuple[Array, ...]:
    return tuple(jax.tree.leaves(meta))


def forward(
    cfg: fc.Config, q: Array, k: Array, v: Array, meta: TokenMeta, bm: BlockMap,
    cost: pl.CostEstimate | None = None,
) -> tuple[Array, ...]:  # fmt: skip
    """(o [B,Sq,H,D], lse [B,H,Sq][, visits [B,H,Sq]: per row, its q block's count])."""
    batch, q_len, heads, d = q.shape
    bq = cfg.block_q
    out_specs = [
        pl.BlockSpec((None, bq, None, d), lambda b, h, i: (b, i, h, 0)),
        pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32),
    ]
    if cfg.debug:
        out_specs.append(out_specs[1])
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, q_len), jnp.int32))
    outs = _call(
        _fwd_kernel, cfg, (batch, heads, cfg.num_q_blocks), out_specs, out_shape,
        "flash_attention_fwd_loop", cost, bm.kv_index, bm.kv_full, bm.kv_count, q, k, v,
        *_meta_arrays(meta),
    )  # fmt: skip
    return tuple(outs)


def dq(
    cfg: fc.Config, q: Array, k: Array, v: Array, do: Array, lse: Array, delta: Array,
    meta: TokenMeta, bm: BlockMap, cost: pl.CostEstimate | None = None,
) -> Array:  # fmt: skip
    """dq [B,Sq,H,D] from lse and delta = rowsum(dO * O), both [B, H, Sq]."""
    batch, _, heads, d = q.shape
    return _call(
        _dq_kernel, cfg, (batch, heads, cfg.num_q_blocks),
        pl.BlockSpec((None, cfg.block_q, None, d), lambda b, h, i: (b, i, h, 0)),
        jax.ShapeDtypeStruct(q.shape, q.dtype), "flash_attention_dq_loop", cost,
        bm.kv_index, bm.kv_full, bm.kv_count, q, k, v, do, lse, delta, *_meta_arrays(meta),
    )  # fmt: skip


def dkv(
    cfg: fc.Config, q: Array, k: Array, v: Array, do: Array, lse: Array, delta: Array,
    meta: TokenMeta, bm: BlockMap, cost: pl.CostEstimate | None = None,
) -> tuple[Array, Array]:  # fmt: skip
    """dk, dv [B,Sk,Hkv,D]: each kv head over its group's query heads and listed q blocks;
    with `cfg.kv_head_split` > 1 the group's shares write f32 partials summed here."""
    batch, d = q.shape[0], q.shape[3]
    kv_len, kv_heads = k.shape[1], k.shape[2]
    split = cfg.kv_head_split
    partial = (batch, kv_len, kv_heads * split, d)
    dtypes = (k.dtype, v.dtype) if split == 1 else (jnp.float32, jnp.float32)
    kv_block = pl.BlockSpec((None, cfg.block_kv, None, d), lambda b, s, j: (b, j, s, 0))
    dk, dv = _call(
        _dkv_kernel, cfg, (batch, kv_heads * split, cfg.num_kv_blocks), [kv_block, kv_block],
        [jax.ShapeDtypeStruct(partial, dtype) for dtype in dtypes],
        "flash_attention_dkv_loop", cost, bm.q_index, bm.q_full, bm.q_count,
        q, k, v, do, lse, delta, *_meta_arrays(meta),
    )  # fmt: skip
    if split == 1:
        return dk, dv
    return tuple(
        x.reshape(batch, kv_len, kv_heads, split, d).sum(axis=3).astype(like.dtype)
        for x, like in ((dk, k), (dv, v))
    )
