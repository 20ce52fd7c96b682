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
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_attention_reference import FAST_COMPILE, Case, naive_mask

from mmjax.kernels import MaskSpec, attention
from mmjax.kernels.block_mask import EMPTY, FULL, PARTIAL
from mmjax.kernels.pallas_attention import VARIANTS, Tiling, executed_kv_blocks, pallas_attention
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
    q_len = draw(st.integers(1, 32))
    kv_len = q_len if draw(st.booleans()) else draw(st.integers(1, 32))
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


def _padded_dense_mask(case: Case, bq: int, bk: int) -> np.ndarray:
    """The naive mask padded with False to whole kernel blocks, [B, nq, bq, nk, bk].

    Blocks are clipped as the kernel clips them on CPU: never longer than the length
    rounded up to 8.
    """
    bq, bk = min(bq, _pad_to(case.q_len, 8)), min(bk, _pad_to(case.kv_len, 8))
    q_pad, kv_pad = _pad_to(case.q_len, bq), _pad_to(case.kv_len, bk)
    dense = np.zeros((case.batch, q_pad, kv_pad), bool)
    dense[:, : case.q_len, : case.kv_len] = naive_mask(case)
    return dense.reshape(case.batch, q_pad // bq, bq, kv_pad // bk, bk)


def _check_lists(kind: np.ndarray, index: np.ndarray, full: np.ndarray, count: np.ndarray):
    """Each row's list holds its FULL blocks in order, then its PARTIAL ones in order, then
    repeats the last one; `full` counts the FULL ones."""
    for row_kind, row_index, n_full, n in zip(
        kind.reshape(-1, kind.shape[-1]),
        index.reshape(-1, kind.shape[-1]),
        full.reshape(-1),
        count.reshape(-1),
        strict=True,
    ):
        listed = np.concatenate(
            [np.flatnonzero(row_kind == FULL), np.flatnonzero(row_kind == PARTIAL)]
        )
        assert n == len(listed) and n_full == np.sum(row_kind == FULL)
        np.testing.assert_array_equal(row_index[:n], listed)
        assert np.all(row_index[n:] == (listed[-1] if n else 0))


@_settings(8)
@given(problems(dtypes=("float32",)), st.sampled_from(sorted(VARIANTS)), st.booleans())
def test_block_map_is_sound_and_the_kernel_executes_exactly_its_non_empty_blocks(
    problem, variant: str, traced: bool
) -> None:
    """The block map never skips a visible pair nor masks-free a masked one, its lists
    hold exactly the non-empty blocks, and the in-kernel visit counter equals their count.

    Concrete metadata sizes the grid variant's slot axis to the largest count at trace
    time; traced metadata makes it a dynamic bound and each q block still runs only its own
    count (slots past it are skipped) -- the loop variant's trip count is read at run time.
    """
    case, bq, bk = problem
    q, k, v = case.qkv()
    kernel = functools.partial(executed_kv_blocks, block_q=bq, block_kv=bk, variant=variant)
    if traced:
        visits, bm = case.jit(kernel, spec=True)(q, k, v)
    else:
        jitted = jax.jit(
            lambda q, k, v: kernel(q, k, v, case.mask()), compiler_options=FAST_COMPILE
        )
        visits, bm = jitted(q, k, v)
    dense = _padded_dense_mask(case, bq, bk)
    kind = np.asarray(bm.kind)
    any_visible, all_visible = dense.any(axis=(2, 4)), dense.all(axis=(2, 4))
    assert not np.any(any_visible[kind == EMPTY]), "a block with visible pairs was skipped"
    assert np.all(all_visible[kind == FULL]), "a block with masked pairs skipped its mask"
    if case.segment_ids is None and case.kv_segment_ids is None and case.span_ids is None:
        # Causal / window / padding only: the classification is exact.
        exact = np.where(all_visible, FULL, np.where(any_visible, PARTIAL, EMPTY))
        np.testing.assert_array_equal(kind, exact)
    _check_lists(kind, np.asarray(bm.kv_index), np.asarray(bm.kv_full), np.asarray(bm.kv_count))
    _check_lists(np.swapaxes(kind, 1, 2), np.asarray(bm.q_index), np.asarray(bm.q_full), bm.q_count)
    counts = np.asarray(bm.kv_count)  # [B, nq]
    np.testing.assert_array_equal(
        np.asarray(visits), np.broadcast_to(counts[:, None], visits.shape)
    )


@functools.partial(
    jax.jit, static_argnames=("static", "options", "with_grads"), compiler_options=FAST_COMPILE
)
def _kernel_and_reference(q, k, v, cotangent, dynamic, *, static, options, with_grads):
    """(pallas, reference) outputs, and their q/k/v gradients for `cotangent` if asked.

    One compile per example covers the forward and backward of both.
    """
    mask = MaskSpec(**dict(static), **dynamic)
    reference = functools.partial(
        attention_reference, logits_soft_cap=dict(options).get("logits_soft_cap")
    )

    def run(fn):
        if not with_grads:
            return fn(q, k, v, mask), ()
        out, pullback = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
        return out, pullback(cotangent)

    return run(functools.partial(pallas_attention, **dict(options))), run(reference)


@_settings(8)
@given(problems(), st.sampled_from(sorted(VARIANTS)))
def test_outputs_and_gradients_match_reference(problem, variant: str) -> None:
    """Outputs within 2e-5 (f32) / 2e-2 (bf16), q/k/v gradients within 1e-4 (f32)."""
    _check_against_reference(problem, variant)


@_settings(8)
@given(problems(), st.sampled_from(sorted(VARIANTS)), st.floats(0.05, 20.0))
def test_soft_capped_outputs_and_gradients_match_reference(
    problem, variant: str, soft_cap: float
) -> None:
    """With a logit soft cap (forward capped, backward through 1 - tanh^2), the same
    tolerances as without."""
    _check_against_reference(problem, variant, (("logits_soft_cap", soft_cap),))


def _check_against_reference(problem, variant: str, extra_options: tuple = ()) -> None:
    case, bq, bk = problem
    q, k, v = case.qkv()
    f32 = case.dtype == "float32"
    cotangent = jnp.asarray(np.random.default_rng(case.seed + 1).normal(size=q.shape), q.dtype)
    kwargs = case.kwargs()
    static = {name: kwargs.pop(name) for name in ("causal", "window")}
    if isinstance(kwargs["q_offset"], int):
        static["q_offset"] = kwargs.pop("q_offset")
    (out, grads), (expected, expected_grads) = _kernel_and_reference(
        q, k, v, cotangent, kwargs,
        static=tuple(static.items()),
        options=(("block_q", bq), ("block_kv", bk), ("variant", variant), *extra_options),
        with_grads=f32,
    )  # fmt: skip
    assert out.dtype == q.dtype and out.shape == q.shape
    tol = 2e-5 if f32 else 2e-2
    out = np.asarray(out, np.float32)
    np.testing.assert_allclose(out, np.asarray(expected, np.float32), atol=tol, rtol=tol)
    empty_rows = ~naive_mask(case).any(axis=-1)
    assert np.all(out[empty_rows] == 0.0), "rows that see nothing must be exactly 0"
    for name, grad, want in zip("qkv"[: len(grads)], grads, expected_grads, strict=True):
        assert np.all(np.isfinite(grad)), f"non-finite d{name}"
        np.testing.assert_allclose(grad, want, atol=1e-4, rtol=1e-4, err_msg=f"d{name}")


def test_block_skipping_on_a_packed_causal_sequence() -> None:
    """Two packed causal samples of 32 tokens, blocks of 8: 2 x (1+2+3+4) of 64 blocks run."""
    q = k = v = jnp.ones((1, 64, 2, 8), jnp.float32)
    segment_ids = jnp.asarray(np.repeat([1, 2], 32)[None], jnp.int32)
    mask = MaskSpec(segment_ids=segment_ids, causal=True)
    visits, bm = executed_kv_blocks(q, k, v, mask, block_q=8, block_kv=8)
    np.testing.assert_array_equal(visits[0, 0], [1, 2, 3, 4, 1, 2, 3, 4])
    assert int(jnp.sum(bm.kind == FULL)) == 2 * (0 + 1 + 2 + 3)  # below-diagonal blocks
    assert int(jnp.sum(visits[0, 0])) == 20


@pytest.mark.parametrize("soft_cap", [None, 0.5])
def test_tpu_interpret_mode_matches_reference(soft_cap: float | None) -> None:
    """Mosaic-style 128-token blocks, scalar prefetch, VMEM scratch and, with the ids traced,
    a dynamic grid bound (the slot axis is the traced largest count) in TPU interpret mode;
    uncapped and with a logit soft cap that bites (the logits are ~ N(0, 1))."""
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 256, 2, 64)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, 256, 1, 64)), jnp.float32) for _ in range(2))
    segment_ids = jnp.asarray(np.repeat([1, 2], [100, 156])[None], jnp.int32)
    span_ids = jnp.asarray(np.repeat([0, 1, 0, 2, 0], [30, 40, 60, 50, 76])[None], jnp.int32)
    kernel = functools.partial(
        pallas_attention,
        block_q=128,
        block_kv=128,
        variant="grid",
        interpret=pltpu.InterpretParams(),
        logits_soft_cap=soft_cap,
    )
    reference = functools.partial(attention_reference, logits_soft_cap=soft_cap)

    def loss(fn, q, k, v, segment_ids, span_ids):
        mask = MaskSpec(segment_ids=segment_ids, span_ids=span_ids, causal=True)
        return jnp.sum(fn(q, k, v, mask) ** 2)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def both(*args):
        of = lambda fn: jax.value_and_grad(functools.partial(loss, fn), (0, 1, 2))  # noqa: E731
        return of(kernel)(*args), of(reference)(*args)

    ours, want = both(q, k, v, segment_ids, span_ids)
    np.testing.assert_allclose(ours[0], want[0], rtol=1e-5)
    for grad, expected in zip(ours[1], want[1], strict=True):
        np.testing.assert_allclose(grad, expected, atol=1e-4, rtol=1e-4)


