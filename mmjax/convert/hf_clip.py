"""Hugging Face transformers `CLIPModel` -> mmjax CLIP (models/clip.py).

Vision: conv patch embedding without bias, class token, pre- and post-LayerNorm, CLS pooling,
bias-free projection. Text: causal, pooled at the end-of-text token (`argmax` of the ids for
configs with the legacy `eos_token_id == 2`, else the first `eos_token_id`), as HF does.
"""

from typing import Any

from mmjax.convert.imported import Imported, activation, finish
from mmjax.convert.torch_layers import Reader
from mmjax.errors import UserError

SOURCE = "HF CLIPModel"


def load(model_or_path: Any) -> tuple[Any, dict]:
    """A `transformers` model instance, or a local `save_pretrained` directory, and its state."""
    if isinstance(model_or_path, str):
        import transformers

        model_or_path = transformers.AutoModel.from_pretrained(model_or_path, local_files_only=True)
    return model_or_path.config, model_or_path.state_dict()


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
    return finish(model, params, v.image_size, v.num_channels, SOURCE)
