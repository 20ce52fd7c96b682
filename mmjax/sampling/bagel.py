"""BAGEL sampling (official `Bagel.generate_image`, `InterleaveInferencer`), with a KV cache.

Generation: each context (the prompt, and for guidance the same prompt without its text and
without its images) is prefilled once into the cache; every Euler step of the rectified flow
(t from 1 to 0, timestep-shifted) runs only the target image's latent tokens against the
three caches as one batch, and the velocities are combined by the official two-scale
classifier-free guidance:

  v_text = v_no_text + s_text (v - v_no_text);  v_img = v_no_image + s_img (v_text - v_no_image)

applied only for t in (interval[0], interval[1]], then renormalised to at most the
conditional velocity's norm (`renorm_type` "global": over the whole image; "channel": per
token; "text_channel": the text-guided velocity per token, before the image guidance), the
ratio floored at `renorm_min`. Understanding: greedy decoding after the ViT tokens of the image.
"""

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data.bagel_tasks import Part, bagel_row, caption_parts, edit_parts, t2i_parts
from mmjax.errors import UserError
from mmjax.objectives.bagel import shift_times
from mmjax.sampling.sampler import SampleContext, Sampler, Settings
from mmjax.sampling.transfusion import (
    TOKEN_KEYS,
    decode_greedily,
    empty_cache,
    rows_slice,
    run_cached,
)

RENORM_TYPES = ("global", "channel", "text_channel")


class FlowSettings(NamedTuple):
    """The official inference knobs (defaults: text -> image in `app.py`)."""

    num_steps: int = 50
    timestep_shift: float = 3.0
    text_scale: float = 4.0
    image_scale: float = 1.0  # editing: 2.0
    interval: tuple[float, float] = (0.4, 1.0)  # editing: (0.0, 1.0)
    renorm_min: float = 0.0
    renorm_type: str = "global"  # editing: text_channel


def guide(v: jax.Array, v_no_text: jax.Array, v_no_image: jax.Array | None, s: FlowSettings):
    """The guided velocity of latent tokens [N, P, D] (module docstring)."""
    if s.renorm_type not in RENORM_TYPES:
        raise UserError(f"unknown renorm_type {s.renorm_type!r}; valid: {RENORM_TYPES}")

    def renorm(guided: jax.Array, reference: jax.Array, axes: tuple[int, ...]) -> jax.Array:
        ratio = jnp.linalg.norm(reference, axis=axes, keepdims=True) / (
            jnp.linalg.norm(guided, axis=axes, keepdims=True) + 1e-8
        )
        return guided * jnp.clip(ratio, s.renorm_min, 1.0)

    text = v_no_text + s.text_scale * (v - v_no_text)
    if s.renorm_type == "text_channel":
        text = renorm(text, v, (-1,))
    out = text
    if v_no_image is not None and s.image_scale > 1.0:
        out = v_no_image + s.image_scale * (text - v_no_image)
    if s.renorm_type == "global":
        out = renorm(out, v, (1, 2))
    elif s.renorm_type == "channel":
        out = renorm(out, v, (-1,))
    return out


