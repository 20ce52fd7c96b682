"""open_clip `CLIP` models (ViT image tower, built-in text tower) -> mmjax CLIP.

The mmjax config is read off the instance itself (layer shapes, heads, activation, LayerNorm
eps, pooling, causal mask), so any checkpoint that `open_clip.create_model(name,
pretrained=local_file)` loads imports without a separate config. Features mmjax's CLIP does not
have (timm or HF towers, layer scale, attentional pooling, average pooling, LayerNorm after
pooling) are refused by name rather than silently dropped. Images: the model's own
`preprocess_cfg` (mean, std, interpolation, resize mode), open_clip's defaults where unset.
"""

import dataclasses
from typing import Any

from mmjax.convert.imported import Imported, finish
from mmjax.convert.torch_layers import Reader
from mmjax.errors import UserError

SOURCE = "open_clip"
TEXT_POOLS = {"argmax": "argmax", "eos": "eos", "last": "last"}


def _activation(mlp: Any) -> str:
    act = mlp.gelu
    name = type(act).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if name == "GELU":
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    raise UserError(f"{SOURCE}: activation {name} has no mmjax equivalent")


def _check_supported(model: Any) -> None:
    import open_clip

    if type(model) is not open_clip.CLIP:
        raise UserError(
            f"{SOURCE}: expected an open_clip.CLIP, got {type(model).__name__} "
            "(custom text towers, CoCa and timm towers are not supported)"
        )
    visual = model.visual
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        raise UserError(f"{SOURCE}: image tower {type(visual).__name__} is not a ViT")
    unsupported = {
        "attentional pooling": visual.attn_pool is not None,
        f"image pool_type {visual.pool_type!r} (only 'tok')": visual.pool_type != "tok",
        "LayerNorm after pooling": visual.final_ln_after_pool,
        "layer scale": any(
            type(b.ls_1).__name__ != "Identity"
            for b in [*visual.transformer.resblocks, *model.transformer.resblocks]
        ),
        f"text pool_type {model.text_pool_type!r}": model.text_pool_type not in TEXT_POOLS,
        "a text projection other than a matrix": not _is_matrix(model.text_projection),
    }
    refused = [name for name, present in unsupported.items() if present]
    if refused:
        raise UserError(f"{SOURCE}: unsupported model features: {', '.join(refused)}")


def _is_matrix(projection: Any) -> bool:
    return projection is not None and getattr(projection, "ndim", 0) == 2


def model_config(model: Any) -> dict:
    """The mmjax `config.model` of an open_clip.CLIP instance."""
    _check_supported(model)
    visual, blocks = model.visual, model.visual.transformer.resblocks
    text_blocks = model.transformer.resblocks
    pool = TEXT_POOLS[model.text_pool_type]
    return dict(
        name="clip",
        embed_dim=visual.proj.shape[1],
        dtype="float32",
        image=dict(
            patch_size=visual.patch_size[0],
            width=visual.conv1.out_channels,
            depth=len(blocks),
            num_heads=blocks[0].attn.num_heads,
            mlp_dim=blocks[0].mlp.c_fc.out_features,
            pool="cls",
            pre_norm=type(visual.ln_pre).__name__ != "Identity",
            patch_bias=visual.conv1.bias is not None,
            activation=_activation(blocks[0].mlp),
            norm_eps=visual.ln_post.eps,
        ),
        text=dict(
            vocab_size=model.token_embedding.num_embeddings,
            max_len=model.positional_embedding.shape[0],
            width=model.token_embedding.embedding_dim,
            depth=len(text_blocks),
            num_heads=text_blocks[0].attn.num_heads,
            mlp_dim=text_blocks[0].mlp.c_fc.out_features,
            causal=model.attn_mask is not None,
            pool=pool,
            mask_padding=False,  # open_clip attends to padding (after the pooled token)
            pad_id=getattr(model, "pad_id", 0),
            activation=_activation(text_blocks[0].mlp),
            norm_eps=model.ln_final.eps,
            **(dict(eos_id=model.text_eos_id) if pool == "eos" else {}),
        ),
    )


def preprocessing(model: Any) -> dict:
    """`finish`'s image keywords from the model's preprocess config (what
    `open_clip.create_model` records; open_clip's defaults, OpenAI CLIP's, for keys unset)."""
    import open_clip

    cfg = dataclasses.asdict(open_clip.transform.PreprocessCfg())
    cfg.update(open_clip.get_model_preprocess_cfg(model))
    geometries = {"shortest": "shortest_side", "squash": "squash"}
    if cfg["resize_mode"] not in geometries:
        raise UserError(
            f"{SOURCE}: resize_mode {cfg['resize_mode']!r} (resize, then pad to the square) has "
            "no mmjax data.image_resize rule"
        )
    # open_clip resizes bilinear for "bilinear" and bicubic for anything else at inference
    resample = "bilinear" if cfg["interpolation"] == "bilinear" else "bicubic"
    return dict(
        image_mean=cfg["mean"],
        image_std=cfg["std"],
        image_resize=f"{geometries[cfg['resize_mode']]}_{resample}",
    )


def encoder(read: Reader, prefix: str, depth: int, num_heads: int) -> dict:
    """`prefix.resblocks.{i}` of an open_clip Transformer -> mmjax.nn.Transformer params."""
    blocks = {}
    for i in range(depth):
        p = f"{prefix}.resblocks.{i}"
        blocks[f"block{i}"] = {
            "norm1": read.layer_norm(f"{p}.ln_1"),
            "attn": read.packed_attention(f"{p}.attn", num_heads),
            "norm2": read.layer_norm(f"{p}.ln_2"),
            "mlp": read.mlp(f"{p}.mlp.c_fc", f"{p}.mlp.c_proj"),
        }
    return blocks


def convert(model: Any, pretrained: str | None = None) -> Imported:
    """Imports an open_clip.CLIP instance, or a model name with a local checkpoint file."""
    if isinstance(model, str):
        import open_clip

        model = open_clip.create_model(model, pretrained=pretrained, load_weights=True)
    config = model_config(model)
    image, text = config["image"], config["text"]
    read = Reader(model.state_dict(), SOURCE)
    image_tower = {
        "patch_embed": read.patch_conv(
            "visual.conv1.weight", "visual.conv1.bias" if image["patch_bias"] else None
        ),
        "cls": read("visual.class_embedding")[None],
        "pos_embedding": read("visual.positional_embedding"),
        "encoder": encoder(read, "visual.transformer", image["depth"], image["num_heads"]),
        "norm_post": read.layer_norm("visual.ln_post"),
    }
    if image["pre_norm"]:
        image_tower["norm_pre"] = read.layer_norm("visual.ln_pre")
    params = {
        "image_tower": image_tower,
        "text_tower": {
            "token_embedding": {"embedding": read("token_embedding.weight")},
            "pos_embedding": read("positional_embedding"),
            "encoder": encoder(read, "transformer", text["depth"], text["num_heads"]),
            "norm_final": read.layer_norm("ln_final"),
        },
        "image_head": {"kernel": read("visual.proj")},  # used as x @ proj: already [in, out]
        "text_head": {"kernel": read("text_projection")},
        "logit_scale": read("logit_scale").reshape(()),
    }
    if read.has("logit_bias"):
        config["logit_bias_init"] = 0.0  # creates the parameter; its value is imported
        params["logit_bias"] = read("logit_bias").reshape(())
    visual = model.visual
    pp = preprocessing(model)
    return finish(config, params, visual.image_size, visual.conv1.in_channels, SOURCE, **pp)
