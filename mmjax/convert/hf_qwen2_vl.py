"""Hugging Face Qwen2-VL and Qwen2.5-VL -> mmjax's QwenVL (models/qwen_vl.py): the vision tower,
its merger, the LM, the tokenizer and the processor's constants.

  imported = mmjax.convert.from_hf_qwen2_vl("/ckpt/Qwen2-VL-2B-Instruct")
  imported = mmjax.convert.from_hf_qwen2_5_vl(model)  # or a transformers model
  model = imported.module()                              # QwenVL
  out = model.apply({"params": imported.params}, batch)

The LM is a Qwen2 (mmjax.convert.hf_llm) with M-RoPE (`mrope_section`). The vision tower's
fused `qkv` splits into mmjax's query, key and value, its Conv3d patch embedding [out, C, 2,
14, 14] becomes a dense kernel over the processor's flattened patches, and the merger's
`mlp.0` / `mlp.2` are fc1 / fc2. Qwen2.5-VL's `fullatt_block_indexes` must repeat every N
blocks (7, 15, 23, 31: N = 8), which the tower's `global_every` expresses. Checkpoints saved
by transformers 4 (`visual.*`, `model.layers.*`) and 5 (`model.visual.*`,
`model.language_model.*`) both import.
"""

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.convert.hf_llm import lm_fields, open_checkpoint, read_lm
from mmjax.convert.imported import activation
from mmjax.convert.torch_layers import array, check_against_model
from mmjax.data.native_resolution import VisionGeometry
from mmjax.errors import UserError
from mmjax.models.qwen_vl import QwenVL

MODEL_TYPES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}
PREPROCESSOR_FILE = "preprocessor_config.json"
# The whole-model config keys of the placeholder and delimiter tokens
TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclasses.dataclass(frozen=True)
class ImportedQwenVL:
    """An imported Qwen2-VL / Qwen2.5-VL: `model` is a run's `config.model` (QwenVL's fields),
    `params` its parameters (unscanned), `geometry` the processor's constants, `tokens` the
    placeholder ids (image_token_id, ...), `tokens_per_second` Qwen2.5-VL's absolute-time
    M-RoPE rate (None for Qwen2-VL), `tokenizer_path` the tokenizer's directory or None."""

    model: dict[str, Any]
    params: dict[str, Any]
    model_type: str
    geometry: VisionGeometry
    tokens: dict[str, int]
    tokens_per_second: float | None
    tokenizer_path: str | None

    def module(self, **kw: Any) -> QwenVL:
        """The QwenVL `params` apply to (`kw`: execution fields such as dtype, decode)."""
        return QwenVL(**{**self.model, **kw})


def convert(model_or_path: Any, expected: str | None = None) -> ImportedQwenVL:
    """Imports a Qwen2-VL or Qwen2.5-VL (`expected`: the model_type it must be)."""
    config, tensors, tokenizer_path = open_checkpoint(model_or_path)
    kind = config.get("model_type")
    if kind not in MODEL_TYPES or (expected is not None and kind != expected):
        want = [expected] if expected else list(MODEL_TYPES)
        raise UserError(f"expected a {want} checkpoint, got model_type {kind!r}")
    source = f"HF {MODEL_TYPES[kind]}"
    model = architecture(config)
    lm = {k: v for k, v in model.items() if k != "vision"}
    tower, vision = model["vision"], config["vision_config"]
    tensors = _Canonical(tensors)
    params = {
        "lm": read_lm(lm, "qwen2", tensors, rename=_lm_name),
        "vision": _vision_params(tensors, tower, kind, source),
    }
    geometry = _geometry(vision, model_or_path, tower)
    checked = check_against_model(params, lambda: _init(model, geometry), source)
    return ImportedQwenVL(
        model={"name": "qwen_vl", **model},
        params=checked,
        model_type=kind,
        geometry=geometry,
        tokens={k: int(config[k]) for k in TOKEN_KEYS if config.get(k) is not None},
        tokens_per_second=vision.get("tokens_per_second") if kind == "qwen2_5_vl" else None,
        tokenizer_path=tokenizer_path,
    )


def architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """QwenVL's fields (the LM's and `vision`) for a checkpoint's config.json dict."""
    kind = config.get("model_type")
    if kind not in MODEL_TYPES:
        raise UserError(f"expected a {list(MODEL_TYPES)} checkpoint, got model_type {kind!r}")
    source = f"HF {MODEL_TYPES[kind]}"
    text = _text_config(config)
    lm = lm_fields(text)
    lm["mrope_sections"] = _mrope_sections(text, source)
    return {**lm, "vision": _vision_fields(config["vision_config"], kind, lm["width"], source)}


