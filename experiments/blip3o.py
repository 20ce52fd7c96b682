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
The paper's models (Sec. 4.1; official run.sh): `4B` and `8B` train the generator on the frozen
Qwen2.5-VL-3B / -7B-Instruct (a qwen2_5_vl.py:3B / :7B workdir holding the released weights),
the pixel decoder being a clip_decoder run on EVA-CLIP-E-14-plus. Their sharded train step
compiles for a TPU pod without one:

  python -m mmjax.aot --config experiments/blip3o.py:8B --topology v5p:4x4x4
  python -m mmjax.train --config experiments/blip3o.py:8B --workdir /gcs/bucket/blip3o_8b \
      --config.init_from.path=/gcs/bucket/qwen25vl7b --config.data.path=/data/blip3o_pretrain \
      --config.data.tokenizer_path=/models/Qwen2.5-VL-7B-Instruct \
      --config.latents.vae_workdir=/gcs/bucket/eva_clip_decoder

Variants: tiny_decoder, tiny_shapes, 4B, 8B.
"""

import ml_collections

from mmjax.data import data_config
from mmjax.train.config_cli import base_config, load_config

# BLIP3-o's sizes -> their backbone, a qwen2_5_vl.py variant (Sec. 4.1)
PAPER_BACKBONES = {"4B": "3B", "8B": "7B"}
VARIANTS = ("tiny_decoder", "tiny_shapes", *PAPER_BACKBONES)
CLIP_WORKDIR = "/tmp/clip_tiny_shapes"
BACKBONE_WORKDIR = "/tmp/llava_tiny"
DECODER_WORKDIR = "/tmp/blip3o_decoder"


def get_config(arg: str = "tiny_shapes") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown blip3o variant {arg!r}; valid: {VARIANTS}")
    if arg == "tiny_decoder":
        return _tiny_decoder()
    if arg in PAPER_BACKBONES:
        return _paper(PAPER_BACKBONES[arg])
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
            clip_workdir="",  # the CLIP cosine's tower: "" = this run's own feature space
            # the backbone judged as llava.py:tiny's own vlm eval judges it
            backbone_sequence=llava.data.sequence.to_dict(), backbone_tasks=("caption", "vqa"),
        )
    )  # fmt: skip
    return c


def _paper(backbone: str) -> ml_collections.ConfigDict:
    """BLIP3-o-4B/8B's generator (official run.sh and NextDiTCrossAttnConfig): 64 queries on the
    frozen Qwen2.5-VL; a NextDiT of 24 blocks of width 1792 (28 heads, SwiGLU 4864: Lumina's
    2/3 * 4 * 1792 rounded up to 256) generating EVA-CLIP-E-14-plus features of 448-px images
    (32x32x1792 average-pooled 4x4 to 8x8: gen_pooling early_pool2d_4); AdamW lr 1e-4, no weight
    decay, cosine to 1e-5 after 0.3% warm-up, batch 128 (16 x 8 GPUs), 512 tokens, bf16."""
    c = base_config(lr=1e-4, warmup_steps=600, end_factor=0.1, frozen=("backbone/**",))
    c.mesh.update(data=1, fsdp=-1)
    c.total_steps = 200_000  # one epoch of ~25M open pre-training images (Sec. 4.1)
    c.batch_size = 128
    c.log_every = 10
    c.eval_every = c.total_steps
    c.checkpoint_every = 1000
    qwen = load_config(f"qwen2_5_vl.py:{backbone}", relative_to=__file__)
    queries = 64
    c.data = data_config(
        source="array_record",  # captioned images
        image_size=448,
        tokenizer="hf",  # Qwen's: data.tokenizer_path names the released checkpoint
        vocab_size=qwen.data.vocab_size,
        prefetch=4,
        sequence=dict(
            kind="blip3o", max_len=512, num_queries=queries, channels=3, chat_template=True
        ),
    )
    c.model = dict(
        name="blip3o",
        backbone=qwen.model.to_dict(),
        dit=dict(width=1792, depth=24, num_heads=28, mlp_dim=4864, patch_size=1,
                 remat_policy="full", scan_layers=True),
        image_shape=(8, 8, 1792),
        num_queries=queries,
        backbone_image=(qwen.data.sequence.patch_size, 3),
        dtype="bfloat16",
    )  # fmt: skip
    c.objective = dict(name="blip3o", kwargs=dict(target="flow", cond_drop=0.1))
    c.init_from.update(format="workdir", path="", load={"backbone": ""}, family="qwen_vl")
    c.latents = dict(vae_workdir="", scaling_factor=1.0, sample=False)
    c.evals = {}
    return c
