"""Qwen2-VL / Qwen2.5-VL rows (`data.sequence.kind` "qwen_vl"): an image or video at its own
size, an instruction and its answer, laid out for models.qwen_vl.

The text is the chat template's vision block followed by the instruction,
`<|vision_start|><|image_pad|><|vision_end|>instruction`, then the answer and <eos> (the
loss scores the answer only); `<|image_pad|>` expands to one token per merged patch
(mmjax.data.native_resolution.build_row). Tasks (`data.sequence.tasks` weights):

  caption  "describe the image."                   -> the record's caption
  refer    grounding one named object, in the run's `box_format`:
           absolute (Qwen2.5-VL, Bai et al., 2025, Sec. 2.2.1: pixel coordinates of the
             image as the model sees it, after smart resize, in its JSON answer format)
             "locate the red circle, output its bbox coordinates using JSON format."
             -> '[{"bbox_2d": [x0, y0, x1, y1], "label": "red circle"}]'
           relative (Qwen2-VL, Wang et al., 2024, Sec. 2.2: corners in [0, 1000))
             "find <|object_ref_start|>the red circle<|object_ref_end|>"
             -> "<|box_start|>(x0,y0),(x1,y1)<|box_end|>"
  video    "which way does the red circle move?"   -> "left" (videos)
Images are records' `image` [H, W, 3] of any size, videos their `video` [T, H, W, 3], shot at
`data.sequence.video_fps` frames a second; Qwen2.5-VL's temporal M-RoPE ids advance
`tokens_per_second` per second (0: Qwen2-VL's one per temporal patch).
"""

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from mmjax.data.native_resolution import (
    PlaceholderIds,
    VisionGeometry,
    Visual,
    build_row,
    preprocess,
    smart_resize,
)
from mmjax.data.sequences import SEQUENCE_DEFAULTS
from mmjax.data.sources import Source
from mmjax.data.tokenizer import Tokenizer, WithSpecialTokens
from mmjax.data.vlm_tasks import TaskPair, normalise_coordinate
from mmjax.errors import UserError

# Qwen's chat template around one user turn (the released checkpoints' default system prompt)
SYSTEM = "You are a helpful assistant."
CHAT_PREFIX = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
CHAT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
REF_START, REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
SPECIAL_TOKENS = (
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    VIDEO_PAD,
    REF_START,
    REF_END,
    BOX_START,
    BOX_END,
)
TASKS = ("caption", "refer", "video")
BOX_FORMATS = ("absolute", "relative")
CAPTION_PROMPT = "describe the image."
ABSOLUTE_PROMPT = "locate the {}, output its bbox coordinates using JSON format."
VIDEO_PROMPT = "which way does the {} move?"
_NUMBER = r"\s*(\d+)\s*"
_ABSOLUTE = re.compile(rf'"bbox_2d"\s*:\s*\[{_NUMBER},{_NUMBER},{_NUMBER},{_NUMBER}\]')
_RELATIVE = re.compile(
    rf"{re.escape(BOX_START)}\s*\({_NUMBER},{_NUMBER}\)\s*,\s*\({_NUMBER},{_NUMBER}\)\s*"
    + re.escape(BOX_END)
)
Box = tuple[float, float, float, float]


class WithQwenTokens(WithSpecialTokens):
    """A tokenizer plus Qwen2-VL's vision and grounding specials; a checkpoint tokenizer that
    has them (Qwen's own) keeps their ids."""

    def __init__(self, base: Tokenizer) -> None:
        super().__init__(base, SPECIAL_TOKENS, reuse=True)

    def __repr__(self) -> str:
        return f"WithQwenTokens({self.base!r})"


def geometry(seq: ConfigDict) -> VisionGeometry:
    """The processor constants of a run's `data.sequence`."""
    return VisionGeometry(
        patch_size=int(seq.patch_size),
        min_pixels=int(seq.min_pixels),
        max_pixels=int(seq.max_pixels),
        window_size=int(seq.window_size) or None,
    )


