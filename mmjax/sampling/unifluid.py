"""UniFluid sampling (Fan et al., 2025, Sec. 3), with a KV cache.

Text -> image: `<bos> prompt <BOI>` is encoded once into the cache; then each decoding step
feeds the m slots that predict the next m visual tokens (their known tokens and the target
positions, in raster or random order), and each predicted token is drawn by per-token reverse
diffusion through the head (MAR, Li et al., 2024, Sec. 3.3: DDPM with 100 steps, noise scaled
by `temperature`), with classifier-free guidance against the prompt-less `<bos> <BOI>` on the
predicted noise. Image -> text: `<bos> <BOI> [image features] <EOI>` is prefilled and text is
decoded greedily (temperature 0) or by nucleus (top-p) sampling, one cached token at a time.

`decoder` is the model built with `decode=True` (same parameters as the training model).
"""

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.data.sequences import unifluid_layout
from mmjax.errors import UserError
from mmjax.objectives.diffusion import Schedule, make_schedule
from mmjax.objectives.unifluid import ORDERS, generation_order, tokens_to_images
from mmjax.sampling.diffusion import cfg, ddpm_sample
from mmjax.sampling.sampler import SampleContext, Sampler, Settings
from mmjax.sampling.transfusion import TOKEN_KEYS, empty_cache, rows_slice, run_cached


def _rows(
    captions: Sequence[Sequence[int]], tokenizer, num_tokens: int, seq: ml_collections.ConfigDict
) -> dict[str, np.ndarray]:
    """Generation rows `<bos> caption <BOI> [slots] <EOI>` (layout errors are UserErrors)."""
    needed = num_tokens + int(seq.tokens_per_step) + 3
    rows = []
    for ids in captions:
        if len(ids) + needed > int(seq.max_len):
            raise UserError(
                f"a prompt of {len(ids)} tokens and an image of {num_tokens} tokens need "
                f"{len(ids) + needed} positions; the model's context is {seq.max_len}"
            )
        rows.append(unifluid_layout(list(ids), tokenizer, num_tokens, seq, generate=True))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def generate_images(
    decoder: nn.Module,
    params: Any,
    tokenizer,
    captions: Sequence[str],
    rng: jax.Array,
    *,
    image_shape: tuple[int, int, int],
    num_tokens: int,
    seq: ml_collections.ConfigDict,
    schedule: Schedule,
    order: str = "raster",
    num_steps: int = 100,
    temperature: float = 1.0,
    cfg_scale: float = 3.0,
    clip_x0: float | None = None,
) -> np.ndarray:
    """Images (or latents) [N, H, W, C] for `captions`, token by token with CFG.

    `seq` is the run's data.sequence (max_len, tokens_per_step: the tokens per decoding
    step); `order` raster or random (one permutation per image); `clip_x0` clips each token's
    predicted clean value (pixel space). Compiled once per decoder, batch size and settings.
    """
    if order not in ORDERS:
        raise UserError(f"unknown order {order!r}; valid: {ORDERS}")
    n = len(captions)
    cond = _rows([tokenizer.encode(c) for c in captions], tokenizer, num_tokens, seq)
    uncond = _rows([[]] * n, tokenizer, num_tokens, seq)
    both = {k: jnp.concatenate([cond[k], uncond[k]]) for k in (*TOKEN_KEYS, "query_positions")}
    settings = _Settings(
        num_tokens, int(seq.tokens_per_step), order, num_steps, temperature, cfg_scale, clip_x0
    )
    tokens = _generate(decoder, settings, params, both, schedule, rng)
    return np.asarray(tokens_to_images(tokens, tuple(image_shape)))


class _Settings(NamedTuple):
    num_tokens: int
    tokens_per_step: int
    order: str
    num_steps: int
    temperature: float
    cfg_scale: float
    clip_x0: float | None


