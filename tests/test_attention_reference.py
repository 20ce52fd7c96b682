"""`mmjax.kernels.attention` (XLA reference) against the mask contract, token by token.

The oracle is a naive numpy implementation with explicit loops over (batch, head, query, key)
that applies DESIGN.md's rule directly, so it shares no code with `masks.py`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmjax.kernels import IMPLS, MaskSpec, attention, attention_mask

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, database=None)
# Tests compile one small program per example: skipping LLVM's optimisations roughly halves
# compile time and leaves the program (the HLO) and its results as they are.
FAST_COMPILE = {"xla_backend_optimization_level": 0}
HIGHEST = jax.lax.Precision.HIGHEST


@dataclass(frozen=True)
class Case:
    """One random attention problem: shapes, token metadata and a seed for q/k/v."""

    batch: int
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    causal: bool
    window: int | None
    q_offset: int | np.ndarray
    segment_ids: np.ndarray | None
    kv_segment_ids: np.ndarray | None
    span_ids: np.ndarray | None
    kv_span_ids: np.ndarray | None
    seed: int

    def kwargs(self) -> dict:
        """Keyword arguments for `attention` / `attention_mask` (ids as jnp arrays)."""
        as_jnp = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731
        offset = self.q_offset if isinstance(self.q_offset, int) else jnp.asarray(self.q_offset)
        return dict(
            segment_ids=as_jnp(self.segment_ids),
            kv_segment_ids=as_jnp(self.kv_segment_ids),
            span_ids=as_jnp(self.span_ids),
            kv_span_ids=as_jnp(self.kv_span_ids),
            causal=self.causal,
            window=self.window,
            q_offset=offset,
        )

    def mask(self) -> MaskSpec:
        """The case's metadata as the backends take it."""
        return MaskSpec(**self.kwargs())

    def jit(self, fn: Callable[..., Any], spec: bool = False) -> Callable[..., Any]:
        """`fn(*args, **kwargs())` (or `fn(*args, mask())` with `spec`) under one jit:
        arrays traced, python values static.

        One compile per example instead of one per eager op keeps the suite fast, and it
        checks that `attention` traces with ids and array offsets as tracers.
        """
        kwargs = self.kwargs()
        static = {name: kwargs.pop(name) for name in ("causal", "window")}
        if isinstance(kwargs["q_offset"], int):
            static["q_offset"] = kwargs.pop("q_offset")
        if spec:
            call = lambda args, dynamic: fn(*args, MaskSpec(**static, **dynamic))  # noqa: E731
        else:
            call = lambda args, dynamic: fn(*args, **static, **dynamic)  # noqa: E731
        jitted = jax.jit(call, compiler_options=FAST_COMPILE)
        return lambda *args: jitted(args, kwargs)

    def qkv(self) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """Random q [B, Sq, H, D] and k, v [B, Sk, Hkv, D] in the case's dtype."""
        rng = np.random.default_rng(self.seed)
        q = rng.normal(size=(self.batch, self.q_len, self.heads, self.head_dim))
        k = rng.normal(size=(self.batch, self.kv_len, self.kv_heads, self.head_dim))
        v = rng.normal(size=(self.batch, self.kv_len, self.kv_heads, self.head_dim))
        return tuple(jnp.asarray(x, dtype=self.dtype) for x in (q, k, v))


def _ids(draw, batch: int, length: int, high: int) -> np.ndarray:
    """Draws an int32 id array [batch, length] with values in 0..high."""
    row = st.lists(st.integers(0, high), min_size=length, max_size=length)
    return np.array(draw(st.lists(row, min_size=batch, max_size=batch)), dtype=np.int32)


