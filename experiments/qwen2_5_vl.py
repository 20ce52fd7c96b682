r"""Qwen2.5-VL (Bai et al., 2025): Qwen2-VL's design with a ViT of RMSNorm + SwiGLU blocks
that attends within 112-pixel windows (8x8 patches) in all but four blocks (Sec. 2.1),
absolute-time M-RoPE for videos (temporal ids at `tokens_per_second`, Sec. 2.1.1) and
grounding in absolute pixel coordinates with JSON answers (Sec. 2.2.1).

Tiny runs (mmjax/evals/qwen_vl.py judges them on held-out data):

  # variable-size scenes, "locate the red circle, output its bbox coordinates using JSON
  # format." -> '[{"bbox_2d": [x0, y0, x1, y1], "label": "red circle"}]' and captions
  python -m mmjax.train --config experiments/qwen2_5_vl.py:tiny --workdir /tmp/qwen25_tiny
  # 4-frame videos: "which way does the red circle move?" -> "left"
  python -m mmjax.train --config experiments/qwen2_5_vl.py:tiny_video --workdir /tmp/qwen25_video

Paper sizes (3B, 7B, 72B) fine-tune from the released weights as experiments/qwen2_vl.py's:

  python -m mmjax.train --config experiments/qwen2_5_vl.py:7B --workdir /gcs/bucket/qwen25vl7b \
      --config.init_from.path=/models/Qwen2.5-VL-7B-Instruct --config.data.path=/data/mix

Variants: tiny, tiny_video, 3B, 7B, 72B.
"""

import ml_collections

from mmjax.train.config_cli import load_config

# The released LMs (Qwen2.5-3B, -7B, -72B): (layers, width, heads, kv heads, MLP, vocab, tied)
LM_SHAPES = {
    "3B": (36, 2048, 16, 2, 11008, 151936, True),
    "7B": (28, 3584, 28, 4, 18944, 152064, False),
    "72B": (80, 8192, 64, 8, 29568, 152064, False),
}
# The redesigned ViT (Sec. 2.1): 32 blocks of width 1280, SwiGLU; full attention in blocks
# 7, 15, 23, 31 (every 8th), 112-px windows elsewhere. 72B's MLP is 3,456 wide.
VISION = dict(
    width=1280,
    depth=32,
    num_heads=16,
    mlp_dim=3420,
    norm="rms",
    gated_mlp=True,
    activation="silu",
    global_every=8,
)
QWEN25_SEQUENCE = dict(window_size=112, tokens_per_second=2.0, box_format="absolute")
VARIANTS = ("tiny", "tiny_video", *LM_SHAPES)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown qwen2_5_vl variant {arg!r}; valid: {VARIANTS}")
    if arg in LM_SHAPES:  # Qwen2-VL's recipe and layout, with this generation's shapes
        c = load_config("qwen2_vl.py:7B", relative_to=__file__)
        depth, width, heads, kv_heads, mlp_dim, vocab, tied = LM_SHAPES[arg]
        c.model.update(
            depth=depth,
            width=width,
            num_heads=heads,
            num_kv_heads=kv_heads,
            mlp_dim=mlp_dim,
            vocab_size=vocab,
            tie_embeddings=tied,
        )
        c.model.vision = dict(VISION, mlp_dim=3456 if arg == "72B" else 3420)
        c.model.vision.update(scan_layers=True, remat_policy="full")
        c.data.sequence.update(QWEN25_SEQUENCE)
        return c
    c = load_config("qwen2_vl.py:tiny", relative_to=__file__)
    # the tiny tower with this generation's block: RMSNorm, SwiGLU, windows but every 2nd block
    c.model.vision.update(norm="rms", gated_mlp=True, activation="silu", global_every=2)
    c.data.sequence.update(QWEN25_SEQUENCE)
    if arg == "tiny_video":
        video(c)
    return c


def video(c: ml_collections.ConfigDict) -> None:
    """The tiny model on 4-frame videos of a moving shape (56 x 84 px, 2 temporal patches of
    24 patches): which way does it move."""
    c.total_steps = 1500
    c.eval_every = c.total_steps
    c.data.update(source="moving_shapes", video_frames=4)
    c.data.sequence.update(min_pixels=56 * 56, patch_capacity=48, max_len=48, tasks=dict(video=1.0))
    c.evals.qwen_vl.update(tasks=("video",))