def check_qwen_config(seq: ConfigDict) -> int:
    """Validates the qwen_vl keys of `data.sequence`; returns the merged-token slots of a
    row (patch_capacity / 4)."""
    g = geometry(seq)
    if seq.box_format not in BOX_FORMATS:
        raise UserError(f"data.sequence.box_format {seq.box_format!r} is not one of {BOX_FORMATS}")
    unknown = sorted(set(seq.tasks) - set(TASKS))
    if unknown or not any(float(w) > 0 for w in seq.tasks.values()):
        raise UserError(
            f"data.sequence.tasks {dict(seq.tasks)} must weigh some of {TASKS} (unknown: {unknown})"
        )
    capacity = int(seq.patch_capacity)
    unit = g.merge_size**2
    if capacity < unit or capacity % unit:
        raise UserError(
            f"data.sequence.patch_capacity {capacity} must be a positive multiple of {unit}"
        )
    if g.min_pixels < g.factor**2 or g.max_pixels < g.min_pixels:
        raise UserError(
            f"data.sequence needs {g.factor**2} <= min_pixels <= max_pixels, got "
            f"{g.min_pixels}, {g.max_pixels}"
        )
    if g.window_size is not None and g.window_size % g.factor:
        raise UserError(
            f"data.sequence.window_size {g.window_size} is not a multiple of {g.factor}"
        )
    return capacity // unit


def resized_box(bbox: Sequence[float], size: tuple[int, int], resized: tuple[int, int]) -> Box:
    """A pixel box of an image of `size` (height, width) in the coordinates of its
    smart-resized `resized` frame."""
    sy, sx = resized[0] / size[0], resized[1] / size[1]
    x0, y0, x1, y1 = bbox
    return (x0 * sx, y0 * sy, x1 * sx, y1 * sy)


def box_answer(box: Box, resized: tuple[int, int], label: str, box_format: str) -> str:
    """The answer text of a box (in the resized frame) in `box_format`."""
    if box_format == "absolute":
        corners = [round(v) for v in box]
        return json.dumps([{"bbox_2d": corners, "label": label}])
    h, w = resized
    x0, y0, x1, y1 = box
    a = (normalise_coordinate(x0, w), normalise_coordinate(y0, h))
    b = (normalise_coordinate(x1, w), normalise_coordinate(y1, h))
    return f"{BOX_START}({a[0]},{a[1]}),({b[0]},{b[1]}){BOX_END}"


def parse_box(text: str, resized: tuple[int, int], box_format: str) -> Box | None:
    """The first box of an answer in `box_format`, in the resized frame's pixels; None if
    the answer holds none."""
    found = (_ABSOLUTE if box_format == "absolute" else _RELATIVE).search(text)
    if found is None:
        return None
    x0, y0, x1, y1 = (int(v) for v in found.groups())
    if box_format == "absolute":
        return (x0, y0, x1, y1)
    h, w = resized
    return (x0 * w / 1000, y0 * h / 1000, x1 * w / 1000, y1 * h / 1000)


def object_label(obj: Mapping[str, Any]) -> str:
    """ "red circle": an object's colour and shape, as a grounding label."""
    return f"{obj['colour']} {obj['shape']}"


def record_size(record: Mapping[str, Any]) -> tuple[int, int]:
    """(height, width) of a record's image or video frames."""
    pixels = record["video"] if "video" in record else record["image"]
    return tuple(np.shape(pixels)[-3:-1])


def task_pairs(record: Mapping[str, Any], task: str, seq: ConfigDict) -> list[TaskPair]:
    """Every pair of `task` the record answers unambiguously (none when it cannot)."""
    if task == "video":
        if "video" not in record:
            return []
        name = object_label(record["shapes"][0][0])
        return [TaskPair("video", "direction", VIDEO_PROMPT.format(name), record["direction"])]
    if "video" in record:
        return []
    if task == "caption":
        return [TaskPair("caption", "caption", CAPTION_PROMPT, record["caption"])]
    size = record_size(record)
    g = geometry(seq)
    resized = smart_resize(*size, g.factor, g.min_pixels, g.max_pixels)
    pairs = []
    names = [object_label(o) for o in record.get("shapes", ())]
    for obj, name in zip(record.get("shapes", ()), names, strict=True):
        if names.count(name) > 1:
            continue
        box = resized_box(obj["bbox"], size, resized)
        if seq.box_format == "absolute":
            prompt = ABSOLUTE_PROMPT.format(name)
        else:
            prompt = f"find {REF_START}the {name}{REF_END}"
        pairs.append(
            TaskPair("refer", "box", prompt, box_answer(box, resized, name, seq.box_format))
        )
    return pairs