def test_attention_entry_point_dispatches_to_pallas() -> None:
    q, k, v = Case(1, 9, 9, 2, 1, 8, "float32", True, None, 0, None, None, None, None, 3).qkv()

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def each_impl(q, k, v):
        return [attention(q, k, v, causal=True, impl=impl) for impl in ("pallas", "xla", "auto")]

    out, xla, auto = each_impl(q, k, v)
    np.testing.assert_allclose(out, xla, atol=2e-5)
    # "auto" picks one of the two per backend and size; the results agree either way.
    np.testing.assert_allclose(auto, out, atol=2e-5)


def test_soft_capped_entry_point_agrees_across_impls_and_meshes() -> None:
    """`attention(..., logits_soft_cap=c)`: "pallas", "auto" (on CPU the reference's own
    forward / backward below `CPU_PALLAS_MIN_PAIRS` pairs) and, on a data x tensor mesh of 8
    CPU devices, the per-shard kernels give the XLA reference's outputs and gradients."""
    rng = np.random.default_rng(4)
    q = jnp.asarray(2 * rng.normal(size=(4, 24, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(4, 24, 2, 8)), jnp.float32) for _ in range(2))
    segment_ids = jnp.asarray(np.repeat([[1, 2, 0]], 8, axis=1).repeat(4, 0), jnp.int32)
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def value_and_grads(impl: str, partition=None):
        def loss(q, k, v):
            out = attention(
                q, k, v, segment_ids=segment_ids, causal=True, window=12, impl=impl,
                logits_soft_cap=1.0, partition=partition,
            )  # fmt: skip
            return jnp.sum(out * jnp.sin(out))

        return jax.value_and_grad(loss, (0, 1, 2))(q, k, v)

    run = functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    want = run(lambda: value_and_grads("xla"))()
    results = run(lambda: [value_and_grads(impl) for impl in ("pallas", "auto")])()
    with jax.set_mesh(mesh):
        results.append(run(lambda: value_and_grads("pallas", ("data", None, "tensor", None)))())
    for got in results:
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
        for grad, expected in zip(got[1], want[1], strict=True):
            np.testing.assert_allclose(grad, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="logits_soft_cap"):
        pallas_attention(q, k, v, logits_soft_cap=-2.0)


