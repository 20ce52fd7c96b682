r"""CLIP (Radford et al., 2021): contrastive image-text pre-training.

Tiny run on the bundled real digits (2 CPU cores, under two minutes), then zero-shot on the
held-out digits:

  python -m mmjax.train --config experiments/clip.py:tiny --workdir /tmp/clip_tiny

`tiny_shapes` trains the same towers on the 32x32 synthetic shapes and their captions ("a red
circle left of a blue square"), the image tower 3 blocks deep with 4x4 patches and fixed 2D
sin-cos positions: the pretrained image encoder experiments/qwen_vl.py:tiny starts from, as
Qwen-VL starts from OpenCLIP's ViT. Measured (1,500 steps, 7 minutes on 2 CPU cores, the
first 3 shared with another run): retrieval R@1 0.763 image to text and 0.798 text to image
on 1,000 held-out scenes, zero-shot accuracy 0.546 on the 18 colour-shape classes of a
scene's first object. With the learned positions of `tiny` instead, retrieval R@1 is 0.475
and 0.50 (captions name where each object is):

  python -m mmjax.train --config experiments/clip.py:tiny_shapes --workdir /tmp/clip_tiny_shapes

Paper shapes (Table 20 of the paper) for accelerators, on your own ArrayRecord shards:

  python -m mmjax.train --config experiments/clip.py:B/32 --workdir /gcs/bucket/clip_b32 \
      --config.data.path=/data/shards

Variants: tiny, tiny_shapes, B/32, B/16, L/14.
"""

import math

import ml_collections

from mmjax.data import data_config
from mmjax.train.config_cli import base_config

# name: (image patch, image width, depth, heads, text width, text heads, embed dim, lr)
PAPER_SHAPES = {
    "B/32": (32, 768, 12, 12, 512, 8, 512, 5e-4),
    "B/16": (16, 768, 12, 12, 512, 8, 512, 5e-4),
    "L/14": (14, 1024, 24, 16, 768, 12, 768, 4e-4),
}
VARIANTS = ("tiny", "tiny_shapes", *PAPER_SHAPES)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown clip variant {arg!r}; valid: {VARIANTS}")
    # AdamW with beta2 0.98, eps 1e-6, weight decay 0.2, 2k warmup steps (Sec. 2.5, Table 19)
    c = base_config(lr=5e-4, b2=0.98, eps=1e-6, weight_decay=0.2, warmup_steps=2000)
    c.objective = dict(name="clip")
    if arg == "tiny":
        _tiny(c)
    elif arg == "tiny_shapes":
        _tiny(c)
        _shapes(c)
    else:
        _paper(c, arg)
    return c


def _tiny(c: ml_collections.ConfigDict) -> None:
    """2-layer, width-64 towers on 8x8 digits with patch 2: under two minutes on 2 CPU cores."""
    c.total_steps = 800
    c.batch_size = 128
    c.log_every = 25
    c.eval_every = 200
    c.checkpoint_every = 200
    c.data = data_config(source="digits", image_size=8, max_text_len=16, vocab_size=128)
    width = 64
    tower = dict(
        width=width, depth=2, num_heads=4, mlp_dim=4 * width, remat_policy="none", scan_layers=False
    )
    c.model = dict(
        name="clip",
        embed_dim=width,
        dtype="float32",
        attention_impl="auto",
        image=dict(patch_size=2, pool="cls", patch_bias=False, **tower),
        text=dict(vocab_size=0, max_len=16, **tower),
    )
    c.optimizer.update(lr=2e-3, weight_decay=0.1, warmup_steps=40)
    c.evals = dict(
        zero_shot=dict(type="zero_shot", split="test", batch_size=c.batch_size),
        retrieval=dict(type="retrieval", split="test", batch_size=c.batch_size),
        linear_probe=dict(
            type="linear_probe", split="test", train_split="train", batch_size=c.batch_size
        ),
    )


def _shapes(c: ml_collections.ConfigDict) -> None:
    """The tiny towers on the 32x32 shapes: the image tower of qwen_vl.py:tiny (4x4 patches,
    64 tokens, 3 blocks like the tiny VLMs' ViT), 1,500 steps."""
    c.total_steps = 1500
    c.eval_every = c.checkpoint_every = 500
    c.data.update(source="shapes", image_size=32)
    # Fixed 2D sin-cos positions (big_vision's): each patch token keeps where it is, which the
    # Qwen-VL adapter's values must carry to the LM for boxes
    c.model.image.update(patch_size=4, depth=3, posemb="sincos2d")


def _paper(c: ml_collections.ConfigDict, arg: str) -> None:
    """Paper sizes: 32 epochs of 400M pairs at batch 32,768 (Sec. 2.5), bf16, FSDP."""
    patch, width, depth, heads, text_width, text_heads, embed, lr = PAPER_SHAPES[arg]
    c.mesh.update(data=1, fsdp=-1)
    c.batch_size = 32768
    c.total_steps = math.ceil(32 * 400_000_000 / c.batch_size)
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 2_000
    c.data = data_config(
        source="array_record", image_size=224, max_text_len=77, vocab_size=49408, prefetch=4
    )
    c.model = dict(
        name="clip",
        embed_dim=embed,
        dtype="bfloat16",
        attention_impl="auto",
        image=dict(
            patch_size=patch,
            width=width,
            depth=depth,
            num_heads=heads,
            mlp_dim=4 * width,
            pool="cls",
            patch_bias=False,  # OpenAI CLIP's conv1 has no bias
            remat_policy="full",
            scan_layers=True,
        ),
        text=dict(
            vocab_size=0,
            max_len=77,
            width=text_width,
            depth=12,
            num_heads=text_heads,
            mlp_dim=4 * text_width,
            remat_policy="full",
            scan_layers=True,
        ),
    )
    c.optimizer.update(lr=lr)
    c.evals = dict()  # zero-shot needs class names: add evals.zero_shot with data.class_names
