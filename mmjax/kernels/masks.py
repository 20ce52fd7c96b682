"""Attention mask semantics: which query token may see which key token.

This module is the single definition of the mask contract in DESIGN.md ("Attention"); the
XLA reference materialises it and every other kernel must agree with it. Token i (query
position `q_offset + i`) may see token j (key position j) iff

- both have the same segment id, and that id is non-zero (0 = padding: it sees nothing and
  nothing sees it); with no segment ids every token is in segment 1;
- when `causal`: j <= i, or both carry the same non-zero span id (a bidirectional span such as
  one image inside a causal text sequence);
- with a window w: |i - j| < w.
"""

from __future__ import annotations

import operator

import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray


def _check_ids(name: str, ids: Array | None, seq_len: int, what: str) -> None:
    """Raises ValueError unless `ids` is None or an integer array shaped [batch, seq_len]."""
    if ids is None:
        return
    shape = jnp.shape(ids)
    if len(shape) != 2 or shape[1] != seq_len:
        raise ValueError(f"{name} must be shaped [batch, {what}={seq_len}], got {shape}")
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise ValueError(f"{name} must hold integers, got dtype {jnp.result_type(ids)}")


def _kv_ids(
    name: str, q_ids: Array | None, kv_ids: Array | None, q_len: int, kv_len: int
) -> Array | None:
    """The key-side ids: given ones, or the query ones when both sequences are the same length."""
    if kv_ids is not None or q_ids is None:
        return kv_ids
    if q_len != kv_len:
        raise ValueError(
            f"kv_{name} is required when {name} is given and q_len ({q_len}) != kv_len "
            f"({kv_len}); the query ids cannot describe the keys"
        )
    return q_ids


def _query_positions(q_len: int, q_offset: int | Array) -> Array:
    """Absolute query positions, [1 or batch, q_len]: `q_offset + 0..q_len-1`."""
    if isinstance(q_offset, (int, np.integer)) and not isinstance(q_offset, bool):
        return (jnp.arange(q_len, dtype=jnp.int32) + int(q_offset))[None, :]
    offset = jnp.asarray(q_offset)
    if not jnp.issubdtype(offset.dtype, jnp.integer):
        raise ValueError(f"q_offset must be an int or an integer array, got dtype {offset.dtype}")
    if offset.ndim > 1:
        raise ValueError(f"q_offset must be an int or shaped [batch], got shape {offset.shape}")
    offset = offset.astype(jnp.int32).reshape(-1, 1)
    return offset + jnp.arange(q_len, dtype=jnp.int32)[None, :]


def _check_window(window: int | None) -> None:
    """Raises ValueError unless `window` is None or a positive python/numpy int."""
    if window is None:
        return
    try:
        value = operator.index(window)
    except TypeError:
        raise ValueError(f"window must be a positive int or None, got {window!r}") from None
    if isinstance(window, bool) or value < 1:
        raise ValueError(f"window must be a positive int or None, got {window!r}")


def _same_nonzero(q_ids: Array, kv_ids: Array) -> Array:
    """[b, q, k] True where the query and key ids are equal and non-zero."""
    q = q_ids[:, :, None]
    return (q == kv_ids[:, None, :]) & (q != 0)


def attention_mask(
    q_len: int,
    kv_len: int,
    *,
    segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
    span_ids: Array | None = None,
    kv_span_ids: Array | None = None,
    causal: bool = False,
    window: int | None = None,
    q_offset: int | Array = 0,
) -> Array:
    """Boolean mask [batch or 1, q_len, kv_len]: True where query i may attend to key j.

    Ids are integer arrays [batch, seq]; `kv_*` default to the query ones when q_len == kv_len
    and are required otherwise. `q_offset` (int, or int array [batch]) shifts query positions,
    as when decoding against a KV cache. Built from broadcasted comparisons only, so it traces
    under jit with any of the arrays (ids, `q_offset`) as tracers.
    """
    q_len, kv_len = operator.index(q_len), operator.index(kv_len)
    if q_len < 1 or kv_len < 1:
        raise ValueError(f"q_len and kv_len must be positive, got {q_len} and {kv_len}")
    _check_window(window)
    kv_segment_ids = _kv_ids("segment_ids", segment_ids, kv_segment_ids, q_len, kv_len)
    kv_span_ids = _kv_ids("span_ids", span_ids, kv_span_ids, q_len, kv_len)
    _check_ids("segment_ids", segment_ids, q_len, "q_len")
    _check_ids("kv_segment_ids", kv_segment_ids, kv_len, "kv_len")
    _check_ids("span_ids", span_ids, q_len, "q_len")
    _check_ids("kv_span_ids", kv_span_ids, kv_len, "kv_len")
    q_pos = _query_positions(q_len, q_offset)

    batches = {
        name: jnp.shape(x)[0]
        for name, x in [
            ("segment_ids", segment_ids),
            ("kv_segment_ids", kv_segment_ids),
            ("span_ids", span_ids),
            ("kv_span_ids", kv_span_ids),
            ("q_offset", q_pos if jnp.ndim(q_offset) == 1 else None),
        ]
        if x is not None
    }
    if len(set(batches.values())) > 1:
        raise ValueError(f"batch sizes of the mask inputs disagree: {batches}")
    batch = next(iter(batches.values()), 1)

    mask = jnp.ones((1, q_len, kv_len), dtype=jnp.bool_)
    if segment_ids is not None or kv_segment_ids is not None:
        q_seg = jnp.ones((1, q_len), jnp.int32) if segment_ids is None else segment_ids
        kv_seg = jnp.ones((1, kv_len), jnp.int32) if kv_segment_ids is None else kv_segment_ids
        mask = mask & _same_nonzero(q_seg, kv_seg)

    kv_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]
    if causal:
        visible = kv_pos <= q_pos[:, :, None]
        if span_ids is not None and kv_span_ids is not None:
            visible = visible | _same_nonzero(span_ids, kv_span_ids)
        mask = mask & visible
    if window is not None:
        mask = mask & (jnp.abs(q_pos[:, :, None] - kv_pos) < operator.index(window))
    return jnp.broadcast_to(mask, (batch, q_len, kv_len))
