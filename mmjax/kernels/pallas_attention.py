"""Block-sparse flash attention in Pallas: forward and backward, every mask of the contract.

Layout: the wrapper moves heads in front ([B, H, S, D]), pads S to whole blocks and D to a
lane-friendly multiple, and packs the token metadata into q_meta [B, Sq, 3] (segment, span,
position) and kv_meta [B, 2, Sk] (segment, span). `block_mask.block_map` classifies each
(q block, kv block) and lists the non-empty ones; those lists are scalar-prefetched so the
grid's index maps fetch only listed kv blocks (splash-attention's recipe). The reduction
axis of each grid runs over list slots; slots past a block's count re-map to the block
already resident (no new copy) and are skipped by `pl.when`, so empty blocks are neither
loaded nor computed. FULL blocks take a branch that never builds the mask.

Kernels (f32 accumulation whatever the input dtype, "online softmax"):
- forward, grid (B, H, nq, kv slots): o and the row log-sum-exp `lse`;
- dq, grid (B, H, nq, kv slots): recomputes p = exp(s - lse) from the saved `lse`;
- dk/dv, grid (B, Hkv, nk, groups x q slots): one kv head accumulates over every query head
  of its group and every non-empty q block, so grouped-query attention needs no repeat.
Rows that see nothing keep l = 0 and give exactly 0 (output and gradients), never NaN.

When all metadata is concrete at trace time (no ids, or ids closed over as constants, and
an int `q_offset`), the block map is computed eagerly and the slot axis shrinks to the
largest non-empty count (e.g. 9 instead of 128 for a 512-token window at S=16384).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mmjax.kernels.block_mask import FULL, BlockMap, block_map, padded_token_metadata
from mmjax.kernels.masks import _check_window, _kv_ids

Array = jnp.ndarray

# Finite stand-ins for -inf: masked logits and the running max start here, so a row that has
# seen nothing yet computes exp(NEG - NEG) = 1 (then zeroed by the mask), never inf - inf.
_NEG = -0.7 * float(np.finfo(np.float32).max)
# Log-sum-exp stored for rows that see nothing: exp(s - _EMPTY_LSE) underflows to 0.
_EMPTY_LSE = 0.5 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static (hashable) parameters of one kernel call."""

    block_q: int
    block_kv: int
    scale: float
    causal: bool
    window: int | None
    use_span: bool
    groups: int
    num_q_blocks: int  # nq
    num_kv_blocks: int  # nk
    kv_slots: int  # grid extent of the forward / dq reduction axis
    q_slots: int  # grid extent of the dk / dv reduction axis, per query head of a group
    interpret: bool | pltpu.InterpretParams
    debug: bool


def _dot(a: Array, b: Array, contract: tuple[int, int]) -> Array:
    """a @ b contracting a's axis contract[0] with b's axis contract[1], f32 accumulation.

    f32 operands ask for HIGHEST precision (TPU otherwise rounds them to bf16 passes);
    bf16 operands use the native MXU path.
    """
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _token_mask(q_meta: Array, kv_meta: Array, kv_block: Array, cfg: _Config) -> Array:
    """[bq, bk] bool: the contract's rule for one block, from the packed token metadata."""
    q_seg, q_span, q_pos = q_meta[:, 0:1], q_meta[:, 1:2], q_meta[:, 2:3]  # [bq, 1]
    kv_seg, kv_span = kv_meta[0:1, :], kv_meta[1:2, :]  # [1, bk]
    mask = (q_seg == kv_seg) & (q_seg != 0)
    kv_pos = kv_block * cfg.block_kv + jax.lax.broadcasted_iota(jnp.int32, (1, cfg.block_kv), 1)
    if cfg.causal:
        visible = kv_pos <= q_pos
        if cfg.use_span:
            visible = visible | ((q_span == kv_span) & (q_span != 0))
        mask = mask & visible
    if cfg.window is not None:
        mask = mask & (jnp.abs(q_pos - kv_pos) < cfg.window)
    return mask


