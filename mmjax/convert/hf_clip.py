"""Hugging Face transformers `CLIPModel` -> mmjax CLIP (models/clip.py).

Vision: conv patch embedding without bias, class token, pre- and post-LayerNorm, CLS pooling,
bias-free projection. Text: causal, pooled at the end-of-text token (`argmax` of the ids for
configs with the legacy `eos_token_id == 2`, else the first `eos_token_id`), as HF does.
Images: the `preprocessor_config.json` saved with the weights, else OpenAI CLIP's published
mean, std and bicubic shortest-side resize with a centre crop.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from mmjax.convert.imported import OPENAI_CLIP_PREPROCESSING, Imported, activation, finish
from mmjax.convert.torch_layers import Reader
from mmjax.data.image_ops import split_resize
from mmjax.errors import UserError

SOURCE = "HF CLIPModel"
PREPROCESSOR_FILE = "preprocessor_config.json"


def load(model_or_path: Any) -> tuple[Any, dict]:
    """A `transformers` model instance, or a local `save_pretrained` directory, and its state."""
    if isinstance(model_or_path, str):
        import transformers

        model_or_path = transformers.AutoModel.from_pretrained(model_or_path, local_files_only=True)
    return model_or_path.config, model_or_path.state_dict()


def preprocessing(model_or_path: Any, published: dict) -> dict:
    """`finish`'s image keywords from the HF image processor config saved with the weights (a
    local directory's `preprocessor_config.json`), else the model type's `published` ones."""
    path = os.path.join(model_or_path, PREPROCESSOR_FILE) if isinstance(model_or_path, str) else ""
    if not os.path.isfile(path):
        return published
    with open(path) as f:
        return processor_preprocessing(json.load(f), published, path)


def processor_preprocessing(pp: Mapping[str, Any], published: dict, where: str) -> dict:
    """An HF image processor config (resize, centre crop, rescale, normalise) as `finish`'s
    image keywords; keys it lacks take the `published` values. A resize mmjax has no rule for
    is a UserError naming `where`."""
    pp = {k: v for k, v in pp.items() if v is not None}  # transformers 5 writes unset as null
    geometry, resample = split_resize(published["image_resize"])
    resample = Image.Resampling(pp.get("resample", resample)).name.lower()
    scale = float(pp.get("rescale_factor", 1 / 255)) if pp.get("do_rescale", True) else 1.0
    mean, std = 0.0, 1.0
    if pp.get("do_normalize", True):
        mean = pp.get("image_mean", published["image_mean"])
        std = pp.get("image_std", published["image_std"])
    k = 255.0 * scale  # (x * scale - mean) / std == (x / 255 - mean / k) / (std / k)
    return dict(
        image_mean=tuple(float(m) / k for m in np.atleast_1d(mean)),
        image_std=tuple(float(s) / k for s in np.atleast_1d(std)),
        image_resize=f"{_geometry(pp, geometry, where)}_{resample}",
    )


def _geometry(pp: Mapping[str, Any], published: str, where: str) -> str:
    """The RESIZES geometry of an HF processor's size and crop: the shortest edge resized to
    the crop size then cropped (CLIP), or a square resize without a crop (SigLIP)."""
    if not pp.get("do_resize", True):
        raise UserError(f"{where}: do_resize false: mmjax resizes every image to data.image_size")
    size = pp.get("size")
    if size is None:
        return published
    if isinstance(size, int):  # older configs: a bare int means the processor's geometry
        shortest = published == "shortest_side"
        size = {"shortest_edge": size} if shortest else {"height": size, "width": size}
    crop = pp.get("crop_size")
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    crops = pp.get("do_center_crop", published == "shortest_side")
    edge = size.get("shortest_edge")
    if set(size) == {"shortest_edge"} and crops and crop == {"height": edge, "width": edge}:
        return "shortest_side"
    square = set(size) == {"height", "width"} and size["height"] == size["width"]
    if square and (not crops or crop == size):
        return "squash"
    cropped = f" then a centre crop to {crop}" if crops else ""
    raise UserError(
        f"{where}: resizing to {size}{cropped} has no mmjax data.image_resize rule (shortest_side: "
        "the shortest edge to the crop size, then the crop; squash: to a square, no crop)"
    )


def check_model_type(config: Any, expected: str, hint: str) -> None:
    got = getattr(config, "model_type", type(config).__name__)
    if got != expected:
        raise UserError(f"expected a {expected!r} checkpoint but got a {got!r} one; {hint}")


def tower(config: Any, source: str) -> dict:
    """The shape keys shared by mmjax's ViT and text tower, from an HF CLIP/SigLIP sub-config."""
    return dict(
        width=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_dim=config.intermediate_size,
        activation=activation(config.hidden_act, source),
        norm_eps=config.layer_norm_eps,
    )


