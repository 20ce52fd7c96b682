"""Mixed-modal sequences: an image-caption record laid out as Transfusion trains on it.

  caption first:  <bos> caption <BOI> p_1 ... p_P <EOI> <eos> pad ...
  image first:    <bos> <BOI> p_1 ... p_P <EOI> caption <eos> pad ...

The caption comes first with probability `caption_first` (0.8, Transfusion Sec. 4.1) and is
dropped from a caption-first example with probability `caption_drop` (0.1, for
classifier-free guidance); image-first examples teach captioning. Patch slots hold the pad id;
the model writes the image's patch embeddings there (`image_positions`).

UniFluid (kind "unifluid", Fan et al., 2025) lays a record out for generation (probability
`caption_first`; the caption dropped with probability `caption_drop` for classifier-free
guidance) or for understanding:

  generation:     <bos> caption <BOI> s_1 .. s_{m-1} v_1 ... v_P <EOI> <eos> pad ...
  understanding:  <bos> <BOI> f_1 ... f_F <EOI> caption <eos> pad ...

v_j are the P visual tokens in generation order, m = `tokens_per_step`: the hidden state m
slots before v_j (<BOI>, a start slot s_i, or v_{j-m}) predicts it, so a decoding step feeds m
known tokens and predicts the next m (`query_positions`). Generation slots are causal; the
F = P image-feature slots f_i (a ViT's patch tokens) see each other.

A VLM (kind "vlm") reads one image and an instruction and is trained on the answer alone
(LLaVA, Liu et al., 2023, Sec. 4.2); the task pair comes from `vlm_tasks`:

  prefix:    <image> x V  instruction  answer <eos> pad ...   (`visual_positions`: the V slots)
  flamingo:  <image>  instruction  answer <eos> pad ...       (`media_ids`: the image a token
                                                               reads through cross-attention)
"""

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from mmjax.data.sources import Source
from mmjax.data.vlm_tasks import (
    TASKS,
    caption_variants,
    check_task_weights,
    sample_pair,
    task_pairs,
)
from mmjax.errors import UserError

SEQUENCE_DEFAULTS: dict[str, Any] = dict(
    kind="",  # "" (image-caption pairs) | transfusion | unifluid | vlm | qwen_vl | bagel
    max_len=32,
    patch_size=2,
    channels=3,  # 1 keeps the first channel (grey images such as the digits)
    caption_first=0.8,
    caption_drop=0.1,
    tokens_per_step=1,  # unifluid: visual tokens predicted per decoding step
    mode="prefix",  # vlm: prefix (visual tokens lead the text) | flamingo (one <image> marker)
    visual_tokens=16,  # vlm prefix: V slots, the connector's output count
    tasks={task: 1.0 for task in TASKS},  # vlm: task mix weights (vlm_tasks.TASKS)
    task_identifiers=False,  # vlm: MiniGPT-v2's "[vqa]"-style token leads each instruction
    # qwen_vl (mmjax.data.qwen_tasks; patch_size 14 for Qwen's processor):
    patch_capacity=1024,  # patches of a row's packed images (a multiple of 4)
    min_pixels=56 * 56,  # the processor's smart-resize bounds
    max_pixels=28 * 28 * 1280,
    window_size=0,  # Qwen2.5-VL's ViT windows in pixels (112); 0: Qwen2-VL, no windows
    box_format="absolute",  # absolute pixels (Qwen2.5-VL) | relative [0, 1000) (Qwen2-VL)
    tokens_per_second=0.0,  # Qwen2.5-VL's temporal M-RoPE rate (2); 0: one id a temporal patch
    video_fps=2.0,  # frames a second of the videos
    # bagel (mmjax.data.bagel_tasks): task weights, ViT patch pixels, CFG dropout rates
    bagel_tasks=dict(t2i=1.0, caption=1.0, edit=1.0),
    vit_patch_size=8,
    text_drop=0.1,  # BAGEL paper: text 0.1, ViT 0.5, clean VAE 0.1 (official code: 0.3, 0.3)
    vit_drop=0.5,
    vae_drop=0.1,
    bagel_pack=False,  # pack further tasks on the scene into a row while they fit
    bagel_image_rope="shared",  # one RoPE position an image block (official) | raster
    # blip3o (mmjax.data.blip3o_rows): the learnable query slots after the prompt (paper: 64)
    num_queries=64,
    chat_template=False,  # blip3o: the official Qwen chat prompt around the caption
    understanding={},  # joint training: the backbone's VLM sequence settings (blip3o_rows)
)
VLM_MODES = ("prefix", "flamingo")
_FIT_CHECK_RECORDS = 256  # records whose every task pair must fit max_len before training


