r"""Qwen-VL (Bai et al., 2023): one cross-attention layer with learned queries and 2D absolute
positions compresses the ViT's tokens into a fixed number of visual tokens (256 in the paper),
read as a prefix of Qwen-7B; boxes are plain text, `<ref>phrase</ref><box>(x0,y0),(x1,y1)</box>`
with corners normalised to integers in [0, 1000) (Sec. 2.1-2.2).

Tiny run on the synthetic 32x32 shapes: the 3-block image tower (4x4 patches: 64 tokens,
fixed 2D sin-cos positions) of a clip.py:tiny_shapes run, as Qwen-VL starts from OpenCLIP's
ViT (Sec. 2.1), compressed to 16 queries (a square number, as the adapter's 2D positions
need; 4 heads, the LM's); a 3-block LM of width 128; captioning, VQA, referring (weighted 4x)
and grounded captions, judged on 200 held-out scenes by caption_accuracy, vqa_accuracy,
grounding_miou and, over the two-object phrases, by how often the box lands on the other
object (grounding_wrong_object; chance about 0.47; mmjax/evals/vlm.py):

  python -m mmjax.train --config experiments/clip.py:tiny_shapes --workdir /tmp/clip_tiny_shapes
  python -m mmjax.train --config experiments/qwen_vl.py:tiny --workdir /tmp/qwen_vl_tiny

Measured (6,000 steps, 41 minutes on 2 CPU cores, shared with CI for the first 20; evals
every 1,500 steps on 932 referring phrases):

  step   grounding_miou  grounding_wrong_object  vqa_accuracy  caption_accuracy
  1500   0.278           0.436                   0.832         0.470
  3000   0.450           0.246                   0.898         0.670
  4500   0.761           0.077                   0.911         0.775
  6000   0.837           0.044                   0.917         0.870

A second seed (`--config.seed=1`) gives grounding_miou 0.824, grounding_wrong_object 0.016,
vqa_accuracy 0.860, caption_accuracy 0.850 at step 6,000. With seed 0, at step 6,000, 91% of
the boxes have IoU >= 0.5, and VQA answers shape, relation and count
questions (0.99, 0.99, 1.0) but not colour ones ("what colour is the circle?", 0.65, the
answer prior; as in minigpt_v2.py:tiny).

The ViT's start decides it. Trained from scratch with the rest (llava.py:tiny's 3-block ViT
with sin-cos positions), the 16 queries never learn to attend where their 2D positions say:
each reads one or two patches chosen by content, so the LM sees colours but hardly shapes
(vqa shape 0.45) and no box follows its phrase (6,000 steps, referring 4x: grounding_miou
0.437 with one head, 0.295 with four; grounding_wrong_object 0.48 and 0.34). A CLIP tower
with learned positions gives shapes but keeps no place in its tokens: from the token
attending most to an object, a linear probe reads its shape at 0.86 but its centre with R^2
0.03 (step 3,000), and grounding_miou is 0.094. The sin-cos tower keeps both: shape 0.96,
centre R^2 0.92 (MAE 1.6 pixels) at step 6,000.

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
# Qwen-7B (Bai et al., 2023, Sec. 2.2): biases on the q, k, v projections only
QWEN_7B = dict(width=4096, depth=32, num_heads=32, mlp_dim=11008, qkv_bias=True)
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
    c.model.connector = dict(type="cross_attn", num_queries=queries, num_heads=c.model.num_heads)
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
