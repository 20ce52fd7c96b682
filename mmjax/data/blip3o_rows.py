"""BLIP3-o's text -> image rows (Chen et al., 2025): the prompt, then the learnable queries.

  <bos> caption <image> q_1 ... q_Q pad ...

The frozen backbone reads the caption and an <image> marker (the official code's [IMG]
token), then Q query slots whose embeddings the model replaces by its learnable queries
(`query_positions`); the backbone's last hidden states there condition the diffusion
transformer, which generates `images` [1, H, W, C] (the row's target, encoded by the frozen
feature space: CLIP features or VAE latents). The tokenizer is the backbone VLM's (the same
specials as kind "vlm", trained on the same texts), so the backbone's embeddings read it.
Classifier-free guidance drops the condition in the objective (the official `mask_drop`).
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from mmjax.errors import UserError


def check_blip3o_config(seq: ConfigDict, image_size: int) -> int:
    """Validates the blip3o keys of `data.sequence`; returns Q, the query slots of a row."""
    del image_size  # the target's shape is the feature space's
    q = seq.num_queries
    if isinstance(q, bool) or not isinstance(q, int) or q < 1:
        raise UserError(f"data.sequence.num_queries must be an integer >= 1, got {q!r}")
    if q + 3 > seq.max_len:
        raise UserError(
            f"data.sequence.max_len {seq.max_len} cannot hold <bos>, a caption, <image> and "
            f"{q} query slots"
        )
    return q


def blip3o_example(
    image: np.ndarray,
    caption_ids: Sequence[int],
    tokenizer: Any,
    seq: ConfigDict,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """One row (module docstring): `tokens`, `positions`, `segment_ids` [L], `query_positions`
    [Q] and `images` [1, H, W, C]."""
    del rng  # nothing random in the layout: CFG drops the condition in the objective
    return blip3o_prompt(caption_ids, tokenizer, seq) | {
        "images": image[None, ..., : int(seq.channels)].astype(np.float32)
    }


def blip3o_prompt(
    caption_ids: Sequence[int], tokenizer: Any, seq: ConfigDict
) -> dict[str, np.ndarray]:
    """The token arrays of a prompt (no target image): what sampling feeds the backbone."""
    q, max_len = check_blip3o_config(seq, 0), int(seq.max_len)
    ids = [tokenizer.bos_id, *caption_ids, tokenizer.image_id]
    n = len(ids) + q
    if n > max_len:
        raise UserError(
            f"a prompt of {len(caption_ids)} tokens with {q} queries takes {n} positions, more "
            f"than data.sequence.max_len {max_len}"
        )
    tokens = np.full((max_len,), tokenizer.pad_id, np.int32)
    tokens[: len(ids)] = ids
    segment_ids = np.zeros((max_len,), np.int32)
    segment_ids[:n] = 1
    return {
        "tokens": tokens,
        "positions": np.arange(max_len, dtype=np.int32),
        "segment_ids": segment_ids,
        "query_positions": np.arange(len(ids), n, dtype=np.int32),
    }
