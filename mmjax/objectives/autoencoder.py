"""The KL-regularised autoencoder loss of latent diffusion (Rombach et al., 2022, Sec. 3).

loss = reconstruction + kl_weight * KL(q(z|x) || N(0, I)), with an L1 (LDM's choice) or L2
pixel reconstruction. As in LDM's `LPIPSWithDiscriminator`, `kl_weight` weighs the KL summed
over latent elements against the reconstruction error summed over pixels (LDM uses 1e-6);
both sums are divided by the number of pixel values so `loss` reads per pixel value.

Left out of LDM's loss: the LPIPS perceptual term (it needs pretrained VGG weights, which an
offline install does not have), the patch-GAN discriminator (it only starts after ~50k steps
in LDM, and sharpens textures that flat synthetic scenes lack) and the learned output log
variance (a constant rescaling of the L1 term at its optimum).
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

RECONSTRUCTIONS = ("l1", "l2")


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) in nats, summed over all but the leading axis: [B]."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)


def psnr(images: jax.Array, reconstruction: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Peak signal-to-noise ratio per image in dB ([B]); `data_range` 2 for images in [-1, 1]."""
    diff = jnp.clip(reconstruction, -data_range / 2, data_range / 2) - images
    mse = jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)
    return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-10))


def vae_loss(
    images: jax.Array,
    reconstruction: jax.Array,
    mean: jax.Array,
    logvar: jax.Array,
    *,
    kl_weight: float = 1e-6,
    reconstruction_loss: str = "l1",
    mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) averaged over the images `mask` (optional, [B]) keeps.

    Metrics: `loss`, `recon_loss` (mean L1 or L2 per pixel value), `kl` (nats per image),
    `psnr` (dB, mean over images), `latent_std` (std of the posterior means: 1 / the scaling
    factor).
    """
    if reconstruction_loss not in RECONSTRUCTIONS:
        raise ValueError(
            f"unknown reconstruction_loss {reconstruction_loss!r}; valid: {RECONSTRUCTIONS}"
        )
    if images.shape != reconstruction.shape:
        raise ValueError(
            f"reconstruction shape {reconstruction.shape} does not match images {images.shape}"
        )
    images = images.astype(jnp.float32)
    diff = reconstruction.astype(jnp.float32) - images
    err = jnp.abs(diff) if reconstruction_loss == "l1" else jnp.square(diff)
    num_values = err[0].size
    rec = jnp.mean(err.reshape(err.shape[0], -1), axis=-1)
    kl = gaussian_kl(mean.astype(jnp.float32), logvar.astype(jnp.float32))
    w = jnp.ones(images.shape[0], jnp.float32) if mask is None else mask.astype(jnp.float32)
    denom = jnp.maximum(jnp.sum(w), 1.0)

    def average(x: jax.Array) -> jax.Array:
        return jnp.sum(w * x) / denom

    rec_loss, kl_mean = average(rec), average(kl)
    loss = rec_loss + kl_weight * kl_mean / num_values
    flat = mean.astype(jnp.float32).reshape(mean.shape[0], -1)
    latent_mean = average(jnp.mean(flat, -1))
    latent_var = average(jnp.mean(jnp.square(flat - latent_mean), -1))
    metrics = {
        "loss": loss,
        "recon_loss": rec_loss,
        "kl": kl_mean,
        "psnr": average(psnr(images, reconstruction.astype(jnp.float32))),
        "latent_std": jnp.sqrt(latent_var),
    }
    return loss, metrics


def vae_objective(
    apply_fn: Callable[[Any, Mapping[str, jax.Array], jax.Array], Mapping[str, jax.Array]],
    *,
    kl_weight: float = 1e-6,
    reconstruction_loss: str = "l1",
) -> Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]:
    """`vae_loss` on a VAE's outputs (models/vae.py) as (params, batch, rng) -> (loss, metrics)."""
    if reconstruction_loss not in RECONSTRUCTIONS:
        raise ValueError(
            f"unknown reconstruction_loss {reconstruction_loss!r}; valid: {RECONSTRUCTIONS}"
        )

    def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
        out = apply_fn(params, batch, rng)
        return vae_loss(
            batch["image"],
            out["reconstruction"],
            out["mean"],
            out["logvar"],
            kl_weight=kl_weight,
            reconstruction_loss=reconstruction_loss,
            mask=batch.get("mask"),
        )

    return loss_fn


def decoder_objective(
    apply_fn: Callable[[Any, Mapping[str, jax.Array], jax.Array], Mapping[str, jax.Array]],
    *,
    reconstruction_loss: str = "l1",
) -> Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]:
    """The pixel reconstruction error (L1 or L2 per pixel value) of a decoder from frozen
    features (models/clip_decoder.py), as (params, batch, rng) -> (loss, {loss, psnr})."""
    if reconstruction_loss not in RECONSTRUCTIONS:
        raise ValueError(
            f"unknown reconstruction_loss {reconstruction_loss!r}; valid: {RECONSTRUCTIONS}"
        )

    def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
        images = batch["image"].astype(jnp.float32)
        reconstruction = apply_fn(params, batch, rng)["reconstruction"].astype(jnp.float32)
        diff = reconstruction - images
        loss = jnp.mean(jnp.abs(diff) if reconstruction_loss == "l1" else jnp.square(diff))
        return loss, {"loss": loss, "psnr": jnp.mean(psnr(images, reconstruction))}

    return loss_fn
