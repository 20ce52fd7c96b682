"""Block-sparse flash attention in Pallas: forward and backward, every mask of the contract.

The wrapper pads S to whole blocks and D to what the backend likes, lays q/k/v out as the
variant reads them, turns the `MaskSpec` into padded int32 token metadata (`TokenMeta`) and
classifies each (q block, kv block) as empty / partial / full (`block_mask.block_map`),
listing the non-empty blocks of every q block and (transposed) of every kv block. Empty
blocks are neither loaded nor computed; full blocks never build the mask. Two variants
share the block math of `flash_common` and run the same lists:

- "grid" (`pallas_tpu`, Mosaic TPU): one grid step per listed block, lists scalar-prefetched,
  q/k/v as [B, H, S, D];
- "loop" (`pallas_gpu`, Triton GPU, and interpret mode on CPU): one program per output block
  looping over its list, q/k/v left as [B, S, H, D].

`jax.custom_vjp` ties them together: the forward saves o and the row log-sum-exp, the
backward recomputes p = exp(s - lse) block by block (dq per q block; dk / dv per kv block,
accumulating a kv head's whole query-head group, so GQA needs no repeat). Rows that see
nothing give exactly 0 (output and gradients), never NaN.

When the metadata is concrete at trace time (no ids, or ids closed over as constants, and
an int `q_offset`), the block map is computed with numpy (no compile) and the grid
variant's reduction axis is sized to the largest non-empty count; otherwise the block map
is part of the traced program and that extent is the traced maximum (a dynamic grid bound).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.kernels import pallas_gpu, pallas_tpu
from mmjax.kernels.block_mask import BlockMap, TokenMeta, block_map, padded_token_metadata
from mmjax.kernels.flash_common import Config
from mmjax.kernels.masks import MaskSpec

Array = jnp.ndarray

VARIANTS = {"grid": pallas_tpu, "loop": pallas_gpu}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: Config, q: Array, k: Array, v: Array, meta: TokenMeta, bm: BlockMap) -> Array:
    """Differentiable (in q, k, v) block-sparse attention on the kernel layout."""
    return VARIANTS[cfg.variant].forward(cfg, q, k, v, meta, bm)[0]


def _flash_fwd(cfg, q, k, v, meta, bm):
    o, lse = VARIANTS[cfg.variant].forward(cfg, q, k, v, meta, bm)[:2]
    return o, (q, k, v, meta, bm, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, meta, bm, o, lse = res
    dq, dk, dv = VARIANTS[cfg.variant].backward(cfg, q, k, v, meta, bm, o, lse, do)
    no_grad = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), (meta, bm))
    return (dq, dk, dv, *no_grad)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- wrapper


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _next_pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class _BackendDefaults:
    """What one backend likes: variant, tiles, and how to round the head dimension."""

    variant: str
    block_q: int
    block_kv: int
    pow2: bool  # Triton: every loaded tile's size must be a power of two
    d_multiple: int


def _defaults(backend: str) -> _BackendDefaults:
    """TPU: Mosaic grid variant, 128-lane tiles. GPU: Triton loop variant, power-of-two
    128 x 64 tiles (untuned: no GPU measured yet). CPU (interpret mode): the loop variant --
    the HLO interpreter of the grid variant copies every whole input at every grid step,
    O(S) per step -- with 256-token tiles, where per-iteration overhead is small against the
    block's matmuls (benchmarks/attention.py).
    """
    if backend == "tpu":
        return _BackendDefaults("grid", 128, 128, pow2=False, d_multiple=128)
    if backend == "gpu":
        return _BackendDefaults("loop", 128, 64, pow2=True, d_multiple=16)
    return _BackendDefaults("loop", 256, 256, pow2=False, d_multiple=8)


def _tile(requested: int | None, default: int, length: int, pow2: bool) -> int:
    """A tile no longer than needed: the length rounded up to 8 (or a power of two >= 16)."""
    if pow2:
        return min(_next_pow2(requested or default), _next_pow2(max(length, 16)))
    return min(requested or default, _round_up(length, 8))


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """Kernel-layout operands of one call and its static configuration.

    q/k/v are padded to whole blocks and the head dimension the backend likes, and laid
    out [B, heads, S, D] for a variant with HEADS_FIRST, else left [B, S, heads, D].
    """

    cfg: Config
    q: Array
    k: Array
    v: Array
    meta: TokenMeta
    bm: BlockMap


def _prepare(
    q: Array,
    k: Array,
    v: Array,
    mask: MaskSpec | None = None,
    *,
    scale: float | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    interpret: object = None,
    variant: str | None = None,
    platform: str | None = None,
    debug: bool = False,
) -> _Prepared:
    """Pads (and for a HEADS_FIRST variant transposes) q/k/v, pads the metadata and builds
    the block map.

    Options: `scale` (default 1 / sqrt(D)); tile sizes `block_q` / `block_kv` (default per
    backend, clipped to the padded lengths); `interpret` (default True on CPU; a
    `pltpu.InterpretParams` runs TPU interpret mode); `variant` ("grid" / "loop", default
    per backend, see `_defaults`); `platform` ("cpu" / "gpu" / "tpu": whose defaults to use;
    default the default backend, another when lowering for it ahead of time); `debug` (the
    forward also counts executed blocks, see `executed_kv_blocks`).
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    mask = (MaskSpec() if mask is None else mask).resolve(q_len, kv_len)
    backend = platform or jax.default_backend()
    defaults = _defaults(backend)
    variant = variant or defaults.variant
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    bq = _tile(block_q, defaults.block_q, q_len, defaults.pow2)
    bk = _tile(block_kv, defaults.block_kv, kv_len, defaults.pow2)
    q_pad, kv_pad = _round_up(q_len, bq), _round_up(kv_len, bk)
    d_pad = _round_up(head_dim, defaults.d_multiple)
    if defaults.pow2:
        d_pad = _next_pow2(d_pad)
    if interpret is None:
        interpret = backend == "cpu"

    def metadata(xp) -> tuple[TokenMeta, BlockMap]:
        meta = padded_token_metadata(mask, batch, q_len, kv_len, q_pad, kv_pad, xp)
        bm = block_map(meta, block_q=bq, block_kv=bk, causal=mask.causal, window=mask.window, xp=xp)
        return meta, bm

    if mask.is_concrete():
        # Known at trace time: numpy (no compile, no device work) sizes the grid exactly.
        meta, bm = metadata(np)
        kv_slots, q_slots = max(1, int(bm.kv_count.max())), max(1, int(bm.q_count.max()))
        meta, bm = jax.tree.map(jnp.asarray, (meta, bm))
    else:  # traced: the grid variant's slot extent becomes dynamic
        meta, bm = metadata(jnp)
        kv_slots = q_slots = None

    cfg = Config(
        variant=variant,
        block_q=bq,
        block_kv=bk,
        scale=float(1.0 / math.sqrt(head_dim) if scale is None else scale),
        causal=mask.causal,
        window=None if mask.window is None else int(mask.window),
        use_span=mask.use_span,
        groups=heads // kv_heads,
        num_q_blocks=q_pad // bq,
        num_kv_blocks=kv_pad // bk,
        kv_slots=kv_slots,
        q_slots=q_slots,
        interpret=interpret,
        debug=debug,
    )

    def layout(x: Array, padded: int) -> Array:
        pad = ((0, 0), (0, padded - x.shape[1]), (0, 0), (0, d_pad - head_dim))
        if any(p != (0, 0) for p in pad):
            x = jnp.pad(x, pad)
        return jnp.swapaxes(x, 1, 2) if VARIANTS[variant].HEADS_FIRST else x

    return _Prepared(cfg, layout(q, q_pad), layout(k, kv_pad), layout(v, kv_pad), meta, bm)


