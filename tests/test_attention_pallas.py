"""The Pallas flash-attention kernel (interpret mode) against the XLA reference.

Shapes are small but blocks are 8 or 16 tokens, so multi-block grids, partial last blocks,
empty / partial / full blocks and the scalar-prefetched block lists are all exercised. The
mask oracle is `naive_mask` of test_attention_reference (python loops over token pairs).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention_reference import Case, naive_mask

from mmjax.kernels import attention
from mmjax.kernels.block_mask import EMPTY, FULL, PARTIAL, block_map, padded_token_metadata
from mmjax.kernels.pallas_attention import executed_kv_blocks, pallas_attention
from mmjax.kernels.reference import attention_reference
from mmjax.models.text import TextTransformer
from mmjax.models.vit import VisionTransformer
from mmjax.nn.attention import MultiHeadAttention


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None)


def _runs(draw, length: int, zero_prob: float) -> np.ndarray:
    """Contiguous runs of increasing ids (packing), some runs 0 (padding / no span)."""
    ids, next_id, pos = np.zeros(length, np.int32), 1, 0
    while pos < length:
        run = draw(st.integers(1, max(1, length // 2)))
        if draw(st.floats(0, 1)) >= zero_prob:
            ids[pos : pos + run] = next_id
            next_id += 1
        pos += run
    return ids


def _id_array(draw, batch: int, length: int, style: str, zero_prob: float) -> np.ndarray:
    """[batch, length] int32 ids: contiguous runs ("packed") or i.i.d. values ("random")."""
    if style == "packed":
        return np.stack([_runs(draw, length, zero_prob) for _ in range(batch)])
    values = st.lists(st.integers(0, 2), min_size=length, max_size=length)
    return np.array(draw(st.lists(values, min_size=batch, max_size=batch)), np.int32)


@st.composite
def problems(draw, dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> tuple[Case, int, int]:
    """(case, block_q, block_kv): multi-block shapes, GQA, Sq != Sk and random metadata."""
    batch = draw(st.integers(1, 2))
    q_len = draw(st.integers(1, 40))
    kv_len = q_len if draw(st.booleans()) else draw(st.integers(1, 40))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3]))

    def q_and_kv(zero_prob: float) -> tuple[np.ndarray | None, np.ndarray | None]:
        style = draw(st.sampled_from(["none", "packed", "random"]))
        if style == "none":
            return None, None
        q_ids = _id_array(draw, batch, q_len, style, zero_prob)
        if q_len == kv_len and draw(st.booleans()):
            return q_ids, None
        return q_ids, _id_array(draw, batch, kv_len, style, zero_prob)

    segment_ids, kv_segment_ids = q_and_kv(zero_prob=0.15)
    span_ids, kv_span_ids = q_and_kv(zero_prob=0.5)
    offset_kind = draw(st.sampled_from(["zero", "int", "array"]))
    q_offset: int | np.ndarray = 0
    if offset_kind == "int":
        q_offset = draw(st.integers(0, 20))
    elif offset_kind == "array":
        q_offset = np.array(draw(st.lists(st.integers(0, 20), min_size=batch, max_size=batch)))
    case = Case(
        batch=batch,
        q_len=q_len,
        kv_len=kv_len,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([5, 8, 16])),
        dtype=draw(st.sampled_from(dtypes)),
        causal=draw(st.booleans()),
        window=draw(st.one_of(st.none(), st.integers(1, 24))),
        q_offset=q_offset,
        segment_ids=segment_ids,
        kv_segment_ids=kv_segment_ids,
        span_ids=span_ids,
        kv_span_ids=kv_span_ids,
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    return case, draw(st.sampled_from([8, 16])), draw(st.sampled_from([8, 16]))


def _pad_to(x: int, block: int) -> int:
    return -(-x // block) * block


_ID_ARGS = ("segment_ids", "kv_segment_ids", "span_ids", "kv_span_ids", "q_offset")


def _case_block_map(case: Case, bq: int, bk: int):
    """The kernel's block map of a case, and its dense mask padded with False.

    Blocks are clipped as the kernel clips them: never longer than the length rounded up
    to 8.
    """
    bq, bk = min(bq, _pad_to(case.q_len, 8)), min(bk, _pad_to(case.kv_len, 8))
    q_pad, kv_pad = _pad_to(case.q_len, bq), _pad_to(case.kv_len, bk)

    @jax.jit
    def compute(kw):
        meta = padded_token_metadata(
            case.batch, case.q_len, case.kv_len, q_pad, kv_pad, **kw
        )  # fmt: skip
        return block_map(*meta, block_q=bq, block_kv=bk, causal=case.causal, window=case.window)

    kw = case.kwargs()
    bm = compute({name: kw[name] for name in _ID_ARGS})
    dense = np.zeros((case.batch, q_pad, kv_pad), bool)
    dense[:, : case.q_len, : case.kv_len] = naive_mask(case)
    return bm, dense.reshape(case.batch, q_pad // bq, bq, kv_pad // bk, bk)


def _check_lists(kind: np.ndarray, index: np.ndarray, kinds: np.ndarray, count: np.ndarray):
    """Each row's list holds its non-empty blocks in order, then repeats the last one."""
    for row_kind, row_index, row_kinds, n in zip(
        kind.reshape(-1, kind.shape[-1]),
        index.reshape(-1, kind.shape[-1]),
        kinds.reshape(-1, kind.shape[-1]),
        count.reshape(-1),
        strict=True,
    ):
        nonempty = np.flatnonzero(row_kind != EMPTY)
        assert n == len(nonempty)
        np.testing.assert_array_equal(row_index[:n], nonempty)
        np.testing.assert_array_equal(row_kinds[:n], row_kind[nonempty])
        assert np.all(row_index[n:] == (nonempty[-1] if n else 0))
        assert np.all(row_kinds[n:] == EMPTY)


