"""Evaluations run during training and standalone; `build_evaluators` reads `config.evals`."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import ml_collections
from jax.sharding import Mesh

from mmjax.errors import UserError
from mmjax.evals.bagel import BagelEval
from mmjax.evals.blip3o import Blip3oEval
from mmjax.evals.features import EvalContext
from mmjax.evals.linear_probe import LinearProbe
from mmjax.evals.qwen_vl import QwenVlEval
from mmjax.evals.retrieval import Retrieval
from mmjax.evals.transfusion import TransfusionEval
from mmjax.evals.unifluid import UniFluidEval
from mmjax.evals.vlm import VlmEval
from mmjax.evals.zero_shot import ZeroShotClassifier
from mmjax.models.vae import LatentSpace

EVALUATORS = {
    "bagel": BagelEval,
    "blip3o": Blip3oEval,
    "zero_shot": ZeroShotClassifier,
    "retrieval": Retrieval,
    "linear_probe": LinearProbe,
    "transfusion": TransfusionEval,
    "unifluid": UniFluidEval,
    "vlm": VlmEval,
    "qwen_vl": QwenVlEval,
}

Evaluator = Callable[[Any], dict[str, float]]


def build_evaluators(
    evals_cfg: ml_collections.ConfigDict,
    model: nn.Module,
    tokenizer,
    data_cfg: ml_collections.ConfigDict,
    mesh: Mesh,
    workdir: str | None = None,
    latents: LatentSpace | None = None,
) -> dict[str, Evaluator]:
    """One evaluator per entry of `config.evals` (`{name: {type: ..., ...}}`); `latents` is
    the frozen VAE of a latent diffusion model (models/vae.py `LatentSpace`), if any."""
    evaluators = {}
    ctx = EvalContext(model, tokenizer, data_cfg, mesh, workdir, latents)
    for name, cfg in evals_cfg.items():
        if cfg.type not in EVALUATORS:
            raise UserError(
                f"evals.{name}.type {cfg.type!r} is unknown; valid: {sorted(EVALUATORS)}"
            )
        cfg = ml_collections.ConfigDict({**cfg.to_dict(), "name": name})
        evaluators[name] = EVALUATORS[cfg.type](cfg, ctx)
    return evaluators
