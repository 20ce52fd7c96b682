"""Transfusion on the latents of a frozen VAE (`config.latents`): training on latents, the
eval decoding to pixels, and clear errors for a VAE that does not fit."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, random_vae_run
from PIL import Image

from mmjax.errors import UserError
from mmjax.train.config_cli import apply_overrides, load_config
from mmjax.train.latents import _training_images
from mmjax.train.loop import Trainer

DEVICES = jax.devices()[:1]


@pytest.fixture(scope="module", autouse=True)
def rbg_keys():
    """rbg keys: inits and steps compile several times faster on CPU (tests/test_vae.py)."""
    with jax.default_prng_impl("unsafe_rbg"):
        yield


@pytest.fixture(scope="module")
def vae_workdir(tmp_path_factory, rbg_keys) -> str:
    return random_vae_run(str(tmp_path_factory.mktemp("vae")), DEVICES)


def shapes_config(vae_workdir: str, *overrides: str):
    """experiments/transfusion.py:tiny_shapes shrunk, on the VAE of `vae_workdir`."""
    c = load_config(os.path.join(REPO, "experiments", "transfusion.py") + ":tiny_shapes")
    apply_overrides(
        c,
        [
            f"latents.vae_workdir={vae_workdir}",
            "model.depth=1",
            "model.width=32",
            "model.mlp_dim=64",
            "batch_size=16",
            "data.shapes_num_train=64",
            "data.shapes_num_test=8",
            "optimizer.warmup_steps=2",
            "optimizer.lr=3e-3",
            "evals.generation.num_samples=2",
            "evals.generation.num_steps=2",
            *overrides,
        ],
    )
    return c


@pytest.fixture(scope="module")
def trained(vae_workdir, tmp_path_factory, rbg_keys):
    """A Transfusion trainer on the VAE's latents and its state after 30 steps on one batch;
    the losses of the first and last step."""
    workdir = str(tmp_path_factory.mktemp("tf"))
    trainer = Trainer(shapes_config(vae_workdir), workdir, devices=DEVICES)
    batch = next(trainer.data_iterator())
    assert batch["images"].shape == (16, 1, 32, 32, 3)  # the pipeline stays in pixels
    state, shardings = trainer.init_state(batch)
    step = trainer.jit_train_step(shardings)
    fixed = {k: jnp.asarray(v) for k, v in batch.items()}  # one batch, so the losses must fall
    losses = []
    for _ in range(30):
        state, metrics = step(state, fixed)
        losses.append({k: float(metrics[k]) for k in ("lm_loss", "diffusion_loss")})
    return trainer, state, workdir, losses


@pytest.mark.long
def test_training_on_latents_lowers_both_losses(trained):
    trainer, _, _, losses = trained
    first, last = losses[0], losses[-1]
    assert last["lm_loss"] < 0.5 * first["lm_loss"], (first, last)
    assert last["diffusion_loss"] < 0.8 * first["diffusion_loss"], (first, last)
    # scaling_factor 0 was estimated from the training images and recorded in the config:
    # their latents have unit std
    factor = trainer.config.latents.scaling_factor
    assert factor > 0 and trainer.latents.autoencoder.scaling_factor == factor
    latents = trainer.latents.encode(_training_images(trainer.config, 64))
    assert latents.shape == (64, 8, 8, 4)
    assert float(jnp.std(latents)) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.long
def test_the_eval_judges_decoded_pixels(trained):
    trainer, state, workdir, _ = trained
    with jax.set_mesh(trainer.mesh):
        evaluator = trainer.bundle.evaluators(workdir)["generation"]
        metrics = evaluator(state.params)
    for name in ("compositional_accuracy", "caption_accuracy", "heldout_diffusion_loss"):
        assert np.isfinite(metrics[name]), metrics
    # the grid holds 32x32 RGB images (a latent [8, 8, 4] could not be drawn): 2 cells of
    # 32 * 3 + 2 * 2 pixels wide and 100 + 40 (prompt) tall
    grid = Image.open(os.path.join(workdir, "samples", "generation_001.png"))
    assert grid.size == (200, 140)
    decoded = evaluator.decode(jnp.zeros((2, 8, 8, 4)))
    assert decoded.shape == (2, 32, 32, 3)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.image_size=16",
            "the VAE was trained on 32x32x3 images but the data gives 16x16x3",
        ),
        (
            "data.sequence.channels=1",
            "the VAE was trained on 32x32x3 images but the data gives 32x32x1",
        ),
        (
            "model.image_shape=(8, 8, 8)",
            r"maps 32x32 images to latents of shape \(8, 8, 4\), but model.image_shape is "
            r"\(8, 8, 8\)",
        ),
        (
            "data.sequence.patch_size=2",
            "with model.patch_size 2 on latents downsampled 4x it must be 8, not 2",
        ),
    ],
)
def test_a_vae_that_does_not_fit_the_data_or_model_is_named(vae_workdir, override, message):
    with pytest.raises(UserError, match=message) as err:
        Trainer(shapes_config(vae_workdir, override), None, devices=DEVICES)
    assert "\n" not in str(err.value) and "latents.vae_workdir" in str(err.value)


def test_a_workdir_without_a_trained_vae_is_named(vae_workdir, tmp_path, trained):
    empty = str(tmp_path / "empty")
    with pytest.raises(UserError, match=r"holds no trained VAE: .*config.json does not exist"):
        Trainer(shapes_config(empty), None, devices=DEVICES)
    untrained = tmp_path / "untrained"  # a VAE config, no checkpoint
    untrained.mkdir()
    shutil.copy(os.path.join(vae_workdir, "config.json"), untrained)
    with pytest.raises(UserError, match="holds no trained VAE: workdir: no complete checkpoint in"):
        Trainer(shapes_config(str(untrained)), None, devices=DEVICES)
    not_a_vae = trained[2]  # the Transfusion run's own workdir
    with open(os.path.join(not_a_vae, "config.json"), "w") as f:
        f.write(trained[0].config.to_json())
    with pytest.raises(
        UserError, match=r"its model is 'transfusion', not one of \('vae', 'clip_decoder'\)"
    ):
        Trainer(shapes_config(not_a_vae), None, devices=DEVICES)