@_settings(25)
@given(problems(dtypes=("float32",)))
def test_block_map_is_sound_and_lists_non_empty_blocks(problem) -> None:
    case, bq, bk = problem
    bm, dense = _case_block_map(case, bq, bk)
    kind = np.asarray(bm.kind)
    any_visible, all_visible = dense.any(axis=(2, 4)), dense.all(axis=(2, 4))
    assert not np.any(any_visible[kind == EMPTY]), "a block with visible pairs was skipped"
    assert np.all(all_visible[kind == FULL]), "a block with masked pairs skipped its mask"
    if case.segment_ids is None and case.kv_segment_ids is None and case.span_ids is None:
        # Causal / window / padding only: the classification is exact.
        exact = np.where(all_visible, FULL, np.where(any_visible, PARTIAL, EMPTY))
        np.testing.assert_array_equal(kind, exact)
    _check_lists(kind, np.asarray(bm.kv_index), np.asarray(bm.kv_kind), np.asarray(bm.kv_count))
    _check_lists(np.swapaxes(kind, 1, 2), np.asarray(bm.q_index), np.asarray(bm.q_kind), bm.q_count)


@_settings(10)
@given(problems())
def test_forward_matches_reference(problem) -> None:
    case, bq, bk = problem
    q, k, v = case.qkv()
    kernel = functools.partial(pallas_attention, block_q=bq, block_kv=bk)
    out = case.jit(kernel)(q, k, v)
    assert out.dtype == q.dtype and out.shape == q.shape
    expected = case.jit(attention_reference)(q, k, v)
    tol = 2e-5 if case.dtype == "float32" else 2e-2
    out = np.asarray(out, np.float32)
    np.testing.assert_allclose(out, np.asarray(expected, np.float32), atol=tol, rtol=tol)
    empty_rows = ~naive_mask(case).any(axis=-1)
    assert np.all(out[empty_rows] == 0.0), "rows that see nothing must be exactly 0"