def sequence_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The data.sequence keys (mmjax.data.qwen_tasks) a checkpoint's architecture fixes:
    its patch size, ViT windows and temporal M-RoPE rate."""
    vision = config["vision_config"]
    qwen25 = config.get("model_type") == "qwen2_5_vl"
    return dict(
        patch_size=int(vision.get("patch_size", 14)),
        window_size=int(vision.get("window_size", 112)) if qwen25 else 0,
        tokens_per_second=float(vision.get("tokens_per_second", 2)) if qwen25 else 0.0,
    )


def convert_qwen2_vl(model_or_path: Any) -> ImportedQwenVL:
    """Imports a Qwen2-VL (model_type qwen2_vl)."""
    return convert(model_or_path, "qwen2_vl")


def convert_qwen2_5_vl(model_or_path: Any) -> ImportedQwenVL:
    """Imports a Qwen2.5-VL (model_type qwen2_5_vl)."""
    return convert(model_or_path, "qwen2_5_vl")


def _text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The LM's config as a Qwen2 config dict: transformers 5's `text_config`, or (4.x) the
    whole config's own keys; the tie flag may sit on the whole config."""
    text = dict(config.get("text_config") or config)
    text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", False))
    rope = dict(text.get("rope_parameters") or {})
    if not rope:  # 4.x: rope_theta, and rope_scaling {"type": "mrope", "mrope_section": ...}
        rope = {"rope_theta": text.get("rope_theta", 1e6), **(text.get("rope_scaling") or {})}
    text["mrope_section"] = rope.get("mrope_section")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise UserError(f"HF Qwen-VL: rope type {kind!r} is not supported (default M-RoPE)")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": rope.get("rope_theta", 1e6)}
    text.pop("rope_scaling", None)
    return {**text, "model_type": "qwen2"}


def _mrope_sections(text: Mapping[str, Any], source: str) -> tuple[int, ...]:
    sections = text.get("mrope_section")
    if not sections:
        raise UserError(f"{source}: the config has no mrope_section")
    return tuple(int(s) for s in sections)


def _vision_fields(vision: Mapping[str, Any], kind: str, lm_width: int, source: str) -> dict:
    """QwenVisionTower's fields (out_dim is the LM's width, set by the model)."""
    if vision.get("in_channels", 3) != 3:
        raise UserError(f"{source}: in_channels={vision['in_channels']} (mmjax takes RGB)")
    rope = vision.get("rope_parameters") or {}
    fields = dict(
        depth=vision["depth"],
        num_heads=vision["num_heads"],
        merge=vision.get("spatial_merge_size", 2),
        rope_theta=float(rope.get("rope_theta", 10_000.0)),
        activation=activation(vision["hidden_act"], source),
    )
    if kind == "qwen2_vl":
        width, out = vision["embed_dim"], vision["hidden_size"]
        fields.update(width=width, mlp_dim=int(width * vision.get("mlp_ratio", 4)))
    else:
        width, out = vision["hidden_size"], vision["out_hidden_size"]
        fields.update(
            width=width,
            mlp_dim=vision["intermediate_size"],
            norm="rms",
            gated_mlp=True,
            global_every=_global_every(vision["fullatt_block_indexes"], vision["depth"], source),
        )
    if out != lm_width:
        raise UserError(f"{source}: the merger's output {out} is not the LM's width {lm_width}")
    return fields


def _global_every(full: Any, depth: int, source: str) -> int:
    """N such that blocks N-1, 2N-1, ... attend to the whole frame (none: depth + 1)."""
    full = sorted(int(i) for i in full)
    every = full[0] + 1 if full else depth + 1
    if full != list(range(every - 1, depth, every)):
        raise UserError(
            f"{source}: fullatt_block_indexes {full} do not repeat every N blocks, which the "
            "tower's global_every needs"
        )
    return every