def visual(record: Mapping[str, Any], seq: ConfigDict) -> Visual:
    """The record's image or video as patches of its own (smart-resized) size."""
    g = geometry(seq)
    video = "video" in record
    patches, grid = preprocess(record["video"] if video else record["image"], g, video=video)
    interval = 1.0
    if video and float(seq.tokens_per_second) > 0:  # Qwen2.5-VL's absolute time (Sec. 2.1.1)
        interval = float(seq.tokens_per_second) * g.temporal_patch_size / float(seq.video_fps)
    return Visual(patches, grid, video, interval)


def prompt_ids(pair: TaskPair, tokenizer: Any, video: bool) -> list[int]:
    """The vision block and the instruction, as ids (one placeholder for the visual)."""
    pad = VIDEO_PAD if video else IMAGE_PAD
    return tokenizer.encode(f"{VISION_START}{pad}{VISION_END}{pair.instruction}")


def qwen_layout(
    prompt: list[int], answer: list[int], vis: Visual, tokenizer: Any, seq: ConfigDict
) -> dict[str, np.ndarray]:
    """One row [max_len] (`answer` with its <eos>; empty: a prompt to decode from): tokens,
    targets (the next token), loss_mask (1 where the target is an answer token),
    segment_ids, positions [3, max_len], the packed patches and visual_positions."""
    check_qwen_config(seq)
    ids = tokenizer.special_ids
    placeholders = PlaceholderIds(ids[IMAGE_PAD], ids[VIDEO_PAD])
    row = build_row([*prompt, *answer], [vis], placeholders, geometry(seq), int(seq.patch_capacity))
    max_len, n = int(seq.max_len), len(row["tokens"])
    if n > max_len:
        raise UserError(
            f"a qwen_vl row of {n} tokens ({n - len(prompt) - len(answer) + 1} for the "
            f"{'video' if vis.video else 'image'} of grid {vis.grid}) exceeds "
            f"data.sequence.max_len {max_len}: raise it or lower max_pixels"
        )
    tokens = np.full((max_len,), tokenizer.pad_id, np.int32)
    tokens[:n] = row.pop("tokens")
    targets = np.full((max_len,), tokenizer.pad_id, np.int32)
    targets[: n - 1] = tokens[1:n]
    loss_mask = np.zeros((max_len,), np.float32)
    loss_mask[n - 1 - len(answer) : n - 1] = 1.0
    positions = np.zeros((3, max_len), np.int32)
    positions[:, :n] = row.pop("positions")
    row.pop("rope_delta")
    visual_positions = row.pop("visual_positions")
    visual_positions[visual_positions >= n] = max_len  # the padding's slots: dropped
    return row | {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": loss_mask,
        "segment_ids": (np.arange(max_len) < n).astype(np.int32),
        "positions": positions,
        "visual_positions": visual_positions,
    }


def qwen_example(
    image: np.ndarray,
    record: Mapping[str, Any],
    tokenizer: Any,
    seq: ConfigDict,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """One training row: a task pair of `record` drawn by `seq.tasks` (among the tasks the
    record answers), its image or video at its own size. (`image`, the pipeline's fixed-size
    one, is not used.)"""
    check_qwen_config(seq)
    pairs = {t: task_pairs(record, t, seq) for t, w in seq.tasks.items() if float(w) > 0}
    pairs = {t: p for t, p in pairs.items() if p}
    if not pairs:
        raise UserError(f"record {record.get('index')} answers none of the tasks {dict(seq.tasks)}")
    names = sorted(pairs)
    weights = np.asarray([float(seq.tasks[t]) for t in names])
    task = names[rng.choice(len(names), p=weights / weights.sum())]
    pair = pairs[task][rng.integers(len(pairs[task]))]
    vis = visual(record, seq)
    answer = [*tokenizer.encode(pair.answer), tokenizer.eos_id]
    return qwen_layout(prompt_ids(pair, tokenizer, vis.video), answer, vis, tokenizer, seq)


def qwen_texts(source: Source, max_records: int) -> list[str]:
    """Every instruction and answer (in both box formats) of up to `max_records` records,
    evenly spaced, the specials cut out: what a SentencePiece vocabulary is trained on."""
    step = max(1, math.ceil(len(source) / max_records))
    specials = re.compile("|".join(map(re.escape, SPECIAL_TOKENS)))
    formats = [ConfigDict({**SEQUENCE_DEFAULTS, "box_format": f}) for f in BOX_FORMATS]
    texts = []
    for index in range(0, len(source), step):
        record = source[index]
        for seq in formats:
            for pair in (p for task in TASKS for p in task_pairs(record, task, seq)):
                texts += [pair.instruction, pair.answer]
    return [part for text in texts for part in specials.split(text) if part.strip()]
