"""VLM answers (mmjax.models.vlm): greedy or nucleus decoding with a KV cache.

A prompt is token ids holding the image placeholders `image_id`: in prefix mode its V slots
for the visual tokens, in flamingo mode one marker per media (a token attends to the image
of the latest marker at or before it). Prompts are left-padded to the longest (padding is
segment 0, and positions count from each prompt's first token), so that all rows are
prefilled in one call and decode in step, one cached token at a time, until every row has
produced `eos_id` or `max_new_tokens`.

`decoder` is the model built with `decode=True` (same parameters as the training model).
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.errors import UserError
from mmjax.sampling.transfusion import empty_cache, run_cached
from mmjax.sampling.unifluid import sample_token


def prompt_batch(
    prompts: Sequence[Sequence[int]], *, mode: str, image_id: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Left-padded `tokens`, `segment_ids`, `positions` [N, P] and `visual_positions` [N, V]
    (prefix: where each prompt holds `image_id`) or `media_ids` [N, P] (flamingo: how many
    `image_id` markers are at or before each token)."""
    if not prompts or not all(len(p) for p in prompts):
        raise UserError("generation needs at least one prompt, and no empty ones")
    length = max(len(p) for p in prompts)
    rows = []
    for ids in prompts:
        ids = np.asarray(ids, np.int32)
        pad = length - len(ids)
        row = {
            "tokens": np.pad(ids, (pad, 0), constant_values=pad_id),
            "segment_ids": np.pad(np.ones_like(ids), (pad, 0)),
            "positions": np.pad(np.arange(len(ids), dtype=np.int32), (pad, 0)),
        }
        if mode == "prefix":
            row["visual_positions"] = pad + np.flatnonzero(ids == image_id).astype(np.int32)
        else:
            row["media_ids"] = np.pad(np.cumsum(ids == image_id, dtype=np.int32), (pad, 0))
        rows.append(row)
    if mode == "prefix" and len({len(r["visual_positions"]) for r in rows}) != 1:
        counts = sorted({len(r["visual_positions"]) for r in rows})
        raise UserError(f"prompts hold different numbers of image slots {counts}; need the same V")
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def generate(
    decoder: nn.Module,
    params: Any,
    images: np.ndarray,
    prompts: Sequence[Sequence[int]],
    *,
    image_id: int,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> np.ndarray:
    """Answer ids [N, max_new_tokens] to `prompts` about `images` ([N, H, W, C] in prefix
    mode, [N, M, H, W, C] in flamingo mode): greedy at temperature 0, else top-p sampling with
    `rng`; each row ends at its first `eos_id` (kept), then `pad_id`. Compiled once per
    decoder, shapes, max_new_tokens and temperature."""
    batch = prompt_batch(prompts, mode=decoder.mode, image_id=image_id, pad_id=pad_id)
    batch["images"] = np.asarray(images, np.float32)
    return generate_batch(
        decoder,
        params,
        batch,
        eos_id=eos_id,
        pad_id=pad_id,
        max_new_tokens=max_new_tokens,
        rng=rng,
        temperature=temperature,
        top_p=top_p,
    )


def generate_batch(
    decoder: nn.Module,
    params: Any,
    batch: dict[str, np.ndarray],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> np.ndarray:
    """`generate` for a prompt batch already laid out: left-padded `tokens`, `segment_ids`,
    `positions` ([N, P], or M-RoPE's [N, 3, P]) and the model's visual inputs (any other
    keys, fed with the prompt only). Decoded token t sits at the prompt's largest position
    + 1 + t (M-RoPE: on all three axes, the rope delta)."""
    if not decoder.decode:
        raise UserError("generate needs the model built with decode=True")
    if temperature < 0.0 or not 0.0 < top_p <= 1.0:
        raise UserError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    knobs = dict(
        eos_id=jnp.int32(eos_id),
        pad_id=jnp.int32(pad_id),
        top_p=jnp.float32(top_p),
    )
    rng = jax.random.key(0) if rng is None else rng
    temperature = float(temperature)
    return np.asarray(_generate(decoder, max_new_tokens, temperature, params, batch, knobs, rng))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _generate(
    decoder: nn.Module,
    steps: int,
    temperature: float,
    params: Any,
    prompt: dict,
    knobs: dict,
    rng: jax.Array,
) -> jax.Array:
    """Compiled once per decoder, shapes, length and temperature; `knobs` are traced."""

    def sample(t: jax.Array, logits: jax.Array) -> jax.Array:
        return sample_token(jax.random.fold_in(rng, t), logits, temperature, knobs["top_p"])

    n, length = prompt["tokens"].shape
    # Decoded token t sits at slot length + t, one position after the prompt's largest (the
    # last token's, or M-RoPE's largest id of any axis), in segment 1 and (flamingo)
    # attending to the prompt's last media.
    positions = prompt["positions"]
    after = positions.reshape(n, -1).max(axis=1)[:, None] + 1 + jnp.arange(steps)
    if positions.ndim == 3:  # M-RoPE [N, 3, P]: the same id on every axis
        after = jnp.broadcast_to(after[:, None], (n, positions.shape[1], steps))
    step = {"positions": after, "segment_ids": jnp.ones((n, steps), jnp.int32)}
    if "media_ids" in prompt:
        step["media_ids"] = jnp.broadcast_to(prompt["media_ids"][:, -1:], (n, steps))
    full = {k: jnp.concatenate([prompt[k], step[k]], -1) for k in step}
    full["tokens"] = jnp.pad(prompt["tokens"], ((0, 0), (0, steps)))
    full.update({k: v for k, v in prompt.items() if k not in full})  # the visual inputs
    cache = empty_cache(decoder, {**full, "cache_offset": 0})
    out, cache = run_cached(decoder, params, cache, {**prompt, "cache_offset": 0})
    first = sample(0, out["logits"][:, -1])

    def unfinished(carry: tuple) -> jax.Array:
        t, _, _, _, done = carry
        return (t < steps) & ~jnp.all(done)

    def decode_one(carry: tuple) -> tuple:
        t, answer, cache, next_id, done = carry
        next_id = jnp.where(done, knobs["pad_id"], next_id).astype(answer.dtype)
        answer = answer.at[:, t].set(next_id)
        done = done | (next_id == knobs["eos_id"])
        chunk = {k: jax.lax.dynamic_slice_in_dim(step[k], t, 1, -1) for k in step}
        chunk.update(tokens=next_id[:, None], cache_offset=jnp.full((n,), length + t))
        out, cache = run_cached(decoder, params, cache, chunk)
        return t + 1, answer, cache, sample(t + 1, out["logits"][:, 0]), done

    answer = jnp.full((n, steps), knobs["pad_id"], prompt["tokens"].dtype)
    carry = (jnp.int32(0), answer, cache, first.astype(answer.dtype), jnp.zeros((n,), bool))
    return jax.lax.while_loop(unfinished, decode_one, carry)[1]
