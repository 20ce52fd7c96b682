"""The convolutional VAE (models/vae.py) and its loss (objectives/autoencoder.py): shapes,
training through the generic trainer, the KL term, the scaling factor, clear input errors."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO

from mmjax import parallel
from mmjax.models.vae import VAE, Pixels, estimate_scaling_factor
from mmjax.objectives import build_loss
from mmjax.objectives.autoencoder import gaussian_kl, psnr, vae_loss
from mmjax.train.config_cli import apply_overrides, load_config
from mmjax.train.loop import Trainer

SMALL = dict(
    channels=8,
    channel_mult=(1, 2, 2),
    num_res_blocks=0,
    latent_channels=4,
    norm_groups=4,
    dtype=jnp.float32,
)


def _key(seed):
    """An rbg key: a model init with threefry keys compiles ~4x slower on CPU (~18 s here)."""
    return jax.random.key(seed, impl="unsafe_rbg")


def _images(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.fixture(scope="module")
def small():
    model = VAE(**SMALL)
    init = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, {"image": _images((1, 8, 8, 3))})))
    return model, init(_key(0))["params"]


def test_encode_decode_shapes_and_latent_scaling(small):
    model, params = small
    x = _images((2, 16, 24, 3))  # non-square; any size divisible by f = 4
    factor = estimate_scaling_factor(model, params, x, batch_size=2)
    scaled = model.clone(scaling_factor=factor)

    @jax.jit
    def run(p):
        v = {"params": p}
        train = model.apply(v, {"image": x}, train=True, rngs={"dropout": _key(1)})
        out = model.apply(v, {"image": x})
        z = scaled.apply(v, x, method="images_to_latents")
        return (
            train,
            out,
            model.apply(v, out["mean"], method="decode"),
            z,
            scaled.apply(v, z, method="latents_to_images"),
        )

    train, out, decoded, z, from_z = run(params)
    mean, logvar = out["mean"], out["logvar"]
    assert mean.shape == logvar.shape == (2, 4, 6, 4) and mean.dtype == jnp.float32
    assert train["reconstruction"].shape == out["reconstruction"].shape == x.shape
    np.testing.assert_array_equal(train["mean"], mean)
    assert not np.allclose(train["latents"], mean)  # a posterior sample in training...
    np.testing.assert_array_equal(out["latents"], mean)  # ...the mode in eval
    np.testing.assert_allclose(out["reconstruction"], decoded, rtol=1e-5, atol=1e-6)
    # Scaled latents: factor * mean, of unit variance; decoding them undoes the scale.
    np.testing.assert_allclose(z, factor * mean, rtol=1e-5, atol=1e-6)
    assert np.std(np.asarray(z)) == pytest.approx(1.0, rel=1e-3)
    np.testing.assert_allclose(from_z, decoded, rtol=1e-4, atol=1e-5)


def test_every_parameter_has_logical_axes():
    model = VAE(**SMALL)
    boxed = jax.eval_shape(model.init, jax.random.key(0), {"image": _images((1, 8, 8, 3))})
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
    assert all(len(leaf.names) == leaf.value.ndim for leaf in leaves)


def test_kl_is_zero_at_the_prior_and_matches_the_closed_form():
    mean = np.zeros((2, 2, 2, 4), np.float32)
    logvar = np.zeros_like(mean)
    mean[1], logvar[1] = 1.5, np.log(0.25)
    expected = 16 * 0.5 * (1.5**2 + 0.25 - 1 - np.log(0.25))  # 16 latents of image 1
    np.testing.assert_allclose(jax.jit(gaussian_kl)(mean, logvar), [0.0, expected], rtol=1e-6)


def test_loss_terms_and_mask():
    x = 0.4 * _images((2, 4, 4, 3))
    recon = x.copy()
    recon[1] += 0.5  # image 0 is perfect, image 1 off by 0.5 everywhere
    z = np.zeros((2, 1, 1, 4), np.float32)
    loss_fn = jax.jit(vae_loss, static_argnames=("kl_weight", "reconstruction_loss"))
    loss, m = loss_fn(x, recon, z + 1.0, z, kl_weight=0.1, reconstruction_loss="l2")
    np.testing.assert_allclose(m["recon_loss"], 0.125, rtol=1e-6)  # mean of 0 and 0.25
    np.testing.assert_allclose(m["kl"], 2.0, rtol=1e-6)  # 4 latents x 0.5 * 1^2
    np.testing.assert_allclose(loss, 0.125 + 0.1 * 2.0 / 48, rtol=1e-6)
    _, masked = loss_fn(x, recon, z, z, mask=np.array([0.0, 1.0], np.float32))
    np.testing.assert_allclose(masked["recon_loss"], 0.5, rtol=1e-6)  # L1, image 1 only
    np.testing.assert_allclose(masked["psnr"], 10 * np.log10(4 / 0.25), rtol=1e-5)
    assert float(jax.jit(psnr)(x, x)[0]) > 90


def test_bad_inputs_give_clear_errors(small):
    model, params = small

    def apply(x, method):  # traced only: the checks run on shapes, before any compute
        return jax.eval_shape(lambda p: model.apply({"params": p}, x, method=method), params)

    with pytest.raises(ValueError, match=r"images must be \[batch, height, width, 3\]"):
        apply(_images((1, 32, 32, 1)), "encode")
    with pytest.raises(ValueError, match="30x32 are not divisible by the downsampling factor 4"):
        apply(_images((1, 30, 32, 3)), "encode")
    with pytest.raises(ValueError, match=r"latents must be \[batch, height, width, 4\]"):
        apply(_images((1, 8, 8, 3)), "decode")
    with pytest.raises(ValueError, match="not divisible by norm_groups 5"):
        bad = VAE(**{**SMALL, "norm_groups": 5})
        jax.eval_shape(bad.init, jax.random.key(0), {"image": _images((1, 8, 8, 3))})
    with pytest.raises(ValueError, match="unknown reconstruction_loss 'l3'"):
        build_loss("vae", lambda p, b, r: {}, reconstruction_loss="l3")
    with pytest.raises(ValueError, match=r"images must be \[batch, height, width, 1\]"):
        Pixels(in_channels=1).apply({}, _images((1, 8, 8, 3)))


def test_pixel_space_option_is_the_identity_up_to_scale():
    x = _images((2, 8, 8, 1))
    pixels = Pixels(in_channels=1, scaling_factor=2.0)
    z = pixels.apply({}, x)
    np.testing.assert_allclose(z, 2 * x)
    np.testing.assert_allclose(pixels.apply({}, z, method="latents_to_images"), x, rtol=1e-6)


def test_tiny_experiment_trains_with_the_generic_trainer():
    """experiments/vae.py:tiny through Trainer (registry, objective, data), shrunk: loss falls."""
    config = load_config(os.path.join(REPO, "experiments", "vae.py") + ":tiny")
    apply_overrides(
        config,
        [
            "model.channels=8",
            "model.channel_mult=(1, 2)",
            "model.norm_groups=4",
            "batch_size=8",
            "data.shapes_num_train=32",
            "optimizer.warmup_steps=2",
            "total_steps=40",
        ],
    )
    # rbg keys for the trainer's init and step rngs, as `_key` says.
    with jax.default_prng_impl("unsafe_rbg"):
        trainer = Trainer(config, workdir=None, devices=jax.devices()[:1])
        data = trainer.data_iterator()
        batches = [next(data) for _ in range(4)]
        assert batches[0]["image"].shape == (8, 32, 32, 3)
        state, shardings = trainer.init_state(batches[0])
        losses = []
        with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
            step = trainer.jit_train_step(shardings)
            for i in range(40):
                state, metrics = step(state, parallel.global_batch(batches[i % 4], trainer.mesh))
                losses.append(float(metrics["loss"]))
    assert {"recon_loss", "kl", "psnr", "latent_std"} <= set(metrics)
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4]), losses
