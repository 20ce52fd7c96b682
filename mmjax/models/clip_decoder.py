"""CLIP image features as a latent space: a frozen CLIP image tower and a trained pixel decoder.

BLIP3-o (Chen et al., 2025, Sec. 3.2) generates the patch features of a CLIP image tower (its
last layer, after the final norm, average-pooled from 32x32 to 8x8: `pool` 4) and renders
them with a second-stage decoder trained to reconstruct images from those features. Here the
tower is the `image_tower` of a trained mmjax CLIP run (loaded by `init_from`, frozen by
`optimizer.frozen`), and the decoder is the VAE's convolutional decoder (models/vae.py) trained
to regress the pixels; the paper's is a diffusion model (SDXL conditioned on the features).

Same latent interface as `VAE` (models/vae.py `LatentSpace` reads it): `images_to_latents`
-> features [B, h, w, width] x `scaling_factor` (BLIP3-o: 1, unnormalised), and
`latents_to_images`. `__call__(batch)` reconstructs `batch["image"]` through the stopped
features for the `clip_decoder` objective.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import freeze

from mmjax.models.vae import Decoder
from mmjax.models.vit import VisionTransformer
from mmjax.nn.dense import dtypes


class ClipDecoder(nn.Module):
    """The module docstring's feature space: `image` is the CLIP run's `model.image` (the
    tower's VisionTransformer fields), `decoder` the VAE Decoder's channels, channel_mult,
    num_res_blocks and norm_groups; 2 ** (len(channel_mult) - 1) must be the tower's patch
    size times `pool`."""

    image: Mapping[str, Any]
    decoder: Mapping[str, Any]
    pool: int = 1
    in_channels: int = 3
    scaling_factor: float = 1.0
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "image", freeze(dict(self.image)))
        object.__setattr__(self, "decoder", freeze(dict(self.decoder)))
        super().__post_init__()

    @property
    def latent_channels(self) -> int:
        return int(self.image["width"])

    @property
    def downsample_factor(self) -> int:
        return int(self.image["patch_size"]) * self.pool

    def setup(self) -> None:
        levels: Sequence[int] = tuple(self.decoder["channel_mult"])
        if 2 ** (len(levels) - 1) != self.downsample_factor:
            raise ValueError(
                f"the decoder upsamples {2 ** (len(levels) - 1)}x (channel_mult {levels}) but "
                f"the features are patch {self.image['patch_size']} x pool {self.pool} = "
                f"{self.downsample_factor}x smaller than the image"
            )
        self.image_tower = VisionTransformer(**self.image, **dtypes(self))
        self.pixel_decoder = Decoder(out_channels=self.in_channels, **self.decoder, **dtypes(self))

    def features(self, images: jnp.ndarray) -> jnp.ndarray:
        """Images [B, H, W, C] -> unscaled pooled patch features [B, h, w, width] (f32)."""
        _, tokens = self.image_tower(images)
        side = images.shape[1] // int(self.image["patch_size"])
        patches = tokens[:, -side * side :]  # the CLS token (if any) leads
        grid = patches.reshape(-1, side, side, patches.shape[-1]).astype(jnp.float32)
        p = self.pool
        return nn.avg_pool(grid, (p, p), (p, p)) if p > 1 else grid

    def images_to_latents(self, images: jnp.ndarray, *, sample: bool = False) -> jnp.ndarray:
        del sample  # deterministic features
        return self.features(images) * self.scaling_factor

    def latents_to_images(self, latents: jnp.ndarray) -> jnp.ndarray:
        return self.pixel_decoder(latents / self.scaling_factor)

    def __call__(self, batch: Mapping[str, jnp.ndarray], *, train: bool = False) -> dict:
        del train
        feats = jax.lax.stop_gradient(self.features(batch["image"]))
        return {"reconstruction": self.pixel_decoder(feats), "latents": feats}


Model = ClipDecoder
