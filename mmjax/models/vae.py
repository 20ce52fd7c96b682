"""A small convolutional VAE: the KL-regularised autoencoder of latent diffusion, scaled down.

The architecture is LDM's `AutoencoderKL` (Rombach et al., 2022, Appendix G; the encoder and
decoder of `ldm/modules/diffusionmodules/model.py`) without its attention layers: a conv stem,
per resolution level `num_res_blocks` ResNet blocks (GroupNorm, SiLU, 3x3 conv, twice, with a
1x1 shortcut when the width changes), a stride-2 conv between levels, two ResNet blocks in the
middle, then GroupNorm, SiLU and a conv to 2 * `latent_channels` (posterior mean and log
variance, the log variance clipped to [-30, 20] as LDM does). The decoder mirrors it with
nearest-neighbour 2x upsampling followed by a 3x3 conv.

As in LDM, level i has width `channels * channel_mult[i]` and there is one downsampling between
consecutive levels, so the latent grid is the image size divided by
`2 ** (len(channel_mult) - 1)`: `channel_mult=(1, 2, 2)` maps 32x32 images to 8x8 latents.

Latents for diffusion: `images_to_latents` returns posterior samples (or means) multiplied by
`scaling_factor`, and `latents_to_images` divides by it before decoding, so a diffusion model
sees latents of about unit variance (Stable Diffusion's 0.18215). `estimate_scaling_factor`
computes it from data as 1 / std of the posterior means; set the result as
`model.scaling_factor` of the configs that use the trained VAE. `LatentSpace` pairs a frozen
VAE (or `Pixels`) with its parameters: what a diffusion model trains and samples through.

Parameters: the wide (width-sized) channel axis of each conv kernel and GroupNorm is the
logical axis `embed` (sharded by FSDP); the 3 image and `latent_channels` axes are replicated.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.nn.conv import Conv, GroupNorm, ResnetBlock
from mmjax.nn.dense import dtypes

LOGVAR_CLIP = (-30.0, 20.0)  # LDM's DiagonalGaussianDistribution clamp


class Encoder(nn.Module):
    """Images [B, H, W, C] -> (mean, logvar), each [B, H/f, W/f, latent_channels] in f32."""

    channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    latent_channels: int
    norm_groups: int
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        kw = dtypes(self)
        mult = tuple(self.channel_mult)
        h = Conv(self.channels, name="conv_in", **kw)(x)
        for level, m in enumerate(mult):
            for i in range(self.num_res_blocks):
                h = ResnetBlock(self.channels * m, self.norm_groups, name=f"down{level}_{i}", **kw)(
                    h
                )
            if level != len(mult) - 1:  # LDM's Downsample: pad right/bottom, 3x3 stride-2 conv
                h = Conv(
                    h.shape[-1],
                    strides=2,
                    padding=((0, 1), (0, 1)),
                    name=f"downsample{level}",
                    **kw,
                )(h)
        for i in range(2):
            h = ResnetBlock(h.shape[-1], self.norm_groups, name=f"mid{i}", **kw)(h)
        h = nn.silu(GroupNorm(self.norm_groups, name="norm_out", **kw)(h))
        moments = Conv(2 * self.latent_channels, wide="in", name="conv_out", **kw)(h)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_CLIP)


class Decoder(nn.Module):
    """Latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels] in f32."""

    channels: int
    channel_mult: Sequence[int]
    num_res_blocks: int
    out_channels: int
    norm_groups: int
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
        kw = dtypes(self)
        mult = tuple(self.channel_mult)
        h = Conv(self.channels * mult[-1], name="conv_in", **kw)(z)
        for i in range(2):
            h = ResnetBlock(h.shape[-1], self.norm_groups, name=f"mid{i}", **kw)(h)
        for level in reversed(range(len(mult))):
            width = self.channels * mult[level]
            for i in range(self.num_res_blocks + 1):
                h = ResnetBlock(width, self.norm_groups, name=f"up{level}_{i}", **kw)(h)
            if level != 0:  # LDM's Upsample: nearest-neighbour 2x, then a 3x3 conv
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = Conv(h.shape[-1], name=f"upsample{level}", **kw)(h)
        h = nn.silu(GroupNorm(self.norm_groups, name="norm_out", **kw)(h))
        return Conv(self.out_channels, wide="in", name="conv_out", **kw)(h).astype(jnp.float32)


class VAE(nn.Module):
    """KL-regularised convolutional autoencoder over images in [-1, 1].

    `__call__(batch, train=...)` encodes `batch["image"]`, samples the diagonal Gaussian
    posterior (training, with the `dropout` rng stream the trainer passes) or takes its mean
    (eval), decodes, and returns {"reconstruction", "mean", "logvar", "latents"} for the
    `vae` objective (objectives/autoencoder.py). `latents` are unscaled.
    """

    channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    in_channels: int = 3
    norm_groups: int = 32
    scaling_factor: float = 1.0
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        """Image size / latent size: 2 ** (number of levels - 1)."""
        return 2 ** (len(tuple(self.channel_mult)) - 1)

    def setup(self) -> None:
        if not self.channel_mult:
            raise ValueError("channel_mult must name at least one level, e.g. (1, 2, 2)")
        for width in (self.channels * m for m in self.channel_mult):
            if width % self.norm_groups:
                raise ValueError(
                    f"level width {width} (channels {self.channels} x channel_mult "
                    f"{tuple(self.channel_mult)}) is not divisible by norm_groups "
                    f"{self.norm_groups}"
                )
        kw = dict(
            channels=self.channels,
            channel_mult=tuple(self.channel_mult),
            num_res_blocks=self.num_res_blocks,
            norm_groups=self.norm_groups,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.encoder = Encoder(latent_channels=self.latent_channels, **kw)
        self.decoder = Decoder(out_channels=self.in_channels, **kw)

    def encode(self, images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Images [B, H, W, in_channels] in [-1, 1] -> posterior (mean, logvar), f32,
        each [B, H/f, W/f, latent_channels] with f = `downsample_factor`."""
        self._check(images, "images", self.in_channels, self.downsample_factor)
        return self.encoder(images)

    def decode(self, latents: jnp.ndarray) -> jnp.ndarray:
        """Unscaled latents [B, h, w, latent_channels] -> images [B, h*f, w*f, in_channels]."""
        self._check(latents, "latents", self.latent_channels, 1)
        return self.decoder(latents)

    def sample(self, mean: jnp.ndarray, logvar: jnp.ndarray) -> jnp.ndarray:
        """A posterior sample mean + exp(logvar / 2) * eps, eps from the `dropout` rng stream."""
        eps = jax.random.normal(self.make_rng("dropout"), mean.shape, mean.dtype)
        return mean + jnp.exp(0.5 * logvar) * eps

    def images_to_latents(self, images: jnp.ndarray, *, sample: bool = False) -> jnp.ndarray:
        """Scaled latents for diffusion: (posterior sample if `sample` else mean) * scaling_factor.

        `sample=True` needs a `dropout` rng: `model.apply(v, x, rngs={"dropout": key}, ...)`.
        """
        mean, logvar = self.encode(images)
        z = self.sample(mean, logvar) if sample else mean
        return z * self.scaling_factor

    def latents_to_images(self, latents: jnp.ndarray) -> jnp.ndarray:
        """Scaled latents (as `images_to_latents` gives) -> images in about [-1, 1]."""
        return self.decode(latents / self.scaling_factor)

    def __call__(self, batch: Mapping[str, jnp.ndarray], *, train: bool = False) -> dict:
        mean, logvar = self.encode(batch["image"])
        z = self.sample(mean, logvar) if train else mean
        return {"reconstruction": self.decode(z), "mean": mean, "logvar": logvar, "latents": z}

    def _check(self, x: jnp.ndarray, what: str, channels: int, factor: int) -> None:
        _check_channels(x, what, channels)
        h, w = x.shape[1:3]
        if h % factor or w % factor:
            raise ValueError(
                f"{what} of {h}x{w} are not divisible by the downsampling factor {factor} "
                f"(2 ** (len(channel_mult) - 1) with channel_mult {tuple(self.channel_mult)})"
            )


