"""Model families; `build_model(model_cfg)` picks one by `model_cfg.name`."""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmjax.models import (
    bagel,
    blip,
    blip3o,
    clip,
    clip_decoder,
    lm,
    qwen_vl,
    siglip,
    transfusion,
    unifluid,
    vae,
    vlm,
)
from mmjax.models.causal_lm import LMFields

MODELS = {
    "bagel": bagel.Model,
    "blip": blip.Blip,
    "blip2": blip.Blip2,
    "blip3o": blip3o.Model,
    "clip": clip.Model,
    "clip_decoder": clip_decoder.Model,
    "lm": lm.Model,
    "qwen_vl": qwen_vl.Model,
    "siglip": siglip.Model,
    "transfusion": transfusion.Model,
    "unifluid": unifluid.Model,
    "vae": vae.Model,
    "vlm": vlm.Model,
}


def holds_causal_lm(name: str) -> bool:
    """Whether model `name` holds a CausalLM under `lm` (what an imported LLM goes into)."""
    return isinstance(MODELS.get(name), type) and issubclass(MODELS[name], LMFields)


def build_model(model_cfg: Mapping[str, Any]) -> nn.Module:
    """Instantiates `MODELS[name](**rest)`, turning dtype names into dtypes."""
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    name = cfg.pop("name")
    if name not in MODELS:
        raise ValueError(f"unknown model.name {name!r}; valid: {sorted(MODELS)}")
    for key in ("dtype", "param_dtype"):
        if key in cfg:
            cfg[key] = jnp.dtype(cfg[key])
    return MODELS[name](**cfg)