def check_transfusion_config(seq: ConfigDict, image_size: int) -> int:
    """Validates a Transfusion `data.sequence` against the image size; returns the patches an
    image takes."""
    return _check_fits(seq, _num_patches(seq, image_size), start_slots=0)


def check_unifluid_config(seq: ConfigDict, image_size: int) -> int:
    """Validates a UniFluid `data.sequence` (its tokens_per_step included); returns the visual
    tokens an image takes."""
    num_patches = _num_patches(seq, image_size)
    m = int(seq.get("tokens_per_step", 1))
    if m < 1 or num_patches % m:
        raise UserError(
            f"data.sequence.tokens_per_step {m} must be >= 1 and divide the {num_patches} "
            "visual tokens of an image"
        )
    return _check_fits(seq, num_patches, start_slots=m - 1)


def _num_patches(seq: ConfigDict, image_size: int) -> int:
    p = int(seq.patch_size)
    if image_size % p:
        raise UserError(f"data.image_size {image_size} is not divisible by patch_size {p}")
    return (image_size // p) ** 2


def _check_fits(seq: ConfigDict, num_patches: int, start_slots: int) -> int:
    """`num_patches`, after checking that they, `start_slots` and <bos> <BOI> <EOI> <eos> fit
    data.sequence.max_len."""
    if num_patches + start_slots + 4 > seq.max_len:
        extra = f" and {start_slots} start slots" if start_slots else ""
        raise UserError(
            f"data.sequence.max_len {seq.max_len} cannot hold an image of {num_patches} "
            f"patches{extra} plus <bos> <BOI> <EOI> <eos>"
        )
    return num_patches


def transfusion_example(
    image: np.ndarray,
    caption_ids: list[int],
    tokenizer: Any,
    seq: ConfigDict,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """One sequence: tokens/positions/segment_ids/span_ids/lm_mask [L], images [1, H, W, C],
    image_positions [1, P], image_valid [1], image_first [1] (1 when the image precedes its
    caption). `tokenizer` has boi_id/eoi_id (WithImageMarkers)."""
    num_patches = check_transfusion_config(seq, image.shape[0])
    max_len = int(seq.max_len)
    caption_first = rng.random() < seq.caption_first
    if caption_first and rng.random() < seq.caption_drop:
        caption_ids = []
    caption_ids = list(caption_ids)[: max_len - num_patches - 4]
    image_block = [tokenizer.boi_id] + [tokenizer.pad_id] * num_patches + [tokenizer.eoi_id]
    body = caption_ids + image_block if caption_first else image_block + caption_ids
    ids = [tokenizer.bos_id, *body, tokenizer.eos_id]
    start = 2 + (len(caption_ids) if caption_first else 0)  # first patch slot
    markers = (tokenizer.boi_id, tokenizer.eoi_id)
    return layout(ids, [start], num_patches, max_len, tokenizer.pad_id, markers) | {
        "images": image[None, ..., : int(seq.channels)].astype(np.float32),
        "image_valid": np.ones((1,), np.float32),
        "image_first": np.full((1,), float(not caption_first), np.float32),
    }


def check_markers(
    ids: list[int], image_starts: list[int], num_patches: int, boi_id: int, eoi_id: int
) -> None:
    """<BOI> right before and <EOI> right after each image's slots, and nowhere else."""
    expected_boi = {s - 1 for s in image_starts}
    expected_eoi = {s + num_patches for s in image_starts}
    boi = {i for i, t in enumerate(ids) if t == boi_id}
    eoi = {i for i, t in enumerate(ids) if t == eoi_id}
    if boi != expected_boi or eoi != expected_eoi:
        raise UserError(
            f"<BOI>/<EOI> do not pair with the images: <BOI> at {sorted(boi)}, <EOI> at "
            f"{sorted(eoi)}, expected {sorted(expected_boi)} and {sorted(expected_eoi)} for "
            f"images of {num_patches} patches starting at {image_starts}"
        )


def layout(
    ids: list[int],
    image_starts: list[int],
    num_patches: int,
    max_len: int,
    pad_id: int,
    markers: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Token arrays of one sequence whose images occupy `num_patches` slots from each start.

    `lm_mask[i]` is 1 where token i is a text target (not an image slot, not the first token,
    not padding); image k gets span id k + 1, so its patches see each other. With `markers`
    (boi_id, eoi_id), every image must sit between a <BOI> and an <EOI> and no marker may
    stand elsewhere.
    """
    n = len(ids)
    if n > max_len:
        raise UserError(f"sequence of {n} tokens exceeds data.sequence.max_len {max_len}")
    if markers is not None:
        check_markers(ids, image_starts, num_patches, *markers)
    tokens = np.full((max_len,), pad_id, np.int32)
    tokens[:n] = ids
    span_ids = np.zeros((max_len,), np.int32)
    image_positions = np.zeros((len(image_starts), num_patches), np.int32)
    for k, start in enumerate(image_starts):
        image_positions[k] = np.arange(start, start + num_patches)
        span_ids[start : start + num_patches] = k + 1
    segment_ids = (np.arange(max_len) < n).astype(np.int32)
    lm_mask = ((segment_ids == 1) & (span_ids == 0)).astype(np.float32)
    lm_mask[0] = 0.0
    return {
        "tokens": tokens,
        "positions": np.arange(max_len, dtype=np.int32),
        "segment_ids": segment_ids,
        "span_ids": span_ids,
        "lm_mask": lm_mask,
        "image_positions": image_positions,
    }


def unifluid_example(
    image: np.ndarray,
    caption_ids: list[int],
    tokenizer: Any,
    seq: ConfigDict,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """One UniFluid sequence (module docstring): the token arrays [L] of `layout`, `images`
    [1, H, W, C] (the generation target) and `understand_images` [1, H, W, C] (the ViT's input),
    `image_positions` / `query_positions` [1, P] (each visual token's slot and the slot that
    predicts it), `feature_positions` [1, F], `image_valid` [1] (1: a generation row) and
    `image_first` [1] (1: an understanding row). Slots of the other kind are at L (unused)."""
    num_patches = check_unifluid_config(seq, image.shape[0])
    generate = rng.random() < seq.caption_first
    if generate and rng.random() < seq.caption_drop:
        caption_ids = []
    return unifluid_layout(
        list(caption_ids), tokenizer, num_patches, seq, generate=generate
    ) | unifluid_images(image, seq, generate)


def unifluid_images(image: np.ndarray, seq: ConfigDict, generate: bool) -> dict[str, np.ndarray]:
    """The image arrays of a UniFluid row: the same pixels as target and as ViT input."""
    pixels = image[None, ..., : int(seq.channels)].astype(np.float32)
    return {
        "images": pixels,
        "understand_images": pixels,
        "image_valid": np.full((1,), float(generate), np.float32),
        "image_first": np.full((1,), float(not generate), np.float32),
    }


def unifluid_layout(
    caption_ids: list[int], tokenizer: Any, num_patches: int, seq: ConfigDict, *, generate: bool
) -> dict[str, np.ndarray]:
    """The token arrays and slot positions of a UniFluid row (see `unifluid_example`)."""
    max_len, m = int(seq.max_len), int(seq.get("tokens_per_step", 1))
    pad, markers = tokenizer.pad_id, (tokenizer.boi_id, tokenizer.eoi_id)
    slots = num_patches + m - 1 if generate else num_patches
    caption_ids = caption_ids[: max_len - slots - 4]
    block = [tokenizer.boi_id, *[pad] * slots, tokenizer.eoi_id]
    body = [*caption_ids, *block] if generate else [*block, *caption_ids]
    first = 2 + (len(caption_ids) if generate else 0)  # the slot after <BOI>
    out = layout([tokenizer.bos_id, *body, tokenizer.eos_id], [first], slots, max_len, pad, markers)
    for key in ("image_positions", "query_positions", "feature_positions"):
        out[key] = np.full((1, num_patches), max_len, np.int32)  # unused
    if generate:
        out["span_ids"] = np.zeros_like(out["span_ids"])  # causal: one token at a time
        boi = first - 1
        out["query_positions"] = boi + np.arange(num_patches, dtype=np.int32)[None]
        out["image_positions"] = out["query_positions"] + m
    else:
        out["feature_positions"] = first + np.arange(num_patches, dtype=np.int32)[None]
    return out


def check_vlm_config(seq: ConfigDict) -> int:
    """Validates the vlm keys of `data.sequence`; returns the slots an image takes."""
    if seq.mode not in VLM_MODES:
        raise UserError(f"data.sequence.mode {seq.mode!r} is not one of {VLM_MODES}")
    v = seq.visual_tokens
    if seq.mode == "prefix" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise UserError(f"data.sequence.visual_tokens must be an integer >= 1, got {v!r}")
    if not isinstance(seq.task_identifiers, bool):
        raise UserError(
            f"data.sequence.task_identifiers must be True or False, got {seq.task_identifiers!r}"
        )
    if not isinstance(seq.tasks, Mapping | ConfigDict):
        raise UserError(f"data.sequence.tasks must map task names to weights, got {seq.tasks!r}")
    check_task_weights(dict(seq.tasks))
    slots = int(v) if seq.mode == "prefix" else 1
    if slots + 2 > seq.max_len:
        raise UserError(
            f"data.sequence.max_len {seq.max_len} cannot hold {slots} image slot(s) plus an "
            "instruction and <eos>"
        )
    return slots


def vlm_layout(
    prompt_ids: list[int], answer_ids: list[int], tokenizer: Any, seq: ConfigDict
) -> dict[str, np.ndarray]:
    """The token arrays [L] of one VLM row (module docstring): `tokens`, `targets` (the next
    token), `loss_mask` (1 where `targets` is one of `answer_ids`), `segment_ids` (0 = padding),
    `positions`, and `visual_positions` [V] (prefix) or `media_ids` [L] (flamingo: the 1-based
    index of the latest <image> at or before each token, 0 on padding). `answer_ids` carries
    its own <eos>; an empty answer lays out a prompt to decode from. `tokenizer` has image_id
    (WithVlmTokens)."""
    slots = check_vlm_config(seq)
    max_len, pad = int(seq.max_len), tokenizer.pad_id
    ids = [tokenizer.image_id] * slots + [*prompt_ids, *answer_ids]
    n = len(ids)
    if n > max_len:
        raise UserError(
            f"a vlm sequence of {n} tokens ({slots} image slot(s), {len(prompt_ids)} instruction "
            f"and {len(answer_ids)} answer tokens with <eos>) exceeds data.sequence.max_len "
            f"{max_len}"
        )
    tokens = np.full((max_len,), pad, np.int32)
    tokens[:n] = ids
    targets = np.full((max_len,), pad, np.int32)
    targets[: n - 1] = ids[1:]
    loss_mask = np.zeros((max_len,), np.float32)
    loss_mask[n - 1 - len(answer_ids) : n - 1] = 1.0  # the slots that predict the answer
    segment_ids = (np.arange(max_len) < n).astype(np.int32)
    out = {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": loss_mask,
        "segment_ids": segment_ids,
        "positions": np.arange(max_len, dtype=np.int32),
    }
    if seq.mode == "prefix":
        out["visual_positions"] = np.arange(slots, dtype=np.int32)
    else:  # Flamingo: a token reads only the latest image before it (Alayrac et al., Sec. 2.3)
        markers = np.cumsum(tokens == tokenizer.image_id).astype(np.int32)
        out["media_ids"] = markers * segment_ids
    return out


def vlm_pair_ids(pair: Any, tokenizer: Any, seq: ConfigDict) -> tuple[list[int], list[int]]:
    """(instruction ids, answer ids + <eos>) of a `vlm_tasks.TaskPair`."""
    prompt = tokenizer.encode(pair.prompt(seq.task_identifiers))
    return prompt, [*tokenizer.encode(pair.answer), tokenizer.eos_id]


def vlm_example(
    image: np.ndarray,
    record: Mapping[str, Any],
    tokenizer: Any,
    seq: ConfigDict,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """One VLM row: a task pair drawn for `record` (which names its data `source`) by
    `seq.tasks`, laid out by `vlm_layout`, with `images` [H, W, C] (prefix) or [1, H, W, C]
    (flamingo)."""
    check_vlm_config(seq)
    pair = sample_pair(record, record["source"], seq.tasks, rng)
    try:
        out = vlm_layout(*vlm_pair_ids(pair, tokenizer, seq), tokenizer, seq)
    except UserError as e:
        raise UserError(f"{e}: {pair.prompt(seq.task_identifiers)!r} -> {pair.answer!r}") from None
    pixels = image[..., : int(seq.channels)].astype(np.float32)
    return out | {"images": pixels if seq.mode == "prefix" else pixels[None]}


def check_vlm_fit(source: Source, source_name: str, tokenizer: Any, seq: ConfigDict) -> None:
    """Raises before training when a task pair of some record (up to _FIT_CHECK_RECORDS
    records, evenly spaced, each with every caption it has) does not fit `seq.max_len`,
    naming the longest."""
    slots = check_vlm_config(seq)
    step = max(1, math.ceil(len(source) / _FIT_CHECK_RECORDS))
    longest, text = 0, ""
    tasks = [task for task, weight in seq.tasks.items() if weight > 0]
    for index in range(0, len(source), step):
        for record in caption_variants(source[index]):
            for pair in (p for task in tasks for p in task_pairs(record, task, source_name)):
                n = slots + sum(len(ids) for ids in vlm_pair_ids(pair, tokenizer, seq))
                if n > longest:
                    longest, text = n, f"{pair.prompt(seq.task_identifiers)!r} -> {pair.answer!r}"
    if longest > seq.max_len:
        raise UserError(
            f"data.sequence.max_len {seq.max_len} is too short for the longest task pair, "
            f"{longest} tokens with {slots} image slot(s) and <eos>: {text}"
        )
