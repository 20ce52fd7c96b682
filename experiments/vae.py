r"""KL-regularised convolutional VAE (LDM's AutoencoderKL, Rombach et al., 2022): the latent
space for diffusion on images (Transfusion on the synthetic shapes).

Tiny run on the synthetic 32x32 shapes, 8x8x4 latents: 1,600 steps of batch 32, about 9 CPU
minutes (27 minutes wall on 2 cores shared with other jobs), held-out PSNR 27.8 dB (L1 0.022 on
[-1, 1]; colours, positions and shapes preserved), latent std 0.87:

  python -m mmjax.train --config experiments/vae.py:tiny --workdir /tmp/vae_tiny

The 8x8 digits need no VAE: diffusion runs on their pixels (models/vae.py `Pixels`).
After training, `mmjax.models.vae.estimate_scaling_factor` gives the `model.scaling_factor`
(1 / latent std) to set in the configs that use this VAE.

Stable Diffusion's kl-f8 shapes (256x256 -> 32x32x4) on your own ArrayRecord shards:

  python -m mmjax.train --config experiments/vae.py:kl-f8 --workdir /gcs/bucket/vae_f8 \
      --config.data.path=/data/shards

Variants: tiny, kl-f8.
"""

import ml_collections

from mmjax.data import data_config
from mmjax.train.config_cli import base_config

VARIANTS = ("tiny", "kl-f8")


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown vae variant {arg!r}; valid: {VARIANTS}")
    # LDM trains its autoencoders with Adam at 4.5e-6 x batch, betas (0.5, 0.9), no decay,
    # a constant rate and no gradient clipping.
    c = base_config(lr=4.5e-6 * 8, b1=0.5, b2=0.9, end_factor=1.0, grad_clip_norm=0.0)
    # kl_weight: LDM's weight of the per-image KL against the per-image summed L1 error.
    c.objective = dict(name="vae", kwargs=dict(kl_weight=1e-6, reconstruction_loss="l1"))
    # c.evals stays empty: held-out reconstruction is in tests/test_vae.py (see the docstring)
    if arg == "tiny":
        _tiny(c)
    else:
        _kl_f8(c)
    return c


def _tiny(c: ml_collections.ConfigDict) -> None:
    """Widths 16/32/64, 32x32 -> 8x8x4 latents (f = 4); no ResNet blocks at the encoder's
    levels (stem, stride-2 convs, 2 middle blocks) and one per decoder level: 0.32M params."""
    c.total_steps = 1600
    c.batch_size = 32
    c.log_every = 50
    c.eval_every = 10_000
    c.checkpoint_every = 500
    # The VAE reads only images; the byte tokenizer skips training a sentencepiece model.
    c.data = data_config(source="shapes", image_size=32, tokenizer="byte", max_text_len=48)
    c.model = dict(
        name="vae",
        channels=16,
        channel_mult=(1, 2, 4),
        num_res_blocks=0,
        latent_channels=4,
        norm_groups=8,
        scaling_factor=1.0,
        dtype="float32",
    )
    c.optimizer.update(lr=2e-3, b1=0.9, b2=0.99, warmup_steps=50, end_factor=0.05)


def _kl_f8(c: ml_collections.ConfigDict) -> None:
    """Stable Diffusion's first stage: widths 128/256/512/512, 2 blocks a level, f = 8; without
    its middle attention block (81.6M parameters against SD's 83.7M)."""
    c.total_steps = 250_000
    c.batch_size = 96
    c.log_every = 100
    c.eval_every = 10_000
    c.checkpoint_every = 5_000
    c.data = data_config(
        source="array_record", image_size=256, max_text_len=77, tokenizer="byte", prefetch=4
    )
    c.model = dict(
        name="vae",
        channels=128,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        latent_channels=4,
        norm_groups=32,
        scaling_factor=0.18215,
        dtype="bfloat16",
    )
    c.optimizer.update(lr=4.5e-6 * c.batch_size)
