"""BLIP3-o's generation objectives (Chen et al., 2025, Sec. 3.2), on targets the frozen
feature space already encoded (objectives.on_latents: CLIP features or VAE latents).

`target`:
  "flow": flow matching (official `Blip3oQwenForCausalLM.forward`): sigma ~ U(0, 1] (the
          official draws the Lumina-Next scheduler's 1,000 levels uniformly), x_sigma =
          (1 - sigma) x0 + sigma eps, the DiT predicts eps - x0. `logit_normal=True` draws
          sigma from SD3's logit-normal instead (Esser et al., 2024, Sec. 3.1; diffusers'
          `compute_density_for_timestep_sampling`, which the official BLIP3o-NEXT trainer calls
          with "uniform"), which puts the steps at mid noise.
  "mse":  regression (the paper's "CLIP + MSE" design): the DiT reads pure noise at sigma 1
          (what sampling starts from) and predicts x0 in one step, from the condition alone.
          Not zeros: all-zero tokens meet the RMSNorms at their 1/sqrt(eps) slope, and the
          gradients of a fresh DiT overflow (measured: 9e19 at the patch embedding).
The condition of a row is zeroed with probability `cond_drop` (official `mask_drop`, 0.1) so
that sampling can guide with the unconditional prediction. Joint training's rows also hold an
understanding task of the backbone (`und_*`): `lm_weight` x its answer cross-entropy (the
VLM objective's) joins the loss.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mmjax.objectives.diffusion import (
    cfg_keep_mask,
    diffusion_loss,
    flow_sample,
    sample_flow_times,
)
from mmjax.objectives.transfusion import masked_token_ce

TARGETS = ("flow", "mse")


def make_blip3o_loss(
    apply_fn: Callable,
    *,
    target: str = "flow",
    cond_drop: float = 0.1,
    lm_weight: float = 1.0,
    logit_normal: bool = False,
) -> Callable:
    """(params, batch, rng) -> (loss, metrics) for rows from mmjax.data.blip3o_rows."""
    if target not in TARGETS:
        raise ValueError(f"unknown blip3o objective target {target!r}; valid: {TARGETS}")
    if not 0.0 <= cond_drop < 1.0:
        raise ValueError(f"objective.kwargs.cond_drop {cond_drop} is not a probability below 1")

    def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
        t_rng, noise_rng, drop_rng, model_rng = jax.random.split(rng, 4)
        x0 = batch["images"].astype(jnp.float32)
        b = x0.shape[0]
        noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
        if target == "flow":
            # (0, 1]: never the clean target
            sigma = 1.0 - sample_flow_times(t_rng, (b, 1), logit_normal=logit_normal)
            x, want = flow_sample(x0, sigma, noise), noise - x0
        else:
            sigma, x, want = jnp.ones((b, 1)), noise, x0
        keep = cfg_keep_mask(drop_rng, (b,), cond_drop).astype(jnp.float32)
        inputs = {**batch, "images": x, "timesteps": sigma, "cond_keep": keep}
        out = apply_fn(params, inputs, model_rng)
        mse, _ = diffusion_loss(out["prediction"], want)
        metrics = {"diffusion_loss": mse}
        loss = mse
        if "und_logits" in out:
            weights = batch["und_loss_mask"].astype(jnp.float32)
            ce = masked_token_ce(
                out["und_logits"].astype(jnp.float32), batch["und_targets"], weights
            )
            loss = loss + lm_weight * ce
            metrics["lm_loss"] = ce
        return loss, metrics | {"loss": loss}

    return loss_fn