def text_tower_config(config: Any, source: str) -> dict:
    """Text tower keys (vocabulary, context, padding) from an HF CLIP/SigLIP text config."""
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    return dict(
        vocab_size=config.vocab_size,
        max_len=config.max_position_embeddings,
        pad_id=pad,
        mask_padding=False,  # CLIP: padding follows the causal pooled token; SigLIP attends it
        **tower(config, source),
    )


def model_config(config: Any) -> dict:
    """The mmjax `config.model` of an HF `CLIPConfig`."""
    v, t = config.vision_config, config.text_config
    # HF keeps argmax pooling for configs saved with the legacy eos_token_id 2 (PR #24773)
    legacy = t.eos_token_id == 2
    eos_pool = dict(pool="argmax") if legacy else dict(pool="eos", eos_id=t.eos_token_id)
    return dict(
        name="clip",
        embed_dim=config.projection_dim,
        logit_scale_init=float(config.logit_scale_init_value),
        dtype="float32",
        image=dict(
            patch_size=v.patch_size,
            pool="cls",
            pre_norm=True,
            patch_bias=False,
            **tower(v, SOURCE),
        ),
        text=dict(causal=True, **eos_pool, **text_tower_config(t, SOURCE)),
    )


def encoder(read: Reader, prefix: str, depth: int, num_heads: int) -> dict:
    """`prefix.layers.{i}` of an HF CLIP/SigLIP encoder -> mmjax.nn.Transformer params."""
    blocks = {}
    for i in range(depth):
        p = f"{prefix}.layers.{i}"
        attn = [f"{p}.self_attn.{n}_proj" for n in ("q", "k", "v", "out")]
        blocks[f"block{i}"] = {
            "norm1": read.layer_norm(f"{p}.layer_norm1"),
            "attn": read.attention(*attn, num_heads),
            "norm2": read.layer_norm(f"{p}.layer_norm2"),
            "mlp": read.mlp(f"{p}.mlp.fc1", f"{p}.mlp.fc2"),
        }
    return blocks


def text_tower(read: Reader, text: dict) -> dict:
    e = "text_model.embeddings"
    return {
        "token_embedding": {"embedding": read(f"{e}.token_embedding.weight")},
        "pos_embedding": read(f"{e}.position_embedding.weight"),
        "encoder": encoder(read, "text_model.encoder", text["depth"], text["num_heads"]),
        "norm_final": read.layer_norm("text_model.final_layer_norm"),
    }


def convert(model_or_path: Any) -> Imported:
    """Imports an HF `CLIPModel` (instance or local directory) with its parameters."""
    config, state = load(model_or_path)
    check_model_type(config, "clip", "use mmjax.convert.from_hf_siglip for SigLIP")
    model = model_config(config)
    image = model["image"]
    read = Reader(state, SOURCE)
    e = "vision_model.embeddings"
    params = {
        "image_tower": {
            "patch_embed": read.patch_conv(f"{e}.patch_embedding.weight"),
            "cls": read(f"{e}.class_embedding")[None],
            "pos_embedding": read(f"{e}.position_embedding.weight"),
            "norm_pre": read.layer_norm("vision_model.pre_layrnorm"),
            "encoder": encoder(read, "vision_model.encoder", image["depth"], image["num_heads"]),
            "norm_post": read.layer_norm("vision_model.post_layernorm"),
        },
        "text_tower": text_tower(read, model["text"]),
        "image_head": read.linear("visual_projection", bias=False),
        "text_head": read.linear("text_projection", bias=False),
        "logit_scale": read("logit_scale").reshape(()),
    }
    v = config.vision_config
    pp = preprocessing(model_or_path, OPENAI_CLIP_PREPROCESSING)
    return finish(model, params, v.image_size, v.num_channels, SOURCE, **pp)
