"""Transfusion's objective (Zhou et al., 2024, Sec. 2.3): L = L_LM + lambda * L_diffusion.

The LM loss is next-token cross-entropy averaged over text targets only (`lm_mask`); the
diffusion loss is the mean squared error of the noise (DDPM, cosine schedule with 1,000
steps) or velocity (rectified flow) prediction over the patches of real images only, with one
timestep and one noise draw per image. lambda = 5 (Sec. 4.1).
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mmjax.objectives.diffusion import add_noise, diffusion_loss, make_schedule

PROCESSES = ("ddpm", "flow")


def masked_token_ce(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting tokens[:, 1:] from logits[:, :-1] where mask[:, 1:]."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    weights = mask[:, 1:].astype(jnp.float32)
    return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def diffusion_time_input(t: jax.Array, process: str, num_train_steps: int) -> jax.Array:
    """What the model's timestep embedding sees: DDPM step index, or flow time x T."""
    return t.astype(jnp.float32) * (1.0 if process == "ddpm" else num_train_steps)


def make_transfusion_loss(
    apply_fn: Callable,
    *,
    process: str = "ddpm",
    schedule: str = "cosine",
    num_train_steps: int = 1000,
    diffusion_weight: float = 5.0,
    logit_normal: bool = False,
) -> Callable:
    """(params, batch, rng) -> (loss, metrics) for batches from mmjax.data.sequences."""
    if process not in PROCESSES:
        raise ValueError(f"unknown objective process {process!r}; valid: {PROCESSES}")
    sched = make_schedule(schedule, num_train_steps) if process == "ddpm" else None

    def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
        noise_rng, model_rng = jax.random.split(rng)
        images = batch["images"]
        b, m = images.shape[:2]
        noised = add_noise(
            noise_rng,
            images.reshape(b * m, *images.shape[2:]),
            process=process,
            schedule=sched,
            logit_normal=logit_normal,
        )
        timesteps = diffusion_time_input(noised.t.reshape(b, m), process, num_train_steps)
        inputs = {**batch, "images": noised.x_t.reshape(images.shape), "timesteps": timesteps}
        out = apply_fn(params, inputs, model_rng)
        lm = masked_token_ce(out["logits"], batch["tokens"], batch["lm_mask"])
        valid = jnp.broadcast_to(
            batch["image_valid"].reshape(b, m, 1, 1, 1).astype(jnp.float32), images.shape
        )
        diff, _ = diffusion_loss(out["image_pred"], noised.target.reshape(images.shape), valid)
        loss = lm + diffusion_weight * diff
        return loss, {"loss": loss, "lm_loss": lm, "diffusion_loss": diff}

    return loss_fn
