r"""Transfusion (Zhou et al., 2024): next-token prediction on text and diffusion on images in
one transformer.

Tiny run on the bundled real digits in pixel space (8x8 grey, 2x2 patches: 16 image tokens),
2 CPU cores, minutes:

  python -m mmjax.train --config experiments/transfusion.py:tiny --workdir /tmp/tf_tiny

Paper shapes (Table 1 of the paper; Llama-2 blocks, 2x2 patches of 32x32x8 VAE latents):

  python -m mmjax.train --config experiments/transfusion.py:7B --workdir /gcs/bucket/tf7b \
      --config.data.path=/data/shards

Variants: tiny, 0.16B, 0.37B, 0.76B, 1.4B, 7B.
"""

import ml_collections

from mmjax.data import data_config
from mmjax.train.config_cli import base_config

# name: (layers, width, heads); Table 1 of the paper
PAPER_SHAPES = {
    "0.16B": (16, 768, 12),
    "0.37B": (24, 1024, 16),
    "0.76B": (24, 1536, 24),
    "1.4B": (24, 2048, 16),
    "7B": (32, 4096, 32),
}
VARIANTS = ("tiny", *PAPER_SHAPES)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown transfusion variant {arg!r}; valid: {VARIANTS}")
    # AdamW, beta2 0.95, eps 1e-8, wd 0.1, 4k warmup, cosine decay to 1.5e-5 (Sec. 4.1)
    c = base_config(b2=0.95, weight_decay=0.1, warmup_steps=4000, end_factor=0.05)
    # L = L_LM + lambda * L_DDPM, lambda = 5, cosine schedule over 1,000 steps (Sec. 4.1)
    c.objective = dict(
        name="transfusion",
        kwargs=dict(process="ddpm", schedule="cosine", num_train_steps=1000, diffusion_weight=5.0),
    )
    if arg == "tiny":
        _tiny(c)
    else:
        _paper(c, arg)
    return c


def _tiny(c: ml_collections.ConfigDict) -> None:
    """4 layers of width 128 over 8x8 grey digits in pixel space: CPU minutes."""
    c.total_steps = 3000
    c.batch_size = 64
    c.log_every = 50
    c.eval_every = 1000
    c.checkpoint_every = 500
    patch = 2
    c.data = data_config(
        source="digits",
        image_size=8,
        vocab_size=128,
        sequence=dict(kind="transfusion", max_len=32, patch_size=patch, channels=1),
    )
    c.model = dict(
        name="transfusion",
        vocab_size=0,
        width=128,
        depth=4,
        num_heads=4,
        mlp_dim=384,
        image_shape=(8, 8, 1),
        patch_size=patch,
        patch_encoder="linear",  # | unet (ablations/transfusion_encoder.py)
        unet_channels=32,
        bidirectional_images=True,
        dtype="float32",
        attention_impl="auto",
    )
    c.optimizer.update(lr=1e-3, warmup_steps=100)
    c.evals = dict(
        generation=dict(
            type="transfusion",
            split="test",
            num_samples=200,
            sampler="ddim",
            num_steps=250,  # Sec. 4.1
            cfg_scale=3.0,
            clip_x0=1.0,  # pixel space: images in [-1, 1]
            loss=c.objective.kwargs,
        )
    )


def _paper(c: ml_collections.ConfigDict, arg: str) -> None:
    """Paper sizes: 4,096-token sequences of 256x256 images as 32x32x8 VAE latents in 2x2
    patches (256 tokens per image), batch 2M tokens, 250k steps (Sec. 4.1)."""
    depth, width, heads = PAPER_SHAPES[arg]
    c.mesh.update(data=1, fsdp=-1)
    c.batch_size = 512
    c.total_steps = 250_000
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 2_000
    c.data = data_config(
        source="array_record",
        image_size=32,
        vocab_size=32_000,
        prefetch=4,
        sequence=dict(kind="transfusion", max_len=4096, patch_size=2, channels=8),
    )
    c.model = dict(
        name="transfusion",
        vocab_size=0,
        width=width,
        depth=depth,
        num_heads=heads,
        mlp_dim=int(8 * width / 3 / 256 + 1) * 256,  # SwiGLU 8/3 width, rounded as Llama
        image_shape=(32, 32, 8),
        patch_size=2,
        patch_encoder="linear",
        unet_channels=256,
        bidirectional_images=True,
        dtype="bfloat16",
        attention_impl="auto",
        remat=True,
    )
