"""Transfusion: the sequence layout and its attention mask, losses that fall, clear errors."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from helpers import REPO

from mmjax.data.sequences import SEQUENCE_DEFAULTS, layout, transfusion_example
from mmjax.data.tokenizer import ByteTokenizer, WithImageMarkers
from mmjax.errors import UserError
from mmjax.kernels.masks import attention_mask
from mmjax.objectives.transfusion import masked_token_ce, text_targets
from mmjax.train.config_cli import apply_overrides, load_config

BOS, EOS, BOI, EOI, PAD = 1, 2, 10, 11, 0


def test_mask_of_a_mixed_sequence_equals_the_hand_written_one():
    # <bos> a b <BOI> p p p <EOI> <eos> pad: causal text, the 3 patches see each other
    ids = [BOS, 5, 6, BOI, PAD, PAD, PAD, EOI, EOS]
    seq = layout(ids, image_starts=[4], num_patches=3, max_len=10, pad_id=PAD)
    mask = attention_mask(
        10,
        10,
        segment_ids=seq["segment_ids"][None],
        span_ids=seq["span_ids"][None],
        causal=True,
    )[0]
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],  # first patch sees the later patches too
            [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # padding sees nothing
        ],
        bool,
    )
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(seq["lm_mask"], [0, 1, 1, 1, 0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(seq["image_positions"], [[4, 5, 6]])


def test_image_first_flags_the_images_laid_out_before_their_caption():
    """The objective caps the noise of these (Sec. 4.3.4), so the flag must match the layout."""
    tok = WithImageMarkers(ByteTokenizer())
    seq = ml_collections.ConfigDict({**SEQUENCE_DEFAULTS, "kind": "transfusion", "channels": 1})
    rng = np.random.default_rng(0)
    flags = []
    for _ in range(200):
        ex = transfusion_example(np.zeros((4, 4, 1)), tok.encode("a 3"), tok, seq, rng)
        eoi = list(ex["tokens"]).index(tok.eoi_id)
        # a dropped caption (CFG) leaves <BOI> at 1 too, but no caption follows the image
        image_first = ex["tokens"][1] == tok.boi_id and ex["tokens"][eoi + 1] != tok.eos_id
        assert ex["image_first"].tolist() == [float(image_first)]
        flags.append(image_first)
    assert 0.1 < np.mean(flags) < 0.3  # caption first 80% of the time (Sec. 4.1)


def test_text_logits_at_target_positions_give_the_full_sequence_loss():
    """The LM loss from logits at text_targets' positions equals the loss over every position."""
    tok = WithImageMarkers(ByteTokenizer())
    seq = ml_collections.ConfigDict({**SEQUENCE_DEFAULTS, "kind": "transfusion", "max_len": 40})
    seq.caption_first = 0.5
    rng = np.random.default_rng(1)
    rows = [
        transfusion_example(np.zeros((8, 8, 3)), tok.encode("ab" * n), tok, seq, rng)
        for n in rng.integers(0, 10, 16)
    ]
    tokens = np.stack([r["tokens"] for r in rows])
    mask = np.stack([r["lm_mask"] for r in rows])
    logits = jax.random.normal(jax.random.key(0), (*tokens.shape, tok.vocab_size))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    full = np.sum(ce * mask[:, 1:]) / np.sum(mask[:, 1:])
    positions, labels, weights = text_targets(jnp.asarray(tokens), jnp.asarray(mask), 1, 16)
    assert positions.shape[1] == 40 - 1 - 15
    at = jnp.take_along_axis(logits, positions[..., None], axis=1)
    np.testing.assert_allclose(masked_token_ce(at, labels, weights), full, rtol=1e-6)
    assert int(weights.sum()) == int(mask[:, 1:].sum())


