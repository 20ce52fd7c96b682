"""Connectors (models/resamplers.py): token counts, the Q-Former's three stage-1 masks, which
connectors ignore the order of the image tokens, that each can fit a target, clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmjax.kernels import attention_mask
from mmjax.models.resamplers import CONNECTORS, QFORMER_MASKS, build_connector, qformer_mask
from mmjax.nn.sincos import sincos_2d
from mmjax.nn.timestep import sinusoidal

BATCH, TOKENS, IN_DIM, OUT_DIM = 2, 16, 24, 16
QFORMER = dict(type="qformer", out_dim=OUT_DIM, num_queries=4, width=32, depth=2, num_heads=4,
               mlp_dim=48, vocab_size=50, max_text_len=8)  # fmt: skip
# each small config, and how many visual tokens it makes of TOKENS image tokens
CONFIGS = {
    "linear": (dict(type="linear", out_dim=OUT_DIM), TOKENS),
    "mlp": (dict(type="mlp", out_dim=OUT_DIM), TOKENS),
    "concat": (dict(type="concat", out_dim=OUT_DIM), TOKENS // 4),
    "qformer": (QFORMER, 4),
    "perceiver": (
        dict(type="perceiver", out_dim=OUT_DIM, num_latents=5, depth=2, num_heads=2, head_dim=8),
        5,
    ),
    "cross_attn": (
        dict(type="cross_attn", out_dim=OUT_DIM, width=32, num_queries=9, num_heads=4),
        9,
    ),
}


def image_tokens(shape=(BATCH, TOKENS, IN_DIM), seed=0) -> jnp.ndarray:
    return jax.random.normal(jax.random.key(seed), shape)


def init(cfg: dict, x: jnp.ndarray) -> tuple[nn.Module, dict]:
    module = build_connector(cfg, dtype=jnp.float32)
    return module, nn.meta.unbox(module.init(jax.random.key(1), x))


def test_every_connector_type_has_a_config_here():
    assert set(CONFIGS) == set(CONNECTORS)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_connector_makes_the_stated_number_of_visual_tokens(kind):
    cfg, count = CONFIGS[kind]
    x = image_tokens()
    module, variables = init(cfg, x)
    out = jax.jit(module.apply)(variables, x)
    assert out.shape == (BATCH, count, OUT_DIM)
    assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())


def test_perceiver_reads_frames_with_time_embeddings():
    cfg, count = CONFIGS["perceiver"]
    frames = image_tokens((BATCH, 3, TOKENS, IN_DIM))
    module, variables = init(cfg, frames)
    out = module.apply(variables, frames)
    assert out.shape == (BATCH, count, OUT_DIM)
    # the time embeddings tell frames apart: swapping two frames changes the output
    swapped = module.apply(variables, frames[:, ::-1])
    assert float(jnp.abs(out - swapped).max()) > 1e-3
    # one frame as [B, N, D] is the same as [B, 1, N, D]
    np.testing.assert_allclose(
        module.apply(variables, frames[:, 0]), module.apply(variables, frames[:, :1]), atol=1e-6
    )


def test_qformer_encode_returns_query_and_text_outputs():
    x = image_tokens()
    module, variables = init(QFORMER, x)
    ids = jnp.ones((BATCH, 6), jnp.int32)
    out = module.apply(variables, x, text_ids=ids, mask="multimodal_causal", method="encode")
    assert out.queries.shape == (BATCH, 4, 32) and out.text.shape == (BATCH, 6, 32)
    assert module.apply(variables, x, method="encode").text is None
    embeds = jnp.take(variables["params"]["word_embedding"], ids, axis=0)
    embeds = embeds + variables["params"]["position_embedding"][:6]
    same = module.apply(variables, x, text_embeds=embeds, mask="multimodal_causal", method="encode")
    np.testing.assert_allclose(same.text, out.text, atol=1e-6)


def hand_written_mask(mode: str, num_queries: int, text_mask: np.ndarray) -> np.ndarray:
    """[B, L, L], L = queries + text: BLIP-2 Fig. 2 (right), one pair at a time."""
    batch, text_len = text_mask.shape
    length = num_queries + text_len
    out = np.zeros((batch, length, length), bool)
    for row in range(batch):
        valid = [True] * num_queries + [bool(t) for t in text_mask[row]]
        for i in range(length):
            for j in range(length):
                i_query, j_query = i < num_queries, j < num_queries
                if not (valid[i] and valid[j]):
                    continue
                if mode == "bidirectional":
                    out[row, i, j] = True
                elif mode == "unimodal":
                    out[row, i, j] = i_query == j_query
                else:  # multimodal_causal: queries see queries; text sees queries, earlier text
                    out[row, i, j] = j_query or (not i_query and j <= i)
    return out


@st.composite
def mask_cases(draw):
    batch = draw(st.integers(1, 3))
    text_len = draw(st.integers(0, 6))
    bits = draw(st.lists(st.booleans(), min_size=batch * text_len, max_size=batch * text_len))
    text_mask = np.array(bits, bool).reshape(batch, text_len)
    return draw(st.sampled_from(QFORMER_MASKS)), draw(st.integers(1, 6)), text_mask


@settings(max_examples=40, deadline=None, database=None)
@given(mask_cases())
def test_qformer_masks_equal_the_hand_written_ones(case):
    mode, num_queries, text_mask = case
    length = num_queries + text_mask.shape[1]
    got = attention_mask(length, length, **qformer_mask(mode, num_queries, text_mask))
    want = hand_written_mask(mode, num_queries, text_mask)
    np.testing.assert_array_equal(np.broadcast_to(got, want.shape), want)


def test_qformer_masks_decide_what_each_output_depends_on():
    """Queries see the image; the masks decide whether they see the text and which text the
    text sees. Padding tokens influence nothing."""
    x, other_image = image_tokens(), image_tokens(seed=5)
    module, variables = init(QFORMER, x)
    ids = jax.random.randint(jax.random.key(2), (BATCH, 6), 1, 50)
    later_changed = ids.at[:, 4:].set((ids[:, 4:] + 7) % 50)
    mask = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])

    def encode(mode, image=x, text=ids):
        return module.apply(
            variables, image, text_ids=text, text_mask=mask, mask=mode, method="encode"
        )

    def same(a, b):
        return bool(jnp.allclose(a, b, atol=1e-6))

    for mode in QFORMER_MASKS:  # the padded row's last two tokens change nothing
        padded_changed = ids.at[1, 4:].set(3)
        a, b = encode(mode), encode(mode, text=padded_changed)
        assert same(a.queries, b.queries) and same(a.text[1, :4], b.text[1, :4]), mode
    # ITC: queries blind to text, text blind to the image (it never sees the queries)
    itc = encode("unimodal")
    assert same(itc.queries, encode("unimodal", text=later_changed).queries)
    assert same(itc.text, encode("unimodal", image=other_image).text)
    # ITM: queries read the text, text reads the image through the queries
    itm = encode("bidirectional")
    assert not same(itm.queries, encode("bidirectional", text=later_changed).queries)
    assert not same(itm.text, encode("bidirectional", image=other_image).text)
    # ITG: queries blind to text; text position t blind to later text, not to the image
    itg, itg_later = encode("multimodal_causal"), encode("multimodal_causal", text=later_changed)
    assert same(itg.queries, itg_later.queries)
    assert same(itg.text[:, :4], itg_later.text[:, :4])
    assert not same(itg.text[:, 4:], itg_later.text[:, 4:])
    assert not same(itg.text, encode("multimodal_causal", image=other_image).text)


@pytest.mark.parametrize("kind, invariant", [("qformer", True), ("perceiver", True),
                                             ("cross_attn", False)])  # fmt: skip
def test_image_token_order_matters_only_with_positions(kind, invariant):
    """The Q-Former and the Perceiver attend to image tokens without positions, so permuting
    them changes nothing; Qwen-VL's adapter adds 2D positions to the keys."""
    cfg, _ = CONFIGS[kind]
    x = image_tokens()
    module, variables = init(cfg, x)
    permutation = jax.random.permutation(jax.random.key(3), TOKENS)
    diff = float(
        jnp.abs(module.apply(variables, x) - module.apply(variables, x[:, permutation])).max()
    )
    if invariant:
        assert diff < 1e-5
    else:
        assert diff > 1e-2


