"""BAGEL's objective (Deng et al., 2025): text CE + rectified flow on VAE latents.

Each latent image a row generates (`image_noised`) gets one flow time t = sigmoid(N(0, 1)),
shifted as t -> s t / (1 + (s - 1) t) (`timestep_shift` s; official trainer default 1), and is
noised as x_t = (1 - t) x0 + t eps; the model predicts the velocity eps - x0 (official
`Bagel.forward`). Clean context latents (an edit's source) keep t = 0. The loss is
`ce_weight` x CE over text targets (`lm_mask`) + `mse_weight` x the velocity MSE over the
generated images' latents (official weights 1 and 1).
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mmjax.objectives.diffusion import diffusion_loss, flow_sample, sample_flow_times
from mmjax.objectives.transfusion import masked_token_ce, text_targets


def shift_times(t: jax.Array, shift: float) -> jax.Array:
    """The timestep shift of SD3 (Sec. 5.3.2) that BAGEL trains and samples with."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def make_bagel_loss(
    apply_fn: Callable,
    *,
    timestep_shift: float = 1.0,
    ce_weight: float = 1.0,
    mse_weight: float = 1.0,
) -> Callable:
    """(params, batch, rng) -> (loss, metrics) for rows from mmjax.data.bagel_tasks (latents
    already encoded: objectives.on_latents)."""

    def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
        t_rng, noise_rng, model_rng = jax.random.split(rng, 3)
        images = batch["images"]
        b, m = images.shape[:2]
        noised = batch["image_noised"] * batch["image_valid"]
        t = shift_times(sample_flow_times(t_rng, (b, m), logit_normal=True), timestep_shift)
        t = t * noised  # clean context latents stay at t = 0
        noise = jax.random.normal(noise_rng, images.shape, jnp.float32)
        x0 = images.astype(jnp.float32)
        x_t = flow_sample(x0, t, noise)
        # Text targets: K is bounded by the row minus every image's slots but one each
        slots = batch["image_positions"].shape[-1] * m + batch["vit_positions"].shape[-1]
        images_per_row = m + batch["vit_positions"].shape[1]
        positions, labels, weights = text_targets(
            batch["tokens"], batch["lm_mask"], 1, slots - images_per_row + 1
        )
        inputs = {
            **batch,
            "images": x_t,
            "timesteps": t,
            "logit_positions": positions,
        }
        out = apply_fn(params, inputs, model_rng)
        ce = masked_token_ce(out["logits"], labels, weights)
        mse, _ = diffusion_loss(out["velocity"], noise - x0, noised)
        loss = ce_weight * ce + mse_weight * mse
        return loss, {"loss": loss, "lm_loss": ce, "diffusion_loss": mse}

    return loss_fn
