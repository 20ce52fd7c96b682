"""What `python -m mmjax.sample` asks of a family: draw images for prompts, caption images.

A family with a sampler (its spec in mmjax/families.py names it) gives a `Sampler`: default
settings (which the run's eval config, then the command line, override) and two functions
over a `SampleContext`, the trained run's decoder, parameters and layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from ml_collections import ConfigDict

from mmjax.models.vae import LatentSpace


@dataclasses.dataclass(frozen=True)
class SampleContext:
    """A trained run as its sampler needs it."""

    decoder: nn.Module  # the model built with decode=True (a KV cache)
    params: Any
    tokenizer: Any
    seq: ConfigDict  # the run's data.sequence
    num_patches: int  # the visual tokens of one image
    image_shape: tuple[int, int, int]  # what the model draws: latents (or pixels) [H, W, C]
    objective: Mapping[str, Any]  # the run's objective.kwargs (noise schedule, ...)
    latents: LatentSpace  # pixels <-> what the model draws
    rng: jax.Array


Settings = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A family's sampling: `draw(ctx, prompts, settings)` -> latents [N, H, W, C];
    `caption(ctx, pixels [N, H, W, C] in [-1, 1], settings)` -> one caption each; optional
    `edit(ctx, source pixels [N, H, W, C], instructions, settings)` -> edited latents."""

    defaults: Settings
    draw: Callable[[SampleContext, Sequence[str], Settings], np.ndarray]
    caption: Callable[[SampleContext, np.ndarray, Settings], list[str]]
    edit: Callable[[SampleContext, np.ndarray, Sequence[str], Settings], np.ndarray] | None = None