def test_sincos_2d_lays_a_coarse_grid_over_a_fine_one():
    """Raster order, rows in the first half of the channels; with scale 2 a 2x2 grid's cell
    centres sit at 0.5 and 2.5 of a 4x4 grid's coordinates."""
    got = sincos_2d(2, 2, 8, scale=2.0)
    centres = jnp.array([0.5, 2.5])
    rows, cols = jnp.repeat(centres, 2), jnp.tile(centres, 2)
    want = jnp.concatenate([sinusoidal(rows, 4), sinusoidal(cols, 4)], axis=-1)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(
        sincos_2d(3, 3, 8)[:, :4], sinusoidal(jnp.repeat(jnp.arange(3.0), 3), 4)
    )


FIT_STEPS, FIT_FACTOR = 60, 10.0


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.long
def test_connector_learns_to_regress_a_fixed_target(kind):
    """A few dozen Adam steps cut the squared error to a fixed random target by FIT_FACTOR."""
    cfg, count = CONFIGS[kind]
    x = image_tokens((1, TOKENS, IN_DIM))  # 16 tokens of 24 dims: a linear map can fit them
    module, variables = init(cfg, x)
    target = jax.random.normal(jax.random.key(4), (1, count, OUT_DIM))
    optimizer = optax.adam(1e-2)

    def loss_fn(params):
        return jnp.mean((module.apply({"params": params}, x) - target) ** 2)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = variables["params"]
    opt_state = optimizer.init(params)
    losses = []
    for _ in range(FIT_STEPS):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    final = float(loss_fn(params))
    assert final < losses[0] / FIT_FACTOR, (kind, losses[0], final)