@_settings(6)
@given(problems(dtypes=("float32",)))
def test_gradients_match_reference(problem) -> None:
    case, bq, bk = problem
    q, k, v = case.qkv()
    cotangent = jnp.asarray(np.random.default_rng(case.seed + 1).normal(size=q.shape), q.dtype)

    def grads(q, k, v, **kwargs):
        def of(fn):
            loss = lambda q, k, v: jnp.sum(fn(q, k, v, **kwargs) * cotangent)  # noqa: E731
            return jax.grad(loss, (0, 1, 2))(q, k, v)

        kernel = functools.partial(pallas_attention, block_q=bq, block_kv=bk)
        return of(kernel), of(attention_reference)

    ours, expected = case.jit(grads)(q, k, v)
    for name, grad, want in zip("qkv", ours, expected, strict=True):
        assert np.all(np.isfinite(grad)), f"non-finite d{name}"
        np.testing.assert_allclose(grad, want, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


@_settings(4)
@given(problems(dtypes=("float32",)), st.booleans())
def test_kernel_executes_exactly_the_non_empty_blocks(problem, traced: bool) -> None:
    """The in-kernel visit counter equals the non-empty count of the metadata.

    Concrete metadata sizes the grid to the largest count; traced metadata runs nk slots
    per q block, so this also checks that slots past a q block's count are skipped.
    """
    case, bq, bk = problem
    q, k, v = case.qkv()
    kernel = functools.partial(executed_kv_blocks, block_q=bq, block_kv=bk)
    visits, bm = case.jit(kernel)(q, k, v) if traced else kernel(q, k, v, **case.kwargs())
    expected_bm, dense = _case_block_map(case, bq, bk)
    counts = np.asarray(expected_bm.kv_count)  # [B, nq]
    np.testing.assert_array_equal(np.asarray(bm.kv_count), counts)
    np.testing.assert_array_equal(
        np.asarray(visits), np.broadcast_to(counts[:, None], visits.shape)
    )
    # Never fewer than the blocks that hold a visible pair.
    assert np.all(counts >= dense.any(axis=(2, 4)).sum(-1))


def test_block_skipping_on_a_packed_causal_sequence() -> None:
    """Two packed causal samples of 32 tokens, blocks of 8: 2 x (1+2+3+4) of 64 blocks run."""
    q = k = v = jnp.ones((1, 64, 2, 8), jnp.float32)
    segment_ids = jnp.asarray(np.repeat([1, 2], 32)[None], jnp.int32)
    visits, bm = executed_kv_blocks(
        q, k, v, segment_ids=segment_ids, causal=True, block_q=8, block_kv=8
    )
    np.testing.assert_array_equal(visits[0, 0], [1, 2, 3, 4, 1, 2, 3, 4])
    assert int(jnp.sum(bm.kind == FULL)) == 2 * (0 + 1 + 2 + 3)  # below-diagonal blocks
    assert int(jnp.sum(visits[0, 0])) == 20


def test_tpu_interpret_mode_matches_reference() -> None:
    """Mosaic-style 128-token blocks, scalar prefetch and VMEM scratch in TPU interpret mode."""
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 256, 2, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, 256, 1, 64)), jnp.float32) for _ in range(2))
    kw = dict(
        segment_ids=jnp.asarray(np.repeat([1, 2], [100, 156])[None], jnp.int32),
        span_ids=jnp.asarray(np.repeat([0, 1, 0, 2, 0], [30, 40, 60, 50, 76])[None], jnp.int32),
        causal=True,
    )
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, **kw) ** 2)  # noqa: E731
    kernel = functools.partial(
        pallas_attention, block_q=128, block_kv=128, interpret=pltpu.InterpretParams()
    )
    ours = jax.jit(jax.value_and_grad(loss(kernel), (0, 1, 2)))(q, k, v)
    want = jax.value_and_grad(loss(attention_reference), (0, 1, 2))(q, k, v)
    np.testing.assert_allclose(ours[0], want[0], rtol=1e-5)
    for grad, expected in zip(ours[1], want[1], strict=True):
        np.testing.assert_allclose(grad, expected, atol=1e-4, rtol=1e-4)