@st.composite
def cases(draw, dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> Case:
    """Small random problems covering GQA, Sq != Sk, padding, spans, causal, window, offsets."""
    batch = draw(st.integers(1, 2))
    q_len = draw(st.integers(1, 6))
    kv_len = q_len if draw(st.booleans()) else draw(st.integers(1, 6))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 3))

    def q_and_kv_ids(high: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        q_ids = _ids(draw, batch, q_len, high) if draw(st.booleans()) else None
        if q_ids is not None and q_len == kv_len and draw(st.booleans()):
            return q_ids, None  # kv ids default to the query ones
        if q_ids is not None or draw(st.integers(0, 3)) == 0:
            return q_ids, _ids(draw, batch, kv_len, high)
        return q_ids, None

    segment_ids, kv_segment_ids = q_and_kv_ids(high=2)
    span_ids, kv_span_ids = q_and_kv_ids(high=2)
    offset_kind = draw(st.sampled_from(["zero", "int", "array"]))
    if offset_kind == "zero":
        q_offset: int | np.ndarray = 0
    elif offset_kind == "int":
        q_offset = draw(st.integers(0, 6))
    else:
        q_offset = np.array(draw(st.lists(st.integers(0, 6), min_size=batch, max_size=batch)))
    return Case(
        batch=batch,
        q_len=q_len,
        kv_len=kv_len,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=draw(st.integers(1, 8)),
        dtype=draw(st.sampled_from(dtypes)),
        causal=draw(st.booleans()),
        window=draw(st.one_of(st.none(), st.integers(1, 7))),
        q_offset=q_offset,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        span_ids=span_ids,
        kv_span_ids=kv_span_ids,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def naive_visible(case: Case, b: int, i: int, j: int) -> bool:
    """The contract's rule for query token i and key token j of batch row b."""
    kv_seg_ids = case.kv_segment_ids
    if kv_seg_ids is None and case.segment_ids is not None:
        kv_seg_ids = case.segment_ids
    kv_span_ids = case.kv_span_ids
    if kv_span_ids is None and case.span_ids is not None:
        kv_span_ids = case.span_ids
    seg_i = 1 if case.segment_ids is None else int(case.segment_ids[b, i])
    seg_j = 1 if kv_seg_ids is None else int(kv_seg_ids[b, j])
    span_i = 0 if case.span_ids is None else int(case.span_ids[b, i])
    span_j = 0 if kv_span_ids is None else int(kv_span_ids[b, j])
    offset = case.q_offset if isinstance(case.q_offset, int) else int(case.q_offset[b])
    pos_i = offset + i
    if seg_i == 0 or seg_j == 0 or seg_i != seg_j:
        return False
    if case.causal and not (j <= pos_i or (span_i != 0 and span_i == span_j)):
        return False
    return case.window is None or abs(pos_i - j) < case.window


def naive_mask(case: Case) -> np.ndarray:
    """[B, Sq, Sk] bool, one `naive_visible` call per token pair."""
    mask = np.zeros((case.batch, case.q_len, case.kv_len), dtype=bool)
    for b in range(case.batch):
        for i in range(case.q_len):
            for j in range(case.kv_len):
                mask[b, i, j] = naive_visible(case, b, i, j)
    return mask


def naive_attention(
    case: Case, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
    scale: float | None = None, soft_cap: float | None = None,
) -> np.ndarray:  # fmt: skip
    """float64 attention with python loops over (b, h, i, j); empty rows give 0. A soft
    cap c maps each scaled logit s to c * tanh(s / c) (Gemma 2) before the mask drops it."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    groups = case.heads // case.kv_heads
    scale = 1.0 / math.sqrt(case.head_dim) if scale is None else scale
    out = np.zeros((case.batch, case.q_len, case.heads, case.head_dim))
    for b in range(case.batch):
        for h in range(case.heads):
            kv_h = h // groups
            for i in range(case.q_len):
                logits, values = [], []
                for j in range(case.kv_len):
                    logit = scale * float(q[b, i, h] @ k[b, j, kv_h])
                    if soft_cap is not None:
                        logit = soft_cap * math.tanh(logit / soft_cap)
                    if naive_visible(case, b, i, j):
                        logits.append(logit)
                        values.append(v[b, j, kv_h])
                if not logits:
                    continue
                weights = np.exp(np.array(logits) - max(logits))
                out[b, i, h] = (weights / weights.sum()) @ np.array(values)
    return out


def dense_f32_attention(
    q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: np.ndarray,
    soft_cap: float | None = None,
) -> jnp.ndarray:  # fmt: skip
    """Plain differentiable softmax attention on an explicit mask; empty rows give 0; scaled
    logits soft-capped to c * tanh(. / c) when `soft_cap` c is given."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST) / math.sqrt(q.shape[-1])
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    visible = jnp.asarray(mask)[:, None]
    probs = jax.nn.softmax(jnp.where(visible, logits, -1e30), axis=-1)
    probs = probs * visible.any(axis=-1, keepdims=True)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=HIGHEST)


@PROPERTY_SETTINGS
@given(cases())
def test_mask_matches_contract(case: Case) -> None:
    mask = case.jit(functools.partial(attention_mask, case.q_len, case.kv_len))()
    assert mask.dtype == jnp.bool_
    assert mask.shape[1:] == (case.q_len, case.kv_len) and mask.shape[0] in (1, case.batch)
    expected = naive_mask(case)
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(mask), expected.shape), expected)