def pallas_attention(
    q: Array, k: Array, v: Array, mask: MaskSpec | None = None, **options: object
) -> Array:
    """Block-sparse flash attention with the semantics of `attention_reference`.

    q [B, Sq, H, D], k/v [B, Sk, Hkv, D] (shapes assumed checked), `mask` a `MaskSpec`
    (default: none); `options` are `_prepare`'s keywords (scale, tiles, interpret mode,
    variant, platform). Differentiable in q, k and v.
    """
    q_len, head_dim = q.shape[1], q.shape[3]
    p = _prepare(q, k, v, mask, **options)
    out = _flash(p.cfg, p.q, p.k, p.v, p.meta, p.bm)
    if VARIANTS[p.cfg.variant].HEADS_FIRST:
        out = jnp.swapaxes(out, 1, 2)
    return out[:, :q_len, :, :head_dim]


def executed_kv_blocks(
    q: Array, k: Array, v: Array, mask: MaskSpec | None = None, **kwargs: object
) -> tuple[Array, BlockMap]:
    """Debug mode: the forward kernel counts, per (b, h, q block), the kv blocks it computed.

    Takes `pallas_attention`'s arguments; returns (visits [B, H, nq] int32, the block map
    [B, ...] the kernel was driven by). The count is incremented inside the kernel (per grid
    step of the grid variant, per loop iteration of the loop variant), so it shows which
    blocks really ran, not what the metadata promised.
    """
    p = _prepare(q, k, v, mask, debug=True, **kwargs)
    visits = VARIANTS[p.cfg.variant].forward(p.cfg, p.q, p.k, p.v, p.meta, p.bm)[2]
    return visits.reshape(*visits.shape[:2], -1)[:, :, :: p.cfg.block_q], p.bm
