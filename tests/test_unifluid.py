"""UniFluid: the diffusion head learns, the KV cache is exact, orders visit every token once,
training lowers both losses, sampling is reproducible, bad input gives clear errors."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmjax.data.kinds import sequence_example
from mmjax.data.sequences import SEQUENCE_DEFAULTS, unifluid_layout
from mmjax.data.tokenizer import ByteTokenizer, WithImageMarkers
from mmjax.errors import UserError
from mmjax.models.unifluid import UniFluid
from mmjax.nn.diffusion_head import DiffusionHead
from mmjax.objectives.diffusion import add_noise, cosine_schedule
from mmjax.objectives.unifluid import (
    generation_order,
    image_tokens,
    make_unifluid_loss,
    tokens_to_images,
    unifluid_inputs,
)
from mmjax.sampling.transfusion import TOKEN_KEYS, empty_cache, run_cached
from mmjax.sampling.unifluid import caption_images, generate_images, step_indices

TOK = WithImageMarkers(ByteTokenizer())
SIZE, CHANNELS, PATCH = 4, 1, 2  # 4x4 grey images: 4 visual tokens of 4 values
NUM_TOKENS, TOKEN_DIM = (SIZE // PATCH) ** 2, PATCH * PATCH * CHANNELS


def _seq(**overrides) -> ml_collections.ConfigDict:
    fields = dict(kind="unifluid", max_len=24, patch_size=PATCH, channels=CHANNELS)
    return ml_collections.ConfigDict({**SEQUENCE_DEFAULTS, **fields, **overrides})


def _model(**overrides) -> UniFluid:
    fields = dict(
        vocab_size=TOK.vocab_size,
        width=32,
        depth=2,
        num_heads=2,
        mlp_dim=64,
        image_shape=(SIZE, SIZE, CHANNELS),
        patch_size=PATCH,
        head_width=32,
        head_depth=2,
        vision_patch=PATCH,
        vision_width=16,
        vision_depth=1,
        vision_heads=2,
        vision_mlp_dim=32,
        dtype=jnp.float32,
    )
    return UniFluid(**{**fields, **overrides})


def _batch(seq: ml_collections.ConfigDict, n: int = 8, seed: int = 0) -> dict:
    """n rows of random images whose caption names their mean brightness."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        bright = rng.random() < 0.5
        image = rng.uniform(0.2 if bright else -1.0, 1.0 if bright else -0.2, (SIZE, SIZE, 1))
        caption = TOK.encode("light" if bright else "dark")
        rows.append(sequence_example(image, caption, TOK, seq, rng))
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


@functools.cache
def _params(tokens_per_step: int) -> dict:
    batch = _batch(_seq(tokens_per_step=tokens_per_step), n=2)
    return jax.jit(_model().init)(jax.random.key(0), batch)["params"]


def test_diffusion_head_loss_falls_on_a_fixed_condition():
    head = DiffusionHead(token_dim=4, width=32, depth=2, dtype=jnp.float32)
    z = jax.random.normal(jax.random.key(1), (2, 16))  # two fixed conditions
    x0 = jnp.array([[1.0, -1.0, 0.5, 0.0], [-0.5, 0.5, 1.0, -1.0]])
    params = head.init(jax.random.key(0), x0, jnp.zeros((2,)), z)["params"]
    tx = optax.adam(3e-3)
    schedule = cosine_schedule(1000)

    def loss_fn(params, rng):
        noised = add_noise(rng, jnp.tile(x0, (64, 1)), schedule=schedule)
        eps = head.apply({"params": params}, noised.x_t, noised.t, jnp.tile(z, (64, 1)))
        return jnp.mean(jnp.square(eps - noised.target))

    @jax.jit
    def step(params, opt_state, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, rng)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    fixed = jax.random.key(99)
    before = float(loss_fn(params, fixed))
    opt_state = tx.init(params)
    for i in range(150):
        params, opt_state, _ = step(params, opt_state, jax.random.key(i))
    after = float(loss_fn(params, fixed))
    assert after < 0.5 * before, (before, after)