def test_soft_capped_kernels_compile_for_a_v5e_topology_and_lower_to_triton() -> None:
    """With a cap, the forward, dq and dk/dv kernels compile as Mosaic calls for a v5e 2x2
    topology inside shard_map (cost estimates: one tanh per exp, so twice the uncapped
    transcendentals), and lower for CUDA as three branch-free Triton kernels that call tanh
    (bf16 and no mask: the call cuDNN would take uncapped, it cannot express the cap)."""
    from accelerators import no_persistent_cache, ops_named, tpu_mesh, triton_modules
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from mmjax.kernels.dispatch import cudnn_eligible

    def grads(q, k, v, **kw):
        out, pullback = jax.vjp(lambda q, k, v: attention(q, k, v, causal=True, **kw), q, k, v)
        return out, *pullback(out)

    mesh = tpu_mesh("v5e:2x2", (2, 2), ("data", "tensor"))
    partition = ("data", None, "tensor", None)
    sharding = NamedSharding(mesh, P(*partition))
    q = jax.ShapeDtypeStruct((4, 256, 4, 64), jnp.bfloat16, sharding=sharding)
    k = jax.ShapeDtypeStruct((4, 256, 2, 64), jnp.bfloat16, sharding=sharding)

    def transcendentals(**kw) -> float:
        run = functools.partial(grads, impl="pallas", partition=partition, **kw)
        with jax.set_mesh(mesh), no_persistent_cache():
            compiled = jax.jit(run).trace(q, k, k).lower().compile()
        assert compiled.as_text().count("tpu_custom_call") == 3
        return compiled.cost_analysis()["transcendentals"]

    assert transcendentals(logits_soft_cap=30.0) == 2 * transcendentals() > 0

    q, k = (jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k))
    assert not cudnn_eligible(q, k, MaskSpec(causal=True), logits_soft_cap=30.0)
    run = functools.partial(grads, impl="auto", logits_soft_cap=30.0)
    modules = triton_modules(jax.jit(run).trace(q, k, k).lower(lowering_platforms=("cuda",)))
    assert len(modules) == 3  # forward, dq, dk/dv
    for module in modules:
        calls = ops_named(module.operation, "tt.extern_elementwise")
        assert any("tanh" in str(op.attributes["symbol"]) for op in calls)
        for branch in ops_named(module.operation, "scf.if"):
            assert not ops_named(branch, "tt.dot"), "a dot inside a branch"


