"""UniFluid's objective (Fan et al., 2025, Sec. 3): L = L_text + w * L_image.

L_text is next-token cross-entropy over text targets (`lm_mask`): captions of understanding
rows, and prompts of generation rows. L_image is MAR's diffusion loss (Li et al., 2024, Sec.
3.2): each visual token x0 of a generation row is noised `diffusion_batch_mul` times (MAR: 4)
at uniform DDPM steps of a cosine schedule (1,000 steps), and the per-token head predicts the
noise given the decoder's output at the slot that predicts the token; the mean squared error
is averaged over the tokens of generation rows. The generation order is raster or a random
permutation per row (`order`, Sec. 3.1). Prompt dropout for classifier-free guidance (10%) is
the data layout's `caption_drop`.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mmjax.nn.patch_embed import patchify, unpatchify
from mmjax.objectives.diffusion import add_noise, diffusion_loss, make_schedule
from mmjax.objectives.transfusion import masked_token_ce, text_targets

ORDERS = ("raster", "random")


def patch_size_of(image_shape: tuple[int, ...], num_tokens: int) -> int:
    """The patch size p that cuts an (H, W, C) image into `num_tokens` p x p patches."""
    h, w = image_shape[:2]
    p = round((h * w / num_tokens) ** 0.5)
    if p < 1 or h % p or w % p or (h // p) * (w // p) != num_tokens:
        raise ValueError(f"an image of {h}x{w} does not split into {num_tokens} square patches")
    return p


def image_tokens(images: jax.Array, num_tokens: int) -> jax.Array:
    """Images [B, H, W, C] -> visual tokens [B, P, p * p * C] in raster order."""
    p = patch_size_of(images.shape[1:], num_tokens)
    return patchify(images, p)


def tokens_to_images(tokens: jax.Array, image_shape: tuple[int, int, int]) -> jax.Array:
    """Visual tokens [B, P, D] in raster order -> images [B, H, W, C]."""
    p = patch_size_of(image_shape, tokens.shape[1])
    return unpatchify(tokens, image_shape[0], p)


def generation_order(rng: jax.Array, batch: int, num_tokens: int, order: str) -> jax.Array:
    """[batch, P] raster indices in generation order: arange, or a random permutation per row."""
    if order not in ORDERS:
        raise ValueError(f"unknown generation order {order!r}; valid: {ORDERS}")
    if order == "raster":
        return jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens))
    return jnp.argsort(jax.random.uniform(rng, (batch, num_tokens)), axis=-1).astype(jnp.int32)


def unifluid_inputs(batch: Mapping[str, jax.Array], order: jax.Array) -> dict[str, jax.Array]:
    """A data-pipeline batch (one image a row, [B, 1, ...]) as the model's inputs: visual
    tokens in generation `order` [B, P] and the slots of the rows' one image."""
    images = batch["images"][:, 0]
    num_tokens = batch["image_positions"].shape[-1]
    tokens = jnp.take_along_axis(image_tokens(images, num_tokens), order[..., None], axis=1)
    inputs = {k: batch[k] for k in ("tokens", "positions", "segment_ids", "span_ids")}
    for key in ("image_positions", "query_positions", "feature_positions"):
        inputs[key] = batch[key][:, 0]
    inputs.update(visual_tokens=tokens, order=order)
    inputs["understand_images"] = batch["understand_images"][:, 0]
    return inputs


def make_unifluid_loss(
    apply_fn: Callable,
    *,
    image_weight: float = 1.0,
    schedule: str = "cosine",
    num_train_steps: int = 1000,
    diffusion_batch_mul: int = 4,
    order: str = "raster",
) -> Callable:
    """(params, batch, rng) -> (loss, metrics) for batches of data.sequence kind "unifluid"."""
    if order not in ORDERS:
        raise ValueError(f"unknown objective order {order!r}; valid: {ORDERS}")
    if diffusion_batch_mul < 1:
        raise ValueError(f"diffusion_batch_mul must be >= 1, got {diffusion_batch_mul}")
    sched = make_schedule(schedule, num_train_steps)

    def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
        order_rng, noise_rng, model_rng = jax.random.split(rng, 3)
        b, num_tokens = batch["image_positions"].shape[0], batch["image_positions"].shape[-1]
        inputs = unifluid_inputs(batch, generation_order(order_rng, b, num_tokens, order))
        x0 = jnp.repeat(inputs["visual_tokens"][:, :, None], diffusion_batch_mul, axis=2)
        flat = x0.reshape(-1, x0.shape[-1])  # one t and noise draw per copy (MAR)
        noised = add_noise(noise_rng, flat, process="ddpm", schedule=sched)
        num_features = batch["feature_positions"].shape[-1]
        positions, labels, weights = text_targets(
            batch["tokens"], batch["lm_mask"], 1, min(num_tokens, num_features) + 1
        )
        inputs.update(
            noised=noised.x_t.reshape(x0.shape),
            timesteps=noised.t.reshape(x0.shape[:-1]).astype(jnp.float32),
            logit_positions=positions,
        )
        out = apply_fn(params, inputs, model_rng)
        text = masked_token_ce(out["logits"], labels, weights)
        valid = jnp.broadcast_to(batch["image_valid"].reshape(b, 1, 1), x0.shape[:-1])
        image, _ = diffusion_loss(out["eps"], noised.target.reshape(x0.shape), valid)
        loss = text + image_weight * image
        return loss, {"loss": loss, "lm_loss": text, "diffusion_loss": image}

    return loss_fn
