"""Sequence kinds: how `data.sequence.kind` turns a record into a training row.

A kind bundles what the data side needs of a family that trains on token sequences: the
layout of one example, the check of `data.sequence` (and how many slots an image takes),
the special tokens its tokenizer adds, the texts a SentencePiece model is trained on, a
check that every record fits before training, and whether `data.augment` may move pixels.
The pipeline and the tokenizer ask the registered kind; they never branch on its name. A
family with a new layout registers its kind here (`register_sequence_kind`) next to its
spec (mmjax/families.py); image-text pairs (CLIP, SigLIP, BLIP, the VAE) have no kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from mmjax.data import bagel_tasks, blip3o_rows, edits, qwen_tasks, sequences
from mmjax.data.sources import Source, sample_captions
from mmjax.data.tokenizer import (
    Tokenizer,
    TrainingTexts,
    WithImageMarkers,
    WithVlmTokens,
    base_tokenizer,
    sized_base_tokenizer,
)
from mmjax.data.vlm_tasks import task_texts
from mmjax.errors import UserError

# VLM tokenizers read every task's texts of these records (about 30 texts each for shapes)
_MAX_TASK_RECORDS = 2_000

# (image [H, W, C], caption ids, tokenizer, data.sequence, rng, record) -> the row's arrays
Example = Callable[..., dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class SequenceKind:
    """What the data pipeline and the tokenizer need of one `data.sequence.kind`."""

    name: str
    example: Example  # one training row (see Example)
    check: Callable[[ConfigDict, int], int]  # (data.sequence, image size) -> slots per image
    specials: Callable[[Tokenizer], Tokenizer]  # the base tokenizer plus the kind's specials
    texts: TrainingTexts | None = None  # SentencePiece training texts (None: the captions)
    split_digits: bool = False  # SentencePiece: each digit its own token (box coordinates)
    # (train split, data.source, tokenizer, data.sequence): raises if some record cannot fit
    check_fit: Callable[[Source, str, Tokenizer, ConfigDict], None] | None = None
    moves_pixels: bool = True  # False: data.augment is refused (the texts describe the frame)


SEQUENCE_KINDS: dict[str, SequenceKind] = {}


def register_sequence_kind(kind: SequenceKind) -> SequenceKind:
    """Makes `kind` the layout of `data.sequence.kind == kind.name`."""
    SEQUENCE_KINDS[kind.name] = kind
    return kind


def sequence_kind(data_cfg: Mapping[str, Any]) -> SequenceKind | None:
    """The registered kind of `data_cfg.sequence.kind`; None for image-text pairs."""
    return _named((data_cfg.get("sequence") or {}).get("kind"))


def _named(name: str | None) -> SequenceKind | None:
    if not name:
        return None
    if name not in SEQUENCE_KINDS:
        raise UserError(
            f"unknown data.sequence.kind {name!r}; valid: {tuple(sorted(SEQUENCE_KINDS))}"
        )
    return SEQUENCE_KINDS[name]


def check_sequence_config(seq: ConfigDict, image_size: int) -> int:
    """Validates `data.sequence` against the image size; returns the slots an image takes
    (its patches; for kind "vlm" its V visual tokens, or the one <image> marker of flamingo)."""
    return _kind(seq).check(seq, image_size)


def sequence_example(
    image: np.ndarray,
    caption_ids: list[int],
    tokenizer: Tokenizer,
    seq: ConfigDict,
    rng: np.random.Generator,
    record: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """One training row of `seq.kind` (`data.sequence`); `record` is the source record plus
    its data `source` name, for layouts that read more than the caption (vlm)."""
    return _kind(seq).example(image, caption_ids, tokenizer, seq, rng, record)


def _kind(seq: ConfigDict) -> SequenceKind:
    kind = _named(seq.get("kind"))
    if kind is None:
        raise UserError("data.sequence.kind is empty: this config trains on image-text pairs")
    return kind


def load_or_train_tokenizer(data_cfg: ConfigDict, workdir: str | None, *, write: bool) -> Tokenizer:
    """The tokenizer of `data_cfg` (data/tokenizer.py `base_tokenizer`, trained on the
    kind's texts) with the special tokens its sequence kind holds."""
    kind = sequence_kind(data_cfg)
    if kind is None:
        return base_tokenizer(data_cfg, workdir, write=write)
    base = base_tokenizer(
        data_cfg, workdir, write=write, texts=kind.texts, split_digits=kind.split_digits
    )
    return kind.specials(base)


def sized_tokenizer(data_cfg: ConfigDict) -> Tokenizer:
    """A tokenizer with the vocabulary size `load_or_train_tokenizer` would give, read from the
    config alone (no data, no training): what `mmjax.aot` compiles with."""
    kind = sequence_kind(data_cfg)
    base = sized_base_tokenizer(data_cfg)
    return base if kind is None else kind.specials(base)


def _reads_caption(example: Callable[..., dict[str, np.ndarray]]) -> Example:
    """A layout of the caption ids alone, as `sequence_example` calls it."""
    return lambda image, caption_ids, tokenizer, seq, rng, record: example(
        image, caption_ids, tokenizer, seq, rng
    )


def _reads_record(example: Callable[..., dict[str, np.ndarray]]) -> Example:
    """A layout of the whole record (scene metadata included), as `sequence_example` calls it."""

    def call(image, caption_ids, tokenizer, seq, rng, record):
        if record is None:
            raise ValueError(f"data.sequence.kind {seq.kind!r} lays out a record: pass `record`")
        return example(image, record, tokenizer, seq, rng)

    return call


register_sequence_kind(
    SequenceKind(
        "transfusion",
        _reads_caption(sequences.transfusion_example),
        sequences.check_transfusion_config,
        WithImageMarkers,
    )
)
register_sequence_kind(
    SequenceKind(
        "unifluid",
        _reads_caption(sequences.unifluid_example),
        sequences.check_unifluid_config,
        WithImageMarkers,
    )
)
register_sequence_kind(
    SequenceKind(
        "vlm",
        _reads_record(sequences.vlm_example),
        lambda seq, image_size: sequences.check_vlm_config(seq),
        WithVlmTokens,
        texts=lambda source, name: task_texts(source, name, _MAX_TASK_RECORDS),
        split_digits=True,
        check_fit=sequences.check_vlm_fit,
        moves_pixels=False,  # Qwen-VL boxes and the spatial questions describe the frame
    )
)
register_sequence_kind(
    SequenceKind(
        "qwen_vl",
        _reads_record(qwen_tasks.qwen_example),
        lambda seq, image_size: qwen_tasks.check_qwen_config(seq),
        qwen_tasks.WithQwenTokens,
        texts=lambda source, name: qwen_tasks.qwen_texts(source, _MAX_TASK_RECORDS),
        split_digits=True,
        moves_pixels=False,  # the boxes and the motion describe the frames
    )
)
register_sequence_kind(
    SequenceKind(
        "bagel",
        _reads_record(bagel_tasks.bagel_example),
        bagel_tasks.check_bagel_config,
        WithImageMarkers,
        texts=lambda source, name: [
            *sample_captions(source, _MAX_TASK_RECORDS),
            *(edits.edit_texts(source, _MAX_TASK_RECORDS) if "shapes" in source[0] else []),
        ],
        moves_pixels=False,  # the edits move objects and name their relations
    )
)
register_sequence_kind(
    SequenceKind(
        "blip3o",
        blip3o_rows.blip3o_example,  # the record too: joint rows add an understanding task
        blip3o_rows.check_blip3o_config,
        WithVlmTokens,  # the backbone VLM's tokenizer: its specials and training texts
        texts=lambda source, name: task_texts(source, name, _MAX_TASK_RECORDS),
        split_digits=True,
    )
)
