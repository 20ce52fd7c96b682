"""Scanned transformer stacks: the same function, gradients and decoding as the unrolled stack,
stacked parameters under the "layers" logical axis, named remat policies, clear errors."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict
from helpers import REPO

from mmjax.models.causal_lm import CausalLM
from mmjax.models.vit import VisionTransformer
from mmjax.nn import Transformer, llama_decoder
from mmjax.parallel import DEFAULT_RULES
from mmjax.train.config_cli import load_config

F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="xla")  # fast compiles
DEPTH = 3


def stack_blocks(params: dict) -> dict:
    """An unrolled stack's `block{i}` parameters in the scanned layout: the blocks but the
    last stacked along a new leading axis as `layers`, and the last block as `last` (absent
    when the stack was built without its last block)."""
    blocks = [params[f"block{i}"] for i in range(len(params))]
    stacked = {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks[: DEPTH - 1])}
    return stacked | ({"last": blocks[DEPTH - 1]} if len(blocks) == DEPTH else {})


def packed_rows() -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """x [2, 12, 32], two packed segments per row (a padded tail in row 1) and RoPE
    positions that restart in each segment."""
    segment_ids = jnp.asarray([[1] * 5 + [2] * 7, [1] * 8 + [2] * 2 + [0] * 2], jnp.int32)
    starts = jnp.asarray([[0] * 5 + [5] * 7, [0] * 8 + [8] * 4])
    positions = jnp.arange(12)[None] - starts
    x = jax.random.normal(jax.random.key(1), (2, 12, 32))
    return x, segment_ids, positions


def decoder(**kw) -> Transformer:
    return llama_decoder(DEPTH, 4, 64, norm_eps=1e-5, rope_theta=10_000.0, **F32, **kw)


def test_a_scanned_causal_lm_stack_equals_the_unrolled_one():
    x, segment_ids, positions = packed_rows()
    params = nn.unbox(decoder().init(jax.random.key(0), x, segment_ids, None, positions))
    unrolled = decoder().apply(params, x, segment_ids, None, positions)
    scanned = decoder(scan_layers=True).apply(
        {"params": stack_blocks(params["params"])}, x, segment_ids, None, positions
    )
    np.testing.assert_allclose(scanned, unrolled, atol=1e-5)


def test_a_scanned_vit_stack_reads_out_as_the_unrolled_one():
    """`read_at` (the last block computes one token) and the ViT's penultimate features (the
    scanned stack without its last block) give the unrolled stack's values."""
    vit = dict(patch_size=4, width=32, depth=DEPTH, num_heads=4, mlp_dim=64, **F32)
    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    params = nn.unbox(VisionTransformer(**vit).init(jax.random.key(0), images))["params"]
    scanned = {**params, "encoder": stack_blocks(params["encoder"])}
    pooled = VisionTransformer(**vit).apply({"params": params}, images, pooled_only=True)[0]
    got = VisionTransformer(**vit, scan_layers=True).apply(
        {"params": scanned}, images, pooled_only=True
    )
    np.testing.assert_allclose(got[0], pooled, atol=1e-5)

    encoder = {f"block{i}": params["encoder"][f"block{i}"] for i in range(DEPTH - 1)}
    penultimate = {**params, "encoder": stack_blocks(encoder)}
    want = VisionTransformer(**vit).apply({"params": params}, images, feature_layer=-2)[1]
    scan_vit = VisionTransformer(**vit, scan_layers=True)
    built = nn.unbox(scan_vit.init(jax.random.key(0), images, feature_layer=-2))["params"]
    assert set(built["encoder"]) == {"layers"}  # the last block is neither run nor created
    got = scan_vit.apply({"params": penultimate}, images, feature_layer=-2)[1]
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="runs all its blocks or all but the last"):
        scan_vit.apply({"params": scanned}, images, feature_layer=1)


def test_remat_policies_give_the_gradients_of_no_remat():
    x, segment_ids, positions = packed_rows()
    params = decoder(scan_layers=True).init(jax.random.key(0), x, segment_ids, None, positions)

    def grads(**kw):
        loss = lambda p: jnp.sum(  # noqa: E731
            decoder(scan_layers=True, **kw).apply(p, x, segment_ids, None, positions) ** 2
        )
        return jax.jit(jax.grad(loss))(params)

    want = grads()
    for policy in ("minimal", "dots", "full"):
        got = grads(remat_policy=policy)
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5), got, want)


# Gemma-2's block, small: alternating 3-token windows inside the scan (lax.cond per layer)
GEMMA2_SMALL = dict(
    head_dim=16,
    activation="gelu_tanh",
    post_norms=True,
    attention_scale=12**-0.5,
    attn_logit_softcap=2.0,
    final_logit_softcap=3.0,
    sliding_window=3,
    global_every=2,
    embed_scale=True,
    tie_embeddings=True,
)