class _Canonical(Mapping[str, Any]):
    """A checkpoint's tensors under transformers 5's names (`model.visual.*`,
    `model.language_model.*`, `lm_head.*`), whichever layout it was saved in."""

    OLD: ClassVar[dict[str, str]] = {"model.visual.": "visual.", "model.language_model.": "model."}

    def __init__(self, tensors: Mapping[str, Any]) -> None:
        self.tensors = tensors

    def _source(self, name: str) -> str:
        if name in self.tensors:
            return name
        for new, old in self.OLD.items():
            if name.startswith(new):
                return old + name[len(new) :]
        return name

    def __getitem__(self, name: str) -> Any:
        return self.tensors[self._source(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._source(name) in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def _lm_name(name: str) -> str:
    """A Qwen2 LM tensor name under the VLM's prefix."""
    return "model.language_model." + name[len("model.") :] if name.startswith("model.") else name


def _vision_params(tensors: _Canonical, tower: Mapping[str, Any], kind: str, source: str) -> dict:
    def get(name: str) -> np.ndarray:
        key = f"model.visual.{name}"
        if key not in tensors:
            raise UserError(f"{source} checkpoint has no tensor {key!r}")
        return array(tensors[key])

    def linear(name: str) -> dict:
        return {"kernel": get(f"{name}.weight").T, "bias": get(f"{name}.bias")}

    def norm(name: str) -> dict:
        if kind == "qwen2_5_vl":
            return {"RMSNorm_0": {"scale": get(f"{name}.weight")}}
        return {"LayerNorm_0": {"scale": get(f"{name}.weight"), "bias": get(f"{name}.bias")}}

    width, heads = tower["width"], tower["num_heads"]
    mlp_names = (
        {"gate_proj": "gate", "up_proj": "fc1", "down_proj": "fc2"}
        if kind == "qwen2_5_vl"
        else {"fc1": "fc1", "fc2": "fc2"}
    )
    blocks = {}
    for i in range(tower["depth"]):
        hf = f"blocks.{i}"
        qkv_w = np.split(get(f"{hf}.attn.qkv.weight"), 3)  # [3 * width, width]: q, k, v
        qkv_b = np.split(get(f"{hf}.attn.qkv.bias"), 3)
        attn = {
            name: {"kernel": w.T.reshape(width, heads, -1), "bias": b.reshape(heads, -1)}
            for name, w, b in zip(("query", "key", "value"), qkv_w, qkv_b, strict=True)
        }
        out = get(f"{hf}.attn.proj.weight")
        attn["out"] = {
            "kernel": out.T.reshape(heads, -1, width),
            "bias": get(f"{hf}.attn.proj.bias"),
        }
        blocks[f"block{i}"] = {
            "norm1": norm(f"{hf}.norm1"),
            "norm2": norm(f"{hf}.norm2"),
            "attn": attn,
            "mlp": {ours: linear(f"{hf}.mlp.{name}") for name, ours in mlp_names.items()},
        }
    conv = get("patch_embed.proj.weight")  # [width, C, temporal, P, P]
    return {
        "patch_embed": {"kernel": conv.reshape(conv.shape[0], -1).T},
        "encoder": blocks,
        "merger": {
            "norm": norm("merger.ln_q"),
            "fc1": linear("merger.mlp.0"),
            "fc2": linear("merger.mlp.2"),
        },
    }


def _init(model: Mapping[str, Any], geometry: VisionGeometry) -> Any:
    """QwenVL.init on a one-image example (what check_against_model compares with)."""
    module = QwenVL(**model)
    n = 4 * geometry.merge_size**2
    batch = {
        "tokens": jnp.zeros((1, 4), jnp.int32),
        "segment_ids": jnp.ones((1, 4), jnp.int32),
        "positions": jnp.zeros((1, 3, 4), jnp.int32),
        "patches": jnp.zeros((1, n, geometry.patch_dim), jnp.float32),
        "patch_positions": jnp.zeros((1, n, 2), jnp.int32),
        "patch_segment_ids": jnp.ones((1, n), jnp.int32),
        "visual_positions": jnp.zeros((1, 4), jnp.int32),
    }
    if geometry.window_size is not None:
        batch["patch_window_ids"] = jnp.ones((1, n), jnp.int32)
        batch["patch_order"] = jnp.arange(n, dtype=jnp.int32)[None]
    return module.init(jax.random.key(0), batch)


def _geometry(
    vision: Mapping[str, Any], model_or_path: Any, tower: Mapping[str, Any]
) -> VisionGeometry:
    """The processor's constants: the vision config's patch sizes, and (from a directory's
    preprocessor_config.json) its pixel bounds and normalisation."""
    kw: dict[str, Any] = dict(
        patch_size=vision.get("patch_size", 14),
        temporal_patch_size=vision.get("temporal_patch_size", 2),
        merge_size=tower.get("merge", 2),
        window_size=vision.get("window_size") if tower.get("global_every") else None,
    )
    path = os.path.join(model_or_path, PREPROCESSOR_FILE) if isinstance(model_or_path, str) else ""
    if path and os.path.exists(path):
        with open(path) as f:
            pp = json.load(f)
        size = pp.get("size") or {}
        kw["min_pixels"] = pp.get("min_pixels") or size.get("shortest_edge") or 56 * 56
        kw["max_pixels"] = pp.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280
        for key in ("image_mean", "image_std"):
            if pp.get(key):
                kw[key] = tuple(float(v) for v in pp[key])
    return VisionGeometry(**kw)
