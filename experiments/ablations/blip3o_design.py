r"""BLIP3-o's design comparison (Chen et al., 2025, Sec. 3.2-3.3, Fig. 4): what the generator
produces and how it is trained, at equal DiT parameters and steps on the frozen backbone.

  clip_flow: CLIP features with flow matching (BLIP3-o's choice; experiments/blip3o.py)
  clip_mse:  CLIP features regressed with MSE (one step from noise, no guidance)
  vae_flow:  VAE latents with flow matching (the tiny VAE's 8x8x4 in 2x2 patches: the same
             16 DiT tokens), judged through the VAE's decoder

  python -m mmjax.ablate --config experiments/ablations/blip3o_design.py \
      --workdir /tmp/blip3o_design

Compare `compositional_accuracy` (and its parts) and `clip_cosine` (every design's images
re-encoded by the same CLIP tower, the clip_decoder run's).
"""

import ml_collections

from mmjax.train.config_cli import load_config

VARIANTS = ("clip_flow", "clip_mse", "vae_flow")
VAE_WORKDIR = "/tmp/vae_tiny"  # experiments/vae.py:tiny


def get_config(arg: str = "clip_flow") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"unknown variant {arg!r}; valid: {VARIANTS}")
    c = load_config("../blip3o.py:tiny_shapes", relative_to=__file__)
    c.evals.generation.clip_workdir = c.latents.vae_workdir  # one tower measures every design
    if arg == "clip_mse":
        c.objective.kwargs.update(target="mse", cond_drop=0.0)
    if arg == "vae_flow":
        c.latents.update(vae_workdir=VAE_WORKDIR, scaling_factor=0.0)  # estimated, as SD's
        c.model.image_shape = (8, 8, 4)
        c.model.dit.patch_size = 2
    c.evals.generation.loss = c.objective.kwargs
    return c