@pytest.mark.parametrize(
    "cfg, shape, message",
    [
        (dict(type="linear", out_dim=8), (2, 24), r"takes image tokens \[batch, tokens, dim\]"),
        (dict(type="mlp", out_dim=8), (2, 4, 4, 24), r"mlp connector takes image tokens"),
        (dict(type="concat", out_dim=8), (2, 24), r"concat connector takes image tokens"),
        (dict(type="concat", out_dim=8), (2, 10, 24), "10, is not divisible by 4"),
        (QFORMER, (2, 24), r"qformer connector takes image tokens"),
        (CONFIGS["perceiver"][0], (2, 1, 1, 4, 24),
         r"or \[batch, frames, tokens, dim\], got shape \(2, 1, 1, 4, 24\)"),
        ({**CONFIGS["perceiver"][0], "max_frames": 2}, (2, 3, 4, 24),
         "got 3 frames but has time embeddings for max_frames=2"),
        (CONFIGS["cross_attn"][0], (2, 12, 24), r"image tokens \(N=12\).*12 is not a square"),
        ({**CONFIGS["cross_attn"][0], "num_queries": 8}, (2, 16, 24),
         "num_queries=8 on a square grid"),
        (CONFIGS["cross_attn"][0], (2, 24), r"cross_attn connector takes image tokens"),
        (dict(type="mlp", out_dim=8, activation="swish"), (2, 4, 24), "unknown activation"),
    ],
)  # fmt: skip
def test_bad_input_is_named(cfg, shape, message):
    module = build_connector(cfg, dtype=jnp.float32)
    with pytest.raises(ValueError, match=message):
        module.init(jax.random.key(0), jnp.zeros(shape))


def test_unknown_connector_type_is_named():
    with pytest.raises(ValueError, match=r"unknown connector type 'resampler'; valid: \["):
        build_connector(dict(type="resampler", out_dim=8))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mask="causal"), "unknown Q-Former mask 'causal'"),
        (dict(text_ids=jnp.ones((2, 3), jnp.int32), text_embeds=jnp.zeros((2, 3, 32))),
         "text_ids or text_embeds, not both"),
        (dict(text_mask=jnp.ones((2, 3))), "text_mask was given without text"),
        (dict(text_ids=jnp.ones((2, 9), jnp.int32)), "9 tokens exceeds max_text_len 8"),
        (dict(text_ids=jnp.ones((2, 3))), "text_ids must be integer"),
        (dict(text_embeds=jnp.zeros((2, 3, 31))), r"width=32\], got \(2, 3, 31\)"),
        (dict(text_ids=jnp.ones((2, 3), jnp.int32), text_mask=jnp.ones((2, 4))),
         r"text_mask must be shaped \(2, 3\)"),
    ],
)  # fmt: skip
def test_qformer_bad_text_is_named(kwargs, message):
    x = image_tokens()
    module, variables = init(QFORMER, x)
    with pytest.raises(ValueError, match=message):
        module.apply(variables, x, method="encode", **kwargs)


def test_qformer_without_a_vocabulary_refuses_text():
    x = image_tokens()
    module, variables = init({**QFORMER, "vocab_size": 0}, x)
    assert "word_embedding" not in variables["params"]
    assert "text_mlp" not in variables["params"]["layers_0"]
    with pytest.raises(ValueError, match=r"reads no text \(vocab_size=0\)"):
        module.apply(variables, x, text_ids=jnp.ones((2, 3), jnp.int32), method="encode")