def _masked_or_full(kind: Array, body: Callable[[bool], None]) -> None:
    """Runs body(masked=False) for FULL blocks and body(masked=True) for PARTIAL ones."""
    pl.when(kind == FULL)(functools.partial(body, False))
    pl.when(kind != FULL)(functools.partial(body, True))


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(
    kv_index_ref, kv_kind_ref, kv_count_ref,  # scalar prefetch: flattened block lists
    q_ref, k_ref, v_ref, q_meta_ref, kv_meta_ref,  # inputs
    *refs,  # outputs o, lse[, visits], then scratch m, l, acc
    cfg: _Config,
) -> None:  # fmt: skip
    """One (b, h, q block, kv slot) step of the online-softmax forward."""
    if cfg.debug:
        o_ref, lse_ref, visits_ref, m_sc, l_sc, acc_sc = refs
    else:
        (o_ref, lse_ref, m_sc, l_sc, acc_sc), visits_ref = refs, None
    b, i, slot = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * cfg.num_q_blocks + i
    entry = row * cfg.num_kv_blocks + slot

    @pl.when(slot == 0)
    def _init():
        m_sc[...] = jnp.full_like(m_sc, _NEG)
        l_sc[...] = jnp.zeros_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)
        if visits_ref is not None:
            visits_ref[...] = jnp.zeros_like(visits_ref)

    def step(masked: bool) -> None:
        s = _dot(q_ref[...], k_ref[...], (1, 1)) * cfg.scale  # [bq, bk] f32
        if masked:
            mask = _token_mask(q_meta_ref[...], kv_meta_ref[...], kv_index_ref[entry], cfg)
            s = jnp.where(mask, s, _NEG)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        if masked:
            p = jnp.where(mask, p, 0.0)  # a row with nothing visible yet has m_new = _NEG
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v.dtype), v, (1, 0))
        m_sc[...] = m_new

    @pl.when(slot < kv_count_ref[row])
    def _visit():
        _masked_or_full(kv_kind_ref[entry], step)
        if visits_ref is not None:
            visits_ref[...] += 1

    @pl.when(slot == pl.num_programs(3) - 1)
    def _finish():
        total = l_sc[...]
        seen = total > 0
        safe_l = jnp.where(seen, total, 1.0)
        o_ref[...] = (acc_sc[...] / safe_l).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(safe_l), _EMPTY_LSE)


def _probs_and_dscores(
    q: Array, k: Array, v: Array, do: Array, lse: Array, delta: Array, mask: Array | None,
    scale: float,
) -> tuple[Array, Array]:  # fmt: skip
    """Recomputed probabilities p [bq, bk] and dS = p * (dO V^T - delta), both f32."""
    s = _dot(q, k, (1, 1)) * scale
    if mask is not None:
        s = jnp.where(mask, s, _NEG)
    p = jnp.exp(s - lse)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    dp = _dot(do, v, (1, 1))
    return p, p * (dp - delta)


def _dq_kernel(
    kv_index_ref, kv_kind_ref, kv_count_ref,
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_meta_ref, kv_meta_ref,
    dq_ref, dq_sc,
    *, cfg: _Config,
) -> None:  # fmt: skip
    """One (b, h, q block, kv slot) step of dq = scale * sum_kv dS K."""
    b, i, slot = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    row = b * cfg.num_q_blocks + i
    entry = row * cfg.num_kv_blocks + slot

    @pl.when(slot == 0)
    def _init():
        dq_sc[...] = jnp.zeros_like(dq_sc)

    def step(masked: bool) -> None:
        mask = None
        if masked:
            mask = _token_mask(q_meta_ref[...], kv_meta_ref[...], kv_index_ref[entry], cfg)
        k = k_ref[...]
        _, ds = _probs_and_dscores(
            q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], mask,
            cfg.scale,
        )  # fmt: skip
        dq_sc[...] += _dot(ds.astype(k.dtype), k, (1, 0))

    @pl.when(slot < kv_count_ref[row])
    def _visit():
        _masked_or_full(kv_kind_ref[entry], step)

    @pl.when(slot == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_index_ref, q_kind_ref, q_count_ref,
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_meta_ref, kv_meta_ref,
    dk_ref, dv_ref, dk_sc, dv_sc,
    *, cfg: _Config,
) -> None:  # fmt: skip
    """One (b, kv head, kv block, group head x q slot) step of dk and dv."""
    b, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    col = b * cfg.num_kv_blocks + j
    entry = col * cfg.num_q_blocks + t % cfg.q_slots

    @pl.when(t == 0)
    def _init():
        dk_sc[...] = jnp.zeros_like(dk_sc)
        dv_sc[...] = jnp.zeros_like(dv_sc)

    def step(masked: bool) -> None:
        mask = None
        if masked:
            mask = _token_mask(q_meta_ref[...], kv_meta_ref[...], j, cfg)
        q, do = q_ref[...], do_ref[...]
        p, ds = _probs_and_dscores(
            q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...], mask, cfg.scale
        )
        dv_sc[...] += _dot(p.astype(do.dtype), do, (0, 0))
        dk_sc[...] += _dot(ds.astype(q.dtype), q, (0, 0))

    @pl.when(t % cfg.q_slots < q_count_ref[col])
    def _visit():
        _masked_or_full(q_kind_ref[entry], step)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas_calls

