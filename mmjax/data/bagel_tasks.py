"""BAGEL's interleaved rows (Deng et al., 2025): generation, understanding, editing.

A row is a sequence of parts: text, an image to understand (ViT tokens), an image as VAE
latents (clean, as context, or noised: the generation target). Each image sits between
<BOI> and <EOI>, and the whole block shares one RoPE position (official `prepare_vae_latent`);
text positions count up. `data.sequence.bagel_image_rope="raster"` instead counts positions up
through the block too, one a token in raster order (Transfusion's layout), for the ablation.
Tasks (`data.sequence.bagel_tasks` weights):

  t2i:      <bos> caption <BOI> [P latents, noised] <EOI>
  caption:  <bos> <BOI> [F ViT tokens] <EOI> caption <eos>           (CE on the caption)
  edit:     <bos> <BOI> [F ViT tokens] <EOI> <BOI> [P latents, clean] <EOI> instruction
            <BOI> [P latents, noised] <EOI>
  text:     <bos> caption <eos>                                      (CE: the mix's pure text)

Nothing follows a noised image, so no token reads it (official "noise" attention mode).
With `data.sequence.bagel_pack`, a row packs further tasks on the same scene after the first,
drawn by the same weights, until one does not fit (max_len, 2 latent and 1 ViT image slots);
each is its own segment: positions restart and attention stays inside it (the official
trainer packs samples into sequences of `max_num_tokens`).
Classifier-free guidance needs the model to see rows without each condition: the caption or
instruction is dropped with probability `text_drop`, an edit's ViT tokens with `vit_drop` and
its clean latents with `vae_drop` (the paper's 0.1, 0.5, 0.1; the official trainer's defaults are
0.1, 0.3, 0.3). Edit targets come from mmjax.data.edits on the synthetic shapes.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from mmjax.data import edits
from mmjax.errors import UserError

TASKS = ("t2i", "caption", "edit", "text")
VAE_SLOTS = 2  # latent images a row holds: an edit's source and target
VIT_SLOTS = 1
PART_KINDS = ("text", "vit", "vae")
IMAGE_ROPE = ("shared", "raster")


@dataclasses.dataclass(frozen=True)
class Part:
    """One piece of a row: `kind` "text" (`ids`; `loss`: trained on), "vit" or "vae" (`pixels`
    [H, W, C]; `noised`: the generation target, else clean context)."""

    kind: str
    ids: tuple[int, ...] = ()
    loss: bool = False
    pixels: np.ndarray | None = None
    noised: bool = False


def check_bagel_config(seq: ConfigDict, image_size: int) -> int:
    """Validates the bagel keys of `data.sequence`; returns the latent tokens of an image."""
    slots = []
    for key in ("patch_size", "vit_patch_size"):
        p = int(seq[key])
        if p < 1 or image_size % p:
            raise UserError(
                f"data.image_size {image_size} is not divisible by data.sequence.{key} {p}"
            )
        slots.append((image_size // p) ** 2)
    weights = dict(seq.bagel_tasks)
    unknown = sorted(set(weights) - set(TASKS))
    if unknown or not any(float(w) > 0 for w in weights.values()):
        raise UserError(
            f"data.sequence.bagel_tasks {weights} must weight some of {TASKS} (unknown: {unknown})"
        )
    if seq.bagel_image_rope not in IMAGE_ROPE:
        raise UserError(
            f"data.sequence.bagel_image_rope {seq.bagel_image_rope!r} is not one of {IMAGE_ROPE}"
        )
    for key in ("text_drop", "vit_drop", "vae_drop"):
        if not 0.0 <= float(seq[key]) <= 1.0:
            raise UserError(f"data.sequence.{key} {seq[key]} is not a probability")
    num_patches, num_features = slots
    if float(weights.get("edit", 0.0)) > 0 and num_features + 2 * num_patches + 8 > seq.max_len:
        raise UserError(
            f"data.sequence.max_len {seq.max_len} cannot hold an edit row: {num_features} ViT "
            f"and 2 x {num_patches} latent tokens plus markers and an instruction"
        )
    return num_patches


def num_vit_tokens(seq: ConfigDict, image_size: int) -> int:
    """F: the ViT tokens of an image (`data.sequence.vit_patch_size` pixels a patch)."""
    return (image_size // int(seq.vit_patch_size)) ** 2


def bagel_row(parts: Sequence[Part], tokenizer: Any, seq: ConfigDict, image_size: int) -> dict:
    """The arrays of a row of one segment (`packed_row`)."""
    return packed_row([parts], tokenizer, seq, image_size)


def packed_row(
    segments: Sequence[Sequence[Part]], tokenizer: Any, seq: ConfigDict, image_size: int
) -> dict:
    """The arrays of one row of `segments` (module docstring): `tokens`, `positions`,
    `segment_ids` (1, 2, ...), `span_ids`, `lm_mask` [L]; `images` [2, S, S, C] at
    `image_positions` [2, P] with `image_valid` and `image_noised` [2]; `vit_images`
    [1, S, S, C] at `vit_positions` [1, F]. Unused slots sit at position L. `tokenizer` has
    boi_id/eoi_id (WithImageMarkers)."""
    max_len, channels = int(seq.max_len), int(seq.channels)
    num_patches = check_bagel_config(seq, image_size)
    num_features = num_vit_tokens(seq, image_size)
    raster = seq.bagel_image_rope == "raster"
    ids, pos, seg, span, loss = [], [], [], [], []
    vae, vit = [], []  # (first slot, part)
    for segment_id, parts in enumerate(segments, 1):
        p = 0
        for part in parts:
            if part.kind not in PART_KINDS:
                raise ValueError(f"unknown part kind {part.kind!r}; valid: {PART_KINDS}")
            if part.kind == "text":
                ids += part.ids
                pos += range(p, p + len(part.ids))
                span += [0] * len(part.ids)
                loss += [part.loss] * len(part.ids)
                p += len(part.ids)
            else:
                slots = num_features if part.kind == "vit" else num_patches
                (vit if part.kind == "vit" else vae).append((len(ids) + 1, part))
                ids += [tokenizer.boi_id, *[tokenizer.pad_id] * slots, tokenizer.eoi_id]
                pos += range(p, p + slots + 2) if raster else [p] * (slots + 2)
                span += [0, *[len(vit) + len(vae)] * slots, 0]
                loss += [False] * (slots + 2)
                p += slots + 2 if raster else 1
        seg += [segment_id] * (len(ids) - len(seg))
    n = len(ids)
    if n > max_len:
        raise UserError(f"a bagel row of {n} tokens exceeds data.sequence.max_len {max_len}")
    if len(vae) > VAE_SLOTS or len(vit) > VIT_SLOTS:
        raise ValueError(f"a row holds at most {VAE_SLOTS} latent and {VIT_SLOTS} ViT images")
    out = {
        "tokens": _padded(ids, max_len, tokenizer.pad_id),
        "positions": _padded(pos, max_len, 0),
        "segment_ids": _padded(seg, max_len, 0),
        "span_ids": _padded(span, max_len, 0),
        "lm_mask": _padded(loss, max_len, 0).astype(np.float32),
    }
    shape = (image_size, image_size, channels)
    out |= _images(vae, VAE_SLOTS, num_patches, max_len, shape, "images", "image_positions")
    out |= _images(vit, VIT_SLOTS, num_features, max_len, shape, "vit_images", "vit_positions")
    out["image_valid"] = np.asarray([float(i < len(vae)) for i in range(VAE_SLOTS)], np.float32)
    noised = [float(part.noised) for _, part in vae] + [0.0] * (VAE_SLOTS - len(vae))
    out["image_noised"] = np.asarray(noised, np.float32)
    return out


def _padded(values: Sequence, length: int, fill: int) -> np.ndarray:
    out = np.full((length,), fill, np.int32)
    out[: len(values)] = values
    return out


def _images(placed, count, slots, max_len, shape, key, positions_key) -> dict[str, np.ndarray]:
    images = np.zeros((count, *shape), np.float32)
    positions = np.full((count, slots), max_len, np.int32)
    for k, (start, part) in enumerate(placed):
        images[k] = part.pixels[..., : shape[-1]]
        positions[k] = np.arange(start, start + slots)
    return {key: images, positions_key: positions}


def t2i_parts(caption_ids: Sequence[int], pixels: np.ndarray, tokenizer: Any) -> list[Part]:
    """<bos> caption, then the image to generate (an empty caption: the unconditional row)."""
    return [Part("text", (tokenizer.bos_id, *caption_ids)), Part("vae", pixels=pixels, noised=True)]


def caption_parts(pixels: np.ndarray, caption_ids: Sequence[int], tokenizer: Any) -> list[Part]:
    """<bos>, the image's ViT tokens, then the caption and <eos> as targets (empty: a prompt)."""
    text = (*caption_ids, tokenizer.eos_id) if caption_ids else ()
    return [Part("text", (tokenizer.bos_id,)), Part("vit", pixels=pixels), Part("text", text, True)]


