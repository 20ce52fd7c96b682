"""The frozen VAE whose latents a diffusion experiment trains on: `config.latents`.

  c.latents = dict(vae_workdir="", scaling_factor=0.0, sample=False)

`vae_workdir` "" keeps the model in pixel space. Otherwise it names the workdir of a trained
autoencoder: a `vae` run (experiments/vae.py) or a `clip_decoder` run (a frozen CLIP tower's
features and their pixel decoder, models/clip_decoder.py: BLIP3-o's feature space). Its
newest checkpoint is restored and never trained further.
The pipeline's pixel images [-1, 1] are encoded to its scaled latents inside the jitted train
step (objectives.on_latents) and in the evals; generated latents are decoded to pixels for the
judges and the sample grids. `scaling_factor` 0 estimates 1 / std of the latents from the
first `SCALING_IMAGES` training images at start and records it in the run's config (so
config.json holds the value that was used); a positive value is used as given. `sample`
encodes to posterior samples instead of means.

The data side stays in pixels: `data.sequence.patch_size` counts pixels, so it must be
`model.patch_size` times the VAE's downsampling factor (2x2 latent patches of an f = 4 VAE:
8x8 pixels), and `model.image_shape` must be the latent shape.
"""

import json
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmjax import models
from mmjax.data.sources import build_source
from mmjax.errors import UserError
from mmjax.models.vae import LatentSpace, estimate_scaling_factor
from mmjax.train.workdir import read_params

SCALING_IMAGES = 2048
AUTOENCODERS = ("vae", "clip_decoder")  # the model.name values a latent space is read from


def load_latent_space(config: ml_collections.ConfigDict, mesh: Mesh) -> LatentSpace | None:
    """The frozen VAE named by `config.latents` with its params replicated on `mesh`; None in
    pixel space. Checks the VAE against the data and model configs first (UserError). Only
    the VAE's parameters are read from its workdir; `config` is not changed (the resolved
    scaling factor is the returned VAE's, `resolved_latents` records it)."""
    latents = config.get("latents")
    if not latents or not latents.get("vae_workdir"):
        _check_pixel_space(config)
        return None
    workdir = os.path.abspath(latents.vae_workdir)
    where = f"latents.vae_workdir {latents.vae_workdir!r}"
    vae, params, step = read_autoencoder(
        workdir, where, mesh, lambda vae, size: _check_shapes(config, vae, size, where)
    )
    factor = float(latents.get("scaling_factor", 0.0))
    how = "given"
    if factor <= 0:
        factor = estimate_scaling_factor(vae, params, _training_images(config, SCALING_IMAGES))
        how = f"estimated from {SCALING_IMAGES} training images"
    space = LatentSpace(
        vae.clone(scaling_factor=factor), params, sample=bool(latents.get("sample", False))
    )
    if jax.process_index() == 0:
        size, c = int(config.data.image_size), int(config.data.sequence.channels)
        shape = "x".join(map(str, space.latent_shape((size, size))))
        print(
            f"Latents: VAE of {workdir} (step {step}), {size}x{size}x{c} images -> "
            f"{shape}, scaling_factor {factor:.4f} ({how})",
            flush=True,
        )
    return space


