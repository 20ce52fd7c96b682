"""Transfusion sampling (Zhou et al., 2024, Sec. 2.2 "Inference").

Text -> image: the prompt is followed by <BOI> and an image block of pure noise, denoised by
DDIM (250 steps by default) or DDPM, or Euler steps for a rectified-flow model, with
classifier-free guidance against the caption-less sequence <bos> <BOI> (scale 3 by default);
<EOI> closes the block. Image -> text: the clean image (timestep 0) in <bos> <BOI> ... <EOI>,
then greedy next-token decoding until <eos>.

Every step runs the decoder over the whole fixed-length sequence, which is exact (causal
attention makes later slots invisible to earlier ones).
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data.sequences import layout
from mmjax.errors import UserError
from mmjax.objectives.diffusion import Schedule
from mmjax.sampling.diffusion import cfg, ddim_sample, ddpm_sample, euler_sample

ApplyFn = Callable[[dict], dict]  # batch -> {"logits", "image_pred"}
SAMPLERS = ("ddim", "ddpm", "euler")


def image_prompts(
    captions: Sequence[Sequence[int]], tokenizer, num_patches: int, max_len: int
) -> dict[str, np.ndarray]:
    """Batch of `<bos> caption <BOI> [P slots] <EOI>` sequences for text -> image."""
    rows = []
    for ids in captions:
        seq = [tokenizer.bos_id, *ids, tokenizer.boi_id, *[tokenizer.pad_id] * num_patches]
        if len(seq) + 1 > max_len:
            raise UserError(
                f"a prompt of {len(ids)} tokens and an image of {num_patches} patches need "
                f"{len(seq) + 1} positions; the model's context is {max_len}"
            )
        markers = (tokenizer.boi_id, tokenizer.eoi_id)
        seq = [*seq, tokenizer.eoi_id]
        rows.append(layout(seq, [len(ids) + 2], num_patches, max_len, tokenizer.pad_id, markers))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def generate_images(
    apply_fn: ApplyFn,
    tokenizer,
    captions: Sequence[str],
    rng: jax.Array,
    *,
    image_shape: tuple[int, int, int],
    num_patches: int,
    max_len: int,
    schedule: Schedule | None,
    sampler: str = "ddim",
    num_steps: int = 250,
    cfg_scale: float = 3.0,
    num_train_steps: int = 1000,
    clip_x0: float | None = None,
) -> np.ndarray:
    """Images [N, H, W, C] for `captions`, with classifier-free guidance.

    `clip_x0` clips each step's predicted clean image to [-clip_x0, clip_x0] (pixel-space
    DDPM/DDIM on [-1, 1] images, Ho et al. 2020); None for latents.
    """
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; valid: {SAMPLERS}")
    n = len(captions)
    cond = image_prompts([tokenizer.encode(c) for c in captions], tokenizer, num_patches, max_len)
    uncond = image_prompts([[]] * n, tokenizer, num_patches, max_len)
    both = {k: jnp.concatenate([cond[k], uncond[k]]) for k in cond}

    def denoise(x_t: jax.Array, t: jax.Array) -> jax.Array:
        time = t.astype(jnp.float32) * (num_train_steps if sampler == "euler" else 1.0)
        batch = {
            **both,
            "images": jnp.concatenate([x_t, x_t])[:, None],
            "timesteps": jnp.concatenate([time, time])[:, None],
        }
        pred = apply_fn(batch)["image_pred"][:, 0]
        return cfg(pred[:n], pred[n:], cfg_scale)

    @jax.jit
    def run(rng: jax.Array) -> jax.Array:
        noise_rng, step_rng = jax.random.split(rng)
        x_T = jax.random.normal(noise_rng, (n, *image_shape), jnp.float32)
        if sampler == "euler":
            return euler_sample(denoise, x_T, num_steps=num_steps)
        if sampler == "ddpm":
            return ddpm_sample(
                denoise, x_T, step_rng, schedule, num_steps=num_steps, clip_x0=clip_x0
            )
        return ddim_sample(denoise, x_T, schedule, num_steps=num_steps, clip_x0=clip_x0)

    return np.asarray(run(rng))


def caption_images(
    apply_fn: ApplyFn, tokenizer, images: np.ndarray, *, num_patches: int, max_len: int
) -> list[str]:
    """Greedy captions of clean images [N, H, W, C]."""
    n = images.shape[0]
    start = num_patches + 3  # <bos> <BOI> patches <EOI>
    prefix = [tokenizer.bos_id, tokenizer.boi_id, *[tokenizer.pad_id] * num_patches]
    row = layout([*prefix, tokenizer.eoi_id], [2], num_patches, max_len, tokenizer.pad_id)
    batch = {k: jnp.broadcast_to(v, (n, *v.shape)) for k, v in row.items()}
    batch["segment_ids"] = jnp.ones_like(batch["segment_ids"])  # causal: later slots unseen
    batch["images"] = jnp.asarray(images, jnp.float32)[:, None]

    @jax.jit
    def run(batch: dict) -> jax.Array:
        def step(i, carry):
            tokens, done = carry
            logits = apply_fn({**batch, "tokens": tokens})["logits"]
            next_id = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, i - 1, 1, False), -1)
            next_id = jnp.where(done, tokenizer.pad_id, next_id).astype(tokens.dtype)
            tokens = jax.lax.dynamic_update_index_in_dim(tokens, next_id, i, 1)
            return tokens, done | (next_id == tokenizer.eos_id)

        done = jnp.zeros((n,), bool)
        return jax.lax.fori_loop(start, max_len, step, (batch["tokens"], done))[0]

    tokens = np.asarray(run(batch))
    return [tokenizer.decode(t[start:]) for t in tokens]
