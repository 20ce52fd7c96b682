r"""Flamingo (Alayrac et al., 2022): a frozen vision encoder -> Perceiver resampler -> gated
cross-attention-dense layers into a frozen, text-pretrained language model.

Each image becomes a fixed number of visual tokens through the Perceiver resampler (64 latents
in the paper, Sec. 2.1); the LM reads text with an `<image>` marker where each image stands,
and before every N-th LM block a gated xattn-dense layer lets each token attend to the visual
tokens of the latest image before it (Sec. 2.2-2.3; tanh gates start at 0, so the model starts
as the LM). The LM and the vision encoder are frozen (`optimizer.frozen`), the resampler and
the gated layers train (Sec. 2, Fig. 3). The data is data.sequence kind "vlm" in flamingo mode:
`<image> instruction answer <eos>` with `media_ids` (one image per row; the paper's
interleaved web pages of up to 5 images are not in the bundled data).

Tiny run on the synthetic 32x32 shapes, captioning and VQA ("what colour is the circle?"):
first the text-only LM of experiments/lm.py:tiny, then Flamingo on it, its LM loaded from the
LM run's workdir (`init_from.load={"lm": "lm"}`) and frozen bit for bit:

  python -m mmjax.train --config experiments/lm.py:tiny --workdir /tmp/lm_tiny
  python -m mmjax.train --config experiments/flamingo.py:tiny --workdir /tmp/flamingo_tiny \
      [--config.init_from.path=/tmp/lm_tiny]

Measured on 2 CPU cores shared with other jobs (LM 1,500 steps, 4 min 10 s: answer loss
3.93 -> 0.54; Flamingo 1,000 steps, 2 min 47 s with the eval: loss 0.64 -> 0.415, the frozen LM
bit-identical), on 100 held-out scenes: vqa_accuracy 0.52 (colour 0.69, count 0.86, shape
0.35, relation 0.38), caption_accuracy 0.09 (every object and relation of the scene right).
The tiny ViT is trained from scratch with the rest (`tiny_frozen_vision` freezes it too, at
its random initialisation, as the paper freezes its contrastively pretrained encoder); both
runs must use the same data.source and data.vocab_size, which give the same SentencePiece
vocabulary.

Paper shapes (App. B.1.1): Flamingo-3B / 9B / 80B on Chinchilla 1.4B / 7B / 70B
(experiments/lm.py's chinchilla_* variants) with a gated layer before every 1st / 4th / 7th LM
block; the resampler has 6 layers of 16 heads of width 96 (1,536) and 64 latents. The
NFNet-F6 image encoder is not implemented here: a ViT-L/16 at 320x320 (400 patch tokens)
stands in for it.

  python -m mmjax.train --config experiments/lm.py:chinchilla_7b \
      --workdir /gcs/bucket/chinchilla_7b --config.data.path=/data/shards
  python -m mmjax.train --config experiments/flamingo.py:9B --workdir /gcs/bucket/flamingo9b \
      --config.data.path=/data/shards [--config.init_from.path=/gcs/bucket/chinchilla_7b]

Variants: tiny, tiny_frozen_vision, 3B, 9B, 80B.
"""

import ml_collections

from mmjax.train.config_cli import base_config, load_config

# name: (the LM, experiments/lm.py's variant; a gated layer before every N-th LM block)
PAPER_SHAPES = {
    "3B": ("chinchilla_1.4b", 1),
    "9B": ("chinchilla_7b", 4),
    "80B": ("chinchilla_70b", 7),
}
VARIANTS = ("tiny", "tiny_frozen_vision", *PAPER_SHAPES)
TINY_TASKS = {"caption": 1.0, "vqa": 1.0}
TINY_MAX_LEN = 40  # the longest caption pair (35 tokens) + <image> and <eos>


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown flamingo variant {arg!r}; valid: {VARIANTS}")
    tiny = arg.startswith("tiny")
    lm_variant = "tiny" if tiny else PAPER_SHAPES[arg][0]
    lm = load_config(f"lm.py:{lm_variant}", relative_to=__file__)
    c = base_config(weight_decay=0.1, end_factor=1.0)  # constant after warmup (App. B.1.2)
    c.objective = dict(name="vlm")
    c.mesh = lm.mesh
    c.data = lm.data
    c.data.sequence.mode = "flamingo"
    # The LM scans its blocks as lm.py does; the gated layers run inside its scan (models/vlm.py)
    lm_fields = {k: v for k, v in lm.model.items() if k != "name"}
    c.model = dict(name="vlm", mode="flamingo", **lm_fields)
    # The LM of the lm.py run (its workdir as lm.py's docstring names it), frozen with the
    # vision encoder (Sec. 2)
    lm_workdir = "/tmp/lm_tiny" if tiny else f"/gcs/bucket/{lm_variant}"
    c.init_from.update(format="workdir", path=lm_workdir, load={"lm": "lm"})
    c.optimizer.frozen = ("lm/**", "vision/**")
    c.evals = {}
    if tiny:
        _tiny(c, frozen_vision=arg == "tiny_frozen_vision")
    else:
        _paper(c, PAPER_SHAPES[arg][1])
    return c


def _tiny(c: ml_collections.ConfigDict, *, frozen_vision: bool) -> None:
    """A 2-layer ViT over 8x8 patches (16 tokens) -> a 2-layer resampler with 8 latents ->
    a gated layer before each of the tiny LM's 2 blocks (Flamingo-3B's frequency)."""
    c.total_steps = 1000
    c.batch_size = 32
    c.log_every = 50
    c.eval_every = c.total_steps
    c.checkpoint_every = 500
    c.data.sequence.update(max_len=TINY_MAX_LEN)
    c.data.sequence.tasks = TINY_TASKS  # replaced whole (update would merge)
    c.model.update(
        vision=dict(patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128),
        connector=dict(
            type="perceiver",
            num_latents=8,
            depth=2,
            num_heads=4,
            head_dim=16,
        ),
        cross_attention_every=1,
    )
    c.optimizer.update(lr=1e-3, warmup_steps=50)
    c.evals = dict(  # greedy answers on 100 held-out scenes (mmjax/evals/vlm.py)
        vlm=dict(type="vlm", split="test", num_samples=100, batch_size=50, tasks=("caption", "vqa"))
    )
    if not frozen_vision:
        c.optimizer.frozen = ("lm/**",)


def _paper(c: ml_collections.ConfigDict, every: int) -> None:
    """A gated layer before every `every`-th LM block, 320x320 images; AdamW at 1e-4 after
    5,000 warmup steps, weight decay 0.1, gradient clipping at 1 (App. B.1.2)."""
    c.batch_size = 256
    c.total_steps = 500_000
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 2_000
    c.data.update(image_size=320)
    c.data.sequence.update(max_len=512)
    c.model.update(
        vision=dict(patch_size=16, width=1024, depth=24, num_heads=16, mlp_dim=4096),
        connector=dict(
            type="perceiver",
            num_latents=64,
            depth=6,
            num_heads=16,
            head_dim=96,
        ),
        cross_attention_every=every,
    )
    c.optimizer.update(lr=1e-4, warmup_steps=5000, grad_clip_norm=1.0)