class Pixels(nn.Module):
    """The pixel-space option (no VAE), for images small enough to diffuse directly (8x8
    digits): the same latent interface as `VAE`, with latents = images * `scaling_factor`."""

    in_channels: int = 3
    scaling_factor: float = 1.0

    @property
    def latent_channels(self) -> int:
        return self.in_channels

    @property
    def downsample_factor(self) -> int:
        return 1

    def images_to_latents(self, images: jnp.ndarray, *, sample: bool = False) -> jnp.ndarray:
        del sample  # deterministic
        _check_channels(images, "images", self.in_channels)
        return images.astype(jnp.float32) * self.scaling_factor

    def latents_to_images(self, latents: jnp.ndarray) -> jnp.ndarray:
        _check_channels(latents, "latents", self.in_channels)
        return latents.astype(jnp.float32) / self.scaling_factor

    def __call__(self, images: jnp.ndarray) -> jnp.ndarray:
        return self.images_to_latents(images)


def _check_channels(x: jnp.ndarray, what: str, channels: int) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(
            f"{what} must be [batch, height, width, {channels}]; got shape {tuple(x.shape)}"
        )


def estimate_scaling_factor(
    model: nn.Module, params, images: np.ndarray | jnp.ndarray, *, batch_size: int = 256
) -> float:
    """1 / std of the posterior means of `images` over every latent element (as SD's 0.18215
    was chosen: latents times it have unit variance). Pass a few thousand training images."""
    images = np.asarray(images)
    if len(images) < 2:
        raise ValueError("estimate_scaling_factor needs at least 2 images")
    unscaled = model.clone(scaling_factor=1.0)  # its images_to_latents: the posterior means
    encode = jax.jit(lambda p, x: unscaled.apply({"params": p}, x, method="images_to_latents"))
    means = [
        np.asarray(encode(params, images[i : i + batch_size]), np.float64)
        for i in range(0, len(images), batch_size)
    ]
    std = float(np.concatenate([m.reshape(-1) for m in means]).std())
    if not std > 0:
        raise ValueError(f"latents have std {std}: is the VAE trained?")
    return 1.0 / std


