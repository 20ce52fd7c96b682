r"""Qwen-VL (Bai et al., 2023): one cross-attention layer with learned queries and 2D absolute
positions compresses the ViT's tokens into a fixed number of visual tokens (256 in the paper),
read as a prefix of Qwen-7B; boxes are plain text, `<ref>phrase</ref><box>(x0,y0),(x1,y1)</box>`
with corners normalised to integers in [0, 1000) (Sec. 2.1-2.2).

Tiny run on the synthetic 32x32 shapes (a 3-block ViT of 4x4 patches: 64 tokens, compressed
to 16 queries, a square number as the adapter's 2D positions need; a 3-block LM of width 128),
captioning, VQA, referring and grounded captions, judged on 200 held-out scenes by
caption_accuracy, vqa_accuracy and grounding_miou (mmjax/evals/vlm.py):

  python -m mmjax.train --config experiments/qwen_vl.py:tiny --workdir /tmp/qwen_vl_tiny

Measured (3,000 steps, about an hour on 2 CPU cores shared with two other runs): vqa_accuracy
0.71 (colour 0.68, count 0.975, shape 0.63, relation 0.67), caption_accuracy 0.215, and
grounding_miou 0.094 (IoU >= 0.5 for 5%): at this size and length the boxes, twelve digit
tokens each, are not learnt yet. MiniGPT-v2's tiny recipe does not carry over. With the ViT's
fixed 2D sin-cos position embeddings, referring weighted 4x and 6,000 steps
(`--config.model.vision.posemb=sincos2d --config.total_steps=6000
--config.data.sequence.tasks="{'caption': 1.0, 'vqa': 1.0, 'refer': 4.0, 'grounding': 1.0}"`,
41 minutes), grounding_miou rises to 0.437, but the box still lands on the other object in
48% of two-object phrases (chance), and vqa_accuracy (0.596) and caption_accuracy (0.18) fall.
A likely cause, not yet measured: each of the 16 queries may read the whole image, so the LM
has no per-object token to pick.

Paper shapes (Sec. 2.1, Table 1): OpenCLIP ViT-bigG/14 at 448 pixels (32x32 patch tokens),
256 queries, Qwen-7B. The three stages (Sec. 3): `7B_stage1` pre-trains the ViT and adapter at
224 pixels with the LM frozen; `7B_stage2` multi-task pre-trains everything at 448 pixels;
`7B_stage3` instruction-tunes the adapter and the LM with the ViT frozen. Each stage starts
from the previous one's workdir (stage 1: one holding the converted ViT-bigG and Qwen-7B
parameters under `vision/` and `lm/`); moving to 448 pixels changes the ViT's position table,
which the converted 448-pixel table must then provide:

  python -m mmjax.train --config experiments/qwen_vl.py:7B_stage2 --workdir /gcs/bucket/qwenvl_s2 \
      --config.init_from.path=/gcs/bucket/qwenvl_s1 --config.data.path=/data/shards \
      --config.data.tokenizer_path=/models/qwen-7b

Variants: tiny, 7B_stage1, 7B_stage2, 7B_stage3.
"""

import ml_collections

from mmjax.train.config_cli import load_config

# OpenCLIP ViT-bigG/14 (Cherti et al., 2023), Qwen-VL's encoder
VIT_BIGG = dict(patch_size=14, width=1664, depth=48, num_heads=16, mlp_dim=8192)
# Qwen-7B: 151,851 tokens, 32 blocks of width 4096, SwiGLU width 11,008 (Bai et al., 2023a)
QWEN_7B = dict(width=4096, depth=32, num_heads=32, mlp_dim=11008)
# stage: (image size, peak lr, batch size, steps, warmup, frozen); Sec. 3 and App. Table 8
STAGES = {
    "stage1": (224, 2e-4, 30720, 50_000, 500, ("lm/**",)),
    "stage2": (448, 5e-5, 4096, 19_000, 400, ()),
    "stage3": (448, 1e-5, 128, 8_000, 3_000, ("vision/**",)),
}
QUERIES = {"tiny": 16, "paper": 256}
VARIANTS = ("tiny", *(f"7B_{stage}" for stage in STAGES))


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown qwen_vl variant {arg!r}; valid: {VARIANTS}")
    c = load_config(
        "llava.py:tiny" if arg == "tiny" else "llava.py:7B_stage2", relative_to=__file__
    )
    c.model.feature_layer = None  # the ViT's last layer
    if arg == "tiny":
        _tiny(c)
    else:
        _paper(c, arg.removeprefix("7B_"))
    return c


def _adapter(c: ml_collections.ConfigDict, queries: int) -> None:
    """The single cross-attention adapter at the LM width, with the LM's heads (32 heads of
    128 channels in the paper, both in the adapter and in Qwen-7B)."""
    c.model.connector = dict(
        type="cross_attn", num_queries=queries, num_heads=c.model.num_heads, out_dim=c.model.width
    )
    c.data.sequence.visual_tokens = queries


def _tiny(c: ml_collections.ConfigDict) -> None:
    """The llava.py tiny LM with the adapter, on the image tower of a clip.py:tiny_shapes run
    (Qwen-VL starts from OpenCLIP's ViT, Sec. 2.1; a from-scratch ViT leaves the phrases
    unbound, above); referring weighted 4x, grounded captions in the mix, 6,000 steps."""
    c.model.vision = dict(load_config("clip.py:tiny_shapes", relative_to=__file__).model.image)
    c.init_from.update(
        format="workdir", path="/tmp/clip_tiny_shapes", step=-1, load={"vision": "image_tower"}
    )
    _adapter(c, QUERIES["tiny"])
    c.data.sequence.update(
        max_len=QUERIES["tiny"] + 88,  # a two-object grounded caption
        tasks=dict(caption=1.0, vqa=1.0, refer=4.0, grounding=1.0),
    )
    c.total_steps = 6000
    c.eval_every = c.checkpoint_every = 1500  # grounding_miou over training


def _paper(c: ml_collections.ConfigDict, stage: str) -> None:
    size, lr, batch, steps, warmup, frozen = STAGES[stage]
    c.model.vision = VIT_BIGG
    c.model.update(**QWEN_7B)
    _adapter(c, QUERIES["paper"])
    c.data.image_size = size
    c.batch_size, c.total_steps, c.eval_every = batch, steps, steps
    c.optimizer.update(lr=lr, warmup_steps=warmup, frozen=frozen, weight_decay=0.05)
    c.init_from.load = dict(vision="vision", lm="lm") if stage == "stage1" else None
