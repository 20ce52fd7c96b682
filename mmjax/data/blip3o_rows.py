"""BLIP3-o's text -> image rows (Chen et al., 2025): the prompt, then the learnable queries.

  <bos> caption <image> q_1 ... q_Q pad ...

With `data.sequence.chat_template` (the paper's Qwen2.5-VL backbones), the caption is the user
turn of Qwen's chat template, as the official `preprocess_qwen` and `generate_image` build it:
system prompt, "Please generate image based on the following caption: {caption}", then the
assistant's turn opens and the queries follow the image marker.

The frozen backbone reads the caption and an <image> marker (the official code's [IMG]
token), then Q query slots whose embeddings the model replaces by its learnable queries
(`query_positions`); the backbone's last hidden states there condition the diffusion
transformer, which generates `images` [1, H, W, C] (the row's target, encoded by the frozen
feature space: CLIP features or VAE latents). The tokenizer is the backbone VLM's (the same
specials as kind "vlm", trained on the same texts), so the backbone's embeddings read it.
Classifier-free guidance drops the condition in the objective (the official `mask_drop`).

Joint training (the paper's other schedule, Sec. 3.3: the backbone trained on understanding
and generation together): `data.sequence.understanding` holds the backbone's own VLM sequence
settings (kind "vlm": mode, visual_tokens, max_len, tasks), and each row also carries one of
its understanding rows on the same record, its keys prefixed `und_` (data/sequences.py
`vlm_example`). Empty (the default): generation rows only, the sequential schedule.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from mmjax.data.qwen_tasks import CHAT_PREFIX, CHAT_SUFFIX
from mmjax.data.sequences import SEQUENCE_DEFAULTS, check_vlm_config, vlm_example
from mmjax.errors import UserError

GENERATION_INSTRUCTION = "Please generate image based on the following caption: "  # train.py


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
    und = understanding_sequence(seq)
    if und is not None:
        check_vlm_config(und)
    return q


def blip3o_example(
    image: np.ndarray,
    caption_ids: Sequence[int],
    tokenizer: Any,
    seq: ConfigDict,
    rng: np.random.Generator,
    record: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """One row (module docstring): `tokens`, `positions`, `segment_ids` [L], `query_positions`
    [Q] and `images` [1, H, W, C]; with `seq.understanding`, an understanding row of `record`
    as `und_*` keys."""
    out = blip3o_prompt(caption_ids, tokenizer, seq) | {
        "images": image[None, ..., : int(seq.channels)].astype(np.float32)
    }
    und = understanding_sequence(seq)
    if und is None:
        return out
    if record is None:
        raise ValueError("joint blip3o rows lay out an understanding task: pass `record`")
    row = vlm_example(image, record, tokenizer, und, rng)
    return out | {f"und_{k}": v for k, v in row.items()}


def understanding_sequence(seq: ConfigDict) -> ConfigDict | None:
    """The backbone's VLM `data.sequence` of joint training (module docstring); None when
    `seq.understanding` is empty."""
    und = seq.get("understanding") or {}
    if not und:
        return None
    values = {**SEQUENCE_DEFAULTS, **dict(und), "kind": "vlm", "channels": seq.channels}
    return ConfigDict(values)


def blip3o_prompt(
    caption_ids: Sequence[int], tokenizer: Any, seq: ConfigDict
) -> dict[str, np.ndarray]:
    """The token arrays of a prompt (no target image): what sampling feeds the backbone."""
    q, max_len = check_blip3o_config(seq, 0), int(seq.max_len)
    bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []  # Qwen's tokenizer has none
    if seq.get("chat_template"):
        head = tokenizer.encode(CHAT_PREFIX + GENERATION_INSTRUCTION)
        caption_ids = [*head, *caption_ids, *tokenizer.encode(CHAT_SUFFIX)]
    ids = [*bos, *caption_ids, tokenizer.image_id]
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