def read_autoencoder(
    workdir: str, where: str, mesh: Mesh, check: Callable[[nn.Module, int], None] | None = None
) -> tuple[nn.Module, Any, int]:
    """(model, params replicated on `mesh`, step) of the trained autoencoder in
    `workdir` (a vae or clip_decoder run); `check(model, image size)` runs before any
    parameter is read. Errors start with `where`."""
    vae_config = _vae_config(workdir, where)
    vae = models.build_model(vae_config.model)
    vae_size = int(vae_config.data.image_size)
    if check is not None:
        check(vae, vae_size)
    image = jax.ShapeDtypeStruct((1, vae_size, vae_size, vae.in_channels), np.float32)
    shapes = jax.eval_shape(lambda x: vae.init(jax.random.key(0), {"image": x})["params"], image)
    replicated = NamedSharding(mesh, PartitionSpec())

    def abstract_leaf(x: Any) -> jax.ShapeDtypeStruct:
        # no sharding constraint: an evaluator reads its tower inside the run's mesh context
        x = x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)

    abstract = jax.tree.map(abstract_leaf, shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    try:
        step, params = read_params(workdir, abstract)
    except UserError as e:
        raise UserError(f"{where} holds no trained VAE: {e}") from None
    return vae, params, step


def resolved_latents(latents: ml_collections.ConfigDict, space: LatentSpace) -> dict:
    """`config.latents` as the run used it: the VAE's absolute workdir and the scaling factor
    (estimated when given as 0), so config.json records what was used."""
    return {
        **latents.to_dict(),
        "vae_workdir": os.path.abspath(latents.vae_workdir),
        "scaling_factor": float(space.autoencoder.scaling_factor),
    }


def _vae_config(workdir: str, where: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{where} holds no trained VAE: {path} does not exist")
    with open(path) as f:
        vae_config = ml_collections.ConfigDict(json.load(f))
    name = vae_config.get("model", {}).get("name")
    if name not in AUTOENCODERS:
        raise UserError(
            f"{where} holds no trained VAE: its model is {name!r}, not one of {AUTOENCODERS}"
        )
    return vae_config


def latent_image_shape(config: ml_collections.ConfigDict) -> tuple[int, ...] | None:
    """model.image_shape when it is not the data's pixel shape (a VAE's latents), else None."""
    shape = config.model.get("image_shape")
    seq = config.data.get("sequence", {})
    if shape is None or not seq.get("kind"):
        return None
    size = int(config.data.image_size)
    pixels = (size, size, int(seq.get("channels", 3)))
    return tuple(shape) if tuple(shape) != pixels else None


def _check_pixel_space(config: ml_collections.ConfigDict) -> None:
    """Without a VAE the model must read the data's pixels (UserError otherwise)."""
    latent = latent_image_shape(config)
    if latent is not None:
        raise UserError(
            f"model.image_shape {latent} is not the data's pixel shape: it is a VAE latent "
            "shape, so set latents.vae_workdir to a trained VAE (experiments/vae.py)"
        )


def _check_shapes(
    config: ml_collections.ConfigDict, vae: nn.Module, vae_size: int, where: str
) -> None:
    """The VAE's images are the data's, its latents the model's images, patches agree."""
    size, seq = int(config.data.image_size), config.data.sequence
    channels = int(seq.channels)
    if (vae_size, vae.in_channels) != (size, channels):
        raise UserError(
            f"{where}: the VAE was trained on {vae_size}x{vae_size}x{vae.in_channels} images "
            f"but the data gives {size}x{size}x{channels} (data.image_size, "
            "data.sequence.channels)"
        )
    f = vae.downsample_factor
    latent = (size // f, size // f, vae.latent_channels)
    if tuple(config.model.image_shape) != latent:
        raise UserError(
            f"{where}: the VAE maps {size}x{size} images to latents of shape {latent}, but "
            f"model.image_shape is {tuple(config.model.image_shape)}"
        )
    if "patch_size" in config.model and int(seq.patch_size) != int(config.model.patch_size) * f:
        raise UserError(
            f"{where}: data.sequence.patch_size counts pixels: with model.patch_size "
            f"{config.model.patch_size} on latents downsampled {f}x it must be "
            f"{int(config.model.patch_size) * f}, not {seq.patch_size}"
        )


def _training_images(config: ml_collections.ConfigDict, n: int) -> np.ndarray:
    """The first `n` training images as the pipeline gives them: [n, S, S, channels]."""
    from mmjax.evals.transfusion import record_pixels

    source = build_source(config.data, config.data.split_train)
    images = [record_pixels(source[i], config.data) for i in range(min(n, len(source)))]
    return np.stack(images)[..., : int(config.data.sequence.channels)]
