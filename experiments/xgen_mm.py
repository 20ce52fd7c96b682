r"""xGen-MM / BLIP-3 (Xue et al., 2024): a vision encoder -> Perceiver token sampler -> visual
tokens as a prefix of a pretrained language model, one next-token loss on the text.

BLIP-3 replaces BLIP-2's Q-Former and its stage-1 objectives with a Perceiver resampler of
128 latents (Sec. 3) whose output tokens take the `<image>` slots of the LM's input (not
cross-attention as in Flamingo), and trains with the autoregressive text loss alone. The
vision encoder is frozen; the token sampler and the LLM are trained, in pre-training as in
fine-tuning (Sec. 3-4, Fig. 2), the LLM starting from the pretrained phi-3-mini. The data is
data.sequence kind "vlm" in prefix mode: `<image> x 128 instruction answer <eos>`, the loss on
the answers (the instruction-tuning form of its SFT stage). Not implemented here: the
any-resolution encoding of SFT (image crops plus a downsized view, each resampled to 128
tokens) and the interleaved multi-image data (MINT-1T): one image per row.

Tiny run on the synthetic 32x32 shapes, captioning and VQA: the text-only LM of
experiments/lm.py:tiny, then xGen-MM with that LM loaded (`init_from.load={"lm": "lm"}`) and
trained on:

  python -m mmjax.train --config experiments/lm.py:tiny --workdir /tmp/lm_tiny
  python -m mmjax.train --config experiments/xgen_mm.py:tiny --workdir /tmp/xgen_mm_tiny \
      [--config.init_from.path=/tmp/lm_tiny]

Measured on 2 CPU cores shared with other jobs (1,000 steps on the 1,500-step LM, 2 min 37 s
with the eval: loss 0.67 -> 0.32), on 100 held-out scenes: vqa_accuracy 0.58 (colour 0.69,
count 0.97, shape 0.37, relation 0.48), caption_accuracy 0.14. The tiny ViT trains with the
rest (`tiny_frozen_vision` freezes it at its random initialisation, as the paper freezes its
pretrained SigLIP).

Paper shape (xGen-MM-phi3-mini, 4B): SigLIP-So400m/14 at 384x384 (729 patch tokens, no CLS;
378x378 here), a 6-layer Perceiver of 16 heads of width 96 with 128 latents, phi-3-mini
(experiments/lm.py's phi3_mini variant):

  python -m mmjax.train --config experiments/lm.py:phi3_mini --workdir /gcs/bucket/phi3_mini \
      --config.data.path=/data/shards
  python -m mmjax.train --config experiments/xgen_mm.py:phi3_mini --workdir /gcs/bucket/xgen \
      --config.data.path=/data/shards [--config.init_from.path=/gcs/bucket/phi3_mini]

Variants: tiny, tiny_frozen_vision, phi3_mini.
"""

import ml_collections

from mmjax.models.siglip import IMAGE_DEFAULTS as SIGLIP_IMAGE_DEFAULTS
from mmjax.train.config_cli import base_config, load_config

VARIANTS = ("tiny", "tiny_frozen_vision", "phi3_mini")
TINY_TASKS = {"caption": 1.0, "vqa": 1.0}
TINY_VISUAL_TOKENS = 16  # the paper's 128, for a 16-patch tiny image
# SigLIP-So400m/14 (Zhai et al., 2023; Alabdulmohsin et al., 2023) without its pooling head
SO400M = dict(
    patch_size=14, width=1152, depth=27, num_heads=16, mlp_dim=4304, **SIGLIP_IMAGE_DEFAULTS
)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown xgen_mm variant {arg!r}; valid: {VARIANTS}")
    tiny = arg.startswith("tiny")
    lm_variant = "tiny" if tiny else "phi3_mini"
    lm = load_config(f"lm.py:{lm_variant}", relative_to=__file__)
    c = base_config(b2=0.95, weight_decay=0.05, end_factor=0.0)
    c.objective = dict(name="vlm")
    c.mesh = lm.mesh
    c.data = lm.data
    lm_fields = {k: v for k, v in lm.model.items() if k != "name"}
    c.model = dict(name="vlm", mode="prefix", **lm_fields)
    # The pretrained LM (the lm.py run's workdir, as lm.py's docstring names it) trains on;
    # the vision encoder is frozen (Sec. 3, Fig. 2)
    lm_workdir = "/tmp/lm_tiny" if tiny else "/gcs/bucket/phi3_mini"
    c.init_from.update(format="workdir", path=lm_workdir, load={"lm": "lm"})
    c.optimizer.frozen = ("vision/**",)
    c.evals = {}
    if tiny:
        _tiny(c, frozen_vision=arg == "tiny_frozen_vision")
    else:
        _paper(c)
    return c


def _tiny(c: ml_collections.ConfigDict, *, frozen_vision: bool) -> None:
    """A 2-layer ViT over 8x8 patches (16 tokens) -> a 2-layer Perceiver with 16 latents ->
    16 visual tokens leading the tiny LM's input."""
    c.total_steps = 1000
    c.batch_size = 32
    c.log_every = 50
    c.eval_every = c.total_steps
    c.checkpoint_every = 500
    c.data.sequence.update(
        mode="prefix",
        visual_tokens=TINY_VISUAL_TOKENS,
        max_len=TINY_VISUAL_TOKENS + 36,  # the longest caption pair (35 tokens) + <eos>
    )
    c.data.sequence.tasks = TINY_TASKS  # replaced whole (update would merge)
    c.model.update(
        vision=dict(patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128),
        connector=dict(
            type="perceiver",
            num_latents=TINY_VISUAL_TOKENS,
            depth=2,
            num_heads=4,
            head_dim=16,
        ),
    )
    c.optimizer.update(lr=1e-3, warmup_steps=50)
    c.evals = dict(  # greedy answers on 100 held-out scenes (mmjax/evals/vlm.py)
        vlm=dict(type="vlm", split="test", num_samples=100, batch_size=50, tasks=("caption", "vqa"))
    )
    if not frozen_vision:
        c.optimizer.frozen = ()


def _paper(c: ml_collections.ConfigDict) -> None:
    """xGen-MM-phi3-mini at the pre-training resolution: 384x384 in the paper, where SigLIP's
    patch convolution drops the last 6 pixels; 378 = 27 x 14 here, the same 729 patches."""
    c.batch_size = 512
    c.total_steps = 200_000
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 2_000
    c.data.update(image_size=378)
    c.data.sequence.update(mode="prefix", visual_tokens=128, max_len=2048)
    c.model.update(
        vision=SO400M,
        connector=dict(
            type="perceiver",
            num_latents=128,
            depth=6,
            num_heads=16,
            head_dim=96,
        ),
    )
    # the optimizer settings are this file's choice (AdamW, cosine), not the paper's
    c.optimizer.update(lr=1e-4, warmup_steps=2000)
