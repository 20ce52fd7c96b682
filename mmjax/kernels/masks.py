"""Attention mask semantics: which query token may see which key token.

This module is the single definition of the mask contract in DESIGN.md ("Attention"); the
XLA reference materialises it and every other kernel must agree with it. Token i (query
position `q_offset + i`) may see token j (key position j) iff

- both have the same segment id, and that id is non-zero (0 = padding: it sees nothing and
  nothing sees it); with no segment ids every token is in segment 1;
- when `causal`: j <= i, or both carry the same non-zero span id (a bidirectional span such as
  one image inside a causal text sequence);
- with a window w: |i - j| < w.

`MaskSpec` holds that metadata once; the public `attention` builds it from its keywords and
every backend, the block maps and `attention_mask` read it from there.
"""

from __future__ import annotations

import dataclasses
import operator

import jax
import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray

_ID_FIELDS = ("segment_ids", "kv_segment_ids", "span_ids", "kv_span_ids")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """The token metadata of one attention call; field names are `attention`'s keywords.

    Ids are integer arrays [batch, seq] (or None); `q_offset` is an int or an int array
    [batch]; `causal` and `window` are static (pytree metadata), the rest are pytree leaves,
    so a MaskSpec can cross `jax.jit` and `jax.tree.map`.
    """

    segment_ids: Array | None = None
    kv_segment_ids: Array | None = None
    span_ids: Array | None = None
    kv_span_ids: Array | None = None
    q_offset: int | Array = 0
    causal: bool = dataclasses.field(default=False, metadata={"static": True})
    window: int | None = dataclasses.field(default=None, metadata={"static": True})

    def resolve(self, q_len: int, kv_len: int) -> MaskSpec:
        """Validated copy with the kv ids filled in (the query ones when Sq == Sk).

        Raises ValueError for a bad window, ids that are not integer [batch, seq] arrays, or
        query ids without key ids when q_len != kv_len.
        """
        _check_window(self.window)
        resolved = dataclasses.replace(
            self,
            kv_segment_ids=_kv_ids(
                "segment_ids", self.segment_ids, self.kv_segment_ids, q_len, kv_len
            ),
            kv_span_ids=_kv_ids("span_ids", self.span_ids, self.kv_span_ids, q_len, kv_len),
        )
        for name in _ID_FIELDS:
            seq_len, what = (kv_len, "kv_len") if name.startswith("kv_") else (q_len, "q_len")
            _check_ids(name, getattr(resolved, name), seq_len, what)
        return resolved

    @property
    def use_span(self) -> bool:
        """Whether span ids take part: only causal masks read them, and only both sides."""
        return self.causal and self.span_ids is not None and self.kv_span_ids is not None

    def batch_size(self) -> int | None:
        """The batch size the ids and an array `q_offset` agree on (None: all absent).

        Raises ValueError when they disagree.
        """
        batches = {name: jnp.shape(getattr(self, name))[0] for name in self.array_fields()}
        if len(set(batches.values())) > 1:
            raise ValueError(f"batch sizes of the mask inputs disagree: {batches}")
        return next(iter(batches.values()), None)

    def array_fields(self) -> tuple[str, ...]:
        """Names of the fields holding per-row arrays (ids and an array q_offset)."""
        names = [name for name in _ID_FIELDS if getattr(self, name) is not None]
        return (*names, "q_offset") if jnp.ndim(self.q_offset) == 1 else tuple(names)

    def is_concrete(self) -> bool:
        """True when no field is a tracer, so block maps can be computed at trace time."""
        return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(self))

    def query_positions(self, q_len: int, xp=jnp) -> Array:
        """Absolute query positions, [1 or batch, q_len]: `q_offset + 0..q_len-1`.

        `xp` is the array module (jax.numpy, or numpy for concrete metadata).
        """
        q_offset = self.q_offset
        if isinstance(q_offset, (int, np.integer)) and not isinstance(q_offset, bool):
            return (xp.arange(q_len, dtype=xp.int32) + int(q_offset))[None, :]
        offset = xp.asarray(q_offset)
        if not xp.issubdtype(offset.dtype, xp.integer):
            raise ValueError(
                f"q_offset must be an int or an integer array, got dtype {offset.dtype}"
            )
        if offset.ndim > 1:
            raise ValueError(f"q_offset must be an int or shaped [batch], got {offset.shape}")
        offset = offset.astype(xp.int32).reshape(-1, 1)
        return offset + xp.arange(q_len, dtype=xp.int32)[None, :]

    def dense(self, q_len: int, kv_len: int) -> Array:
        """Boolean mask [batch or 1, q_len, kv_len]: True where query i may see key j.

        Built from broadcasted comparisons only, so it traces under jit with any of the
        arrays (ids, `q_offset`) as tracers.
        """
        q_len, kv_len = operator.index(q_len), operator.index(kv_len)
        if q_len < 1 or kv_len < 1:
            raise ValueError(f"q_len and kv_len must be positive, got {q_len} and {kv_len}")
        spec = self.resolve(q_len, kv_len)
        q_pos = spec.query_positions(q_len)
        batch = spec.batch_size() or 1

        mask = jnp.ones((1, q_len, kv_len), dtype=jnp.bool_)
        q_seg, kv_seg = spec.segment_ids, spec.kv_segment_ids
        if q_seg is not None or kv_seg is not None:
            q_seg = jnp.ones((1, q_len), jnp.int32) if q_seg is None else q_seg
            kv_seg = jnp.ones((1, kv_len), jnp.int32) if kv_seg is None else kv_seg
            mask = mask & _same_nonzero(q_seg, kv_seg)

        kv_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]
        if spec.causal:
            visible = kv_pos <= q_pos[:, :, None]
            if spec.use_span:
                visible = visible | _same_nonzero(spec.span_ids, spec.kv_span_ids)
            mask = mask & visible
        if spec.window is not None:
            mask = mask & (jnp.abs(q_pos[:, :, None] - kv_pos) < operator.index(spec.window))
        return jnp.broadcast_to(mask, (batch, q_len, kv_len))


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


def attention_mask(q_len: int, kv_len: int, **mask: object) -> Array:
    """Boolean mask [batch or 1, q_len, kv_len]: True where query i may attend to key j.

    `mask` takes `MaskSpec`'s fields, i.e. `attention`'s mask keywords (segment / span ids,
    `causal`, `window`, `q_offset`); see `MaskSpec.dense`.
    """
    return MaskSpec(**mask).dense(q_len, kv_len)
