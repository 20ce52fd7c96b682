"""big_vision SigLIP import: small random trees in big_vision's npz layout, imported into mmjax,
embed images and text as an independent numpy forward of big_vision's two towers does (1e-5 in
f32: tight enough that exact GELU in place of flax's tanh form fails); malformed or foreign
files fail with one clear line.
"""

import math

import jax
import ml_dtypes
import numpy as np
import pytest

from mmjax import convert
from mmjax.errors import UserError

VOCAB, TEXT_LEN, CHANNELS = 64, 8, 3

CONFIGS = {
    # So400m-like (equal tower widths, MLP not 4x, no image head): SigLIP's layer loop ...
    "so400m_like": dict(
        image=dict(width=32, depth=2, heads=4, mlp=48), patch=4, size=16,
        text=dict(width=32, depth=2, heads=4, mlp=48), embed=32, scan=False,
    ),
    # ... and SigLIP 2's scanned blocks
    "so400m_like_scanned": dict(
        image=dict(width=32, depth=2, heads=4, mlp=48), patch=4, size=16,
        text=dict(width=32, depth=2, heads=4, mlp=48), embed=32, scan=True,
    ),
    # g-opt-like: a wider image tower, the text head projecting up to it; saved in bfloat16,
    # with tiny embeddings so that LayerNorm's epsilon shows
    "gopt_like_bf16": dict(
        image=dict(width=48, depth=3, heads=4, mlp=64), patch=4, size=12,
        text=dict(width=32, depth=2, heads=4, mlp=48), embed=48, scan=True, bf16=True,
        stem_scale=1e-3,
    ),
    # out_dim[0] set: an image head, on big_vision's "mu/4" variant
    "mu_image_head": dict(
        image=dict(width=32, depth=1, heads=2, mlp=128), patch=4, size=16,
        text=dict(width=32, depth=2, heads=4, mlp=48), embed=24, scan=False, image_head=True,
        variant="mu/4",
    ),
}  # fmt: skip


# --- a random tree in big_vision's layout (two_towers.Model, vit.py, text_transformer.py)


