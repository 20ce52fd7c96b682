"""Transfusion's objective (Zhou et al., 2024, Sec. 2.3): L = L_LM + lambda * L_diffusion.

The LM loss is next-token cross-entropy averaged over text targets only (`lm_mask`); the
diffusion loss is the mean squared error of the noise (DDPM, cosine schedule with 1,000
steps) or velocity (rectified flow) prediction over the patches of real images only, with one
timestep and one noise draw per image. lambda = 5 (Sec. 4.1). Images laid out before their
caption (`image_first`) are noised only up to `image_first_max_level` of the schedule (t <= 500
of 1,000, the paper's "image noising" ablation, Sec. 4.3.4), so captioning learns from
recognisable images.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mmjax.objectives.diffusion import add_noise, diffusion_loss, make_schedule

PROCESSES = ("ddpm", "flow")


def text_targets(tokens: jax.Array, lm_mask: jax.Array, num_images: int, num_patches: int):
    """Where the LM head is needed: (positions [B, K], next tokens [B, K], weights [B, K]).

    Position i predicts token i + 1 where lm_mask[i + 1]. Inside an image only its last patch
    precedes a text token (<EOI>), so a row has at most K = L - 1 - M * (P - 1) targets; K is
    static and about half of L with a 16-patch image in 32 tokens."""
    length = tokens.shape[1]
    k = max(length - 1 - num_images * (num_patches - 1), 1)
    wanted = lm_mask[:, 1:] > 0
    positions = jax.vmap(lambda w: jnp.nonzero(w, size=k, fill_value=0)[0])(wanted)
    weights = jnp.take_along_axis(wanted, positions, axis=1) & (
        jnp.arange(k) < jnp.sum(wanted, axis=1, keepdims=True)
    )
    labels = jnp.take_along_axis(tokens[:, 1:], positions, axis=1)
    return positions, labels, weights.astype(jnp.float32)


def masked_token_ce(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted mean cross-entropy of `labels` [B, K] under `logits` [B, K, V]."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
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
    image_first_max_level: float = 0.5,
) -> Callable:
    """(params, batch, rng) -> (loss, metrics) for batches from mmjax.data.sequences."""
    if process not in PROCESSES:
        raise ValueError(f"unknown objective process {process!r}; valid: {PROCESSES}")
    sched = make_schedule(schedule, num_train_steps) if process == "ddpm" else None

    def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
        noise_rng, model_rng = jax.random.split(rng)
        images = batch["images"]
        b, m = images.shape[:2]
        image_first = batch.get("image_first", jnp.zeros((b, m)))
        max_level = jnp.where(image_first > 0, image_first_max_level, 1.0).reshape(b * m)
        noised = add_noise(
            noise_rng,
            images.reshape(b * m, *images.shape[2:]),
            process=process,
            schedule=sched,
            logit_normal=logit_normal,
            max_level=max_level,
        )
        timesteps = diffusion_time_input(noised.t.reshape(b, m), process, num_train_steps)
        positions, labels, weights = text_targets(
            batch["tokens"], batch["lm_mask"], m, batch["image_positions"].shape[-1]
        )
        inputs = {
            **batch,
            "images": noised.x_t.reshape(images.shape),
            "timesteps": timesteps,
            "logit_positions": positions,
        }
        out = apply_fn(params, inputs, model_rng)
        lm = masked_token_ce(out["logits"], labels, weights)
        valid = jnp.broadcast_to(
            batch["image_valid"].reshape(b, m, 1, 1, 1).astype(jnp.float32), images.shape
        )
        diff, _ = diffusion_loss(out["image_pred"], noised.target.reshape(images.shape), valid)
        loss = lm + diffusion_weight * diff
        return loss, {"loss": loss, "lm_loss": lm, "diffusion_loss": diff}

    return loss_fn