def stack_rows(rows: Sequence[dict]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def generate(
    decoder: Any,
    params: Any,
    contexts: Sequence[Sequence[dict]],
    rng: jax.Array,
    *,
    image_shape: tuple[int, int, int],
    settings: FlowSettings,
    encode: Any = None,
) -> np.ndarray:
    """Latents [N, h, w, c] for N prompts, each given as its rows (`bagel_row` arrays ending
    with the image to generate): contexts[0] the prompts, contexts[1] without their text,
    optionally contexts[2] without their images; `encode` maps their pixel `images` to latents
    (a frozen VAE's). Compiled once per shapes and settings."""
    batch = stack_rows([row for rows in contexts for row in rows])
    if encode is not None:
        batch["images"] = encode(batch["images"])
    n = len(contexts[0])
    return np.asarray(
        _generate(decoder, tuple(image_shape), settings, len(contexts), params, batch, rng)
    )[:n]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _generate(decoder, image_shape, s: FlowSettings, groups: int, params, batch, rng):
    total = batch["tokens"].shape[0]
    n = total // groups
    # the target is each row's last latent image: the noised one
    target = jnp.argmax(batch["image_noised"], axis=1)
    positions = jnp.take_along_axis(batch["image_positions"], target[:, None, None], 1)[:, 0]
    starts, p = positions[:, 0], positions.shape[-1]
    block = {k: rows_slice(batch[k], starts, p) for k in TOKEN_KEYS}
    block.update(
        image_positions=jnp.broadcast_to(jnp.arange(p), (total, 1, p)), cache_offset=starts
    )
    full = {**batch, "cache_offset": 0, "timesteps": jnp.zeros(batch["image_valid"].shape)}
    _, cache = run_cached(decoder, params, empty_cache(decoder, full), full)
    times = jnp.asarray(shift_times(np.linspace(1.0, 0.0, s.num_steps + 1), s.timestep_shift))

    def step(i: int, x: jax.Array) -> jax.Array:
        t = times[i]
        chunk = {**block, "images": jnp.tile(x, (groups, 1, 1, 1))[:, None],
                 "timesteps": jnp.full((total, 1), t)}  # fmt: skip
        v = run_cached(decoder, params, cache, chunk)[0]["velocity"][:, 0]
        tokens = v.reshape(groups, n, -1, v.shape[-1])
        guided = guide(tokens[0], tokens[1], tokens[2] if groups > 2 else None, s)
        inside = (t > s.interval[0]) & (t <= s.interval[1])
        v = jnp.where(inside, guided, tokens[0]).reshape(x.shape)
        return x + (times[i + 1] - t) * v

    x_1 = jax.random.normal(rng, (n, *image_shape), jnp.float32)
    return jax.lax.fori_loop(0, s.num_steps, step, x_1)


def t2i_contexts(tokenizer, captions: Sequence[str], seq, image_size: int) -> list[list[dict]]:
    """The rows of text -> image prompts and of their text-free counterparts."""
    blank = np.zeros((image_size, image_size, int(seq.channels)), np.float32)
    rows = [
        [bagel_row(t2i_parts(ids, blank, tokenizer), tokenizer, seq, image_size) for ids in texts]
        for texts in ([tokenizer.encode(c) for c in captions], [[] for _ in captions])
    ]
    return rows


def edit_contexts(
    tokenizer, sources: np.ndarray, instructions: Sequence[str], seq
) -> list[list[dict]]:
    """Rows of edit prompts (source pixels [N, S, S, C]), without the instruction, and without
    the source image."""
    if sources is None:
        raise UserError("an edit needs a source image: pass the image to edit (--edit IMAGE)")
    if len(sources) != len(instructions):
        raise UserError(f"{len(sources)} source images but {len(instructions)} edit instructions")
    size = sources.shape[1]
    blank = np.zeros_like(sources[0])

    def rows(text: bool, images: bool) -> list[dict]:
        return [
            bagel_row(
                edit_parts(
                    src,
                    tokenizer.encode(ins) if text else [],
                    blank,
                    tokenizer,
                    vit=images,
                    vae=images,
                ),
                tokenizer,
                seq,
                size,
            )
            for src, ins in zip(sources, instructions, strict=True)
        ]

    return [rows(True, True), rows(False, True), rows(True, False)]


def caption_images(
    decoder, params, tokenizer, pixels: np.ndarray, seq, prompt: str = ""
) -> list[str]:
    """Greedy text after the ViT tokens of each image [N, S, S, C] (and `prompt`, e.g. a
    question): captions, or answers."""
    size = pixels.shape[1]
    rows = [
        bagel_row(
            caption_parts(px, [], tokenizer) + _question(tokenizer, prompt), tokenizer, seq, size
        )
        for px in pixels
    ]
    batch = stack_rows(rows)
    start = int(np.sum(rows[0]["segment_ids"]))
    last = int(rows[0]["positions"][start - 1])
    max_len = batch["tokens"].shape[1]
    if start >= max_len:
        raise UserError(
            f"the prompt takes {start} of the model's {max_len} positions: no room to answer"
        )
    later = last + 1 + np.arange(max_len - start)
    batch["positions"] = batch["positions"].at[:, start:].set(later)
    batch["segment_ids"] = jnp.ones_like(batch["segment_ids"])  # slots still to be decoded
    for key in ("lm_mask", "images", "image_positions", "image_valid", "image_noised"):
        del batch[key]  # no latent images: the ViT reads the pixels
    tokens = np.asarray(
        decode_greedily(decoder, (start, tokenizer.pad_id, tokenizer.eos_id), params, batch)
    )
    return [tokenizer.decode(t[start:]) for t in tokens]


def _question(tokenizer, prompt: str) -> list:
    return [Part("text", tuple(tokenizer.encode(prompt)))] if prompt else []


# The official app's text -> image defaults, and its editing overrides (`edit_image`)
DEFAULTS = dict(FlowSettings()._asdict())
EDIT_DEFAULTS = dict(image_scale=2.0, interval=(0.0, 1.0), renorm_type="text_channel")


def flow_settings(settings: Settings, edit: bool = False) -> FlowSettings:
    """FlowSettings from sampler settings (a run's eval config, the command line); editing
    takes the official editing defaults for the keys the settings leave at text -> image's."""
    values = {k: settings.get(k, v) for k, v in DEFAULTS.items()}
    if edit:
        values |= {k: v for k, v in EDIT_DEFAULTS.items() if values[k] == DEFAULTS[k]}
    values["interval"] = tuple(float(x) for x in values["interval"])
    return FlowSettings(**values)


def _draw(ctx: SampleContext, prompts: Sequence[str], settings: Settings) -> np.ndarray:
    size = ctx.image_shape[0] * ctx.latents.autoencoder.downsample_factor
    contexts = t2i_contexts(ctx.tokenizer, prompts, ctx.seq, size)
    return generate(ctx.decoder, ctx.params, contexts, ctx.rng, image_shape=ctx.image_shape,
                    settings=flow_settings(settings), encode=_encoder(ctx))  # fmt: skip


def _edit(ctx: SampleContext, pixels: np.ndarray, instructions: Sequence[str], settings: Settings):
    contexts = edit_contexts(ctx.tokenizer, pixels, instructions, ctx.seq)
    return generate(ctx.decoder, ctx.params, contexts, ctx.rng, image_shape=ctx.image_shape,
                    settings=flow_settings(settings, edit=True), encode=_encoder(ctx))  # fmt: skip


def _caption(ctx: SampleContext, pixels: np.ndarray, settings: Settings) -> list[str]:
    del settings
    return caption_images(ctx.decoder, ctx.params, ctx.tokenizer, pixels, ctx.seq)


def _encoder(ctx: SampleContext):
    return jax.jit(lambda x: ctx.latents.encode(x, ctx.rng))


SAMPLER = Sampler(DEFAULTS, _draw, _caption, _edit)
