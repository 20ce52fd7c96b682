r"""BLIP3-o (Chen et al., 2025; official JiuhaiChen/BLIP3o): a frozen VLM's hidden states at
learnable queries condition a flow-matching diffusion transformer that generates CLIP image
features, rendered to pixels by a decoder trained on the same CLIP tower.

Tiny chain on the 32x32 shapes (2 CPU cores): a CLIP whose image tower gives the features
(3 blocks, 4x4 patches: 8x8x64, pooled 2x2 to 4x4x64 as BLIP3-o pools EVA-CLIP's 32x32 to
8x8), the LLaVA-style VLM that becomes the frozen backbone, the pixel decoder on the frozen
tower, then the generator (the backbone frozen: the paper's sequential schedule):

  python -m mmjax.train --config experiments/clip.py:tiny_shapes --workdir /tmp/clip_tiny_shapes
  python -m mmjax.train --config experiments/llava.py:tiny --workdir /tmp/llava_tiny
  python -m mmjax.train --config experiments/blip3o.py:tiny_decoder --workdir /tmp/blip3o_decoder
  python -m mmjax.train --config experiments/blip3o.py:tiny_shapes --workdir /tmp/blip3o_shapes
  python -m mmjax.sample --workdir /tmp/blip3o_shapes --prompt "a red circle left of a blue square"

The design comparison (CLIP + flow, CLIP + MSE, VAE + flow) is
experiments/ablations/blip3o_design.py, the schedules (sequential: the backbone frozen; joint:
trained on its own understanding rows too) experiments/ablations/blip3o_schedule.py.
Variants: tiny_decoder, tiny_shapes.
"""

import ml_collections

from mmjax.data import data_config
from mmjax.train.config_cli import base_config, load_config

VARIANTS = ("tiny_decoder", "tiny_shapes")
CLIP_WORKDIR = "/tmp/clip_tiny_shapes"
BACKBONE_WORKDIR = "/tmp/llava_tiny"
DECODER_WORKDIR = "/tmp/blip3o_decoder"


def get_config(arg: str = "tiny_shapes") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown blip3o variant {arg!r}; valid: {VARIANTS}")
    if arg == "tiny_decoder":
        return _tiny_decoder()
    return _tiny_shapes()


def _tiny_decoder() -> ml_collections.ConfigDict:
    """The pixel decoder of the frozen CLIP tower's pooled features (the VAE's decoder,
    widths 16/32/64/64 upsampling 8x, L1 regression; the paper's is a diffusion model)."""
    c = base_config(lr=2e-3, warmup_steps=50, end_factor=0.05, frozen=("image_tower/**",))
    c.total_steps = 2000
    c.batch_size = 32
    c.log_every = 50
    c.eval_every = 10_000
    c.checkpoint_every = 500
    # the decoder reads only images; the byte tokenizer skips training a SentencePiece model
    c.data = data_config(source="shapes", image_size=32, tokenizer="byte", max_text_len=48)
    clip = load_config("clip.py:tiny_shapes", relative_to=__file__)
    c.model = dict(
        name="clip_decoder",
        image=clip.model.image.to_dict(),
        decoder=dict(channels=16, channel_mult=(1, 2, 4, 4), num_res_blocks=1, norm_groups=8),
        pool=2,
        scaling_factor=1.0,
        dtype="float32",
    )
    c.objective = dict(name="clip_decoder", kwargs=dict(reconstruction_loss="l1"))
    c.init_from.update(
        format="workdir", path=CLIP_WORKDIR, load={"image_tower": "image_tower"}, family="clip"
    )
    return c


def _tiny_shapes() -> ml_collections.ConfigDict:
    """CLIP + flow matching at Transfusion's tiny_shapes budget (4,000 steps of batch 64) on
    the frozen tiny LLaVA: 16 queries (one per target token, as the paper's 64 for 8x8), a
    4-block width-128 NextDiT, the official sampler (30 Euler steps, guidance 3)."""
    # AdamW, no weight decay, cosine decay (official trainer: lr 1e-4 at batch 512)
    c = base_config(lr=1e-3, warmup_steps=100, end_factor=0.0, frozen=("backbone/**",))
    c.total_steps = 4000
    c.batch_size = 64
    c.log_every = 50
    c.eval_every = c.total_steps  # the final eval only
    c.checkpoint_every = 500
    llava = load_config("llava.py:tiny", relative_to=__file__)
    queries = 16
    c.data = data_config(
        source="shapes",
        image_size=32,
        vocab_size=llava.data.vocab_size,  # the backbone's tokenizer (same source and size)
        sequence=dict(kind="blip3o", max_len=48 + queries, num_queries=queries, channels=3),
    )
    c.model = dict(
        name="blip3o",
        backbone=llava.model.to_dict(),
        dit=dict(width=128, depth=4, num_heads=4, mlp_dim=384, patch_size=1, time_width=128),
        image_shape=(4, 4, 64),
        num_queries=queries,
        backbone_image=(llava.data.image_size, 3),
        backbone_visual_tokens=llava.data.sequence.visual_tokens,
        dtype="float32",
    )
    c.objective = dict(name="blip3o", kwargs=dict(target="flow", cond_drop=0.1))
    c.init_from.update(format="workdir", path=BACKBONE_WORKDIR, load={"backbone": ""}, family="vlm")
    c.latents = dict(vae_workdir=DECODER_WORKDIR, scaling_factor=1.0, sample=False)
    c.evals = dict(
        generation=dict(
            type="blip3o", split="test", num_samples=200, num_steps=30, cfg_scale=3.0,
            loss=c.objective.kwargs,
            # the backbone judged as llava.py:tiny's own vlm eval judges it
            backbone_sequence=llava.data.sequence.to_dict(), backbone_tasks=("caption", "vqa"),
        )
    )  # fmt: skip
    return c