@PROPERTY_SETTINGS
@given(cases())
def test_attention_matches_naive(case: Case) -> None:
    q, k, v = case.qkv()
    out = case.jit(attention)(q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape
    out = np.asarray(out, dtype=np.float64)
    tol = 2e-5 if case.dtype == "float32" else 2e-2
    np.testing.assert_allclose(out, naive_attention(case, q, k, v), atol=tol, rtol=tol)
    empty_rows = ~naive_mask(case).any(axis=-1)  # [B, Sq]
    assert np.all(out[empty_rows] == 0.0)


# Soft caps from "saturates every logit" to "changes almost nothing" (logits here ~ N(0, 1)).
SOFT_CAPS = st.floats(0.05, 20.0)


@PROPERTY_SETTINGS
@given(cases(), SOFT_CAPS, st.one_of(st.none(), st.floats(0.1, 3.0)))
def test_soft_capped_attention_matches_naive(case: Case, soft_cap: float, scale) -> None:
    """scores * scale -> cap * tanh(. / cap) -> mask -> softmax, with GQA and every mask."""
    q, k, v = case.qkv()
    run = functools.partial(attention, scale=scale, logits_soft_cap=soft_cap, impl="xla")
    out = np.asarray(case.jit(run)(q, k, v), dtype=np.float64)
    tol = 2e-5 if case.dtype == "float32" else 2e-2
    expected = naive_attention(case, q, k, v, scale=scale, soft_cap=soft_cap)
    np.testing.assert_allclose(out, expected, atol=tol, rtol=tol)
    assert np.all(out[~naive_mask(case).any(axis=-1)] == 0.0)


@PROPERTY_SETTINGS
@given(cases(dtypes=("float32",)), st.one_of(st.none(), SOFT_CAPS))
def test_gradients_match_dense_reference(case: Case, soft_cap: float | None) -> None:
    """dq, dk, dv of every mask, uncapped or soft-capped, against autodiff of the dense f32
    formula; rows that see nothing get zero gradients."""
    q, k, v = case.qkv()
    cotangent = jnp.asarray(np.random.default_rng(case.seed + 1).normal(size=q.shape), q.dtype)
    mask = naive_mask(case)

    def both_grads(q, k, v, **kwargs):
        def loss(fn):
            return lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent)

        ours = loss(lambda q, k, v: attention(q, k, v, logits_soft_cap=soft_cap, **kwargs))
        dense = loss(lambda q, k, v: dense_f32_attention(q, k, v, mask, soft_cap))
        return jax.grad(ours, (0, 1, 2))(q, k, v), jax.grad(dense, (0, 1, 2))(q, k, v)

    grads, expected = case.jit(both_grads)(q, k, v)
    for name, grad, want in zip("qkv", grads, expected, strict=True):
        assert np.all(np.isfinite(grad)), f"non-finite d{name}"
        np.testing.assert_allclose(grad, want, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")
    empty_rows = ~mask.any(axis=-1)
    assert np.all(np.asarray(grads[0])[empty_rows] == 0.0)


def _random_qkv(
    batch: int, q_len: int, kv_len: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """f32 q [B, Sq, H, D], k and v [B, Sk, Hkv, D] from a fixed seed."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, q_len, heads, head_dim))
    k = rng.normal(size=(batch, kv_len, kv_heads, head_dim))
    v = rng.normal(size=(batch, kv_len, kv_heads, head_dim))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


@pytest.mark.parametrize("impl", IMPLS)
def test_pure_causal_equals_jax_dot_product_attention(impl: str) -> None:
    q, k, v = _random_qkv(batch=2, q_len=7, kv_len=7, heads=4, kv_heads=2, head_dim=8)
    out = attention(q, k, v, causal=True, impl=impl)
    expected = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_soft_cap_changes_the_output_only_when_it_bites(impl: str) -> None:
    """A cap far above every logit leaves attention as it is; a small one changes it, and a
    tiny one flattens every row to the plain mean of the values it sees (causal: prefix
    means), gradients included."""
    q, k, v = _random_qkv(batch=2, q_len=8, kv_len=8, heads=4, kv_heads=2, head_dim=8)
    q = 4.0 * q  # logits of several units: a cap of 1 bites

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(q, k, v):
        def out(cap):
            return attention(q, k, v, causal=True, logits_soft_cap=cap, impl=impl)

        grad = jax.grad(lambda q: jnp.sum(attention(q, k, v, logits_soft_cap=1.0, impl=impl)))
        return out(None), out(1e4), out(1.0), out(1e-4), grad(q)

    plain, large, small, tiny, dq = run(q, k, v)
    np.testing.assert_allclose(large, plain, atol=1e-5, rtol=1e-5)
    assert np.max(np.abs(np.asarray(small - plain))) > 0.1
    groups = q.shape[2] // k.shape[2]
    prefix_mean = np.cumsum(np.repeat(v, groups, axis=2), axis=1) / np.arange(1, 9)[:, None, None]
    np.testing.assert_allclose(tiny, prefix_mean, atol=1e-3)
    assert np.all(np.isfinite(dq)) and np.max(np.abs(np.asarray(dq))) > 0


@pytest.mark.parametrize("cap", [0, 0.0, -1.0, float("nan"), float("inf"), "1", True])
@pytest.mark.parametrize("impl", IMPLS)
def test_soft_cap_must_be_positive(cap, impl: str) -> None:
    with pytest.raises(ValueError, match="logits_soft_cap"):
        attention(_Q, _KV, _KV, logits_soft_cap=cap, impl=impl)


def test_span_inside_causal_sequence_is_bidirectional() -> None:
    # Text token 0, an image of tokens 1..3, then text tokens 4 and 5.
    span_ids = jnp.array([[0, 1, 1, 1, 0, 0]])
    mask = np.asarray(attention_mask(6, 6, span_ids=span_ids, causal=True))[0]
    expected = np.tril(np.ones((6, 6), dtype=bool))
    expected[1:4, 1:4] = True
    np.testing.assert_array_equal(mask, expected)

    q, k, v = _random_qkv(batch=1, q_len=6, kv_len=6, heads=2, kv_heads=1, head_dim=4)
    out = attention(q, k, v, span_ids=span_ids, causal=True)
    # The first image token attends to the whole prefix and image, exactly as without a mask.
    image_view = attention(q[:, 1:2], k[:, :4], v[:, :4])
    np.testing.assert_allclose(out[:, 1:2], image_view, atol=1e-6)
    # Text before the image is unaffected by it.
    np.testing.assert_allclose(out[:, :1], attention(q[:, :1], k[:, :1], v[:, :1]), atol=1e-6)


def test_decoding_with_q_offset_matches_full_causal_rows() -> None:
    q, k, v = _random_qkv(batch=2, q_len=6, kv_len=6, heads=4, kv_heads=1, head_dim=8)
    segment_ids = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])  # row 1: padded cache
    full = attention(q, k, v, segment_ids=segment_ids, causal=True)
    positions = jnp.array([5, 3])
    step_q = q[jnp.arange(2), positions][:, None]  # one new query per row: [B, 1, H, D]

    @jax.jit
    def decode(step_q, offsets):
        return attention(
            step_q,
            k,
            v,
            segment_ids=jnp.ones((2, 1), jnp.int32),
            kv_segment_ids=segment_ids,
            causal=True,
            q_offset=offsets,
        )

    out = decode(step_q, positions)
    np.testing.assert_allclose(out[:, 0], full[jnp.arange(2), positions], atol=1e-6)


def test_padding_rows_are_zero_with_zero_gradients() -> None:
    q, k, v = _random_qkv(batch=2, q_len=4, kv_len=4, heads=2, kv_heads=2, head_dim=4)
    segment_ids = jnp.array([[1, 1, 2, 0], [0, 0, 0, 0]])
    out = attention(q, k, v, segment_ids=segment_ids, causal=True, window=2)
    assert np.all(np.asarray(out[1]) == 0.0) and np.all(np.asarray(out[0, 3]) == 0.0)
    loss = lambda q, k, v: jnp.sum(attention(q, k, v, segment_ids=segment_ids) ** 2)  # noqa: E731
    grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
    for grad in grads:
        assert np.all(np.isfinite(grad))
        assert np.all(np.asarray(grad[1]) == 0.0) and np.all(np.asarray(grad[0, 3]) == 0.0)


def test_bf16_inputs_return_bf16() -> None:
    q, k, v = (x.astype(jnp.bfloat16) for x in _random_qkv(1, 3, 5, 2, 1, 4))
    out = attention(q, k, v, scale=0.3)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 3, 2, 4)


_Q = jnp.zeros((2, 4, 4, 8))
_KV = jnp.zeros((2, 6, 2, 8))
_BAD_CALLS = {
    "rank": lambda: attention(_Q[0], _KV, _KV),
    "batch": lambda: attention(_Q, _KV[:1], _KV[:1]),
    "head_dim": lambda: attention(_Q, _KV[..., :4], _KV[..., :4]),
    "kv_heads_divide": lambda: attention(_Q, jnp.zeros((2, 6, 3, 8)), jnp.zeros((2, 6, 3, 8))),
    "k_v_shapes": lambda: attention(_Q, _KV, _KV[:, :5]),
    "segment_shape": lambda: attention(_Q, _KV, _KV, segment_ids=jnp.ones((2, 6), jnp.int32)),
    "kv_segment_shape": lambda: attention(
        _Q,
        _KV,
        _KV,
        segment_ids=jnp.ones((2, 4), jnp.int32),
        kv_segment_ids=jnp.ones((2, 4), jnp.int32),
    ),
    "kv_ids_required": lambda: attention(_Q, _KV, _KV, segment_ids=jnp.ones((2, 4), jnp.int32)),
    "kv_span_required": lambda: attention(_Q, _KV, _KV, span_ids=jnp.ones((2, 4), jnp.int32)),
    "float_ids": lambda: attention_mask(4, 4, segment_ids=jnp.ones((2, 4))),
    "window": lambda: attention(_Q, _KV, _KV, window=0),
    "q_offset_shape": lambda: attention(_Q, _KV, _KV, q_offset=jnp.zeros((3,), jnp.int32)),
    "mask_batches": lambda: attention_mask(
        4, 4, segment_ids=jnp.ones((2, 4), jnp.int32), span_ids=jnp.ones((3, 4), jnp.int32)
    ),
}


@pytest.mark.parametrize("name", sorted(_BAD_CALLS))
def test_bad_inputs_raise_value_error(name: str) -> None:
    with pytest.raises(ValueError):
        _BAD_CALLS[name]()


def test_unknown_impl_names_valid_choices() -> None:
    assert set(IMPLS) == {"auto", "xla", "pallas"}
    with pytest.raises(ValueError, match="auto, xla, pallas"):
        attention(_Q, _KV, _KV, impl="cuda")