def step_indices(step: int | jax.Array, tokens_per_step: int) -> tuple[jax.Array, jax.Array]:
    """Decoding step g's (known, queried) indices into the generation order, [m] each: the
    step feeds the tokens of step g - 1 (none at step 0: <BOI> and the start slots) and
    predicts tokens g m ... g m + m - 1."""
    m = tokens_per_step
    queried = step * m + jnp.arange(m)
    return jnp.maximum(queried - m, 0), queried


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(
    decoder: nn.Module,
    s: _Settings,
    params: Any,
    both: dict,
    schedule: Schedule,
    rng: jax.Array,
) -> jax.Array:
    """Visual tokens [N, P, D] in raster order."""
    two_n, m, p = both["tokens"].shape[0], s.tokens_per_step, s.num_tokens
    n = two_n // 2
    order_rng, rng = jax.random.split(rng)
    order = generation_order(order_rng, n, p, s.order)
    order2 = jnp.concatenate([order, order])
    boi = both["query_positions"][:, 0, 0]
    # Prompt prefill: causality makes the prompt's keys independent of the later slots.
    full = {**{k: both[k] for k in TOKEN_KEYS}, "cache_offset": 0}
    _, cache = run_cached(decoder, params, empty_cache(decoder, full), full)
    token_dim = decoder.token_dim
    arange = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), (two_n, m))

    def step(g: int, carry: tuple) -> tuple:
        values, cache = carry  # values [N, P, D] in generation order
        chunk = {k: rows_slice(both[k], boi + g * m, m) for k in TOKEN_KEYS}
        known, queried = step_indices(g, m)
        chunk["visual_tokens"] = jnp.concatenate([jnp.take(values, known, axis=1)] * 2)
        chunk["order"] = jnp.take(order2, known, axis=1)
        chunk["image_positions"] = jnp.where(g > 0, arange, m)  # step 0: <BOI> and start slots
        chunk["query_positions"] = arange
        chunk["query_order"] = jnp.take(order2, queried, axis=1)
        chunk["cache_offset"] = boi + g * m
        out, cache = run_cached(decoder, params, cache, chunk)
        z = out["z"].reshape(two_n * m, -1)  # cond rows first, then uncond

        def denoise(x_t: jax.Array, t: jax.Array) -> jax.Array:
            x2, t2 = jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]).astype(jnp.float32)
            eps = decoder.apply({"params": params}, x2, t2, z, method=decoder.denoise)
            return cfg(eps[: n * m], eps[n * m :], s.cfg_scale)

        step_rng = jax.random.fold_in(rng, g)
        x_T = jax.random.normal(jax.random.fold_in(step_rng, 0), (n * m, token_dim))
        new = ddpm_sample(
            denoise,
            x_T,
            jax.random.fold_in(step_rng, 1),
            schedule,
            num_steps=s.num_steps,
            temperature=s.temperature,
            clip_x0=s.clip_x0,
        )
        values = values.at[:, queried].set(new.reshape(n, m, -1))
        return values, cache

    values = jnp.zeros((n, p, token_dim), jnp.float32)
    values, _ = jax.lax.fori_loop(0, p // m, step, (values, cache))
    raster = jnp.zeros_like(values)
    return jax.vmap(lambda r, o, v: r.at[o].set(v))(raster, order, values)


def sample_token(rng: jax.Array, logits: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Next token ids [N] from logits [N, V]: greedy at temperature 0, else nucleus sampling
    (Holtzman et al., 2020) from the smallest set of tokens whose probability reaches top_p."""
    if temperature == 0.0:
        return jnp.argmax(logits, -1)
    logits = logits / temperature
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
    cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jax.random.categorical(rng, jnp.where(logits >= cutoff, logits, -jnp.inf), axis=-1)


def caption_images(
    decoder: nn.Module,
    params: Any,
    tokenizer,
    images: np.ndarray,
    *,
    num_tokens: int,
    seq: ml_collections.ConfigDict,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[str]:
    """Captions of clean images [N, H, W, C] (pixels, the ViT's input): greedy at temperature
    0, else top-p sampling with `rng`. Compiled once per decoder, shape and settings."""
    if temperature < 0.0 or not 0.0 < top_p <= 1.0:
        raise UserError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    n = images.shape[0]
    row = unifluid_layout([], tokenizer, num_tokens, seq, generate=False)
    start = num_tokens + 3  # <bos> <BOI> features <EOI>
    row["segment_ids"] = np.ones_like(row["segment_ids"])  # slots still to be decoded
    batch = {k: jnp.broadcast_to(row[k], (n, *row[k].shape)) for k in TOKEN_KEYS}
    batch["feature_positions"] = jnp.broadcast_to(row["feature_positions"][0], (n, num_tokens))
    batch["understand_images"] = jnp.asarray(images, jnp.float32)
    ids = (start, tokenizer.pad_id, tokenizer.eos_id, float(temperature), float(top_p))
    rng = jax.random.key(0) if rng is None else rng
    tokens = np.asarray(_caption(decoder, ids, params, batch, rng))
    return [tokenizer.decode(t[start:]) for t in tokens]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _caption(decoder: nn.Module, ids: tuple, params: Any, batch: dict, rng: jax.Array):
    start, pad_id, eos_id, temperature, top_p = ids
    n, max_len = batch["tokens"].shape
    cache = empty_cache(decoder, {k: batch[k] for k in TOKEN_KEYS} | {"cache_offset": 0})
    prompt = {k: batch[k][:, :start] for k in TOKEN_KEYS}
    prompt.update(
        understand_images=batch["understand_images"],
        feature_positions=batch["feature_positions"],
        cache_offset=0,
    )
    out, cache = run_cached(decoder, params, cache, prompt)
    tokens = batch["tokens"]
    first = sample_token(jax.random.fold_in(rng, start), out["logits"][:, -1], temperature, top_p)

    def step(i, carry):
        tokens, cache, next_id, done = carry
        next_id = jnp.where(done, pad_id, next_id).astype(tokens.dtype)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, next_id, i, 1)
        done = done | (next_id == eos_id)
        chunk = {k: jax.lax.dynamic_slice_in_dim(batch[k], i, 1, 1) for k in TOKEN_KEYS}
        chunk.update(tokens=next_id[:, None], cache_offset=jnp.full((n,), i))
        out, cache = run_cached(decoder, params, cache, chunk)
        logits = out["logits"][:, 0]
        return tokens, cache, sample_token(jax.random.fold_in(rng, i + 1), logits, *ids[3:]), done

    carry = (tokens, cache, first.astype(tokens.dtype), jnp.zeros((n,), bool))
    return jax.lax.fori_loop(start, max_len, step, carry)[0]


# UniFluid: per-token DDPM of the diffusion head, 100 steps, temperature 1, CFG scale 3,
# raster order unless the run trained another; captions greedy, or nucleus with top_p
DEFAULTS = dict(num_steps=100, temperature=1.0, cfg_scale=3.0, clip_x0=None, order="", top_p=None)


def _draw(ctx: SampleContext, prompts: Sequence[str], settings: Settings) -> np.ndarray:
    return generate_images(
        ctx.decoder,
        ctx.params,
        ctx.tokenizer,
        prompts,
        ctx.rng,
        image_shape=ctx.image_shape,
        num_tokens=ctx.num_patches,
        seq=ctx.seq,
        schedule=make_schedule(ctx.objective["schedule"], int(ctx.objective["num_train_steps"])),
        order=settings["order"] or ctx.objective.get("order", "raster"),
        num_steps=int(settings["num_steps"]),
        temperature=float(settings["temperature"]),
        cfg_scale=float(settings["cfg_scale"]),
        clip_x0=settings["clip_x0"],
    )


def _caption_pixels(ctx: SampleContext, pixels: np.ndarray, settings: Settings) -> list[str]:
    """Captions of pixel images, which UniFluid's ViT reads as they are."""
    top_p = settings["top_p"]
    return caption_images(
        ctx.decoder,
        ctx.params,
        ctx.tokenizer,
        pixels,
        num_tokens=ctx.num_patches,
        seq=ctx.seq,
        rng=ctx.rng,
        temperature=0.0 if top_p is None else 1.0,
        top_p=1.0 if top_p is None else float(top_p),
    )


SAMPLER = Sampler(DEFAULTS, _draw, _caption_pixels)
