"""BLIP3-o (Chen et al., 2025; official JiuhaiChen/BLIP3o): a frozen autoregressive VLM
conditions a diffusion transformer that generates an image's CLIP features.

The backbone (`backbone`: a models/vlm.py VLM or, as in the paper, a Qwen2-VL / Qwen2.5-VL
(models/qwen_vl.py), its parameters under `backbone/`, loaded from a trained VLM's workdir and
frozen by `optimizer.frozen`) reads the prompt with `num_queries`
learnable query embeddings in its query slots (data/blip3o_rows.py; official `latent_queries`,
drawn from N(0, 1)). Its last-layer normed hidden states at the queries, unprojected (the
official `down_projector` is the identity), are the condition of a NextDiT (`dit`:
nn/nextdit.py fields) that predicts on the target grid `image_shape` (CLIP features pooled to
a grid, or VAE latents: the feature space of `config.latents`).

`__call__(batch)` -> {"prediction" [B, 1, h, w, c]}: `images` [B, 1, h, w, c] are the noised
targets, `timesteps` [B, 1] their noise levels sigma, `cond_keep` [B] (optional) zeroes the
condition of the rows with 0 (the official `mask_drop`, for classifier-free guidance).
Without `timesteps` (initialising from a data batch) sigma is 1.
Sampling runs `condition` once and `predict` at every step. Joint training's batches also
hold an understanding row of the backbone (`und_*` keys, data/blip3o_rows.py): its logits are
"und_logits".
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.core import freeze

from mmjax.models.qwen_vl import QwenVL
from mmjax.models.vlm import VLM
from mmjax.nn.dense import dtypes
from mmjax.nn.initializers import logical
from mmjax.nn.nextdit import NextDiT

UND = "und_"  # the prefix of a joint row's understanding keys
# backbone.name -> its model: a models/vlm.py VLM (LLaVA-style) or Qwen2-VL / Qwen2.5-VL (the
# paper's backbones, Sec. 4.1), whose M-RoPE reads a text-only prompt's ids on all 3 axes
BACKBONES = {"vlm": VLM, "qwen_vl": QwenVL}
QWEN_TEMPORAL_PATCH = 2  # Qwen2-VL's patches span 2 frames (an image: one frame twice)


class Blip3o(nn.Module):
    """The model of the module docstring."""

    backbone: Mapping[str, Any]  # the VLM's config.model (`name`: a key of BACKBONES)
    dit: Mapping[str, Any]  # NextDiT fields but the dtypes
    image_shape: Sequence[int]  # the generated grid (h, w, c)
    num_queries: int = 64
    # The backbone's images (size, channels) and visual tokens: initialising runs it once on
    # a blank image so its vision tower and connector exist, the whole trained VLM loads into
    # `backbone` and it still captions. 0: text only (its LM alone). A qwen_vl backbone reads
    # native-resolution patches: `size` is its patch side, and the blank image one merged
    # group of patches (visual tokens unused).
    backbone_image: tuple[int, int] = (0, 3)
    backbone_visual_tokens: int = 0
    decode: bool = False  # `backbone_model`'s KV cache (captioning); generation needs none
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    def __post_init__(self) -> None:
        # Frozen (hashable) configs, so that the model can be a static argument of jax.jit
        object.__setattr__(self, "backbone", freeze(dict(self.backbone)))
        object.__setattr__(self, "dit", freeze(dict(self.dit)))
        super().__post_init__()

    def _backbone_kind(self) -> str:
        name = self.backbone.get("name", "vlm")
        if name not in BACKBONES:
            raise ValueError(
                f"model.backbone.name {name!r} cannot be BLIP3-o's backbone; valid: "
                f"{sorted(BACKBONES)}"
            )
        return name

    def _backbone_fields(self) -> dict[str, Any]:
        fields = {k: v for k, v in self.backbone.items() if k != "name"}
        for key, default in dtypes(self).items():  # the backbone's own, else the model's
            fields[key] = jnp.dtype(fields.get(key, default))
        return fields

    def backbone_model(self, decode: bool = False) -> VLM | QwenVL:
        """The backbone as a stand-alone VLM: `params["backbone"]` are its parameters."""
        model = BACKBONES[self._backbone_kind()]
        return model(**self._backbone_fields(), decode=decode, parent=None)

    def setup(self) -> None:
        self.vlm = BACKBONES[self._backbone_kind()](**self._backbone_fields(), name="backbone")
        self.queries = self.param(
            "queries",
            logical(nn.initializers.normal(1.0), None, "embed"),
            (self.num_queries, self.vlm.width),
            self.param_dtype,
        )
        self.generator = NextDiT(**self.dit, **dtypes(self), name="dit")

    def condition(self, batch: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
        """The backbone's last hidden states at the query slots, [B, Q, backbone width]."""
        slots = batch["query_positions"]
        if slots.shape[-1] != self.num_queries:
            raise ValueError(
                f"query_positions has {slots.shape[-1]} slots but the model has "
                f"{self.num_queries} queries (data.sequence.num_queries, model.num_queries)"
            )
        if self.is_initializing() and self.backbone_image[0]:
            self._build_backbone_vision()
        prompt = {k: batch[k] for k in ("tokens", "positions", "segment_ids", "query_positions")}
        if self.backbone.get("mrope_sections") and prompt["positions"].ndim == 2:
            # text: the same id on the temporal, height and width axes (Qwen2-VL Sec. 2.1)
            pos = prompt["positions"]
            prompt["positions"] = jnp.broadcast_to(pos[:, None], (pos.shape[0], 3, pos.shape[1]))
        queries = jnp.broadcast_to(self.queries, (slots.shape[0], *self.queries.shape))
        hidden = self.vlm(prompt, queries=queries.astype(self.dtype), hidden=True)["hidden"]
        return jnp.take_along_axis(hidden, slots[..., None], axis=1)

    def _build_backbone_vision(self) -> None:
        size, channels = self.backbone_image
        if self._backbone_kind() == "qwen_vl":
            self._build_qwen_vision(size, channels)
            return
        slots = jnp.arange(self.backbone_visual_tokens)[None]
        blank = jnp.zeros((1, size, size, channels), self.dtype)
        ones = jnp.ones_like(slots)
        self.vlm({"tokens": 0 * slots, "positions": slots, "segment_ids": ones,
                  "visual_positions": slots, "images": blank})  # fmt: skip

    def _build_qwen_vision(self, patch: int, channels: int) -> None:
        """One merged group of blank patches (merge x merge of `patch` px) through Qwen-VL."""
        merge = int(self.backbone["vision"].get("merge", 2))
        rows, cols = jnp.divmod(jnp.arange(merge * merge), merge)
        dim = channels * QWEN_TEMPORAL_PATCH * patch * patch
        one, patches = jnp.ones((1, 1), jnp.int32), jnp.ones((1, merge * merge), jnp.int32)
        windows = {}
        if self.backbone["vision"].get("global_every"):  # Qwen2.5-VL: one window holds them
            windows = {"patch_window_ids": patches, "patch_order": jnp.arange(merge * merge)[None]}
        self.vlm({"tokens": 0 * one, "positions": jnp.zeros((1, 3, 1), jnp.int32),
                  "segment_ids": one, "visual_positions": 0 * one,
                  "patches": jnp.zeros((1, merge * merge, dim), self.dtype),
                  "patch_positions": jnp.stack([rows, cols], -1)[None],
                  "patch_segment_ids": patches, **windows})  # fmt: skip

    def predict(self, x: jnp.ndarray, sigma: jnp.ndarray, cond: jnp.ndarray) -> jnp.ndarray:
        """Noised grids [N, h, w, c] at noise levels sigma [N] -> the DiT's output (f32)."""
        if tuple(x.shape[1:]) != tuple(self.image_shape):
            raise ValueError(
                f"targets of shape {tuple(x.shape[1:])} but the model generates "
                f"{tuple(self.image_shape)} (model.image_shape: the feature space's grid)"
            )
        return self.generator(x, sigma, cond)

    def __call__(self, batch: Mapping[str, jnp.ndarray], *, train: bool = False) -> dict:
        cond = self.condition(batch)
        if "cond_keep" in batch:
            cond = cond * batch["cond_keep"][:, None, None].astype(cond.dtype)
        x = batch["images"][:, 0]
        sigma = batch.get("timesteps", jnp.ones(x.shape[:1]))  # absent when initialising
        out = {"prediction": self.predict(x, sigma.reshape(-1), cond)[:, None]}
        if "und_tokens" in batch:  # joint training: the backbone's own understanding rows
            und = {k[len(UND) :]: v for k, v in batch.items() if k.startswith(UND)}
            out["und_logits"] = self.vlm(und, train=train)["logits"]
        return out


Model = Blip3o
