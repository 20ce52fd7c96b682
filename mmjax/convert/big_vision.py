"""big_vision SigLIP / SigLIP 2 `.npz` checkpoints -> mmjax SigLIP (models/siglip.py).

Read with numpy alone. The npz is the flat tree of big_vision's `two_towers.Model`
(big_vision/models/proj/image_text/two_towers.py), its keys the "/"-joined flax paths under
`params/` (other entries, such as optimizer state, are ignored as big_vision's
`utils.load_params` does; bare paths work too); bfloat16 arrays, which numpy saves as 2-byte
void, are decoded. The keys, with W a tower's width, H its heads, D = W / H, and where they go
under mmjax's image_tower/, text_tower/ (heads and scalars at the top):

  img/embedding/{kernel [p, p, C, W], bias}       vit.py conv stem -> patch_embed/proj, the
                                                  kernel as [(p p C), W]
  img/pos_embedding [1, (S/p)^2, W]               learned, square grid -> pos_embedding [N, W]
  img/Transformer/encoderblock_{i}/...            vit.Encoder1DBlock (unscanned), or
  img/Transformer/encoderblock/...                stacked on a leading [depth] axis (scan)
                                                  -> encoder/block{i}:
      LayerNorm_0, LayerNorm_1/{scale, bias}      -> norm1, norm2
      MultiHeadDotProductAttention_0/{query, key, value}/{kernel [W, H, D], bias [H, D]},
          out/{kernel [H, D, W], bias [W]}        -> attn (the same shapes)
      MlpBlock_0/Dense_0, Dense_1/{kernel, bias}  -> mlp/fc1, fc2
  img/Transformer/encoder_norm/{scale, bias}      -> norm_post
  img/MAPHead_0/probe [1, 1, W], MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0
                                                  -> map_head/{probe, attn, norm, mlp}
  img/head/{kernel, bias}                         optional (out_dim[0]) -> image_head
  txt/Embed_0/embedding [V, W], txt/pos_embedding [1, L, W]     text_transformer.py
                                                  -> token_embedding, pos_embedding [L, W]
  txt/Encoder_0/encoderblock(_{i})/..., encoder_norm    as in the image tower
                                                  -> encoder/block{i}, norm_final
  txt/head/{kernel, bias}                         -> text_head
  t [1], b [1]                                    log temperature, bias -> logit_scale,
                                                  logit_bias

big_vision's blocks are flax's LayerNorm (epsilon 1e-6) and `nn.gelu` (tanh approximation);
the text is bidirectional, unmasked and pooled at the last position. Every key must be
used; a missing or unknown one is a one-line UserError naming it. The NaFlex image tower
(naflex_vit.py) is not supported.
"""

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mmjax.convert.imported import Imported, finish
from mmjax.errors import UserError

SOURCE = "big_vision SigLIP"
TOWER = dict(activation="gelu_tanh", norm_eps=1e-6)  # flax nn.gelu and nn.LayerNorm defaults