def test_attention_entry_point_dispatches_to_pallas() -> None:
    q, k, v = Case(1, 9, 9, 2, 1, 8, "float32", True, None, 0, None, None, None, None, 3).qkv()
    out = attention(q, k, v, causal=True, impl="pallas")
    np.testing.assert_allclose(out, attention(q, k, v, causal=True, impl="xla"), atol=2e-5)
    # On CPU "auto" is the reference (the faster one here); the results agree either way.
    np.testing.assert_allclose(attention(q, k, v, causal=True), out, atol=2e-5)


def _loss_of(module: nn.Module, inputs: jnp.ndarray, **call_kwargs) -> tuple[float, float]:
    """Loss of a module with both impls from the same params."""
    params = module.clone(attention_impl="xla").init(jax.random.key(0), inputs, **call_kwargs)

    def loss(impl: str) -> float:
        @jax.jit
        def run(params, inputs, call_kwargs):
            pooled, tokens = module.clone(attention_impl=impl).apply(params, inputs, **call_kwargs)
            return jnp.mean(pooled**2) + jnp.mean(jnp.sin(tokens))

        return float(run(params, inputs, call_kwargs))

    return loss("pallas"), loss("xla")


def test_vit_loss_is_identical_with_pallas_and_xla() -> None:
    vit = VisionTransformer(
        patch_size=4, width=32, depth=1, num_heads=4, mlp_dim=64, dtype=jnp.float32
    )
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    pallas, xla = _loss_of(vit, images)
    np.testing.assert_allclose(pallas, xla, rtol=1e-5, atol=1e-5)


def test_causal_text_tower_loss_is_identical_with_pallas_and_xla() -> None:
    text = TextTransformer(
        vocab_size=50, max_len=24, width=32, depth=1, num_heads=4, mlp_dim=64, dtype=jnp.float32
    )
    tokens = jax.random.randint(jax.random.key(2), (2, 24), 1, 50)
    tokens = tokens.at[1, 15:].set(0)  # padding: segment id 0
    pallas, xla = _loss_of(text, tokens)
    np.testing.assert_allclose(pallas, xla, rtol=1e-5, atol=1e-5)


class _TransfusionLayer(nn.Module):
    """One Transfusion-style attention layer: packed samples, causal text, image spans."""

    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, x, segment_ids, span_ids):
        attn = MultiHeadAttention(
            4, num_kv_heads=2, impl=self.attention_impl, dtype=jnp.float32, name="attn"
        )
        y = attn(x, segment_ids=segment_ids, span_ids=span_ids, causal=True)
        return y[:, 0], y


def test_transfusion_style_layer_loss_and_grads_match() -> None:
    # Two packed samples: text, an image span, text | text, an image span; then padding.
    segment_ids = jnp.asarray(np.repeat([1, 2, 0], [20, 16, 4])[None], jnp.int32)
    span_ids = jnp.asarray(np.repeat([0, 1, 0, 0, 2, 0], [5, 10, 5, 4, 12, 4])[None], jnp.int32)
    x = jax.random.normal(jax.random.key(3), (1, 40, 32))
    layer = _TransfusionLayer()
    pallas, xla = _loss_of(layer, x, segment_ids=segment_ids, span_ids=span_ids)
    np.testing.assert_allclose(pallas, xla, rtol=1e-5, atol=1e-5)

    params = layer.init(jax.random.key(0), x, segment_ids, span_ids)

    def grads(impl: str):
        def loss(params):
            _, y = layer.clone(attention_impl=impl).apply(params, x, segment_ids, span_ids)
            return jnp.sum(jnp.sin(y))

        return jax.jit(jax.grad(loss))(params)

    for ours, want in zip(
        jax.tree.leaves(grads("pallas")), jax.tree.leaves(grads("xla")), strict=True
    ):
        np.testing.assert_allclose(ours, want, atol=1e-4, rtol=1e-4)
