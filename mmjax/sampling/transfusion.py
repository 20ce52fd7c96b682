"""Transfusion sampling (Zhou et al., 2024, Sec. 2.2 "Inference"), with a KV cache.

Text -> image: the prompt is followed by <BOI> and an image block of pure noise, denoised by
DDIM (250 steps by default) or DDPM, or Euler steps for a rectified-flow model, with
classifier-free guidance against the caption-less sequence <bos> <BOI> (scale 3 by default);
<EOI> closes the block. The prompt is encoded once into the cache; each denoising step runs
only the image block against it. Image -> text: the clean image (timestep 0) in
<bos> <BOI> ... <EOI> is prefilled, then text is decoded greedily one cached token at a time
until <eos>.

`decoder` is the model built with `decode=True` (same parameters as the training model).
"""

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data.sequences import layout
from mmjax.errors import UserError
from mmjax.objectives.diffusion import Schedule, make_schedule
from mmjax.sampling.diffusion import cfg, ddim_sample, ddpm_sample, euler_sample
from mmjax.sampling.sampler import SampleContext, Sampler, Settings

SAMPLERS = ("ddim", "ddpm", "euler")
TOKEN_KEYS = ("tokens", "positions", "segment_ids", "span_ids")


def image_prompts(
    captions: Sequence[Sequence[int]], tokenizer, num_patches: int, max_len: int
) -> dict[str, np.ndarray]:
    """Batch of `<bos> caption <BOI> [P slots] <EOI>` sequences for text -> image."""
    rows = []
    markers = (tokenizer.boi_id, tokenizer.eoi_id)
    for ids in captions:
        seq = [tokenizer.bos_id, *ids, tokenizer.boi_id, *[tokenizer.pad_id] * num_patches]
        seq.append(tokenizer.eoi_id)
        if len(seq) > max_len:
            raise UserError(
                f"a prompt of {len(ids)} tokens and an image of {num_patches} patches need "
                f"{len(seq)} positions; the model's context is {max_len}"
            )
        rows.append(layout(seq, [len(ids) + 2], num_patches, max_len, tokenizer.pad_id, markers))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def empty_cache(decoder: nn.Module, batch: dict) -> Any:
    """Zeros shaped as the cache `decoder` keeps for full-length `batch`es."""
    shapes = jax.eval_shape(decoder.init, jax.random.key(0), batch)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def run_cached(decoder: nn.Module, params: Any, cache: Any, chunk: dict) -> tuple[dict, Any]:
    """`chunk` through the KV-cached `decoder`: (outputs, the updated cache)."""
    out, state = decoder.apply({"params": params, "cache": cache}, chunk, mutable=["cache"])
    return out, state["cache"]


def rows_slice(x: jax.Array, starts: jax.Array, size: int) -> jax.Array:
    """Per row b: x[b, starts[b] : starts[b] + size]."""
    return jax.vmap(lambda r, s: jax.lax.dynamic_slice_in_dim(r, s, size, 0))(x, starts)


