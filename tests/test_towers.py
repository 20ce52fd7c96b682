"""The towers' pooled-only path (last block computed at the pooled token) equals the full one;
the ViT's position embeddings."""

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models.text import TextTransformer
from mmjax.models.vit import VisionTransformer
from mmjax.nn.sincos import sincos_2d

TOWER = dict(width=32, depth=2, num_heads=4, mlp_dim=64, dtype=jnp.float32)


@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_vit_cls_pooled_only_equals_the_full_pass(remat_policy):
    vit = VisionTransformer(patch_size=4, pool="cls", remat_policy=remat_policy, **TOWER)
    images = jax.random.normal(jax.random.key(0), (3, 16, 16, 3))
    params = vit.init(jax.random.key(1), images)
    full, tokens = vit.apply(params, images)
    pooled, none = vit.apply(params, images, pooled_only=True)
    assert tokens.shape == (3, 17, 32) and none is None
    np.testing.assert_allclose(pooled, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_vit_sincos2d_posemb_is_fixed_and_added_to_the_patches_only(pool):
    vit = VisionTransformer(patch_size=4, pool=pool, posemb="sincos2d", pre_norm=False, **TOWER)
    images = jax.random.normal(jax.random.key(0), (2, 16, 8, 3))
    params = vit.init(jax.random.key(1), images)
    assert "pos_embedding" not in params["params"]
    embedded = vit.apply(params, images, feature_layer=0)[1]
    patches = embedded[:, 1:] if pool == "cls" else embedded
    proj = nn.unbox(params["params"]["patch_embed"]["proj"])
    pixels = einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=4, q=4)
    no_pos = pixels @ proj["kernel"] + proj["bias"]
    np.testing.assert_allclose(
        patches - no_pos, jnp.broadcast_to(sincos_2d(4, 2, 32), patches.shape), atol=1e-5
    )
    if pool == "cls":
        np.testing.assert_allclose(
            embedded[:, 0], jnp.broadcast_to(nn.unbox(params["params"]["cls"])[0], (2, 32))
        )
    with pytest.raises(ValueError, match="unknown posemb 'rope'"):
        VisionTransformer(patch_size=4, posemb="rope", **TOWER).init(jax.random.key(1), images)


@pytest.mark.parametrize(
    "text",
    [
        dict(causal=True, pool="eot", mask_padding=True),  # CLIP
        dict(causal=False, pool="last", mask_padding=False),  # SigLIP
        dict(causal=True, pool="eos", mask_padding=True, eos_id=7, remat_policy="full"),
    ],
)
@pytest.mark.slow
def test_text_pooled_only_equals_the_full_pass(text):
    tower = TextTransformer(vocab_size=16, max_len=10, **text, **TOWER)
    tokens = np.array(
        [[3, 5, 7, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7, 0], [7, 1, 1, 1, 1, 1, 1, 1]]
    )
    params = tower.init(jax.random.key(0), tokens)
    full, _ = tower.apply(params, tokens)
    pooled, none = tower.apply(params, tokens, pooled_only=True)
    assert none is None
    np.testing.assert_allclose(pooled, full, rtol=1e-5, atol=1e-6)
    # a random readout: sum(pooled ** 2) is constant after the final LayerNorm
    readout = jax.random.normal(jax.random.key(2), full.shape)
    grads = [
        jax.grad(lambda p, k=k: jnp.sum(tower.apply(p, tokens, pooled_only=k)[0] * readout))(params)
        for k in (False, True)
    ]
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads[0]))
    for a, b in zip(*map(jax.tree.leaves, grads), strict=True):  # f32 sums of ~1e2 terms
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)