# vit.decode_variant: width, depth, mlp_dim, num_heads
VARIANTS = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "g-opt": (1536, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "G-opt": (1536, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}

Get = Callable[[str], np.ndarray]


def _float32(value: Any) -> np.ndarray:
    """An npz array as f32; bfloat16, saved by numpy as void of 2 bytes, is decoded."""
    value = np.asarray(value)
    if value.dtype.kind == "V" and value.dtype.itemsize == 2:
        return (value.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return value.astype(np.float32)


def _load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            raise UserError(f"{SOURCE}: {path} holds one array, not a checkpoint tree")
        with loaded:
            return dict(loaded)
    except (OSError, ValueError) as e:
        raise UserError(f"{SOURCE}: cannot read {path} as an .npz: {e}") from e


class _Checkpoint:
    """A big_vision npz's params by their "/"-joined paths; remembers which were read."""

    def __init__(self, path_or_npz: str | os.PathLike | Mapping[str, Any]) -> None:
        if isinstance(path_or_npz, Mapping):
            self.name, flat = "the given npz dict", path_or_npz
        else:
            self.name = os.fspath(path_or_npz)
            flat = _load_npz(self.name)
        with_params = any(k.startswith("params/") for k in flat)
        self.prefix = "params/" if with_params else ""
        self.arrays = {
            k.removeprefix(self.prefix): _float32(v)
            for k, v in flat.items()
            if k.startswith(self.prefix)
        }
        self.used: set[str] = set()
        towers = {k.split("/")[0] for k in self.arrays}
        if not {"img", "txt"} <= towers:
            found = ", ".join(repr(self.prefix + k) for k in sorted(self.arrays)[:3])
            raise UserError(
                f"{SOURCE}: {self.name} is not a big_vision two-towers (SigLIP) checkpoint: "
                f"it has no {self.prefix}img/... and {self.prefix}txt/... params (keys: {found})"
            )

    def has(self, key: str) -> bool:
        return key in self.arrays

    def __call__(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            raise UserError(f"{SOURCE}: {self.name} has no {self.prefix + key!r}")
        self.used.add(key)
        return self.arrays[key]

    def shaped(self, key: str, rank: int, layout: str) -> np.ndarray:
        """The array at `key`, which must have `rank` axes (`layout` names them)."""
        value = self(key)
        if value.ndim != rank:
            raise UserError(f"{SOURCE}: {self.prefix + key} has shape {value.shape}, not {layout}")
        return value

    def check_all_read(self) -> None:
        if unknown := sorted(set(self.arrays) - self.used):
            raise UserError(
                f"{SOURCE}: {self.name} has {self.prefix + unknown[0]!r}, which has no place "
                "in mmjax's SigLIP"
            )


def _dense(get: Get, prefix: str) -> dict:
    return {"kernel": get(f"{prefix}/kernel"), "bias": get(f"{prefix}/bias")}


def _norm(get: Get, prefix: str) -> dict:
    return {"LayerNorm_0": {"scale": get(f"{prefix}/scale"), "bias": get(f"{prefix}/bias")}}


def _attention(get: Get, prefix: str) -> dict:
    return {n: _dense(get, f"{prefix}/{n}") for n in ("query", "key", "value", "out")}


def _mlp(get: Get, prefix: str) -> dict:
    return {"fc1": _dense(get, f"{prefix}/Dense_0"), "fc2": _dense(get, f"{prefix}/Dense_1")}


def _block(get: Get, prefix: str) -> dict:
    """vit.Encoder1DBlock -> mmjax.nn.TransformerBlock."""
    return {
        "norm1": _norm(get, f"{prefix}/LayerNorm_0"),
        "attn": _attention(get, f"{prefix}/MultiHeadDotProductAttention_0"),
        "norm2": _norm(get, f"{prefix}/LayerNorm_1"),
        "mlp": _mlp(get, f"{prefix}/MlpBlock_0"),
    }


def _encoder(read: _Checkpoint, prefix: str) -> tuple[dict, dict]:
    """vit.Encoder at `prefix`, scanned or not -> (unscanned mmjax.nn.Transformer params,
    its width, depth, num_heads and mlp_dim)."""
    stacked = f"{prefix}/encoderblock"
    if read.has(f"{stacked}/LayerNorm_0/scale"):
        depth = read(f"{stacked}/LayerNorm_0/scale").shape[0]

        def layer(i: int) -> Get:
            def get(key: str) -> np.ndarray:
                value = read(key)
                if value.shape[0] != depth:
                    raise UserError(
                        f"{SOURCE}: scanned {read.prefix + key} has {value.shape[0]} layers, "
                        f"{read.prefix}{stacked}/LayerNorm_0/scale has {depth}"
                    )
                return value[i]

            return get

        blocks = [_block(layer(i), stacked) for i in range(depth)]
    else:
        depth = 0
        while read.has(f"{stacked}_{depth}/LayerNorm_0/scale"):
            depth += 1
        if not depth:
            raise UserError(f"{SOURCE}: {read.name} has no {read.prefix + stacked}(_0)/...")
        blocks = [_block(read, f"{stacked}_{i}") for i in range(depth)]
    width, heads, _ = blocks[0]["attn"]["query"]["kernel"].shape
    mlp_dim = blocks[0]["mlp"]["fc1"]["kernel"].shape[1]
    shape = dict(width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim)
    return {f"block{i}": b for i, b in enumerate(blocks)}, shape


def _positions(read: _Checkpoint, key: str) -> np.ndarray:
    """A learned [1, N, W] position table -> [N, W]."""
    table = read(key)
    if table.ndim != 3 or table.shape[0] != 1:
        raise UserError(
            f"{SOURCE}: {read.prefix + key} has shape {table.shape}, not [1, tokens, width]"
        )
    return table[0]


def _image_tower(read: _Checkpoint) -> tuple[dict, dict, int, int]:
    """vit.py (pool_type "map") -> (mmjax ViT config, params, image size, channels)."""
    kernel = read.shaped(
        "img/embedding/kernel",
        4,
        "a [patch, patch, channels, width] conv (NaFlex checkpoints are not supported)",
    )
    patch, patch_w, channels, width = kernel.shape
    if patch != patch_w:
        raise UserError(f"{SOURCE}: non-square patches {kernel.shape[:2]} are not supported")
    pos = _positions(read, "img/pos_embedding")
    grid = math.isqrt(pos.shape[0])
    if grid * grid != pos.shape[0]:
        raise UserError(f"{SOURCE}: {pos.shape[0]} image positions do not form a square grid")
    encoder, shape = _encoder(read, "img/Transformer")
    params = {
        "patch_embed": {
            "proj": {"kernel": kernel.reshape(-1, width), "bias": read("img/embedding/bias")}
        },
        "pos_embedding": pos,
        "encoder": encoder,
        "norm_post": _norm(read, "img/Transformer/encoder_norm"),
        "map_head": {
            "probe": read("img/MAPHead_0/probe"),
            "attn": _attention(read, "img/MAPHead_0/MultiHeadDotProductAttention_0"),
            "norm": _norm(read, "img/MAPHead_0/LayerNorm_0"),
            "mlp": _mlp(read, "img/MAPHead_0/MlpBlock_0"),
        },
    }
    config = dict(patch_size=patch, pool="map", pre_norm=False, patch_bias=True, **shape, **TOWER)
    return config, params, grid * patch, channels


def _text_tower(read: _Checkpoint) -> tuple[dict, dict]:
    """text_transformer.py (pool_type "last") -> (mmjax text tower config, params)."""
    embedding = read.shaped("txt/Embed_0/embedding", 2, "[vocab, width]")
    pos = _positions(read, "txt/pos_embedding")
    encoder, shape = _encoder(read, "txt/Encoder_0")
    params = {
        "token_embedding": {"embedding": embedding},
        "pos_embedding": pos,
        "encoder": encoder,
        "norm_final": _norm(read, "txt/Encoder_0/encoder_norm"),
    }
    config = dict(
        vocab_size=embedding.shape[0],
        max_len=pos.shape[0],
        causal=False,
        pool="last",
        mask_padding=False,
        **shape,
        **TOWER,
    )
    return config, params


def _check_variant(variant: str, image: dict) -> None:
    """The image tower must have the sizes of big_vision's `variant` ("So400m/14")."""
    name, _, patch = variant.partition("/")
    if name not in VARIANTS:
        raise UserError(f"{SOURCE}: unknown variant {variant!r}; valid: {sorted(VARIANTS)}")
    want = dict(zip(("width", "depth", "mlp_dim", "num_heads"), VARIANTS[name], strict=True))
    if patch:
        want["patch_size"] = int(patch)
    for key, value in want.items():
        if image[key] != value:
            raise UserError(
                f"{SOURCE}: variant {variant} has image {key} {value} but the checkpoint's "
                f"image tower has {image[key]}"
            )


def _scalar(read: _Checkpoint, key: str) -> np.ndarray:
    value = read(key)
    if value.size != 1:
        raise UserError(f"{SOURCE}: {read.prefix + key} has shape {value.shape}, not [1]")
    return value.reshape(())


def convert(
    path_or_npz: str | os.PathLike | Mapping[str, Any], *, variant: str | None = None
) -> Imported:
    """Imports a big_vision SigLIP or SigLIP 2 checkpoint: an `.npz` path or its loaded dict.

    The architecture is read off the tensors' shapes; `variant` (big_vision's name of the
    image tower, e.g. "So400m/14") additionally checks it. Images are squashed to the square
    and scaled to [-1, 1] (the returned preprocessing); text is the checkpoint's SentencePiece
    ids padded to the full length.
    """
    read = _Checkpoint(path_or_npz)
    image, image_params, image_size, channels = _image_tower(read)
    text, text_params = _text_tower(read)
    if variant is not None:
        _check_variant(variant, image)
    text_head = _dense(read, "txt/head")
    params = {
        "image_tower": image_params,
        "text_tower": text_params,
        "text_head": text_head,
        "logit_scale": _scalar(read, "t"),
        "logit_bias": _scalar(read, "b"),
    }
    image_proj = read.has("img/head/kernel")
    if image_proj:
        params["image_head"] = _dense(read, "img/head")
    read.check_all_read()
    model = dict(
        name="siglip",
        embed_dim=text_head["kernel"].shape[-1],
        image_proj=image_proj,
        dtype="float32",
        image=image,
        text=text,
    )
    return finish(  # the SigLIP colabs' `resize(S)|value_range(-1, 1)`
        model,
        params,
        image_size,
        channels,
        SOURCE,
        image_mean=(0.5,) * channels,
        image_std=(0.5,) * channels,
        image_resize="squash_bilinear",
    )
