"""Transfusion: the sequence layout and its attention mask, losses that fall, clear errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO

from mmjax.data.sequences import layout
from mmjax.errors import UserError
from mmjax.kernels.masks import attention_mask
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
            "batch_size=32",
            "optimizer.warmup_steps=5",
            "optimizer.lr=3e-3",
            *(f"{k}={v}" for k, v in overrides.items()),
        ],
    )
    return c


def test_a_few_steps_lower_both_losses(tmp_path):
    from mmjax.train.loop import Trainer

    trainer = Trainer(tiny_config(total_steps=40), str(tmp_path))
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
    params = model.init(jax.random.key(0), {**batch, "images": jnp.zeros((1, 1, 8, 8, 1))})
    with pytest.raises(ValueError, match=r"images have shape \(8, 8, 3\) but .* \(8, 8, 1\)"):
        model.apply(params, {**batch, "images": jnp.zeros((1, 1, 8, 8, 3))})


def test_a_sequence_too_long_for_its_images_is_a_config_error(tmp_path):
    from mmjax.train.loop import Trainer

    with pytest.raises(UserError, match="max_len 16 cannot hold an image of 16 patches"):
        trainer = Trainer(tiny_config(**{"data.sequence.max_len": 16}), str(tmp_path))
        next(trainer.data_iterator())