_SEMANTICS = pltpu.CompilerParams(
    dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
)


def _lists(bm: BlockMap, by_q: bool) -> tuple[Array, Array, Array]:
    """The scalar-prefetch operands: flattened index, kind and count lists."""
    if by_q:
        return bm.kv_index.reshape(-1), bm.kv_kind.reshape(-1), bm.kv_count.reshape(-1)
    return bm.q_index.reshape(-1), bm.q_kind.reshape(-1), bm.q_count.reshape(-1)


def _row_specs(cfg: _Config) -> tuple[Callable, Callable]:
    """Index maps of the (b, h, q block, kv slot) grids: q-side blocks and listed kv blocks."""
    nq, nk, g = cfg.num_q_blocks, cfg.num_kv_blocks, cfg.groups

    def kv_block(b, i, s, kv_index):
        return kv_index[(b * nq + i) * nk + s]

    def q_side(shape):
        return pl.BlockSpec((None, None, *shape), lambda b, h, i, s, *lists: (b, h, i, 0))

    def kv_side(shape):
        return pl.BlockSpec(
            (None, None, *shape),
            lambda b, h, i, s, ki, *_: (b, h // g, kv_block(b, i, s, ki), 0),
        )

    return q_side, kv_side


def _meta_specs(cfg: _Config, by_q: bool) -> list[pl.BlockSpec]:
    """BlockSpecs of q_meta [B, Sq, 3] and kv_meta [B, 2, Sk] for either grid."""
    nq, nk, bq, bk = cfg.num_q_blocks, cfg.num_kv_blocks, cfg.block_q, cfg.block_kv
    if by_q:

        def kv_block(b, i, s, ki):
            return ki[(b * nq + i) * nk + s]

        return [
            pl.BlockSpec((None, bq, 3), lambda b, h, i, s, *_: (b, i, 0)),
            pl.BlockSpec((None, 2, bk), lambda b, h, i, s, ki, *_: (b, 0, kv_block(b, i, s, ki))),
        ]

    def q_block(b, j, t, qi):
        return qi[(b * nk + j) * nq + t % cfg.q_slots]

    return [
        pl.BlockSpec((None, bq, 3), lambda b, h, j, t, qi, *_: (b, q_block(b, j, t, qi), 0)),
        pl.BlockSpec((None, 2, bk), lambda b, h, j, t, *_: (b, 0, j)),
    ]


def _forward(
    cfg: _Config, q: Array, k: Array, v: Array, q_meta: Array, kv_meta: Array, bm: BlockMap
) -> tuple[Array, ...]:
    """Runs the forward kernel: (o [B,H,Sq,D], lse [B,H,Sq,1][, visits [B,H,Sq,1]])."""
    batch, heads, q_len, d = q.shape
    q_side, kv_side = _row_specs(cfg)
    bq, bk = cfg.block_q, cfg.block_kv
    out_specs = [q_side((bq, d)), q_side((bq, 1))]
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((batch, heads, q_len, 1), jnp.float32),
    ]
    if cfg.debug:
        out_specs.append(q_side((bq, 1)))
        out_shape.append(jax.ShapeDtypeStruct((batch, heads, q_len, 1), jnp.int32))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(batch, heads, cfg.num_q_blocks, cfg.kv_slots),
        in_specs=[
            q_side((bq, d)),
            kv_side((bk, d)),
            kv_side((bk, d)),
            *_meta_specs(cfg, by_q=True),
        ],
        out_specs=out_specs,
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
        ],
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=_SEMANTICS,
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(*_lists(bm, by_q=True), q, k, v, q_meta, kv_meta)