@pytest.mark.parametrize(
    "num_kv_heads, features", [(None, {}), (1, {}), (2, GEMMA2_SMALL)], ids=["mha", "gqa", "gemma2"]
)
def test_scanned_kv_cache_decoding_equals_the_full_forward_pass(num_kv_heads, features):
    """A prompt prefilled into the scanned stack's cache, then one token at a time; with
    grouped-query attention the cache holds the kv heads only."""
    lm = dict(
        vocab_size=40,
        width=32,
        depth=DEPTH,
        num_heads=4,
        mlp_dim=64,
        scan_layers=True,
        **features,
        **F32,
    )
    model = CausalLM(**lm, num_kv_heads=num_kv_heads)
    cached = CausalLM(**lm, num_kv_heads=num_kv_heads, decode=True)
    tokens = jax.random.randint(jax.random.key(1), (2, 10), 1, 40)
    segment_ids, positions = jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(10), (2, 10))
    params = model.init(jax.random.key(0), tokens, segment_ids, positions)["params"]
    full = model.apply({"params": params}, tokens, segment_ids, positions)
    cache = cached.init(jax.random.key(0), tokens, segment_ids, positions)["cache"]
    keys = [x for x in jax.tree.leaves(cache) if x.ndim == 5]  # [layers, B, L, kv heads, d]
    assert keys and all(x.shape[-2] == (num_kv_heads or 4) for x in keys)
    if features:  # the window is in the computation: without it the logits differ
        windowless = CausalLM(**{**lm, "sliding_window": None}, num_kv_heads=num_kv_heads)
        other = windowless.apply({"params": params}, tokens, segment_ids, positions)
        assert np.abs(other - full).max() > 1e-3
    apply = jax.jit(functools.partial(cached.apply, mutable=["cache"]))
    for start, stop in [(0, 4), *((i, i + 1) for i in range(4, 10))]:
        chunk = (tokens[:, start:stop], segment_ids[:, start:stop], positions[:, start:stop])
        logits, state = apply({"params": params, "cache": cache}, *chunk, jnp.full((2,), start))
        cache = state["cache"]
        np.testing.assert_allclose(logits, full[:, start:stop], atol=1e-4)


def test_scanned_parameters_carry_the_layers_axis_first():
    x, segment_ids, positions = packed_rows()
    boxed = jax.eval_shape(
        decoder(scan_layers=True).init, jax.random.key(0), x, segment_ids, None, positions
    )
    specs = nn.get_partition_spec(boxed)["params"]
    assert set(specs) == {"layers", "last"}
    is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)  # noqa: E731
    stacked = jax.tree.leaves(specs["layers"], is_leaf=is_spec)
    assert stacked and all(s[0] == "layers" and "layers" not in s[1:] for s in stacked)
    assert all("layers" not in s for s in jax.tree.leaves(specs["last"], is_leaf=is_spec))
    shapes = nn.unbox(boxed)["params"]
    assert shapes["layers"]["attn"]["query"]["kernel"].shape == (DEPTH - 1, 32, 4, 8)
    # replicated by the default rules: FSDP shards the other dimensions
    kernel = specs["layers"]["attn"]["query"]["kernel"]
    assert nn.logical_to_mesh_axes(kernel, DEFAULT_RULES)[0] is None
    unrolled = jax.eval_shape(decoder().init, jax.random.key(0), x, segment_ids, None, positions)
    assert set(unrolled["params"]) == {f"block{i}" for i in range(DEPTH)}


def test_an_unknown_policy_or_a_partial_scanned_stack_is_a_clear_error():
    x, segment_ids, positions = packed_rows()
    with pytest.raises(ValueError, match=r"unknown remat_policy 'dot'; valid: \['dots', "):
        decoder(remat_policy="dot").init(jax.random.key(0), x, segment_ids, None, positions)
    with pytest.raises(ValueError, match="runs all its blocks or all but the last, not 1"):
        decoder(scan_layers=True).init(
            jax.random.key(0), x, segment_ids, None, positions, num_blocks=1
        )


def test_a_hook_before_each_block_sees_the_block_index_scanned_or_not():
    """`before_block(i, x)` runs before every block: with a traced i inside the scan, a Python
    int for the last block; the stacks agree."""
    x, segment_ids, positions = packed_rows()
    params = nn.unbox(decoder().init(jax.random.key(0), x, segment_ids, None, positions))

    def hook(i, y):
        return y + 0.01 * (i + 1)

    want = decoder().apply(params, x, segment_ids, None, positions, before_block=hook)
    got = decoder(scan_layers=True).apply(
        {"params": stack_blocks(params["params"])},
        x,
        segment_ids,
        None,
        positions,
        before_block=hook,
    )
    np.testing.assert_allclose(got, want, atol=1e-5)
    plain = decoder().apply(params, x, segment_ids, None, positions)
    assert not np.allclose(plain, want, atol=1e-3)  # the hook changed the result


