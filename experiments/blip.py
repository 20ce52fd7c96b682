r"""BLIP (Li et al., 2022): a ViT and a multimodal mixture of encoder-decoder, pre-trained with
ITC + ITM (hard negatives) + LM (models/blip.py `Blip`, objectives/blip.py).

Tiny run on the bundled digits (2 CPU cores), every parameter trained (BLIP fine-tunes its
ViT, Sec. 3.4):

  python -m mmjax.train --config experiments/blip.py:tiny --workdir /tmp/blip_tiny

Paper shapes: ViT-B/16 and BERT-base on 224-pixel images (Sec. 4.1), 20 epochs of the 14M-image
set at batch 2880; start from a workdir holding the converted ImageNet ViT (`vision/`) and
BERT (`text/`):

  python -m mmjax.train --config experiments/blip.py:B/16 --workdir /gcs/bucket/blip_b16 \
      --config.init_from.path=/gcs/bucket/vit_bert --config.data.path=/data/pairs \
      --config.data.tokenizer_path=/models/bert-base-uncased

Not implemented: the momentum encoders and momentum distillation, and CapFilt's bootstrapping
of the captions (Sec. 3.3).

Variants: tiny, B/16.
"""

import math

import ml_collections

from mmjax.data import data_config
from mmjax.train.config_cli import base_config

# ViT-B/16 (Dosovitskiy et al., 2021) and BERT-base (Devlin et al., 2019)
VIT_B16 = dict(
    patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072, pool="cls", norm_eps=1e-6
)
BERT_BASE = dict(width=768, depth=12, num_heads=12, mlp_dim=3072)
TINY_TEXT_LEN = 16
VARIANTS = ("tiny", "B/16")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown blip variant {arg!r}; valid: {VARIANTS}")
    # AdamW, weight decay 0.05, warmup to a peak lr of 3e-4 (Sec. 4.1); the paper then decays
    # it by 0.85 an epoch, the trainer's schedule is cosine
    c = base_config(lr=3e-4, weight_decay=0.05, warmup_steps=3000, end_factor=0.0)
    # Two captions of one image are no ITM negatives (LAVIS's image-id mask)
    c.objective = dict(name="blip", kwargs=dict(label_smoothing=0.1, same_key="index"))
    if arg == "tiny":
        _tiny(c)
    else:
        _paper(c)
    return c


def _tiny(c: ml_collections.ConfigDict) -> None:
    """A 2-block ViT over 2x2 patches and a 2-layer text transformer, width 64, on digits."""
    c.total_steps = 600
    c.batch_size = 64
    c.log_every = 25
    c.eval_every = c.total_steps
    c.checkpoint_every = 300
    c.data = data_config(source="digits", image_size=8, max_text_len=TINY_TEXT_LEN, vocab_size=128)
    width = 64
    c.model = dict(
        name="blip",
        vision=dict(patch_size=2, width=width, depth=2, num_heads=4, mlp_dim=4 * width, pool="cls"),
        text=dict(width=width, depth=2, num_heads=4, mlp_dim=4 * width),
        vocab_size=0,  # the tokenizer's
        embed_dim=width,
        max_text_len=TINY_TEXT_LEN,
        dtype="float32",
        attention_impl="auto",
    )
    c.optimizer.update(lr=1e-3, warmup_steps=40)
    c.objective.kwargs.same_key = "label"  # a digit's captions name its label alone
    c.evals = dict()


def _paper(c: ml_collections.ConfigDict) -> None:
    """ViT-B/16 + BERT-base, 224-pixel images, batch 2880, 20 epochs of 14M images."""
    c.mesh.update(data=1, fsdp=-1)
    c.batch_size = 2880
    c.total_steps = math.ceil(20 * 14_000_000 / c.batch_size)
    c.log_every = 100
    c.eval_every = c.total_steps
    c.checkpoint_every = 5000
    c.data = data_config(
        source="array_record",
        image_size=224,
        max_text_len=30,
        tokenizer="hf",  # BERT's, from data.tokenizer_path
        vocab_size=30522,  # that tokenizer's size, for compiling without it (mmjax.aot)
        prefetch=4,
    )
    c.model = dict(
        name="blip",
        vision=dict(VIT_B16, remat_policy="full", scan_layers=True),
        text=BERT_BASE,
        vocab_size=0,
        embed_dim=256,
        max_text_len=30,
        dtype="bfloat16",
        attention_impl="auto",
    )
    c.init_from.update(format="workdir", path="", step=-1)
    c.init_from.load = {"vision": "vision", "text": "text"}
    c.evals = dict()