def _losses(module: nn.Module, inputs: jnp.ndarray, grads: bool = False, **call_kwargs):
    """{impl: loss (and its parameter gradients)} of `module` from the same parameters.

    One compile computes both impls; the loss reads the pooled output and every token.
    """

    def loss(params, impl: str):
        pooled, tokens = module.clone(attention_impl=impl).apply(params, inputs, **call_kwargs)
        return jnp.mean(pooled**2) + jnp.mean(jnp.sin(tokens))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(key):
        params = module.clone(attention_impl="xla").init(key, inputs, **call_kwargs)
        of = jax.value_and_grad(loss) if grads else loss
        return {impl: of(params, impl) for impl in ("pallas", "xla")}

    return run(jax.random.key(0))


def test_vit_loss_is_identical_with_pallas_and_xla() -> None:
    vit = VisionTransformer(
        patch_size=4, width=32, depth=1, num_heads=4, mlp_dim=64, dtype=jnp.float32
    )
    images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    losses = _losses(vit, images)
    np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-5, atol=1e-5)


def test_causal_text_tower_loss_is_identical_with_pallas_and_xla() -> None:
    text = TextTransformer(
        vocab_size=50, max_len=24, width=32, depth=1, num_heads=4, mlp_dim=64, dtype=jnp.float32
    )
    tokens = jax.random.randint(jax.random.key(2), (2, 24), 1, 50)
    tokens = tokens.at[1, 15:].set(0)  # padding: segment id 0
    losses = _losses(text, tokens)
    np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-5, atol=1e-5)


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
    losses = _losses(layer, x, grads=True, segment_ids=segment_ids, span_ids=span_ids)
    (pallas, ours), (xla, want) = losses["pallas"], losses["xla"]
    np.testing.assert_allclose(pallas, xla, rtol=1e-5, atol=1e-5)
    for grad, expected in zip(jax.tree.leaves(ours), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(grad, expected, atol=1e-4, rtol=1e-4)


def test_kv_head_groups_split_over_programs_sum_to_the_whole_group() -> None:
    """dk/dv with each kv head's 4 query heads shared by 2 programs (f32 partials added by
    the wrapper) equal the reference; the split grows only until the grid fills the GPU."""
    from mmjax.kernels.pallas_attention import GPU_MIN_PROGRAMS, Tile, kv_head_split

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 40, 8, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 40, 2, 16)), jnp.float32) for _ in range(2))
    tile = Tile(16, 16)
    tiling = Tiling(tile, tile, Tile(16, 16, kv_head_split=2))
    mask = MaskSpec(causal=True)

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask))), (0, 1, 2))(q, k, v)

    ours = grads(functools.partial(pallas_attention, variant="loop", tiling=tiling))
    for got, want in zip(ours, grads(attention_reference), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert kv_head_split(1, 2, 8, 2) == 8  # 32 programs at most: the whole group
    assert kv_head_split(4, 8, 4, -(-GPU_MIN_PROGRAMS // 32)) == 1  # 4 x 8 x nk fill it
    assert kv_head_split(1, 8, 4, -(-GPU_MIN_PROGRAMS // 16)) == 2