@pytest.mark.slow  # CI runs it
@pytest.mark.parametrize("tokens_per_step", [1, 2])
def test_decoding_with_a_kv_cache_equals_the_full_forward_pass(tokens_per_step):
    """Prefill the prompt, then feed the m slots of each step as the sampler does: the head's
    conditions z and the text logits match one full pass over the sequence (random order)."""
    m = tokens_per_step
    seq = _seq(tokens_per_step=m)
    model, params = _model(), _params(m)
    row = unifluid_layout(TOK.encode("ab"), TOK, NUM_TOKENS, seq, generate=True)
    batch = {k: jnp.asarray(row[k])[None] for k in TOKEN_KEYS}
    values = jax.random.normal(jax.random.key(3), (1, NUM_TOKENS, TOKEN_DIM))
    order = generation_order(jax.random.key(4), 1, NUM_TOKENS, "random")
    full = {
        **batch,
        "visual_tokens": values,
        "order": order,
        "image_positions": jnp.asarray(row["image_positions"]),
        "query_positions": jnp.asarray(row["query_positions"]),
    }
    want = jax.jit(model.apply)({"params": params}, full)

    decoder = model.clone(decode=True)
    run = jax.jit(functools.partial(run_cached, decoder))
    boi = int(row["query_positions"][0, 0])
    cache = empty_cache(decoder, {**batch, "cache_offset": 0})
    prompt = {k: v[:, :boi] for k, v in batch.items()}
    out, cache = run(params, cache, {**prompt, "cache_offset": 0})
    np.testing.assert_allclose(out["logits"], want["logits"][:, :boi], atol=1e-5)
    z = []
    for g in range(NUM_TOKENS // m):
        known, queried = step_indices(g, m)
        start = boi + g * m
        chunk = {k: v[:, start : start + m] for k, v in batch.items()}
        chunk.update(
            visual_tokens=values[:, known],
            order=order[:, known],
            image_positions=jnp.arange(m)[None] if g else jnp.full((1, m), m),
            query_positions=jnp.arange(m)[None],
            query_order=order[:, queried],
            cache_offset=jnp.full((1,), start),
        )
        out, cache = run(params, cache, chunk)
        z.append(out["z"])
    np.testing.assert_allclose(jnp.concatenate(z, axis=1), want["z"], atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(
    num_tokens=st.sampled_from([4, 16, 64, 256]),
    tokens_per_step=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_order_generation_visits_every_position_exactly_once(
    num_tokens, tokens_per_step, seed
):
    m = tokens_per_step
    order = np.asarray(generation_order(jax.random.key(seed), 1, num_tokens, "random"))[0]
    visits, fed = [], set()
    for g in range(num_tokens // m):
        known, queried = (np.asarray(i) for i in step_indices(g, m))
        if g:  # a step feeds exactly the tokens the previous step generated
            assert set(known) == set(visits[-1])
            fed |= set(order[known])
        visits.append(queried)
    written = order[np.concatenate(visits)]
    assert sorted(written) == list(range(num_tokens))  # each raster position exactly once
    assert fed == set(written) - set(order[num_tokens - m :])


def test_a_few_train_steps_lower_both_losses():
    seq = _seq(caption_first=0.5)
    model = _model()
    apply_fn = lambda p, b, rng: model.apply({"params": p}, b)  # noqa: E731
    loss_fn = make_unifluid_loss(apply_fn, order="random", diffusion_batch_mul=2)
    batches = [_batch(seq, n=16, seed=s) for s in range(4)]
    params = jax.jit(model.init)(jax.random.key(0), batches[0])["params"]
    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state, batch, rng):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, metrics

    evaluate = jax.jit(lambda p: loss_fn(p, batches[0], jax.random.key(7))[1])
    before = evaluate(params)
    opt_state = tx.init(params)
    for i in range(40):
        params, opt_state, _ = step(params, opt_state, batches[i % 4], jax.random.key(i))
    after = evaluate(params)
    assert after["lm_loss"] < 0.7 * before["lm_loss"], (before, after)
    assert after["diffusion_loss"] < 0.9 * before["diffusion_loss"], (before, after)


@pytest.mark.parametrize("order", ["raster", "random"])
@pytest.mark.slow
def test_sampling_is_deterministic_for_a_seed(order):
    seq, model, params = _seq(tokens_per_step=2), _model(), _params(2)
    decoder = model.clone(decode=True)
    kw = dict(
        image_shape=(SIZE, SIZE, CHANNELS),
        num_tokens=NUM_TOKENS,
        seq=seq,
        schedule=cosine_schedule(1000),
        order=order,
        num_steps=5,
    )
    run = lambda key: generate_images(decoder, params, TOK, ["ab", ""], key, **kw)  # noqa: E731
    a, b, c = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    assert a.shape == (2, SIZE, SIZE, CHANNELS) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    images = np.asarray(jax.random.uniform(jax.random.key(2), (3, SIZE, SIZE, CHANNELS)))
    cap = functools.partial(caption_images, decoder, params, TOK, images, num_tokens=4, seq=seq)
    assert cap() == cap()  # greedy
    top_p = dict(rng=jax.random.key(5), temperature=1.0, top_p=0.9)
    assert cap(**top_p) == cap(**top_p)


def test_visual_tokens_round_trip_through_images():
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    tokens = image_tokens(images, 16)
    assert tokens.shape == (2, 16, 12)
    np.testing.assert_array_equal(tokens_to_images(tokens, (8, 8, 3)), images)


def test_unpaired_image_markers_are_a_user_error():
    with pytest.raises(UserError, match="<BOI>/<EOI> do not pair"):
        unifluid_layout([TOK.boi_id], TOK, NUM_TOKENS, _seq(), generate=True)
    with pytest.raises(UserError, match="<BOI>/<EOI> do not pair"):
        unifluid_layout([TOK.eoi_id, 5], TOK, NUM_TOKENS, _seq(), generate=False)


def test_tokens_per_step_must_divide_the_image():
    with pytest.raises(UserError, match="tokens_per_step 3"):
        sequence_example(
            np.zeros((SIZE, SIZE, 1)), [5], TOK, _seq(tokens_per_step=3), np.random.default_rng()
        )


def test_latent_shape_mismatch_is_a_clear_error():
    model, params = _model(), _params(1)
    batch = _batch(_seq(), n=2)
    inputs = unifluid_inputs(batch, generation_order(jax.random.key(0), 2, NUM_TOKENS, "raster"))
    wrong = {**inputs, "visual_tokens": jnp.zeros((2, NUM_TOKENS, TOKEN_DIM + 1))}
    with pytest.raises(ValueError, match="check the latent shape"):
        jax.jit(lambda b: model.apply({"params": params}, b))(wrong)
    loss_fn = make_unifluid_loss(lambda p, b, rng: model.apply({"params": p}, b))
    odd = {**batch, "images": jnp.zeros((2, 1, SIZE, SIZE + 2, 1))}
    with pytest.raises(ValueError, match="square patches"):
        jax.jit(loss_fn)(params, odd, jax.random.key(0))


def test_a_prompt_longer_than_the_context_is_a_user_error():
    decoder = _model(decode=True)
    with pytest.raises(UserError, match="the model's context is 24"):
        generate_images(
            decoder,
            _params(1),
            TOK,
            ["x" * 30],
            jax.random.key(0),
            image_shape=(SIZE, SIZE, CHANNELS),
            num_tokens=NUM_TOKENS,
            seq=_seq(),
            schedule=cosine_schedule(1000),
        )
