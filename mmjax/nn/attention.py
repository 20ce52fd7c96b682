"""Multi-head (grouped-query) attention layer on top of `mmjax.kernels.attention`."""

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax import kernels
from mmjax.nn.dense import DenseGeneral
from mmjax.nn.rope import apply_rope, rotate

QKV_AXES = ("batch", "length", "act_heads", "kv")


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention with `num_kv_heads` dividing `num_heads` (GQA).

    The mask comes from token metadata (segment/span ids, causal, window) exactly as
    `mmjax.kernels.attention` defines it; `impl` picks the kernel ("auto", "xla", ...).
    With `rope_theta`, q and k are rotated by the `positions` passed at call time; a model
    whose RoPE is not 1D (M-RoPE, a ViT's 2D RoPE) passes the `rope_angles` it computed once
    (nn.rope) instead, and they are used whatever `rope_theta` is.
    `query_offset` (int [B]) places the queries at positions `query_offset + i` of the keys,
    for the causal mask: how a block computes only the token it is read out at.

    `scale` multiplies the scores (default 1/sqrt(head_dim); Gemma-2: query_pre_attn_scalar^-1/2)
    and `logits_soft_cap` caps them, cap * tanh(s / cap) (Gemma-2). `window_on` (a traced
    bool) switches the `window` on or off at run time, for a scanned stack whose layers
    alternate local and global attention (Gemma-2): both variants compile, one runs.

    `values` feeds the value projection when it differs from the keys' input `kv` (Qwen-VL's
    adapter adds 2D positions to the keys only).

    `decode=True` keeps a KV cache (flax collection "cache": keys, values and their segment
    and span ids, sized by the first call, which only creates it). Later calls write their
    chunk's keys and values at `cache_offset` (int [B]) and attend to the whole cache, with
    the chunk's queries at positions `cache_offset + i`: one token when decoding text, or a
    whole image block re-denoised against a cached prompt.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    use_bias: bool = True
    qkv_bias: bool | None = None  # the q, k, v projections' bias (None: use_bias); Qwen: True
    rope_theta: float | None = None
    rope_scaling: Mapping[str, Any] | None = None  # nn.rope.rope_frequencies
    scale: float | None = None
    logits_soft_cap: float | None = None
    decode: bool = False
    impl: str = "auto"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        kv: jnp.ndarray | None = None,
        *,
        values: jnp.ndarray | None = None,
        segment_ids: jnp.ndarray | None = None,
        kv_segment_ids: jnp.ndarray | None = None,
        span_ids: jnp.ndarray | None = None,
        kv_span_ids: jnp.ndarray | None = None,
        causal: bool = False,
        window: int | None = None,
        window_on: jnp.ndarray | None = None,
        positions: jnp.ndarray | None = None,
        kv_positions: jnp.ndarray | None = None,
        rope_angles: jnp.ndarray | None = None,
        kv_rope_angles: jnp.ndarray | None = None,
        cache_offset: jnp.ndarray | None = None,
        query_offset: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        width = x.shape[-1]
        if self.head_dim is None and width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        head_dim = self.head_dim or width // self.num_heads
        kv_heads = self.num_kv_heads or self.num_heads
        kv = x if kv is None else kv

        def project(name: str, inputs: jnp.ndarray, heads: int) -> jnp.ndarray:
            y = DenseGeneral(
                (heads, head_dim),
                ("embed", "heads", "kv"),
                use_bias=self.use_bias if self.qkv_bias is None else self.qkv_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )(inputs)
            return nn.with_logical_constraint(y, QKV_AXES)

        q = project("query", x, self.num_heads)
        k = project("key", kv, kv_heads)
        v = project("value", kv if values is None else values, kv_heads)
        if rope_angles is not None:
            q = rotate(q, rope_angles)
            k = rotate(k, rope_angles if kv_rope_angles is None else kv_rope_angles)
        elif self.rope_theta is not None:
            if positions is None:
                raise ValueError("attention with rope_theta needs token positions")
            kv_positions = positions if kv_positions is None else kv_positions
            q = apply_rope(q, positions, self.rope_theta, self.rope_scaling)
            k = apply_rope(k, kv_positions, self.rope_theta, self.rope_scaling)
        q_offset = 0 if query_offset is None else query_offset
        if self.decode:
            k, v, kv_segment_ids, kv_span_ids, q_offset = kv_cache(
                self, k, v, segment_ids, span_ids, cache_offset
            )
        attend = functools.partial(
            kernels.attention,
            q,
            k,
            v,
            segment_ids=segment_ids,
            kv_segment_ids=kv_segment_ids,
            span_ids=span_ids,
            kv_span_ids=kv_span_ids,
            causal=causal,
            scale=self.scale,
            logits_soft_cap=self.logits_soft_cap,
            q_offset=q_offset,
            impl=self.impl,
            partition=_mesh_axes(QKV_AXES),
        )
        if window is not None and window_on is not None:
            out = jax.lax.cond(window_on, lambda: attend(window=window), lambda: attend())
        else:
            out = attend(window=window)
        return DenseGeneral(
            (width,),
            ("heads", "kv", "embed"),
            num_in=2,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="out",
        )(out)


def kv_cache(
    module: nn.Module,
    k: jnp.ndarray,
    v: jnp.ndarray,
    segment_ids: jnp.ndarray | None,
    span_ids: jnp.ndarray | None,
    offset: jnp.ndarray | None,
) -> tuple:
    """The KV cache of an attention `module` (its "cache" collection): writes this chunk's
    keys, values and ids at `offset` and returns (keys, values, segment ids, span ids,
    query offset) of the whole cache to attend to; the first (sizing) call only creates it."""
    batch, chunk = k.shape[:2]
    ids = jnp.ones((batch, chunk), jnp.int32)
    segment_ids = ids if segment_ids is None else segment_ids
    span_ids = jnp.zeros_like(ids) if span_ids is None else span_ids
    initialised = module.has_variable("cache", "cached_key")
    entries = {
        "cached_key": k,
        "cached_value": v,
        "cached_segment_ids": segment_ids,
        "cached_span_ids": span_ids,
    }
    cache = {
        name: module.variable("cache", name, jnp.zeros, x.shape, x.dtype)
        for name, x in entries.items()
    }
    if not initialised:  # the sizing call: attend within the chunk as without a cache
        return k, v, segment_ids, span_ids, 0
    if offset is None:
        raise ValueError("attention with decode=True needs cache_offset")
    offset = jnp.broadcast_to(jnp.asarray(offset, jnp.int32), (batch,))
    for name, x in entries.items():
        cache[name].value = jax.vmap(_write)(
            cache[name].value, x.astype(cache[name].value.dtype), offset
        )
    return (*(c.value for c in cache.values()), offset)


def _mesh_axes(names: tuple[str, ...]) -> tuple | None:
    """The mesh axes the active logical-axis rules give `names` (None: no rules set), so
    the attention kernels shard exactly as the surrounding activations are sharded."""
    spec = tuple(nn.logical_to_mesh_axes(names))
    return None if all(axis is None for axis in spec) else spec


def _write(cache: jnp.ndarray, chunk: jnp.ndarray, offset: jnp.ndarray) -> jnp.ndarray:
    """One row: cache[offset : offset + len(chunk)] = chunk."""
    start = (offset,) + (0,) * (cache.ndim - 1)
    return jax.lax.dynamic_update_slice(cache, chunk, start)
