"""grain input pipelines: an infinite, checkpointable train iterator and finite eval passes.

Multi-host: a global batch of G examples is split into `process_count` contiguous local
batches, process p holding examples [p * G / P, (p + 1) * G / P). Concatenating the local
batches in process order therefore gives exactly the batch a single process would see.
"""

import os
from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np
from ml_collections import ConfigDict

from mmjax.data.image_ops import build_augment_ops, image_preprocessor
from mmjax.data.kinds import sequence_example, sequence_kind
from mmjax.data.sources import (
    DIGIT_NAMES,
    DIGIT_PROMPT_TEMPLATES,
    SHAPE_CLASS_NAMES,
    SHAPE_PROMPT_TEMPLATES,
    ShapesSource,
    build_source,
)
from mmjax.data.tokenizer import Tokenizer
from mmjax.errors import UserError

Batch = dict[str, np.ndarray]
_GENERIC_PROMPT_TEMPLATES = ["a photo of a {}", "{}"]


def _preprocess_fn(data_cfg: ConfigDict, tokenizer: Tokenizer) -> Callable[[dict], Batch]:
    """Record -> model inputs: image float32 [S, S, 3] (data.image_mean / image_std: [-1, 1]
    by default), text int32, label, index."""
    image_op = image_preprocessor(data_cfg)
    max_len = int(data_cfg.max_text_len)

    def preprocess(record: dict[str, Any]) -> Batch:
        return {
            "image": image_op(record["image"]),
            "text": tokenizer.tokenize([record["caption"]], max_len)[0],
            "label": np.int32(record["label"]),
            "index": np.int32(record["index"]),
        }

    return preprocess


def _train_preprocess_fn(
    data_cfg: ConfigDict, tokenizer: Tokenizer
) -> Callable[[dict, np.random.Generator], Batch]:
    """Like `_preprocess_fn`, plus per-visit randomness from a seeded generator: one caption
    drawn from the record's `captions` when it has several, and the `data.augment` ops."""
    preprocess = _preprocess_fn(data_cfg, tokenizer)
    augment = build_augment_ops(tuple(data_cfg.get("augment", ())), int(data_cfg.image_size))

    kind = sequence_kind(data_cfg)
    if kind is not None and not kind.moves_pixels and data_cfg.get("augment"):
        raise UserError(
            f"data.augment {tuple(data_cfg.augment)} moves pixels away from the boxes and "
            f"relations the {kind.name} tasks state: leave data.augment empty"
        )

    def apply(record: dict[str, Any], rng: np.random.Generator) -> Batch:
        captions = record.get("captions")
        if captions:
            record = {**record, "caption": captions[rng.integers(len(captions))]}
        example = preprocess(record)
        image = augment(example["image"], rng)
        if kind is not None:
            ids = tokenizer.encode(record["caption"])
            record = {**record, "source": data_cfg.source}
            row = sequence_example(image, ids, tokenizer, data_cfg.sequence, rng, record)
            return row | {"label": example["label"]}
        return {**example, "image": image}

    return apply


def _local_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} is not in [0, {process_count})")
    if batch_size < 1 or batch_size % process_count:
        raise UserError(
            f"batch_size {batch_size} must be a positive multiple of the process count "
            f"{process_count}"
        )
    return batch_size // process_count


def _read_options(data_cfg: ConfigDict) -> grain.ReadOptions:
    """Thread prefetch of `data.prefetch` batches (0: produce batches on demand)."""
    prefetch = int(data_cfg.prefetch)
    if prefetch < 0:
        raise UserError(f"data.prefetch must be >= 0, got {prefetch}")
    return grain.ReadOptions(
        num_threads=min(prefetch, os.cpu_count() or 1), prefetch_buffer_size=prefetch
    )