def generate_images(
    decoder: nn.Module,
    params: Any,
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
    DDPM/DDIM on [-1, 1] images, Ho et al. 2020); None for latents. Compiled once per
    decoder, batch size and settings.
    """
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; valid: {SAMPLERS}")
    n = len(captions)
    cond = image_prompts([tokenizer.encode(c) for c in captions], tokenizer, num_patches, max_len)
    uncond = image_prompts([[]] * n, tokenizer, num_patches, max_len)
    both = {k: jnp.concatenate([cond[k], uncond[k]]) for k in cond}
    settings = _Settings(
        tuple(image_shape), num_patches, sampler, num_steps, cfg_scale, num_train_steps, clip_x0
    )
    return np.asarray(_generate(decoder, settings, params, both, schedule, rng))


class _Settings(NamedTuple):
    image_shape: tuple[int, int, int]
    num_patches: int
    sampler: str
    num_steps: int
    cfg_scale: float
    num_train_steps: int
    clip_x0: float | None


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(
    decoder: nn.Module, s: _Settings, params: Any, both: dict, schedule: Any, rng: jax.Array
) -> jax.Array:
    n = both["tokens"].shape[0] // 2
    starts = both["image_positions"][:, 0, 0]
    block = {k: rows_slice(both[k], starts, s.num_patches) for k in TOKEN_KEYS}
    block["image_positions"] = jnp.broadcast_to(
        jnp.arange(s.num_patches), (2 * n, 1, s.num_patches)
    )
    block["cache_offset"] = starts
    # Prompt prefill: causality makes the prompt's keys independent of the image slots.
    full = {**both, "images": jnp.zeros((2 * n, 1, *s.image_shape)), "cache_offset": 0}
    _, cache = run_cached(decoder, params, empty_cache(decoder, full), full)

    def denoise(x_t: jax.Array, t: jax.Array) -> jax.Array:
        time = t.astype(jnp.float32) * (s.num_train_steps if s.sampler == "euler" else 1.0)
        chunk = {
            **block,
            "images": jnp.concatenate([x_t, x_t])[:, None],
            "timesteps": jnp.concatenate([time, time])[:, None],
        }
        pred = run_cached(decoder, params, cache, chunk)[0]["image_pred"][:, 0]
        return cfg(pred[:n], pred[n:], s.cfg_scale)

    noise_rng, step_rng = jax.random.split(rng)
    x_T = jax.random.normal(noise_rng, (n, *s.image_shape), jnp.float32)
    if s.sampler == "euler":
        return euler_sample(denoise, x_T, num_steps=s.num_steps)
    if s.sampler == "ddpm":
        return ddpm_sample(
            denoise, x_T, step_rng, schedule, num_steps=s.num_steps, clip_x0=s.clip_x0
        )
    return ddim_sample(denoise, x_T, schedule, num_steps=s.num_steps, clip_x0=s.clip_x0)


def caption_images(
    decoder: nn.Module,
    params: Any,
    tokenizer,
    images: np.ndarray,
    *,
    num_patches: int,
    max_len: int,
) -> list[str]:
    """Greedy captions of clean images [N, H, W, C]. Compiled once per decoder and shape."""
    n = images.shape[0]
    start = num_patches + 3  # <bos> <BOI> patches <EOI>
    prefix = [tokenizer.bos_id, tokenizer.boi_id, *[tokenizer.pad_id] * num_patches]
    markers = (tokenizer.boi_id, tokenizer.eoi_id)
    row = layout([*prefix, tokenizer.eoi_id], [2], num_patches, max_len, tokenizer.pad_id, markers)
    row["segment_ids"] = np.ones_like(row["segment_ids"])  # slots still to be decoded
    batch = {k: jnp.broadcast_to(v, (n, *v.shape)) for k, v in row.items()}
    batch["images"] = jnp.asarray(images, jnp.float32)[:, None]
    ids = (start, tokenizer.pad_id, tokenizer.eos_id)
    tokens = np.asarray(decode_greedily(decoder, ids, params, batch))
    return [tokenizer.decode(t[start:]) for t in tokens]


@functools.partial(jax.jit, static_argnums=(0, 1))
def decode_greedily(decoder: nn.Module, ids: tuple[int, int, int], params: Any, batch: dict):
    """Greedy text after a prompt of `start` tokens, `ids` = (start, pad_id, eos_id): `batch`
    holds full-length rows whose TOKEN_KEYS give the later slots' positions and ids, and the
    prompt's images (any other keys, passed to the prefill as they are). Returns the tokens."""
    start, pad_id, eos_id = ids
    n, max_len = batch["tokens"].shape
    cache = empty_cache(decoder, {**batch, "cache_offset": 0})
    prompt = {k: batch[k][:, :start] if k in TOKEN_KEYS else v for k, v in batch.items()}
    out, cache = run_cached(decoder, params, cache, {**prompt, "cache_offset": 0})
    tokens = batch["tokens"]
    first = jnp.argmax(out["logits"][:, -1], -1).astype(tokens.dtype)

    def step(i, carry):
        tokens, cache, next_id, done = carry
        next_id = jnp.where(done, pad_id, next_id).astype(tokens.dtype)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, next_id, i, 1)
        done = done | (next_id == eos_id)
        chunk = {k: jax.lax.dynamic_slice_in_dim(batch[k], i, 1, 1) for k in TOKEN_KEYS}
        chunk.update(tokens=next_id[:, None], cache_offset=jnp.full((n,), i))
        out, cache = run_cached(decoder, params, cache, chunk)
        return tokens, cache, jnp.argmax(out["logits"][:, 0], -1), done

    carry = (tokens, cache, first, jnp.zeros((n,), bool))
    return jax.lax.fori_loop(start, max_len, step, carry)[0]


# Transfusion Sec. 4.1: DDIM with 250 steps and a CFG scale of 3 (euler: rectified flow)
DEFAULTS = dict(sampler="ddim", num_steps=250, cfg_scale=3.0, clip_x0=None)


def _draw(ctx: SampleContext, prompts: Sequence[str], settings: Settings) -> np.ndarray:
    schedule = None
    num_train_steps = int(ctx.objective.get("num_train_steps", 1000))
    if settings["sampler"] != "euler":
        schedule = make_schedule(ctx.objective.get("schedule", "cosine"), num_train_steps)
    return generate_images(
        ctx.decoder,
        ctx.params,
        ctx.tokenizer,
        prompts,
        ctx.rng,
        image_shape=ctx.image_shape,
        num_patches=ctx.num_patches,
        max_len=int(ctx.seq.max_len),
        schedule=schedule,
        sampler=settings["sampler"],
        num_steps=int(settings["num_steps"]),
        cfg_scale=float(settings["cfg_scale"]),
        num_train_steps=num_train_steps,
        clip_x0=settings["clip_x0"],
    )


def _caption_pixels(ctx: SampleContext, pixels: np.ndarray, settings: Settings) -> list[str]:
    """Captions of pixel images: the model reads their latents."""
    latents = jax.jit(lambda x: ctx.latents.encode(x, ctx.rng))(pixels)
    return caption_images(
        ctx.decoder,
        ctx.params,
        ctx.tokenizer,
        latents,
        num_patches=ctx.num_patches,
        max_len=int(ctx.seq.max_len),
    )


SAMPLER = Sampler(DEFAULTS, _draw, _caption_pixels)
