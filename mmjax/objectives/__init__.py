"""Pure loss functions; `build_loss` wraps a model's apply as (params, batch, rng) -> loss."""

from collections.abc import Callable, Mapping
from typing import Any

import jax

from mmjax.objectives.autoencoder import decoder_objective, vae_objective
from mmjax.objectives.bagel import make_bagel_loss
from mmjax.objectives.blip import make_blip_loss
from mmjax.objectives.blip3o import make_blip3o_loss
from mmjax.objectives.contrastive import (
    clip_loss,
    clip_loss_sharded,
    siglip_loss,
    siglip_loss_sharded,
)
from mmjax.objectives.transfusion import make_transfusion_loss
from mmjax.objectives.unifluid import make_unifluid_loss
from mmjax.objectives.vlm import make_vlm_loss

ApplyFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], Mapping[str, jax.Array]]
LossFn = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[jax.Array, dict]]


def _clip(apply_fn: ApplyFn) -> LossFn:
    """CLIP's softmax InfoNCE, sharded over the context mesh's batch axes."""

    def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
        out = apply_fn(params, batch, rng)
        return clip_loss_sharded(out["image_emb"], out["text_emb"], out["logit_scale"])

    return loss_fn


def _siglip(apply_fn: ApplyFn) -> LossFn:
    """SigLIP's sigmoid loss, chunked over the context mesh's batch axes."""

    def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
        out = apply_fn(params, batch, rng)
        return siglip_loss_sharded(
            out["image_emb"], out["text_emb"], out["logit_scale"], out["logit_bias"]
        )

    return loss_fn


OBJECTIVES: dict[str, Callable[..., LossFn]] = {
    "bagel": make_bagel_loss,
    "blip": make_blip_loss,
    "blip3o": make_blip3o_loss,
    "clip": _clip,
    "clip_decoder": decoder_objective,
    "siglip": _siglip,
    "vae": vae_objective,
    "transfusion": make_transfusion_loss,
    "unifluid": make_unifluid_loss,
    "vlm": make_vlm_loss,
}


def build_loss(name: str, apply_fn: ApplyFn, **kwargs: Any) -> LossFn:
    """The loss named by `config.objective.name`, applied to the model's outputs."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective.name {name!r}; valid: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](apply_fn, **kwargs)


def encode_images(
    batch: Mapping[str, jax.Array], latents: Any, rng: jax.Array
) -> dict[str, jax.Array]:
    """`batch` with its pixel `images` [B, M, H, W, C] replaced by the scaled latents of the
    frozen `latents` (models/vae.py `LatentSpace`; `rng` for posterior samples)."""
    return {**batch, "images": latents.encode(batch["images"], rng)}


def on_latents(loss_fn: LossFn, latents: Any) -> LossFn:
    """`loss_fn` on latents: each batch's images are encoded first, in the same jit (the
    objective then noises latents, not pixels)."""

    def wrapped(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
        encoded = encode_images(batch, latents, jax.random.fold_in(rng, 1))
        return loss_fn(params, encoded, rng)

    return wrapped


__all__ = [
    "OBJECTIVES",
    "build_loss",
    "clip_loss",
    "clip_loss_sharded",
    "encode_images",
    "on_latents",
    "siglip_loss",
    "siglip_loss_sharded",
]
