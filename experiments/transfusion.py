r"""Transfusion (Zhou et al., 2024): next-token prediction on text and diffusion on images in
one transformer.

Tiny run on the bundled real digits in pixel space (8x8 grey, 2x2 patches: 16 image tokens),
2 CPU cores, minutes:

  python -m mmjax.train --config experiments/transfusion.py:tiny --workdir /tmp/tf_tiny

Tiny run on the synthetic 32x32 shapes through a frozen VAE (experiments/vae.py:tiny, 8x8x4
latents, 2x2 latent patches: 16 image tokens, word-level captions), judged by
compositional_accuracy (every prompted shape, colour, count and relation right) and
caption_accuracy; train the VAE, then the Transfusion on its latents (4,000 steps of batch 64,
30 minutes on 2 cores shared with two other jobs; the eval samples 200 prompts with 250 DDIM
steps, x0 clipped at 3 latent std):

  python -m mmjax.train --config experiments/vae.py:tiny --workdir /tmp/vae_tiny
  python -m mmjax.train --config experiments/transfusion.py:tiny_shapes --workdir /tmp/tf_shapes \
      [--config.latents.vae_workdir=/tmp/vae_tiny]

The latent space is `c.latents = dict(vae_workdir, scaling_factor, sample)` (mmjax/train/
latents.py): vae_workdir "" is pixel space (the digits); a trained VAE's workdir makes the
model diffuse its latents. The VAE stays frozen; pipeline images are encoded to latents in the
jitted train step, generated latents decoded to pixels for the judge and the sample grids
(evals and `python -m mmjax.sample`). scaling_factor 0 (the default) estimates 1 / latent std
from 2,048 training images at start and records it in the run's config.json; set a positive
value to fix it (`mmjax.models.vae.estimate_scaling_factor` computes the same). With latents,
model.image_shape is the latent shape and data.sequence.patch_size counts pixels
(model.patch_size x the VAE's downsampling factor).

Paper shapes (Table 1 of the paper; Llama-2 blocks, 2x2 patches of 32x32x8 VAE latents):

  python -m mmjax.train --config experiments/transfusion.py:7B --workdir /gcs/bucket/tf7b \
      --config.data.path=/data/shards

Variants: tiny, tiny_shapes, 0.16B, 0.37B, 0.76B, 1.4B, 7B.
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
VARIANTS = ("tiny", "tiny_shapes", *PAPER_SHAPES)


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown transfusion variant {arg!r}; valid: {VARIANTS}")
    # AdamW, beta2 0.95, eps 1e-8, wd 0.1, 4k warmup, cosine decay to 1.5e-5 (Sec. 4.1)
    c = base_config(b2=0.95, weight_decay=0.1, warmup_steps=4000, end_factor=0.05)
    # L = L_LM + lambda * L_DDPM, lambda = 5, cosine schedule over 1,000 steps (Sec. 4.1)
    c.objective = dict(
        name="transfusion",
        kwargs=dict(
            process="ddpm",  # | "flow" (rectified flow, v-prediction, Euler sampling)
            schedule="cosine",
            logit_normal=False,  # flow only: t ~ sigmoid(N(0, 1)) (Esser et al., 2024, Sec. 3.1)
            num_train_steps=1000,
            diffusion_weight=5.0,
            image_first_max_level=0.5,  # t <= 500 for images before their caption (Sec. 4.3.4)
        ),
    )
    # The latent space (mmjax/train/latents.py): "" = pixel space; else a trained VAE's workdir
    c.latents = dict(vae_workdir="", scaling_factor=0.0, sample=False)
    if arg == "tiny":
        _tiny(c)
    elif arg == "tiny_shapes":
        _tiny_shapes(c)
    else:
        _paper(c, arg)
    return c


def _tiny(c: ml_collections.ConfigDict) -> None:
    """4 layers of width 128 over 8x8 grey digits in pixel space: about 9 CPU minutes.

    Two departures from the paper's large-scale mix, for captioning from 1,437 training
    digits within the budget: 70% of the examples put the image first (paper: 20%), and those
    images are noised to t < 200 (paper: 500). Held-out (generation, caption) accuracy measured
    here: paper mix and cap (1.0, 0.915) after 2,500 steps; half image-first (0.99, 0.935)
    after 2,000, with the lower cap (0.995, 0.95), 2,400 steps (0.995, 0.945); these settings
    (0.98, 0.975) after 2,400."""
    c.total_steps = 2400
    c.batch_size = 64
    c.log_every = 50
    c.eval_every = c.total_steps  # the final eval only: its 200 samples x 250 steps take ~1 min
    c.checkpoint_every = 500
    patch = 2
    c.data = data_config(
        source="digits",
        image_size=8,
        vocab_size=128,
        sequence=dict(
            kind="transfusion", max_len=32, patch_size=patch, channels=1, caption_first=0.3
        ),
    )
    c.objective.kwargs.image_first_max_level = 0.2
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
        remat_policy="none",  # nn.transformer.REMAT_POLICIES
        scan_layers=False,
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


def _tiny_shapes(c: ml_collections.ConfigDict) -> None:
    """The tiny model on 8x8x4 latents of the 32x32 shapes (the tiny VAE, f = 4), with the
    paper's 80% caption-first mix and t <= 500 noise cap, the paper's U-Net patch encoder and
    the rectified-flow option (logit-normal t, Euler sampling). Measured here after 4,000
    steps (compositional / colour / shape / count / relation accuracy): DDPM + DDIM with the
    linear encoder 0.08 / 0.33 / 0.15 / 0.46 / 0.06 (0.005 without the x0 clip: DDIM's latents
    diverged to std ~10^3); flow, uniform t 0.15 / 0.58 / 0.33 / 0.79 / 0.11; flow,
    logit-normal t, U-Net encoder 0.875 / 0.965 / 0.875 / 0.965 / 0.89."""
    _tiny(c)
    c.total_steps = 4000
    c.eval_every = c.total_steps  # the final eval only
    patch, f = 2, 4  # 2x2 latent patches = 8x8 pixels
    c.data = data_config(
        source="shapes",
        image_size=32,
        vocab_size=128,  # a word a token: the longest caption is 8 tokens
        # <bos> 8 caption tokens <BOI> 16 patches <EOI> <eos>
        sequence=dict(kind="transfusion", max_len=32, patch_size=patch * f, channels=3),
    )
    c.objective.kwargs.update(image_first_max_level=0.5, process="flow", logit_normal=True)
    c.model.update(image_shape=(8, 8, 4), patch_size=patch, patch_encoder="unet")
    c.latents.vae_workdir = "/tmp/vae_tiny"
    c.evals.generation.update(num_samples=200, sampler="euler", num_steps=100, clip_x0=None)


def _paper(c: ml_collections.ConfigDict, arg: str) -> None:
    """Paper sizes: 4,096-token sequences of 256x256 images as 32x32x8 VAE latents in 2x2
    patches (256 tokens per image), batch 2M tokens, 250k steps (Sec. 4.1). Set
    --config.latents.vae_workdir to a trained f = 8 VAE with 8 latent channels
    (experiments/vae.py:kl-f8 --config.model.latent_channels=8)."""
    depth, width, heads = PAPER_SHAPES[arg]
    c.mesh.update(data=1, fsdp=-1)
    c.batch_size = 512
    c.total_steps = 250_000
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 2_000
    c.data = data_config(
        source="array_record",
        image_size=256,
        vocab_size=32_000,
        prefetch=4,
        # 16x16-pixel patches: 2x2 latent patches of the f = 8 VAE
        sequence=dict(kind="transfusion", max_len=4096, patch_size=16, channels=3),
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
        remat_policy="full",
        scan_layers=True,
    )
