r"""Qwen2-VL (Wang et al., 2024): a ViT over images at their own resolution (2D RoPE, packed
rows with block-diagonal attention, a 2x2 merger) feeding a Qwen2 LM with M-RoPE, and videos
through the same tower (3D patches of 2 frames).

Tiny run on the variable-size scenes (56 to 224 px, aspect ratios 1:2 to 2:1, smart-resized to
between 84x84 and 140x140 px: 36 to 100 patches, 9 to 25 LM tokens an image), grounding a named
object in Qwen2-VL's relative format ("find <|object_ref_start|>the red
circle<|object_ref_end|>" -> "<|box_start|>(x0,y0),(x1,y1)<|box_end|>", corners in [0, 1000))
and captioning, judged on held-out scenes by grounding_miou, grounding_wrong_object and
caption_accuracy (mmjax/evals/qwen_vl.py):

  python -m mmjax.train --config experiments/qwen2_vl.py:tiny --workdir /tmp/qwen2_vl_tiny

Paper sizes (2B, 7B, 72B: the released checkpoints' shapes): fine-tuning from the released
weights in the recipe of the paper's third stage (Sec. 2.3: the ViT frozen, the LM trained on
instruction data); the converted architecture, tokenizer and processor constants become the
run's (mmjax.convert.from_hf_qwen2_vl):

  python -m mmjax.train --config experiments/qwen2_vl.py:7B --workdir /gcs/bucket/qwen2vl7b \
      --config.init_from.path=/models/Qwen2-VL-7B-Instruct --config.data.path=/data/mix

Variants: tiny, 2B, 7B, 72B. experiments/qwen2_5_vl.py holds Qwen2.5-VL.
"""

import ml_collections

from mmjax.data import data_config
from mmjax.train.config_cli import base_config

# The released LMs (Qwen2-1.5B, -7B, -72B): (layers, width, heads, kv heads, MLP, vocab, tied)
LM_SHAPES = {
    "2B": (28, 1536, 12, 2, 8960, 151936, True),
    "7B": (28, 3584, 28, 4, 18944, 152064, False),
    "72B": (80, 8192, 64, 8, 29568, 152064, False),
}
# The 675M-parameter ViT of every size (Sec. 2.1): 32 blocks of width 1280, QuickGELU MLP x4
VISION = dict(width=1280, depth=32, num_heads=16, mlp_dim=5120, activation="quick_gelu")
MROPE_SECTIONS = (16, 24, 24)  # temporal, height, width runs of the 64 rotary frequencies
VARIANTS = ("tiny", *LM_SHAPES)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown qwen2_vl variant {arg!r}; valid: {VARIANTS}")
    c = base_config(weight_decay=0.0, end_factor=0.0)
    c.objective = dict(name="vlm")  # answer-only cross-entropy
    if arg == "tiny":
        tiny(c)
    else:
        paper(c, LM_SHAPES[arg], VISION, box_format="relative")
    return c


def tiny(c: ml_collections.ConfigDict) -> None:
    """A from-scratch Qwen2-VL on the variable-size scenes: a 4-block ViT of width 64 over
    14-px patches, a 3-block LM of width 128 (GQA 4/2 heads, M-RoPE)."""
    c.total_steps = 8000
    c.batch_size = 32
    c.log_every = 100
    c.eval_every = 4000
    c.checkpoint_every = 1000
    c.data = data_config(
        source="scenes",
        image_size=56,  # unused by the qwen_vl rows, which keep each image's own size
        vocab_size=256,  # SentencePiece on the task texts, each digit its own piece (boxes)
        sequence=dict(
            kind="qwen_vl",
            patch_size=14,
            min_pixels=84 * 84,  # smaller scenes are scaled up, as the processor does
            max_pixels=140 * 140,
            patch_capacity=100,  # one image of at most 140 x 140 px a row
            max_len=96,
            box_format="relative",
            tasks=dict(refer=3.0, caption=1.0),
        ),
    )
    width = 128
    c.model = dict(
        name="qwen_vl",
        vision=dict(width=64, depth=4, num_heads=4, mlp_dim=256, activation="quick_gelu"),
        vocab_size=0,  # the tokenizer's
        width=width,
        depth=3,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=3 * width,
        qkv_bias=True,
        # M-RoPE gives the height and width ids the lower frequencies (Qwen2-VL's sections
        # run t, h, w from the highest): at theta 1e4 and 16 frequencies the width band turns
        # 10 columns by < 0.04 rad, and the LM cannot tell columns apart (grounding_miou 0.11
        # at 2,000 steps). Theta 10 puts both spatial bands at periods of 11 to 55 positions,
        # what a grid of 4 to 10 merged tokens a side needs.
        rope_theta=10.0,
        norm_eps=1e-6,
        mrope_sections=(4, 6, 6),  # 16 rotary frequencies in Qwen2-VL's 16:24:24 proportion
        dtype="float32",
        attention_impl="auto",
    )
    c.optimizer.update(lr=1e-3, warmup_steps=200)
    c.evals = dict(
        qwen_vl=dict(
            type="qwen_vl", split="test", num_samples=200, batch_size=50, tasks=("refer", "caption")
        )
    )


def paper(c: ml_collections.ConfigDict, shape: tuple, vision: dict, **sequence) -> None:
    """A released size fine-tuned from its weights: the paper's stage 3 (Sec. 2.3), the ViT
    frozen; `sequence`: the processor's data.sequence keys of the generation."""
    depth, width, heads, kv_heads, mlp_dim, vocab, tied = shape
    c.mesh.update(data=1, fsdp=-1)
    c.batch_size = 128
    c.total_steps = 10_000
    c.log_every = 10
    c.eval_every = c.total_steps
    c.checkpoint_every = 500
    c.optimizer.update(lr=1e-5, warmup_steps=300, frozen=("vision/**",))
    c.init_from.update(format="hf_qwen_vl", path="")  # the released checkpoint directory
    c.data = data_config(
        source="array_record",
        image_size=448,  # unused by the qwen_vl rows
        tokenizer="hf",  # Qwen's: init_from sets data.tokenizer_path to the checkpoint
        vocab_size=151_643,  # that tokenizer's base size, for compiling without it (mmjax.aot)
        prefetch=4,
        sequence=dict(
            kind="qwen_vl",
            patch_size=14,
            min_pixels=256 * 28 * 28,
            max_pixels=1280 * 28 * 28,  # the model card's range: 256 to 1,280 merged tokens
            patch_capacity=4 * 1280,
            max_len=2048,
            tasks=dict(caption=1.0),  # array_record sources hold image-caption pairs
            **sequence,
        ),
    )
    c.model = dict(
        name="qwen_vl",
        vision=dict(vision, scan_layers=True, remat_policy="full"),
        vocab_size=vocab,
        width=width,
        depth=depth,
        num_heads=heads,
        num_kv_heads=kv_heads,
        mlp_dim=mlp_dim,
        qkv_bias=True,
        rope_theta=1_000_000.0,
        norm_eps=1e-6,
        tie_embeddings=tied,
        mrope_sections=MROPE_SECTIONS,
        dtype="bfloat16",
        attention_impl="auto",
        remat_policy="full",
        scan_layers=True,
    )
    c.evals = dict()
