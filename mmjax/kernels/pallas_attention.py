"""Block-sparse flash attention in Pallas: forward and backward, every mask of the contract.

The wrapper pads S to whole blocks (and D where the backend needs it), lays q/k/v out as the
variant reads them, turns the `MaskSpec` into padded int32 token metadata (`TokenMeta`) and
classifies each (q block, kv block) as empty / partial / full (`block_mask.block_map`),
listing the non-empty blocks of every q block and (transposed) of every kv block, FULL ones
first. Empty blocks are neither loaded nor computed; full blocks never build the mask. Two
variants share the block math of `flash_common` and run the same lists:

- "grid" (`pallas_tpu`, Mosaic TPU): one grid step per listed block, lists scalar-prefetched,
  q/k/v as [B, H, S, D];
- "loop" (`pallas_gpu`, Triton GPU, and interpret mode on CPU): one program per output block
  running two branch-free loops over its list, q/k/v left as [B, S, H, D].

The forward returns o and the row log-sum-exp in the caller's layout; the backward
recomputes p = exp(s - lse) block by block (dq per q block; dk / dv per kv block,
accumulating a kv head's whole query-head group, so GQA needs no repeat). `vjp.flash_vjp`
ties them together. A logit soft cap (`Plan.logits_soft_cap`) caps s in both, and the
backward takes dS through it. Rows that see nothing give exactly 0 (output and gradients),
never NaN.

Tiles are per backend and per kernel (`Tile`, `Tiling`): on TPU they fit the sequence
length (197 ViT tokens run as one 200-row block, not two padded 128-row ones), on GPU they
are Triton's published fused-attention settings, on CPU 256-token blocks. Every pallas_call
carries a `pl.CostEstimate` of the blocks it visits, so XLA's cost analysis of a compiled
step counts the attention FLOPs.

When the metadata is concrete at trace time (no ids, or ids closed over as constants, and
an int `q_offset`), the block maps are computed with numpy (no compile) and the grid
variant's reduction axis is sized to the largest non-empty count; otherwise the block maps
are part of the traced program and that extent is the traced maximum (a dynamic grid bound).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from mmjax.kernels import pallas_gpu, pallas_tpu
from mmjax.kernels.block_mask import BlockMap, TokenMeta, block_map, padded_token_metadata
from mmjax.kernels.flash_common import Config, check_soft_cap
from mmjax.kernels.masks import MaskSpec
from mmjax.kernels.vjp import flash_vjp

Array = jnp.ndarray

VARIANTS = {"grid": pallas_tpu, "loop": pallas_gpu}
PLATFORMS = ("cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Tile:
    """One kernel's tile: rows of queries and of keys per block, and Triton's launch
    parameters (None where the backend has none)."""

    block_q: int
    block_kv: int
    num_warps: int | None = None
    num_stages: int | None = None
    kv_head_split: int = 1  # dk/dv of the loop variant: programs per kv head


@dataclasses.dataclass(frozen=True)
class Tiling:
    """The tiles of the forward, dq and dk/dv kernels of one call."""

    fwd: Tile
    dq: Tile
    dkv: Tile

    @classmethod
    def uniform(cls, block_q: int, block_kv: int) -> Tiling:
        tile = Tile(block_q, block_kv)
        return cls(tile, tile, tile)

    def tiles(self) -> tuple[Tile, Tile, Tile]:
        return self.fwd, self.dq, self.dkv


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


# TPU: query rows per block at most this; keys one block up to `_TPU_ONE_KV_BLOCK` tokens
# when nothing could be skipped (no causal, window or segment ids), else lane-wide blocks.
_TPU_BLOCK = 128
_TPU_ONE_KV_BLOCK = 1024


def tpu_tiling(q_len: int, kv_len: int, mask: MaskSpec) -> Tiling:
    """Tiles that fit the lengths: as few 128-row query blocks as cover Sq, shrunk to the
    smallest multiple of 8 that still covers it (197 -> one 200-row block); keys as one
    block (a block equal to the padded array is exempt from Mosaic's 128-lane rule) while
    no block could be skipped, else 128-key blocks (the last one masked)."""
    num_q = -(-q_len // _TPU_BLOCK)
    block_q = _round_up(-(-q_len // num_q), 8)
    sparse = mask.causal or mask.window is not None or mask.segment_ids is not None
    one_kv_block = kv_len <= _TPU_BLOCK or (not sparse and kv_len <= _TPU_ONE_KV_BLOCK)
    block_kv = _round_up(kv_len, 8) if one_kv_block else _TPU_BLOCK
    return Tiling.uniform(block_q, block_kv)


# An H100 has 132 streaming multiprocessors: a kernel wants at least two programs for each.
GPU_MIN_PROGRAMS = 2 * 132


def kv_head_split(batch: int, kv_heads: int, groups: int, kv_blocks: int) -> int:
    """Programs per kv head for the dk/dv kernel: the fewest shares of the query-head group
    (a divisor of it) that give `GPU_MIN_PROGRAMS` programs, or the whole group."""
    for split in range(1, groups + 1):
        if groups % split == 0 and batch * kv_heads * split * kv_blocks >= GPU_MIN_PROGRAMS:
            return split
    return groups


def gpu_tiling(head_dim: int) -> Tiling:
    """Triton's fused-attention tutorial (FlashAttention-2): forward 128 x 64 tiles with 4
    warps (8 from head_dim 128) and 3 stages; backward dq over 128 query rows x 32-key
    blocks, dk/dv over 128 key rows x 32-query blocks, 4 warps, 5 stages. Starting points
    to tune on the card with benchmarks/gpu_check.sh."""
    warps = 4 if head_dim <= 64 else 8
    return Tiling(
        fwd=Tile(128, 64, num_warps=warps, num_stages=3),
        dq=Tile(128, 32, num_warps=4, num_stages=5),
        dkv=Tile(32, 128, num_warps=4, num_stages=5),
    )


@dataclasses.dataclass(frozen=True)
class Backend:
    """What one backend likes: variant, tiles, and how to round the head dimension."""

    variant: str
    pow2: bool  # Triton: every loaded tile's size must be a power of two
    d_multiple: int

    def tiling(self, q_len: int, kv_len: int, head_dim: int, mask: MaskSpec) -> Tiling:
        if self.variant == "grid":
            return tpu_tiling(q_len, kv_len, mask)
        if self.pow2:
            return gpu_tiling(head_dim)
        return Tiling.uniform(256, 256)


# TPU: the Mosaic grid variant; blocks span the whole head dimension (a block equal to the
# array's last dimension is exempt from the 128-lane rule), so D is never padded. GPU: the
# Triton loop variant, power-of-two tiles and D. CPU (interpret mode): the loop variant --
# the HLO interpreter of the grid variant copies every whole input at every grid step, O(S)
# per step -- with 256-token tiles, where per-iteration overhead is small against the
# block's matmuls (benchmarks/attention.py).
BACKENDS = {
    "tpu": Backend("grid", pow2=False, d_multiple=1),
    "gpu": Backend("loop", pow2=True, d_multiple=16),
    "cpu": Backend("loop", pow2=False, d_multiple=8),
}


def _clip(tile: Tile, q_len: int, kv_len: int, pow2: bool) -> Tile:
    """A tile no longer than needed: each side at most its length rounded up to 8 (or to a
    power of two >= 16 for Triton)."""

    def fit(block: int, length: int) -> int:
        if pow2:
            return min(_next_pow2(block), _next_pow2(max(length, 16)))
        return min(block, _round_up(length, 8))

    return dataclasses.replace(
        tile, block_q=fit(tile.block_q, q_len), block_kv=fit(tile.block_kv, kv_len)
    )


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one call: variant, tiles, padding, scale, logit soft cap,
    interpret mode."""

    variant: str
    tiling: Tiling
    q_pad: int
    kv_pad: int
    d_pad: int
    scale: float
    interpret: object
    debug: bool
    logits_soft_cap: float | None = None


def plan(
    q_shape: tuple[int, ...],
    kv_shape: tuple[int, ...],
    mask: MaskSpec,
    *,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    tiling: Tiling | None = None,
    interpret: object = None,
    variant: str | None = None,
    platform: str | None = None,
    debug: bool = False,
) -> Plan:
    """The static plan of a call with q shaped `q_shape`, k/v `kv_shape` and a resolved mask.

    Options: `scale` (default 1 / sqrt(D)); `logits_soft_cap` (None: no cap); tiles:
    `tiling`, or `block_q` / `block_kv` for every kernel (default per backend, see
    `BACKENDS`), clipped to the lengths; `interpret` (default True on CPU; a
    `pltpu.InterpretParams` runs TPU interpret mode); `variant` ("grid" / "loop", default
    per backend); `platform` ("cpu" / "gpu" / "tpu": whose defaults to use; default the
    default backend); `debug` (the forward also counts executed blocks, see
    `executed_kv_blocks`).
    """
    q_len, head_dim = q_shape[1], q_shape[3]
    kv_len = kv_shape[1]
    logits_soft_cap = check_soft_cap(logits_soft_cap)
    platform = platform or jax.default_backend()
    if platform not in BACKENDS:
        raise ValueError(f"unknown platform {platform!r}; valid: {', '.join(PLATFORMS)}")
    backend = BACKENDS[platform]
    variant = variant or backend.variant
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    if tiling is None:
        tiling = backend.tiling(q_len, kv_len, head_dim, mask)
        if block_q or block_kv:
            tiling = Tiling(
                *(
                    dataclasses.replace(
                        t, block_q=block_q or t.block_q, block_kv=block_kv or t.block_kv
                    )
                    for t in tiling.tiles()
                )
            )
    tiling = Tiling(*(_clip(t, q_len, kv_len, backend.pow2) for t in tiling.tiles()))
    kv_pad = _round_up(kv_len, math.lcm(*(t.block_kv for t in tiling.tiles())))
    if platform == "gpu" and variant == "loop":
        batch, kv_heads, dkv = q_shape[0], kv_shape[2], tiling.dkv
        split = kv_head_split(batch, kv_heads, q_shape[2] // kv_heads, kv_pad // dkv.block_kv)
        tiling = dataclasses.replace(tiling, dkv=dataclasses.replace(dkv, kv_head_split=split))
    d_pad = _round_up(head_dim, backend.d_multiple)
    if backend.pow2:
        d_pad = _next_pow2(d_pad)
    return Plan(
        variant=variant,
        tiling=tiling,
        q_pad=_round_up(q_len, math.lcm(*(t.block_q for t in tiling.tiles()))),
        kv_pad=kv_pad,
        d_pad=d_pad,
        scale=float(1.0 / math.sqrt(head_dim) if scale is None else scale),
        interpret=platform == "cpu" if interpret is None else interpret,
        debug=debug,
        logits_soft_cap=logits_soft_cap,
    )


# ----------------------------------------------------------------------------- metadata


@dataclasses.dataclass(frozen=True)
class _Blocks:
    """One tile's block map, its grid extents and how many blocks it visits in all."""

    cfg: Config
    bm: BlockMap
    visited: int  # listed (b, q block, kv block) triples; an upper bound when traced


def _structural_visits(mask: MaskSpec, tile: Tile, p: Plan, batch: int, lengths) -> int:
    """Blocks visited by a traced mask, bounded from its static part: causal and window
    without ids (ids only hide blocks; span ids can reveal some, so then all blocks)."""
    q_len, kv_len = lengths
    nq, nk = p.q_pad // tile.block_q, p.kv_pad // tile.block_kv
    if mask.use_span or not isinstance(mask.q_offset, int):
        return batch * nq * nk
    static = MaskSpec(q_offset=mask.q_offset, causal=mask.causal, window=mask.window)
    meta = padded_token_metadata(static, 1, q_len, kv_len, p.q_pad, p.kv_pad, np)
    bm = block_map(meta, block_q=tile.block_q, block_kv=tile.block_kv, causal=mask.causal,
                   window=mask.window, xp=np)  # fmt: skip
    return batch * int(bm.kv_count.sum())


def _metadata(
    mask: MaskSpec, p: Plan, tiles: tuple[Tile, ...], batch: int, q_len: int, kv_len: int,
    groups: int,
) -> tuple[TokenMeta, list[_Blocks]]:  # fmt: skip
    """The padded token metadata and, per tile, its block map and kernel config."""
    concrete = mask.is_concrete()
    xp = np if concrete else jnp
    meta = padded_token_metadata(mask, batch, q_len, kv_len, p.q_pad, p.kv_pad, xp)
    maps: dict[tuple[int, int], tuple[BlockMap, int]] = {}  # one per distinct tile shape
    out = []
    for tile in tiles:
        shape = (tile.block_q, tile.block_kv)
        if shape not in maps:
            bm = block_map(meta, block_q=shape[0], block_kv=shape[1], causal=mask.causal,
                           window=mask.window, xp=xp)  # fmt: skip
            visited = (
                int(bm.kv_count.sum())
                if concrete
                else _structural_visits(mask, tile, p, batch, (q_len, kv_len))
            )
            maps[shape] = (bm, visited)
        bm, visited = maps[shape]
        if concrete:  # known at trace time: numpy sized the grid exactly
            kv_slots, q_slots = max(1, int(bm.kv_count.max())), max(1, int(bm.q_count.max()))
        else:  # traced: the grid variant's slot extent becomes dynamic
            kv_slots = q_slots = None
        cfg = Config(
            variant=p.variant,
            block_q=tile.block_q,
            block_kv=tile.block_kv,
            scale=p.scale,
            causal=mask.causal,
            window=None if mask.window is None else int(mask.window),
            use_span=mask.use_span,
            groups=groups,
            num_q_blocks=p.q_pad // tile.block_q,
            num_kv_blocks=p.kv_pad // tile.block_kv,
            kv_slots=kv_slots,
            q_slots=q_slots,
            interpret=p.interpret,
            debug=p.debug,
            num_warps=tile.num_warps,
            num_stages=tile.num_stages,
            kv_head_split=tile.kv_head_split,
            soft_cap=p.logits_soft_cap,
        )
        out.append(_Blocks(cfg, jax.tree.map(jnp.asarray, bm) if concrete else bm, visited))
    if concrete:
        meta = jax.tree.map(jnp.asarray, meta)
    return meta, out


# Matmuls of one (q block, kv block) visit, each 2 * bq * bk * D FLOPs: forward q k^T and
# p v; dq q k^T, dO v^T and dS k; dk/dv q k^T, dO v^T, dS^T q and p^T dO.
_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4}


def _cost(kind: str, blocks: _Blocks, heads: int, d: int, operand_bytes: int):
    """The pallas_call's `pl.CostEstimate`: FLOPs and exps (and soft-cap tanhs) of its
    visited blocks; bytes of its operands (each listed kv or q tile read once per visit)."""
    cfg = blocks.cfg
    pairs = blocks.visited * heads * cfg.block_q * cfg.block_kv
    tile_bytes = blocks.visited * heads * max(cfg.block_q, cfg.block_kv) * d * 2
    return pl.CostEstimate(
        flops=2 * _MATMULS[kind] * pairs * d,
        transcendentals=pairs if cfg.soft_cap is None else 2 * pairs,
        bytes_accessed=operand_bytes + tile_bytes,
    )


# ----------------------------------------------------------------------------- layouts


def _to_kernel(x: Array, padded: int, p: Plan) -> Array:
    """[B, S, h, D] -> the variant's layout, padded to `padded` rows and `p.d_pad`."""
    pad = ((0, 0), (0, padded - x.shape[1]), (0, 0), (0, p.d_pad - x.shape[3]))
    if any(side != (0, 0) for side in pad):
        x = jnp.pad(x, pad)
    return jnp.swapaxes(x, 1, 2) if VARIANTS[p.variant].HEADS_FIRST else x


def _from_kernel(x: Array, length: int, d: int, p: Plan) -> Array:
    """The variant's layout -> [B, length, h, d]."""
    if VARIANTS[p.variant].HEADS_FIRST:
        x = jnp.swapaxes(x, 1, 2)
    return x[:, :length, :, :d]


def _rows_to_kernel(x: Array, p: Plan) -> Array:
    """Per-row f32 [B, H, Sq] (lse, delta) -> the variant's layout, padded to p.q_pad."""
    x = jnp.pad(x, ((0, 0), (0, 0), (0, p.q_pad - x.shape[2])))
    return x[..., None] if VARIANTS[p.variant].HEADS_FIRST else x


def _forward(q: Array, k: Array, v: Array, mask: MaskSpec, p: Plan):
    """(o [B,Sq,H,D], lse [B,H,Sq], visits [B,H,Sq] or None, forward block map)."""
    batch, q_len, heads, d = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    meta, (blocks,) = _metadata(mask, p, (p.tiling.fwd,), batch, q_len, kv_len, heads // kv_heads)
    operand_bytes = sum(x.size * x.dtype.itemsize for x in (q, k, v)) + q.size * q.dtype.itemsize
    outs = VARIANTS[p.variant].forward(
        blocks.cfg,
        _to_kernel(q, p.q_pad, p),
        _to_kernel(k, p.kv_pad, p),
        _to_kernel(v, p.kv_pad, p),
        meta,
        blocks.bm,
        _cost("fwd", blocks, heads, p.d_pad, operand_bytes),
    )
    o, lse = _from_kernel(outs[0], q_len, d, p), outs[1].reshape(batch, heads, p.q_pad)[..., :q_len]
    visits = outs[2].reshape(batch, heads, p.q_pad) if p.debug else None
    return o, lse, visits, blocks.bm


def kernel_forward(q: Array, k: Array, v: Array, mask: MaskSpec, *, p: Plan):
    """(o [B, Sq, H, D], lse [B, H, Sq] f32) of the plan's kernel."""
    return _forward(q, k, v, mask, p)[:2]


def kernel_backward(
    q: Array, k: Array, v: Array, mask: MaskSpec, o: Array, lse: Array, do: Array, *, p: Plan
) -> tuple[Array, Array, Array]:
    """(dq, dk, dv) from the forward's o and lse: the dq and the dk/dv kernels."""
    batch, q_len, heads, d = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    tiles = (p.tiling.dq, p.tiling.dkv)
    meta, (dq_blocks, dkv_blocks) = _metadata(
        mask, p, tiles, batch, q_len, kv_len, heads // kv_heads
    )
    delta = jnp.swapaxes(jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1), 1, 2)
    operands = (
        _to_kernel(q, p.q_pad, p),
        _to_kernel(k, p.kv_pad, p),
        _to_kernel(v, p.kv_pad, p),
        _to_kernel(do, p.q_pad, p),
        _rows_to_kernel(lse, p),
        _rows_to_kernel(delta, p),
        meta,
    )
    nbytes = sum(x.size * x.dtype.itemsize for x in (q, k, v, do, q))
    variant = VARIANTS[p.variant]
    dq = variant.dq(
        dq_blocks.cfg, *operands, dq_blocks.bm, _cost("dq", dq_blocks, heads, p.d_pad, nbytes)
    )
    dk, dv = variant.dkv(
        dkv_blocks.cfg, *operands, dkv_blocks.bm, _cost("dkv", dkv_blocks, heads, p.d_pad, nbytes)
    )
    return (
        _from_kernel(dq, q_len, d, p),
        _from_kernel(dk, kv_len, d, p),
        _from_kernel(dv, kv_len, d, p),
    )


def pallas_attention(
    q: Array, k: Array, v: Array, mask: MaskSpec | None = None, **options: object
) -> Array:
    """Block-sparse flash attention with the semantics of `attention_reference`.

    q [B, Sq, H, D], k/v [B, Sk, Hkv, D] (shapes assumed checked), `mask` a `MaskSpec`
    (default: none); `options` are `plan`'s keywords (scale, logit soft cap, tiles,
    interpret mode, variant, platform). Differentiable in q, k and v. This runs one
    backend's kernel; the public `mmjax.kernels.attention` picks the backend when the
    program is lowered.
    """
    mask = (MaskSpec() if mask is None else mask).resolve(q.shape[1], k.shape[1])
    p = plan(q.shape, k.shape, mask, **options)
    attend = flash_vjp(
        functools.partial(kernel_forward, p=p), functools.partial(kernel_backward, p=p)
    )
    return attend(q, k, v, mask)


def forward_block_map(
    q: Array, k: Array, mask: MaskSpec | None = None, **options: object
) -> BlockMap:
    """The forward kernel's block map for `pallas_attention`'s arguments (nothing run)."""
    mask = (MaskSpec() if mask is None else mask).resolve(q.shape[1], k.shape[1])
    p = plan(q.shape, k.shape, mask, **options)
    groups = q.shape[2] // k.shape[2]
    _, (blocks,) = _metadata(mask, p, (p.tiling.fwd,), q.shape[0], q.shape[1], k.shape[1], groups)
    return blocks.bm


def executed_kv_blocks(
    q: Array, k: Array, v: Array, mask: MaskSpec | None = None, **options: object
) -> tuple[Array, BlockMap]:
    """Debug mode: the forward kernel counts, per (b, h, q block), the kv blocks it computed.

    Takes `pallas_attention`'s arguments; returns (visits [B, H, nq] int32, the block map
    [B, ...] the kernel was driven by). The count is incremented inside the kernel (per grid
    step of the grid variant, per loop iteration of the loop variant), so it shows which
    blocks really ran, not what the metadata promised.
    """
    mask = (MaskSpec() if mask is None else mask).resolve(q.shape[1], k.shape[1])
    p = plan(q.shape, k.shape, mask, debug=True, **options)
    _, _, visits, bm = _forward(q, k, v, mask, p)
    return visits[:, :, :: p.tiling.fwd.block_q], bm
