"""Qwen2-VL / Qwen2.5-VL answers (mmjax.models.qwen_vl): prompts about images and videos of
any size, decoded greedily (or by nucleus sampling) with a KV cache.

Each prompt is token ids holding one placeholder (`<|image_pad|>` / `<|video_pad|>`) per
visual, which expands to the visual's merged token count (mmjax.data.native_resolution).
Prompts are left-padded to the longest, so that all rows prefill in one call; decoding
continues every row at its largest M-RoPE id + 1 (sampling/vlm.py `generate_batch`).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from mmjax.data.native_resolution import PlaceholderIds, VisionGeometry, Visual, build_row
from mmjax.errors import UserError
from mmjax.sampling.vlm import generate_batch


def prompt_batch(
    prompts: Sequence[tuple[Sequence[int], Sequence[Visual]]],
    placeholders: PlaceholderIds,
    geometry: VisionGeometry,
    *,
    pad_id: int,
    capacity: int | None = None,
) -> dict[str, np.ndarray]:
    """Left-padded rows of (token ids, their visuals): `tokens`, `segment_ids` [N, P],
    `positions` [N, 3, P], the packed patches [N, capacity, D] with their layout and
    `visual_positions` [N, capacity / merge^2]. `capacity` (default: the most patches of a
    row) must hold every row's patches."""
    if not prompts:
        raise UserError("generation needs at least one prompt")
    need = max(sum(int(np.prod(v.grid)) for v in visuals) for _, visuals in prompts)
    unit = geometry.merge_size**2
    capacity = capacity or max(unit, -(-need // unit) * unit)
    rows = [build_row(ids, visuals, placeholders, geometry, capacity) for ids, visuals in prompts]
    length = max(len(r["tokens"]) for r in rows)
    out = []
    for r in rows:
        pad = length - len(r["tokens"])
        out.append(
            {
                "tokens": np.pad(r["tokens"], (pad, 0), constant_values=pad_id),
                "segment_ids": np.pad(np.ones_like(r["tokens"]), (pad, 0)),
                "positions": np.pad(r["positions"], ((0, 0), (pad, 0))),
                "visual_positions": r["visual_positions"] + pad,
                **{k: v for k, v in r.items() if k.startswith("patch")},
            }
        )
    return {k: np.stack([r[k] for r in out]) for k in out[0]}


def answer(
    decoder: nn.Module,
    params: Any,
    prompts: Sequence[tuple[Sequence[int], Sequence[Visual]]],
    placeholders: PlaceholderIds,
    geometry: VisionGeometry,
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    capacity: int | None = None,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> np.ndarray:
    """Answer ids [N, max_new_tokens] to `prompts` (token ids with their visuals): greedy
    at temperature 0, else top-p sampling with `rng`; each row ends at its first `eos_id`
    (kept), then `pad_id`."""
    batch = prompt_batch(prompts, placeholders, geometry, pad_id=pad_id, capacity=capacity)
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