def make_train_iterator(
    data_cfg: ConfigDict,
    tokenizer: Tokenizer,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Infinite iterator of this process's share of each global training batch.

    The order is a seeded global shuffle, reshuffled every epoch. The iterator is checkpointable
    (`get_state` / `set_state`, or `grain.checkpoint.CheckpointSave` / `CheckpointRestore` in
    Orbax) and resumes at exactly the next batch.
    """
    local = _local_batch_size(global_batch_size, process_index, process_count)
    if not 0 <= seed < 2**32:
        raise UserError(f"seed must be in [0, 2**32 - 1] for the data shuffle, got {seed}")
    source = build_source(data_cfg, data_cfg.split_train)
    kind = sequence_kind(data_cfg)
    if kind is not None and kind.check_fit is not None:
        kind.check_fit(source, data_cfg.source, tokenizer, data_cfg.sequence)
    ds = (
        grain.MapDataset.source(source)
        .shuffle(seed)
        .repeat()  # Infinite; reseeds the shuffle each epoch.
        .random_map(_train_preprocess_fn(data_cfg, tokenizer), seed=seed)
        .batch(local, drop_remainder=True)
    )
    # Global batch t is local batches t * P ... t * P + P - 1; this process takes one of them.
    # Datasets are lazy, so only this process's examples are read and preprocessed.
    ds = ds[process_index::process_count]
    return iter(ds.to_iter_dataset(_read_options(data_cfg)))


def first_example(data_cfg: ConfigDict, tokenizer: Tokenizer) -> Batch:
    """The train split's first record as training lays it out: the shapes of a model's inputs
    from the config's own data, without an iterator (reading a trained workdir)."""
    record = build_source(data_cfg, data_cfg.split_train)[0]
    return _train_preprocess_fn(data_cfg, tokenizer)(record, np.random.default_rng(0))


def synthetic_example(data_cfg: ConfigDict, tokenizer: Tokenizer) -> Batch:
    """One training example of `data_cfg`'s layout from a synthetic shapes scene.

    The scene goes through this config's own preprocessing (image ops to data.image_size,
    tokenization, the data.sequence layout), so keys, shapes and dtypes are exactly what
    training feeds the model, without the config's data: what compiling a step ahead of
    time and benchmarking it on an accelerator need.
    """
    local = ConfigDict({**data_cfg.to_dict(), "source": "shapes", "augment": ()})
    record = ShapesSource(data_cfg.split_train, 1)[0]
    return _train_preprocess_fn(local, tokenizer)(record, np.random.default_rng(0))


def batch_shapes(
    data_cfg: ConfigDict, tokenizer: Tokenizer, global_batch_size: int
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of `data_cfg`'s global training batches (`synthetic_example`)."""
    example = synthetic_example(data_cfg, tokenizer)
    return {k: ((global_batch_size, *np.shape(v)), np.asarray(v).dtype) for k, v in example.items()}


def eval_batches(
    data_cfg: ConfigDict,
    tokenizer: Tokenizer,
    split: str,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """One in-order pass over `split` in global batches of `batch_size` (this process's share).

    The last global batch is padded to full size; `mask` is 1.0 for real examples, 0.0 for
    padding, so every process yields the same number of batches.
    """
    local = _local_batch_size(batch_size, process_index, process_count)
    source = build_source(data_cfg, split)
    preprocess = _preprocess_fn(data_cfg, tokenizer)
    size = int(data_cfg.image_size)
    padding = {
        "image": np.zeros((size, size, 3), np.float32),
        "text": tokenizer.tokenize([""], int(data_cfg.max_text_len))[0],
        "label": np.int32(-1),
        "index": np.int32(-1),
        "mask": np.float32(0.0),
    }
    n = len(source)

    def element(position: int) -> Batch:
        if position >= n:
            return padding
        return {**preprocess(source[position]), "mask": np.float32(1.0)}

    num_batches = -(-n // batch_size)
    ds = grain.MapDataset.range(num_batches * batch_size).map(element).batch(local)
    ds = ds[process_index::process_count]
    return iter(ds.to_iter_dataset(_read_options(data_cfg)))


def class_names(data_cfg: ConfigDict) -> list[str] | None:
    """Class names for zero-shot classification, or None when the data has none."""
    if data_cfg.source == "digits":
        return list(DIGIT_NAMES)
    if data_cfg.source == "shapes":
        return list(SHAPE_CLASS_NAMES)
    return list(data_cfg.class_names) or None


def prompt_templates(data_cfg: ConfigDict) -> list[str]:
    """Zero-shot prompt templates (format strings with `{}` for the class name)."""
    if data_cfg.source == "digits":
        return list(DIGIT_PROMPT_TEMPLATES)
    if data_cfg.source == "shapes":
        return list(SHAPE_PROMPT_TEMPLATES)
    return list(_GENERIC_PROMPT_TEMPLATES)