def make_tree(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Flat "params/..." keys as big_vision's npz files have them, f32 (or bf16) values."""
    rng = np.random.default_rng(seed)

    def normal(*shape, std=1.0):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def dense(fan_in, *out):
        return {"kernel": normal(*fan_in, *out, std=1 / math.sqrt(math.prod(fan_in))),
                "bias": normal(*out, std=0.1)}  # fmt: skip

    def norm(width):
        return {"scale": 1 + normal(width, std=0.1), "bias": normal(width, std=0.1)}

    def attention(width, heads):
        d = width // heads
        qkv = {n: dense((width,), heads, d) for n in ("query", "key", "value")}
        return {**qkv, "out": dense((heads, d), width)}

    def mlp(width, hidden):
        return {"Dense_0": dense((width,), hidden), "Dense_1": dense((hidden,), width)}

    def encoder(t):
        blocks = [
            {"LayerNorm_0": norm(t["width"]),
             "MultiHeadDotProductAttention_0": attention(t["width"], t["heads"]),
             "LayerNorm_1": norm(t["width"]), "MlpBlock_0": mlp(t["width"], t["mlp"])}
            for _ in range(t["depth"])
        ]  # fmt: skip
        if cfg["scan"]:
            out = {"encoderblock": jax.tree.map(lambda *x: np.stack(x), *blocks)}
        else:
            out = {f"encoderblock_{i}": b for i, b in enumerate(blocks)}
        return {**out, "encoder_norm": norm(t["width"])}

    image, text, p = cfg["image"], cfg["text"], cfg["patch"]
    small = cfg.get("stem_scale", 1.0)
    w = image["width"]
    img = {
        "embedding": {"kernel": normal(p, p, CHANNELS, w, std=small / p),
                      "bias": normal(w, std=small)},
        "pos_embedding": normal(1, (cfg["size"] // p) ** 2, w, std=small),
        "Transformer": encoder(image),
        "MAPHead_0": {"probe": normal(1, 1, w), "LayerNorm_0": norm(w),
                      "MultiHeadDotProductAttention_0": attention(w, image["heads"]),
                      "MlpBlock_0": mlp(w, image["mlp"])},
    }  # fmt: skip
    if cfg.get("image_head"):
        img["head"] = dense((w,), cfg["embed"])
    txt = {
        "Embed_0": {"embedding": normal(VOCAB, text["width"], std=small)},
        "pos_embedding": normal(1, TEXT_LEN, text["width"], std=small),
        "Encoder_0": encoder(text),
        "head": dense((text["width"],), cfg["embed"]),
    }
    tree = {"img": img, "txt": txt, "t": np.array([2.3], np.float32),
            "b": np.array([-3.5], np.float32)}  # fmt: skip
    flat = {"params/" + "/".join(k.key for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}  # fmt: skip
    if cfg.get("bf16"):
        flat = {k: v.astype(ml_dtypes.bfloat16) for k, v in flat.items()}
    return flat


def save(tmp_path, tree: dict) -> str:
    path = str(tmp_path / "siglip.npz")
    np.savez(path, **tree)
    return path


# --- big_vision's forward, re-implemented in numpy (f64) on the raw tree


def layer_norm(x, p):
    """flax nn.LayerNorm: epsilon 1e-6."""
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def gelu(x):
    """flax nn.gelu: approximate=True by default, the tanh form."""
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def mlp_block(x, p):
    h = gelu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def attention(q_in, kv_in, p):
    """flax nn.MultiHeadDotProductAttention: [W, H, D] projections, 1/sqrt(D) scaling."""

    def proj(x, name):
        return np.einsum("blw,whd->blhd", x, p[name]["kernel"]) + p[name]["bias"]

    q, k, v = proj(q_in, "query"), proj(kv_in, "key"), proj(kv_in, "value")
    logits = np.einsum("bqhd,bkhd->bhqk", q / math.sqrt(q.shape[-1]), k)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", weights, v)
    return np.einsum("bqhd,hdw->bqw", out, p["out"]["kernel"]) + p["out"]["bias"]


def encoder(x, p):
    """vit.Encoder: pre-LN Encoder1DBlocks (looped or scanned), then encoder_norm."""
    if "encoderblock" in p:
        depth = len(p["encoderblock"]["LayerNorm_0"]["scale"])
        blocks = [jax.tree.map(lambda a, i=i: a[i], p["encoderblock"]) for i in range(depth)]
    else:
        blocks = [p[f"encoderblock_{i}"] for i in range(sum(k != "encoder_norm" for k in p))]
    for b in blocks:
        y = layer_norm(x, b["LayerNorm_0"])
        x = x + attention(y, y, b["MultiHeadDotProductAttention_0"])
        x = x + mlp_block(layer_norm(x, b["LayerNorm_1"]), b["MlpBlock_0"])
    return layer_norm(x, p["encoder_norm"])


def vit(images, p):
    """vit._Model with pool_type "map": VALID strided conv, learned posemb, MAPHead."""
    kernel = p["embedding"]["kernel"]
    patch = kernel.shape[0]
    b, h, w, c = images.shape
    grid = images.reshape(b, h // patch, patch, w // patch, patch, c)
    x = np.einsum("biyjxc,yxco->bijo", grid, kernel) + p["embedding"]["bias"]
    x = x.reshape(b, -1, kernel.shape[-1]) + p["pos_embedding"]
    x = encoder(x, p["Transformer"])
    head = p["MAPHead_0"]
    probe = np.tile(head["probe"], (b, 1, 1))
    x = attention(probe, x, head["MultiHeadDotProductAttention_0"])
    x = (x + mlp_block(layer_norm(x, head["LayerNorm_0"]), head["MlpBlock_0"]))[:, 0]
    if "head" in p:
        x = x @ p["head"]["kernel"] + p["head"]["bias"]
    return x


def text_transformer(tokens, p):
    """text_transformer._Model with pool_type "last": no mask, last position, head."""
    x = p["Embed_0"]["embedding"][tokens] + p["pos_embedding"]
    x = encoder(x, p["Encoder_0"])[:, -1]
    return x @ p["head"]["kernel"] + p["head"]["bias"]


def reference(tree: dict, images: np.ndarray, tokens: np.ndarray) -> dict:
    """two_towers.Model: each tower's output divided by (its norm + 1e-8)."""
    nested: dict = {}
    for key, value in tree.items():
        *parents, leaf = key.removeprefix("params/").split("/")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.asarray(value, np.float32).astype(np.float64)
    zimg = vit(images.astype(np.float64), nested["img"])
    ztxt = text_transformer(tokens, nested["txt"])
    return {
        "image_emb": zimg / (np.linalg.norm(zimg, axis=1, keepdims=True) + 1e-8),
        "text_emb": ztxt / (np.linalg.norm(ztxt, axis=1, keepdims=True) + 1e-8),
        "logit_scale": np.exp(nested["t"][0]),
        "logit_bias": nested["b"][0],
    }


def inputs(imported: convert.Imported) -> tuple[np.ndarray, np.ndarray]:
    """Images in [-1, 1]; token ids padded with 0 at the end, one row unpadded."""
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (3, *imported.image_size, imported.channels)).astype(np.float32)
    tokens = rng.integers(1, VOCAB, (3, TEXT_LEN)).astype(np.int32)
    tokens[0, 5:] = 0
    tokens[1, 2:] = 0
    return images, tokens


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_big_vision_siglip_parity(tmp_path, name):
    cfg = CONFIGS[name]
    tree = make_tree(cfg)
    imported = convert.from_big_vision_siglip(save(tmp_path, tree), variant=cfg.get("variant"))
    image, text = imported.model["image"], imported.model["text"]
    assert (image["width"], image["depth"], image["num_heads"], image["mlp_dim"]) == tuple(
        cfg["image"].values()
    )
    assert (text["width"], text["depth"], text["num_heads"], text["mlp_dim"]) == tuple(
        cfg["text"].values()
    )
    assert imported.image_size == (cfg["size"], cfg["size"]) and imported.text_len == TEXT_LEN
    assert (imported.image_mean, imported.image_std) == ((0.5,) * 3, (0.5,) * 3)
    assert imported.image_resize == "squash_bilinear"
    images, tokens = inputs(imported)
    module = imported.module()
    out = jax.jit(module.apply)({"params": imported.params}, {"image": images, "text": tokens})
    want = reference(tree, images, tokens)
    for key in ("image_emb", "text_emb"):
        np.testing.assert_allclose(out[key], want[key], atol=1e-5, err_msg=key)
    for key in ("logit_scale", "logit_bias"):
        np.testing.assert_allclose(out[key], want[key], rtol=1e-6, err_msg=key)


def one_line_error(call, match: str) -> None:
    with pytest.raises(UserError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


def test_a_missing_or_unknown_key_is_named(tmp_path):
    tree = make_tree(CONFIGS["so400m_like"])
    missing = dict(tree)
    del missing["params/txt/Encoder_0/encoder_norm/bias"]
    one_line_error(
        lambda: convert.from_big_vision_siglip(save(tmp_path, missing)),
        r"has no 'params/txt/Encoder_0/encoder_norm/bias'$",
    )
    extra = {**tree, "params/img/Transformer/encoderblock_2/LayerNorm_7/scale": np.ones(32)}
    one_line_error(
        lambda: convert.from_big_vision_siglip(extra),
        r"the given npz dict has 'params/img/Transformer/encoderblock_2/LayerNorm_7/scale', "
        "which has no place in mmjax's SigLIP",
    )


def test_a_file_that_is_not_a_siglip_checkpoint_is_refused(tmp_path):
    vit_classifier = {
        "params/embedding/kernel": np.zeros((4, 4, 3, 8), np.float32),
        "params/head/kernel": np.zeros((8, 10), np.float32),
    }
    one_line_error(
        lambda: convert.from_big_vision_siglip(save(tmp_path, vit_classifier)),
        r"is not a big_vision two-towers \(SigLIP\) checkpoint: it has no params/img/\.\.\. "
        r"and params/txt/\.\.\. params \(keys: 'params/embedding/kernel', 'params/head/kernel'\)",
    )
    text = tmp_path / "notes.npz"
    text.write_text("not a zip")
    one_line_error(lambda: convert.from_big_vision_siglip(str(text)), "cannot read .* as an .npz")


def test_a_variant_the_tree_does_not_match_is_named(tmp_path):
    path = save(tmp_path, make_tree(CONFIGS["so400m_like"]))
    one_line_error(
        lambda: convert.from_big_vision_siglip(path, variant="So400m/14"),
        "variant So400m/14 has image width 1152 but the checkpoint's image tower has 32",
    )


def test_load_imports_a_big_vision_siglip_npz(tmp_path):
    path = save(tmp_path, make_tree(CONFIGS["so400m_like_scanned"]))
    imported = convert.load({"format": "big_vision_siglip", "path": path})
    direct = convert.from_big_vision_siglip(path)
    assert imported.model == direct.model and imported.model["name"] == "siglip"
    blocks = imported.params["text_tower"]["encoder"]
    assert sorted(blocks) == ["block0", "block1"]
    jax.tree.map(np.testing.assert_array_equal, imported.params, direct.params)