def test_two_images_get_separate_bidirectional_spans():
    ids = [BOS, BOI, PAD, PAD, EOI, 5, BOI, PAD, PAD, EOI, EOS]
    seq = layout(ids, image_starts=[2, 7], num_patches=2, max_len=12, pad_id=PAD)
    np.testing.assert_array_equal(seq["span_ids"], [0, 0, 1, 1, 0, 0, 0, 2, 2, 0, 0, 0])
    mask = attention_mask(
        12, 12, segment_ids=seq["segment_ids"][None], span_ids=seq["span_ids"][None], causal=True
    )[0]
    assert mask[2, 3] and not mask[7, 8 + 1] and mask[7, 8] and not mask[3, 7]


def tiny_config(**overrides):
    c = load_config(f"{REPO}/experiments/transfusion.py:tiny")
    apply_overrides(
        c,
        [
            "model.depth=2",
            "model.width=64",
            "model.mlp_dim=128",
            "model.unet_channels=16",
            "batch_size=32",
            "optimizer.warmup_steps=5",
            "optimizer.lr=3e-3",
            *(f"{k}={v}" for k, v in overrides.items()),
        ],
    )
    return c


@pytest.mark.parametrize("encoder", ["linear", pytest.param("unet", marks=pytest.mark.long)])
@pytest.mark.slow
def test_a_few_steps_lower_both_losses(tmp_path, encoder):
    from mmjax.train.loop import Trainer

    config = tiny_config(total_steps=40, **{"model.patch_encoder": encoder})
    trainer = Trainer(config, str(tmp_path))
    it = trainer.data_iterator()
    batch = next(it)
    state, shardings = trainer.init_state(batch)
    step = trainer.jit_train_step(shardings)
    fixed = {k: jnp.asarray(v) for k, v in batch.items()}  # one batch, so the losses must fall
    first = None
    for _ in range(40):
        state, metrics = step(state, fixed)
        first = first or {k: float(metrics[k]) for k in ("lm_loss", "diffusion_loss")}
    last = {k: float(metrics[k]) for k in ("lm_loss", "diffusion_loss")}
    assert last["lm_loss"] < 0.5 * first["lm_loss"], (first, last)
    assert last["diffusion_loss"] < 0.8 * first["diffusion_loss"], (first, last)


def test_an_image_of_the_wrong_shape_is_named():
    from mmjax.models import build_model

    c = tiny_config()
    c.model.vocab_size = 64
    model = build_model(c.model)
    seq = layout([BOS, BOI, *[PAD] * 16, EOI, EOS], [2], 16, 32, PAD)
    batch = {k: jnp.asarray(v)[None] for k, v in seq.items()}
    good = {**batch, "images": jnp.zeros((1, 1, 8, 8, 1))}
    params = jax.eval_shape(model.init, jax.random.key(0), good)
    with pytest.raises(ValueError, match=r"images have shape \(8, 8, 3\) but .* \(8, 8, 1\)"):
        jax.eval_shape(model.apply, params, {**batch, "images": jnp.zeros((1, 1, 8, 8, 3))})


def test_a_sequence_too_long_for_its_images_is_a_config_error(tmp_path):
    from mmjax.train.loop import Trainer

    with pytest.raises(UserError, match="max_len 16 cannot hold an image of 16 patches"):
        trainer = Trainer(tiny_config(**{"data.sequence.max_len": 16}), str(tmp_path))
        next(trainer.data_iterator())


def test_unpaired_image_markers_are_an_error():
    ids = [BOS, BOI, PAD, PAD, PAD, EOS]  # no <EOI>
    with pytest.raises(UserError, match=r"<BOI>/<EOI> do not pair .* <EOI> at \[\]"):
        layout(ids, [2], 3, 8, PAD, markers=(BOI, EOI))
    ids = [BOS, 5, PAD, PAD, PAD, EOI, BOI, EOS]  # <BOI> after the image
    with pytest.raises(UserError, match=r"<BOI> at \[6\], <EOI> at \[5\], expected \[1\]"):
        layout(ids, [2], 3, 8, PAD, markers=(BOI, EOI))


class _Tokenizer:
    """Word-per-id tokenizer with the markers the sequences need."""

    pad_id, bos_id, eos_id, boi_id, eoi_id = 0, 1, 2, 3, 4
    words = ("a", "digit", "one", "two", "three")

    def encode(self, text):
        return [5 + self.words.index(w) for w in text.split()]

    def decode(self, ids):
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i >= 5:
                out.append(self.words[i - 5])
        return " ".join(out)