def _backward(cfg: _Config, res: tuple[Array, ...], do: Array) -> tuple[Array, Array, Array]:
    """dq, dk, dv from the saved residuals (q, k, v, metadata, block map, o, lse)."""
    q, k, v, q_meta, kv_meta, bm, o, lse = res
    batch, heads, _, d = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    bq, bk, g, nq = cfg.block_q, cfg.block_kv, cfg.groups, cfg.num_q_blocks
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    operands = (q, k, v, do, lse, delta, q_meta, kv_meta)

    q_side, kv_side = _row_specs(cfg)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, heads, nq, cfg.kv_slots),
            in_specs=[
                q_side((bq, d)),
                kv_side((bk, d)),
                kv_side((bk, d)),
                q_side((bq, d)),
                q_side((bq, 1)),
                q_side((bq, 1)),
                *_meta_specs(cfg, by_q=True),
            ],
            out_specs=q_side((bq, d)),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_SEMANTICS,
        interpret=cfg.interpret,
        name="flash_attention_dq",
    )(*_lists(bm, by_q=True), *operands)

    nk, slots = cfg.num_kv_blocks, cfg.q_slots

    def q_of(shape):  # the t-th (group head, q slot) of kv head h, kv block j
        return pl.BlockSpec(
            (None, None, *shape),
            lambda b, h, j, t, qi, *_: (
                b,
                h * g + t // slots,
                qi[(b * nk + j) * nq + t % slots],
                0,
            ),
        )

    def kv_of(shape):
        return pl.BlockSpec((None, None, *shape), lambda b, h, j, t, *_: (b, h, j, 0))

    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3,
            grid=(batch, kv_heads, nk, g * slots),
            in_specs=[
                q_of((bq, d)),
                kv_of((bk, d)),
                kv_of((bk, d)),
                q_of((bq, d)),
                q_of((bq, 1)),
                q_of((bq, 1)),
                *_meta_specs(cfg, by_q=False),
            ],
            out_specs=[kv_of((bk, d)), kv_of((bk, d))],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, kv_len, d), k.dtype),
            jax.ShapeDtypeStruct((batch, kv_heads, kv_len, d), v.dtype),
        ],
        compiler_params=_SEMANTICS,
        interpret=cfg.interpret,
        name="flash_attention_dkv",
    )(*_lists(bm, by_q=False), *operands)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(
    cfg: _Config, q: Array, k: Array, v: Array, q_meta: Array, kv_meta: Array, bm: BlockMap
) -> Array:
    """Differentiable (in q, k, v) block-sparse attention on the kernel layout."""
    return _forward(cfg, q, k, v, q_meta, kv_meta, bm)[0]


def _flash_fwd(cfg, q, k, v, q_meta, kv_meta, bm):
    o, lse = _forward(cfg, q, k, v, q_meta, kv_meta, bm)[:2]
    return o, (q, k, v, q_meta, kv_meta, bm, o, lse)


def _flash_bwd(cfg, res, do):
    dq, dk, dv = _backward(cfg, res, do)
    _, _, _, q_meta, kv_meta, bm, _, _ = res
    no_grad = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), (q_meta, kv_meta, bm))
    return (dq, dk, dv, *no_grad)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- wrapper


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _defaults() -> tuple[int, int, int]:
    """(block_q, block_kv, head_dim multiple) the current backend likes.

    TPU: 128-lane tiles. CPU (interpret mode): bigger blocks, because every grid step costs
    a while-loop iteration with dynamic slices; 256 keeps that overhead small without
    computing much masked work in the partial blocks (not tuned).
    """
    if jax.default_backend() == "tpu":
        return 128, 128, 128
    return 256, 256, 8


def _is_concrete(*xs: object) -> bool:
    """True when none of `xs` is a tracer, so the block map can be computed at trace time."""
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """Kernel-layout operands of one call and its static configuration."""

    cfg: _Config
    q: Array
    k: Array
    v: Array
    q_meta: Array
    kv_meta: Array
    bm: BlockMap