def text_parts(ids: Sequence[int], tokenizer: Any) -> list[Part]:
    """<bos>, then the text and <eos> as targets: language modelling alone."""
    return [Part("text", (tokenizer.bos_id,)), Part("text", (*ids, tokenizer.eos_id), True)]


def edit_parts(
    source: np.ndarray | None,
    instruction_ids: Sequence[int],
    target: np.ndarray,
    tokenizer: Any,
    *,
    vit: bool = True,
    vae: bool = True,
) -> list[Part]:
    """<bos>, the source as ViT tokens (`vit`) and clean latents (`vae`), the instruction, then
    the target to generate."""
    parts = [Part("text", (tokenizer.bos_id,))]
    if vit:
        parts.append(Part("vit", pixels=source))
    if vae:
        parts.append(Part("vae", pixels=source))
    return [*parts, Part("text", tuple(instruction_ids)), Part("vae", pixels=target, noised=True)]


def bagel_example(
    image: np.ndarray,
    record: Mapping[str, Any],
    tokenizer: Any,
    seq: ConfigDict,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """One training row: a task drawn by `data.sequence.bagel_tasks`, with the CFG dropouts;
    with `bagel_pack`, more tasks on the scene while they fit (module docstring)."""
    size = image.shape[0]
    weights = {t: float(w) for t, w in dict(seq.bagel_tasks).items() if float(w) > 0}
    segments = [task_parts(image, record, tokenizer, seq, rng, weights)]
    while seq.bagel_pack:
        more = task_parts(image, record, tokenizer, seq, rng, weights)
        if not fits([*segments, more], seq, size):
            break
        segments.append(more)
    return packed_row(segments, tokenizer, seq, size)


def fits(segments: Sequence[Sequence[Part]], seq: ConfigDict, image_size: int) -> bool:
    """Whether `packed_row` can hold `segments`: max_len tokens and the image slots."""
    slots = {"vae": check_bagel_config(seq, image_size), "vit": num_vit_tokens(seq, image_size)}
    parts = [part for segment in segments for part in segment]
    length = sum(len(p.ids) if p.kind == "text" else slots[p.kind] + 2 for p in parts)
    vae = sum(p.kind == "vae" for p in parts)
    vit = sum(p.kind == "vit" for p in parts)
    return length <= int(seq.max_len) and vae <= VAE_SLOTS and vit <= VIT_SLOTS


def task_parts(
    image: np.ndarray,
    record: Mapping[str, Any],
    tokenizer: Any,
    seq: ConfigDict,
    rng: np.random.Generator,
    weights: Mapping[str, float],
) -> list[Part]:
    """The parts of one task on the scene, drawn by `weights` (task: weight), with the CFG
    dropouts."""
    names = [t for t in TASKS if t in weights]
    p = np.asarray([weights[t] for t in names])
    task = names[rng.choice(len(names), p=p / p.sum())]
    caption = tokenizer.encode(record["caption"])
    text_kept = rng.random() >= float(seq.text_drop)
    if task == "t2i":
        return t2i_parts(caption if text_kept else [], image, tokenizer)
    if task == "caption":
        return caption_parts(image, caption, tokenizer)
    if task == "text":
        return text_parts(caption, tokenizer)
    if "shapes" not in record:
        raise UserError(f"bagel edit rows need data.source 'shapes', not {record.get('source')!r}")
    target, edit = edits.edit_pair(record, rng)
    vit, vae = rng.random() >= float(seq.vit_drop), rng.random() >= float(seq.vae_drop)
    instruction = tokenizer.encode(edit.instruction) if text_kept else []
    return edit_parts(
        image, instruction, pixels_like(image, record["image"], target), tokenizer,
        vit=vit, vae=vae,
    )  # fmt: skip


def pixels_like(image: np.ndarray, image_u8: np.ndarray, target_u8: np.ndarray) -> np.ndarray:
    """The edit target uint8 [H, W, 3] preprocessed as the source `image` was from `image_u8`:
    [-1, 1]. Any other preprocessing (normalisation, augmentation) is refused."""
    source = np.asarray(image_u8, np.float32) / 127.5 - 1.0
    if image.shape != source.shape or not np.allclose(image, source, atol=1e-5):
        raise UserError(
            "bagel edits need the shapes images as [-1, 1] pixels: leave data.image_mean, "
            "data.image_std and data.augment at their defaults"
        )
    return np.asarray(target_u8, np.float32) / 127.5 - 1.0