@dataclasses.dataclass(frozen=True, eq=False)
class LatentSpace:
    """Images <-> the scaled latents a diffusion model works in, through a frozen autoencoder.

    `autoencoder` is a `VAE` (with its `scaling_factor`), `Pixels` or a models/clip_decoder.py
    `ClipDecoder` (CLIP features: the same methods and fields), `params` its parameters
    (never trained: no gradient flows into them). `sample` encodes to posterior samples
    instead of means and needs an rng. Images and latents may have any leading axes (e.g.
    [B, M, H, W, C]). Jitted callers close over `params`, so they are constants of the program.
    """

    autoencoder: nn.Module  # VAE | Pixels | ClipDecoder
    params: Any
    sample: bool = False

    @classmethod
    def pixels(cls, channels: int) -> "LatentSpace":
        """Pixel space: latents are the images themselves."""
        return cls(Pixels(in_channels=channels), {})

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """(H, W, C) of images -> (H / f, W / f, latent_channels)."""
        h, w = image_shape[:2]
        f = self.autoencoder.downsample_factor
        return (h // f, w // f, self.autoencoder.latent_channels)

    def encode(self, images: jnp.ndarray, rng: jax.Array | None = None) -> jnp.ndarray:
        """Images [..., H, W, C] in [-1, 1] -> scaled latents [..., H/f, W/f, c], f32."""
        if self.sample and rng is None:
            raise ValueError("LatentSpace(sample=True).encode needs an rng")
        rngs = {"dropout": rng} if self.sample else {}
        return self._apply(images, "images_to_latents", sample=self.sample, rngs=rngs)

    def decode(self, latents: jnp.ndarray) -> jnp.ndarray:
        """Scaled latents [..., h, w, c] -> images [..., h*f, w*f, C] in about [-1, 1], f32."""
        return self._apply(latents, "latents_to_images")

    def _apply(self, x: jnp.ndarray, method: str, **kwargs: Any) -> jnp.ndarray:
        lead = x.shape[:-3]
        flat = x.reshape(-1, *x.shape[-3:])
        out = self.autoencoder.apply({"params": self.params}, flat, method=method, **kwargs)
        return jax.lax.stop_gradient(out.reshape(*lead, *out.shape[1:]))


Model = VAE
