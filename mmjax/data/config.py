"""Every `config.data` key with its default, so experiments set only what differs."""

from typing import Any

import ml_collections

from mmjax.data.image_ops import (
    DEFAULT_IMAGE_MEAN,
    DEFAULT_IMAGE_OPS,
    DEFAULT_IMAGE_RESIZE,
    DEFAULT_IMAGE_STD,
)
from mmjax.data.sequences import SEQUENCE_DEFAULTS

DATA_DEFAULTS: dict[str, Any] = dict(
    source="digits",  # digits | skimage | shapes | scenes | moving_shapes | array_record | tfds
    path="",  # array_record: directory of shards; tfds: data_dir
    split_train="train",
    image_size=8,
    image_ops=DEFAULT_IMAGE_OPS,
    image_resize=DEFAULT_IMAGE_RESIZE,  # <crop|shortest_side|squash>_<PIL filter>, image_ops.py
    image_mean=DEFAULT_IMAGE_MEAN,  # per channel, [0, 1] scale: value_range gives (x - mean) / std
    image_std=DEFAULT_IMAGE_STD,  # 0.5 / 0.5: [-1, 1]; an import records its checkpoint's values
    augment=(),  # train-only random ops, e.g. ("random_shift",)
    max_text_len=16,
    tokenizer="sentencepiece",  # sentencepiece (trained on the train captions) | byte | hf
    tokenizer_path="",  # hf: a Hugging Face tokenizer directory; sentencepiece: a .model to load
    vocab_size=128,
    prefetch=2,
    shapes_num_train=10_000,
    shapes_num_test=1_000,
    scenes_num_train=10_000,  # variable-size scenes (mmjax.data.scenes)
    scenes_num_test=1_000,
    moving_shapes_num_train=10_000,  # short videos of a moving shape
    moving_shapes_num_test=1_000,
    video_frames=4,
    tfds_name="",
    tfds_image_key="image",
    tfds_text_key="",
    tfds_label_key="label",
    class_names=(),
    sequence=SEQUENCE_DEFAULTS,  # mixed-modal layout (mmjax.data.sequences); kind "" = pairs
)


def data_config(**overrides: Any) -> ml_collections.ConfigDict:
    """`DATA_DEFAULTS` updated with `overrides`; an unknown key is a ValueError."""
    unknown = sorted(set(overrides) - set(DATA_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown data config keys {unknown}; valid: {sorted(DATA_DEFAULTS)}")
    sequence = dict(overrides.pop("sequence", {}))
    unknown = sorted(set(sequence) - set(SEQUENCE_DEFAULTS))
    if unknown:
        valid = sorted(SEQUENCE_DEFAULTS)
        raise ValueError(f"unknown data.sequence keys {unknown}; valid: {valid}")
    return ml_collections.ConfigDict(
        {**DATA_DEFAULTS, **overrides, "sequence": {**SEQUENCE_DEFAULTS, **sequence}}
    )
