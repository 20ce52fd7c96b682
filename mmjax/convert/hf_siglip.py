"""Hugging Face transformers `SiglipModel` -> mmjax SigLIP (models/siglip.py).

Vision: conv patch embedding with bias, no class token and no pre-LayerNorm, MAP-head pooling
(a learned probe through torch's packed `nn.MultiheadAttention`), no projection. Text:
bidirectional, pooled at the last position, linear head with bias. HF's SigLIP layers are
CLIP's, so the encoder and text tower readers are shared with hf_clip. Images: the
`preprocessor_config.json` saved with the weights, else HF SiglipImageProcessor's defaults:
0.5 / 0.5 and a bicubic resize to the square without a crop.
"""

from typing import Any

from mmjax.convert.hf_clip import (
    check_model_type,
    encoder,
    load,
    preprocessing,
    text_tower,
    text_tower_config,
    tower,
)
from mmjax.convert.imported import HF_SIGLIP_PREPROCESSING, Imported, finish
from mmjax.convert.torch_layers import Reader
from mmjax.errors import UserError

SOURCE = "HF SiglipModel"


def model_config(config: Any) -> dict:
    """The mmjax `config.model` of an HF `SiglipConfig`."""
    v, t = config.vision_config, config.text_config
    if not getattr(v, "vision_use_head", True):
        raise UserError(f"{SOURCE}: vision_use_head=False (no pooled embedding) is not supported")
    return dict(
        name="siglip",
        embed_dim=t.projection_size,
        dtype="float32",
        image=dict(
            patch_size=v.patch_size,
            pool="map",
            pre_norm=False,
            patch_bias=True,
            **tower(v, SOURCE),
        ),
        text=dict(causal=False, pool="last", **text_tower_config(t, SOURCE)),
    )


def map_head(read: Reader, prefix: str, num_heads: int) -> dict:
    return {
        "probe": read(f"{prefix}.probe"),
        "attn": read.packed_attention(f"{prefix}.attention", num_heads),
        "norm": read.layer_norm(f"{prefix}.layernorm"),
        "mlp": read.mlp(f"{prefix}.mlp.fc1", f"{prefix}.mlp.fc2"),
    }


def convert(model_or_path: Any) -> Imported:
    """Imports an HF `SiglipModel` (instance or local directory) with its parameters."""
    config, state = load(model_or_path)
    check_model_type(config, "siglip", "use mmjax.convert.from_hf_clip for CLIP")
    model = model_config(config)
    image = model["image"]
    read = Reader(state, SOURCE)
    e = "vision_model.embeddings"
    params = {
        "image_tower": {
            "patch_embed": read.patch_conv(
                f"{e}.patch_embedding.weight", f"{e}.patch_embedding.bias"
            ),
            "pos_embedding": read(f"{e}.position_embedding.weight"),
            "encoder": encoder(read, "vision_model.encoder", image["depth"], image["num_heads"]),
            "norm_post": read.layer_norm("vision_model.post_layernorm"),
            "map_head": map_head(read, "vision_model.head", image["num_heads"]),
        },
        "text_tower": text_tower(read, model["text"]),
        "text_head": read.linear("text_model.head"),
        "logit_scale": read("logit_scale").reshape(()),
        "logit_bias": read("logit_bias").reshape(()),
    }
    v = config.vision_config
    pp = preprocessing(model_or_path, HF_SIGLIP_PREPROCESSING)
    return finish(model, params, v.image_size, v.num_channels, SOURCE, **pp)