def test_a_tiny_scanned_transfusion_trains(tmp_path):
    from mmjax.train.loop import Trainer

    c = load_config(f"{REPO}/experiments/transfusion.py:tiny")
    c.model.update(depth=DEPTH, width=32, mlp_dim=64, attention_impl="xla")
    c.model.update(scan_layers=True, remat_policy="dots")
    c.update(batch_size=16, total_steps=10)
    c.optimizer.update(warmup_steps=2, lr=3e-3)
    trainer = Trainer(c, str(tmp_path))
    batch = next(trainer.data_iterator())
    state, shardings = trainer.init_state(batch)
    assert "layers" in state.params["decoder"]
    step = trainer.jit_train_step(shardings)
    fixed = {k: jnp.asarray(v) for k, v in batch.items()}  # one batch, so the loss must fall
    losses = []
    for _ in range(10):
        state, metrics = step(state, fixed)
        losses.append(float(metrics["lm_loss"]))
    assert losses[-1] < 0.85 * losses[0], losses


def _same_loss_and_gradients(loss_of, unscanned: dict, scanned_shapes: dict) -> None:
    """`loss_of(scanned: bool)(params)` for the unscanned params and for them converted to the
    scanned layout: equal losses, and equal gradients once converted the same way (f32)."""
    from mmjax.parallel.layout import to_layout

    def convert(tree: dict) -> dict:
        target = flatten_dict(scanned_shapes, sep="/")
        return unflatten_dict(to_layout(flatten_dict(tree, sep="/"), target), sep="/")

    want, want_grads = jax.jit(jax.value_and_grad(loss_of(False)))(unscanned)
    got, got_grads = jax.jit(jax.value_and_grad(loss_of(True)))(convert(unscanned))
    np.testing.assert_allclose(got, want, rtol=1e-5)

    def close(path, got: jax.Array, want: jax.Array) -> None:
        # f32 sums in another order: to 1e-5, relative to a gradient's largest entry above 1
        error = float(jnp.max(jnp.abs(got - want)))
        scale = max(1.0, float(jnp.max(jnp.abs(want))))
        assert error <= 1e-5 * scale, (jax.tree_util.keystr(path), error, scale)

    jax.tree_util.tree_map_with_path(close, got_grads, convert(want_grads))


def test_vit_and_llama_decoder_losses_and_gradients_equal_scanned_and_unscanned():
    vit = dict(patch_size=4, width=32, depth=DEPTH, num_heads=4, mlp_dim=64, **F32)
    images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))

    tokens_out = jax.random.normal(jax.random.key(4), (2, 5, 32))  # CLS + 4 patches

    def vit_loss(scan: bool):  # every token's output, not just the normalised CLS
        model = VisionTransformer(**vit, scan_layers=scan)
        return lambda p: jnp.sum(model.apply({"params": p}, images)[1] * tokens_out)

    params = nn.unbox(VisionTransformer(**vit).init(jax.random.key(0), images))["params"]
    shapes = jax.eval_shape(
        VisionTransformer(**vit, scan_layers=True).init, jax.random.key(0), images
    )
    _same_loss_and_gradients(vit_loss, params, nn.unbox(shapes)["params"])

    lm = dict(vocab_size=40, width=32, depth=DEPTH, num_heads=4, mlp_dim=64, **F32)
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, 40)
    segment_ids, positions = jnp.ones_like(tokens), jnp.broadcast_to(jnp.arange(12), (2, 12))

    def lm_loss(scan: bool):
        model = CausalLM(**lm, scan_layers=scan)
        return lambda p: jnp.mean(
            jax.nn.log_softmax(model.apply({"params": p}, tokens, segment_ids, positions))[..., 0]
        )

    init = CausalLM(**lm).init
    params = nn.unbox(init(jax.random.key(0), tokens, segment_ids, positions))["params"]
    shapes = jax.eval_shape(
        CausalLM(**lm, scan_layers=True).init, jax.random.key(0), tokens, segment_ids, positions
    )
    _same_loss_and_gradients(lm_loss, params, nn.unbox(shapes)["params"])


@pytest.mark.slow
def test_transfusion_loss_and_gradients_equal_scanned_and_unscanned(tmp_path):
    """The whole Transfusion objective (LM + diffusion terms, the same noise) through the
    trainer, f32: scanned and unscanned agree to 1e-5."""
    from mmjax.train.loop import Trainer

    def trainer(scan: bool) -> Trainer:
        c = load_config(f"{REPO}/experiments/transfusion.py:tiny")
        c.model.update(depth=DEPTH, width=32, mlp_dim=64, attention_impl="xla")
        c.model.update(scan_layers=scan)
        c.update(batch_size=8)
        return Trainer(c, str(tmp_path))

    plain, scanned = trainer(False), trainer(True)
    batch = {k: jnp.asarray(v) for k, v in next(plain.data_iterator()).items()}
    params = nn.unbox(jax.jit(plain.bundle.init_params, static_argnums=0)(0, batch))
    shapes = nn.unbox(scanned.bundle.boxed_params(batch))
    rng = jax.random.key(3)

    def loss_of(scan: bool):
        loss_fn = (scanned if scan else plain).loss_fn
        return lambda p: loss_fn(p, batch, rng)[0]

    _same_loss_and_gradients(loss_of, params, shapes)
