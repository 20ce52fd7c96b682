"""Qwen2-VL and Qwen2.5-VL (Wang et al., 2024; Bai et al., 2025): native-resolution vision
tower (models/qwen_vision.py) -> merged visual tokens in place of the prompt's placeholders
-> a Qwen2 LM with M-RoPE (models/causal_lm.py with `mrope_sections`).

Parameters: `vision` (QwenVisionTower, its merger included) and `lm` (the CausalLM), the
layout mmjax.convert.from_hf_qwen2_vl / from_hf_qwen2_5_vl write.

Batch: `tokens`, `segment_ids` [B, L], `positions` [B, 3, L] (M-RoPE ids, mmjax.data.mrope);
where the row has images or videos, `patches` [B, N, C*2*14*14] packed with their
`patch_positions` [B, N, 2], `patch_segment_ids` [B, N], for window attention
`patch_window_ids` and `patch_order` [B, N] (mmjax.data.native_resolution), and
`visual_positions` [B, N / 4]: the slot of each merged token in the row (>= L: none, the
padding's). With `decode`, batches are chunks written into the KV cache at `cache_offset`;
later chunks carry no patches, and their positions continue at the prompt's largest id + 1
(the rope delta).
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import freeze

from mmjax.models.causal_lm import LMFields
from mmjax.models.qwen_vision import QwenVisionTower
from mmjax.models.vlm import scatter_tokens, with_queries
from mmjax.nn.dense import dtypes

PATCH_KEYS = ("patch_positions", "patch_segment_ids", "visual_positions")


class QwenVL(LMFields, kw_only=True):
    """Packed images and videos + text -> {"logits" [B, L, vocab] (f32), and with patches
    "visual_tokens" [B, N / 4, width]}. `vision`: QwenVisionTower's fields (its out_dim is
    the LM's width)."""

    vision: Mapping[str, Any]

    def __post_init__(self) -> None:
        object.__setattr__(self, "vision", freeze(dict(self.vision)))
        super().__post_init__()

    @nn.compact
    def __call__(
        self,
        batch: Mapping[str, jnp.ndarray],
        *,
        train: bool = False,
        queries: jnp.ndarray | None = None,
        hidden: bool = False,
    ) -> dict:
        """`queries` and `hidden` as models/vlm.py's VLM: BLIP3-o's backbone (models/blip3o.py)."""
        lm = self.language_model(name="lm")
        x = with_queries(lm.embed(batch["tokens"]), batch, queries)
        out = {}
        if "patches" in batch:
            missing = [k for k in PATCH_KEYS if k not in batch]
            if missing:
                raise ValueError(f"a batch with patches needs {missing}")
            out["visual_tokens"] = visual = self.vision_tower()(
                batch["patches"],
                batch["patch_positions"],
                batch["patch_segment_ids"],
                batch.get("patch_window_ids"),
                batch.get("patch_order"),
            )
            slots = batch["visual_positions"].shape
            if slots != visual.shape[:2]:
                raise ValueError(
                    f"visual_positions {slots} do not match the {visual.shape[:2]} merged tokens"
                )
            x = jax.vmap(scatter_tokens)(x, batch["visual_positions"], visual)
        h = lm.hidden(x, batch["segment_ids"], batch["positions"], batch.get("cache_offset"))
        return out | lm.readout(h, hidden)

    @nn.nowrap
    def vision_tower(self, **kw: Any) -> QwenVisionTower:
        """The vision tower (named `vision`; `kw`: fields to change)."""
        fields = {"attention_impl": self.attention_impl, **dtypes(self), **self.vision}
        return QwenVisionTower(**{**fields, "out_dim": self.width, "name": "vision", **kw})


Model = QwenVL