def _prepare(
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
    q_offset: int | Array = 0,
    scale: float | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    interpret: bool | pltpu.InterpretParams | None = None,
    debug: bool = False,
) -> _Prepared:
    """Pads and transposes q/k/v, packs the metadata and builds the block map."""
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    _check_window(window)
    kv_segment_ids = _kv_ids("segment_ids", segment_ids, kv_segment_ids, q_len, kv_len)
    kv_span_ids = _kv_ids("span_ids", span_ids, kv_span_ids, q_len, kv_len)
    default_bq, default_bk, d_multiple = _defaults()
    bq = min(block_q or default_bq, _round_up(q_len, 8))
    bk = min(block_kv or default_bk, _round_up(kv_len, 8))
    q_pad, kv_pad = _round_up(q_len, bq), _round_up(kv_len, bk)
    d_pad = _round_up(head_dim, d_multiple)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"

    def metadata() -> tuple[Array, Array, BlockMap]:
        q_seg, kv_seg, q_span, kv_span, q_pos = padded_token_metadata(
            batch, q_len, kv_len, q_pad, kv_pad,
            segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, span_ids=span_ids,
            kv_span_ids=kv_span_ids, q_offset=q_offset,
        )  # fmt: skip
        bm = block_map(
            q_seg, kv_seg, q_span, kv_span, q_pos,
            block_q=bq, block_kv=bk, causal=causal, window=window,
        )  # fmt: skip
        q_meta = jnp.stack([q_seg, q_span, q_pos], axis=-1)  # [B, Sq, 3]
        kv_meta = jnp.stack([kv_seg, kv_span], axis=1)  # [B, 2, Sk]
        return q_meta, kv_meta, bm

    nq, nk = q_pad // bq, kv_pad // bk
    if _is_concrete(segment_ids, kv_segment_ids, span_ids, kv_span_ids, q_offset):
        with jax.ensure_compile_time_eval():
            q_meta, kv_meta, bm = metadata()
            kv_slots = max(1, int(jnp.max(bm.kv_count)))
            q_slots = max(1, int(jnp.max(bm.q_count)))
    else:
        q_meta, kv_meta, bm = metadata()
        kv_slots, q_slots = nk, nq

    cfg = _Config(
        block_q=bq,
        block_kv=bk,
        scale=float(1.0 / math.sqrt(head_dim) if scale is None else scale),
        causal=causal,
        window=None if window is None else int(window),
        use_span=causal and span_ids is not None and kv_span_ids is not None,
        groups=heads // kv_heads,
        num_q_blocks=nq,
        num_kv_blocks=nk,
        kv_slots=kv_slots,
        q_slots=q_slots,
        interpret=interpret,
        debug=debug,
    )

    def layout(x: Array, padded: int) -> Array:
        x = jnp.pad(x, ((0, 0), (0, padded - x.shape[1]), (0, 0), (0, d_pad - head_dim)))
        return jnp.swapaxes(x, 1, 2)  # [B, heads, S, D]

    return _Prepared(
        cfg, layout(q, q_pad), layout(k, kv_pad), layout(v, kv_pad), q_meta, kv_meta, bm
    )


def pallas_attention(
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
    q_offset: int | Array = 0,
    scale: float | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    interpret: bool | pltpu.InterpretParams | None = None,
) -> Array:
    """Block-sparse flash attention with the semantics of `attention_reference`.

    Same arguments as `mmjax.kernels.attention` (shapes assumed checked), plus the tile
    sizes `block_q` / `block_kv` (defaults per backend; clipped to the padded lengths) and
    `interpret` (default: True on CPU; a `pltpu.InterpretParams` runs TPU interpret mode).
    Differentiable in q, k and v; the backward recomputes from the saved log-sum-exp.
    """
    q_len, head_dim = q.shape[1], q.shape[3]
    p = _prepare(
        q, k, v,
        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, span_ids=span_ids,
        kv_span_ids=kv_span_ids, causal=causal, window=window, q_offset=q_offset, scale=scale,
        block_q=block_q, block_kv=block_kv, interpret=interpret, debug=False,
    )  # fmt: skip
    out = _flash(p.cfg, p.q, p.k, p.v, p.q_meta, p.kv_meta, p.bm)
    return jnp.swapaxes(out, 1, 2)[:, :q_len, :, :head_dim]


def executed_kv_blocks(q: Array, k: Array, v: Array, **kwargs: object) -> tuple[Array, BlockMap]:
    """Debug mode: the forward kernel counts, per (b, h, q block), the kv blocks it computed.

    Takes `pallas_attention`'s arguments; returns (visits [B, H, nq] int32, the block map
    [B, ...] the grid was driven by). The count is incremented inside the kernel, so it
    shows which blocks really ran, not what the metadata promised.
    """
    p = _prepare(q, k, v, debug=True, **kwargs)
    visits = _forward(p.cfg, p.q, p.k, p.v, p.q_meta, p.kv_meta, p.bm)[2]
    return visits[:, :, :: p.cfg.block_q, 0], p.bm
