"""Data: sources of image-caption records, tokenizers, image ops and grain pipelines."""

from mmjax.data.config import DATA_DEFAULTS, data_config
from mmjax.data.image_ops import DEFAULT_IMAGE_OPS, IMAGE_OPS, build_image_ops, decode_image
from mmjax.data.pipeline import class_names, eval_batches, make_train_iterator, prompt_templates
from mmjax.data.sources import (
    DIGIT_NAMES,
    DIGIT_PROMPT_TEMPLATES,
    SHAPE_CLASS_NAMES,
    SHAPE_PROMPT_TEMPLATES,
    SOURCES,
    ArrayRecordSource,
    DigitsSource,
    ShapesSource,
    SkimageSource,
    Source,
    TfdsSource,
    build_source,
    pack_record,
    unpack_record,
)
from mmjax.data.tokenizer import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_or_train_tokenizer,
)

__all__ = [
    "DATA_DEFAULTS",
    "DEFAULT_IMAGE_OPS",
    "DIGIT_NAMES",
    "DIGIT_PROMPT_TEMPLATES",
    "IMAGE_OPS",
    "SHAPE_CLASS_NAMES",
    "SHAPE_PROMPT_TEMPLATES",
    "SOURCES",
    "ArrayRecordSource",
    "ByteTokenizer",
    "DigitsSource",
    "SentencePieceTokenizer",
    "ShapesSource",
    "SkimageSource",
    "Source",
    "TfdsSource",
    "Tokenizer",
    "build_image_ops",
    "build_source",
    "class_names",
    "data_config",
    "decode_image",
    "eval_batches",
    "load_or_train_tokenizer",
    "make_train_iterator",
    "pack_record",
    "prompt_templates",
    "unpack_record",
]
