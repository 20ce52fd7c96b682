"""BLIP3-o's sampling: the backbone reads each prompt once, the DiT integrates the flow.

Official `sample_images`: the condition (the backbone's hidden states at the queries) and a
zero condition run as one batch; sigmas fall linearly from 1 over `num_steps` Euler steps
(official 30) to 0, and the prediction is guided as v_u + scale (v_c - v_u) (official 3).
The MSE design has no sampler: its one prediction from zeros at sigma 1 is the target.
Captions come from the backbone VLM itself (`backbone_decoder`), greedily.
"""

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data.blip3o_rows import blip3o_prompt
from mmjax.data.vlm_tasks import CAPTION_PROMPTS
from mmjax.errors import UserError
from mmjax.models.blip3o import Blip3o
from mmjax.sampling.sampler import SampleContext, Sampler, Settings
from mmjax.sampling.vlm import generate as vlm_generate


class FlowSettings(NamedTuple):
    """The official defaults: 30 Euler steps, guidance 3; `target` the objective's."""

    num_steps: int = 30
    cfg_scale: float = 3.0
    target: str = "flow"


def prompt_rows(tokenizer: Any, captions: Sequence[str], seq: Any) -> dict[str, jax.Array]:
    """The prompt arrays of `captions` (data/blip3o_rows.py), stacked."""
    rows = [blip3o_prompt(tokenizer.encode(c), tokenizer, seq) for c in captions]
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def generate(
    model: Blip3o, params: Any, prompts: dict, rng: jax.Array, settings: FlowSettings
) -> np.ndarray:
    """Generated grids [N, h, w, c] (CLIP features or latents) for prompt rows `prompts`."""
    if settings.num_steps < 1:
        raise UserError(f"num_steps must be >= 1, got {settings.num_steps}")
    return np.asarray(_generate(model, settings, params, prompts, rng))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(model: Blip3o, s: FlowSettings, params: Any, prompts: dict, rng: jax.Array):
    variables = {"params": params}
    cond = model.apply(variables, prompts, method=Blip3o.condition)
    n = cond.shape[0]
    shape = (n, *model.image_shape)
    noise = jax.random.normal(rng, shape, jnp.float32)
    if s.target == "mse":  # the regression design: one prediction from noise at sigma 1
        return model.apply(variables, noise, jnp.ones((n,)), cond, method=Blip3o.predict)
    both = jnp.concatenate([cond, jnp.zeros_like(cond)])
    sigmas = jnp.linspace(1.0, 0.0, s.num_steps + 1)

    def step(i: int, x: jax.Array) -> jax.Array:
        sigma = jnp.full((2 * n,), sigmas[i])
        v = model.apply(variables, jnp.concatenate([x, x]), sigma, both, method=Blip3o.predict)
        v_c, v_u = v[:n], v[n:]
        return x + (sigmas[i + 1] - sigmas[i]) * (v_u + s.cfg_scale * (v_c - v_u))

    return jax.lax.fori_loop(0, s.num_steps, step, noise)


def caption_with_backbone(
    model: Blip3o, params: Any, tokenizer: Any, pixels: np.ndarray, prompt: str, max_new: int
) -> list[str]:
    """The backbone VLM's greedy answers to `prompt` about each image [N, H, W, C] (prefix
    mode: the image's visual tokens lead, as it was trained)."""
    if model.backbone.get("name", "vlm") != "vlm":
        raise UserError(
            f"captioning runs a vlm backbone; this one is {model.backbone['name']!r}: caption "
            "with its own workdir (init_from.path) through python -m mmjax.chat"
        )
    if not model.backbone_visual_tokens:
        raise UserError("this model's backbone was built text-only: it has no vision to caption")
    decoder = model.backbone_model(decode=True)
    ids = [tokenizer.image_id] * model.backbone_visual_tokens + tokenizer.encode(prompt)
    out = vlm_generate(
        decoder, params["backbone"], pixels, [ids] * len(pixels), image_id=tokenizer.image_id,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, max_new_tokens=max_new,
    )  # fmt: skip
    return [tokenizer.decode(row) for row in out]


def flow_settings(settings: Settings, objective: Settings) -> FlowSettings:
    defaults = FlowSettings(target=objective.get("target", "flow"))._asdict()
    return FlowSettings(**{k: settings.get(k, v) for k, v in defaults.items()})


def _draw(ctx: SampleContext, prompts: Sequence[str], settings: Settings) -> np.ndarray:
    rows = prompt_rows(ctx.tokenizer, prompts, ctx.seq)
    return generate(ctx.decoder, ctx.params, rows, ctx.rng, flow_settings(settings, ctx.objective))


def _caption(ctx: SampleContext, pixels: np.ndarray, settings: Settings) -> list[str]:
    prompt = settings.get("caption_prompt", CAPTION_PROMPTS[0])
    max_new = int(settings.get("max_new_tokens", 32))
    return caption_with_backbone(ctx.decoder, ctx.params, ctx.tokenizer, pixels, prompt, max_new)


SAMPLER = Sampler(FlowSettings()._asdict(), _draw, _caption)