def test_diffusion_sampling_is_deterministic_for_a_seed_and_prompts_must_fit():
    from mmjax.models import build_model
    from mmjax.objectives.diffusion import cosine_schedule
    from mmjax.sampling.transfusion import caption_images, generate_images

    c = tiny_config()
    c.model.vocab_size = 16
    model = build_model(c.model)
    tok = _Tokenizer()
    seq = layout([BOS, BOI, *[PAD] * 16, EOI, EOS], [2], 16, 32, PAD)
    batch = {k: jnp.asarray(v)[None] for k, v in seq.items()}
    init = jax.jit(model.init)
    params = init(jax.random.key(0), {**batch, "images": jnp.zeros((1, 1, 8, 8, 1))})
    decoder = model.clone(decode=True)
    kw = dict(image_shape=(8, 8, 1), num_patches=16, max_len=32, schedule=cosine_schedule())
    prompts = ["a digit one", "a digit two"]
    sample = lambda seed, **extra: generate_images(  # noqa: E731
        decoder, params["params"], tok, prompts, jax.random.key(seed), num_steps=5, **kw, **extra
    )
    # DDPM draws fresh noise every step: the same key must still give the same images
    first, again, other = (sample(seed, sampler="ddpm", clip_x0=1.0) for seed in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert first.shape == (2, 8, 8, 1) and np.abs(first).max() < 10
    captions = caption_images(
        decoder, params["params"], tok, np.zeros((2, 8, 8, 1)), num_patches=16, max_len=32
    )
    assert len(captions) == 2 and all(isinstance(s, str) for s in captions)
    with pytest.raises(UserError, match="a prompt of 15 tokens and an image of 16 patches need 34"):
        generate_images(
            decoder, params["params"], tok, ["a " * 15], jax.random.key(0), num_steps=2, **kw
        )


@pytest.mark.slow  # CI runs it
def test_kv_cache_decoder_equals_a_full_forward_pass():
    from mmjax.models import build_model

    c = tiny_config()
    c.model.vocab_size = 16
    model = build_model(c.model)
    decoder = build_model({**c.model.to_dict(), "decode": True})
    ids = [BOS, 5, 6, BOI, *[PAD] * 16, EOI, 7, 8, EOS]
    seq = layout(ids, [4], 16, 32, PAD, markers=(BOI, EOI))
    batch = {k: jnp.broadcast_to(v, (2, *v.shape)) for k, v in seq.items()}
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(2, 1, 8, 8, 1)), jnp.float32)
    timesteps = jnp.asarray([[10.0], [500.0]])
    batch = {**batch, "images": images, "timesteps": timesteps}
    params = model.init(jax.random.key(0), batch)["params"]
    full = model.apply({"params": params}, batch)
    cache = decoder.init(jax.random.key(0), batch)["cache"]
    keys = ("tokens", "positions", "segment_ids", "span_ids")

    apply = jax.jit(functools.partial(decoder.apply, mutable=["cache"]))

    def step(cache, start, stop, **extra):
        chunk = {k: batch[k][:, start:stop] for k in keys}
        out, state = apply(
            {"params": params, "cache": cache},
            {**chunk, "cache_offset": jnp.full((2,), start), **extra},
        )
        np.testing.assert_allclose(out["logits"], full["logits"][:, start:stop], atol=1e-5)
        return out, state["cache"]

    _, cache = step(cache, 0, 4)  # prompt prefill
    image_chunk = dict(
        images=images,
        timesteps=timesteps,
        image_positions=jnp.broadcast_to(jnp.arange(16), (2, 1, 16)),
    )
    out, cache = step(cache, 4, 20, **image_chunk)  # the image block against the cached prompt
    np.testing.assert_allclose(out["image_pred"], full["image_pred"], atol=1e-5)
    for i in range(20, len(ids)):  # then text one token at a time
        _, cache = step(cache, i, i + 1)
