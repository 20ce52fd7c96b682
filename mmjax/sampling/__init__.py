"""Decoding with a KV cache, diffusion samplers, classifier-free guidance."""

from mmjax.sampling.diffusion import (
    cfg,
    ddim_sample,
    ddpm_sample,
    euler_sample,
    guided,
)

__all__ = ["cfg", "ddim_sample", "ddpm_sample", "euler_sample", "guided"]
