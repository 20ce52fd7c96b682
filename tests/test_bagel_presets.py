"""BAGEL's paper preset is the released model's shape (Qwen2.5-7B with both experts,
SigLIP2-so400m/14, the FLUX VAE's 16-channel latents), and its sharded train step compiles for
a TPU topology (compile-only devices, `mmjax.aot`) with block-local routing: shrunk in depth,
image size and sequence only."""

import pytest
from accelerators import check_sharded_2_layer_compile

from mmjax.train.config_cli import load_config

SHRINK = [
    "model.depth=2",
    "model.vision_depth=2",
    "batch_size=8",
    "data.image_size=112",
    "model.image_size=112",
    "model.image_shape=(14,14,16)",
    "data.sequence.max_len=256",
    "mesh.data=1",
    "mesh.fsdp=2",
    "mesh.tensor=2",
]


def test_the_paper_preset_is_the_released_shape():
    config = load_config("experiments/bagel.py:7B")
    m = config.model
    assert (m.depth, m.width, m.num_heads, m.num_kv_heads, m.mlp_dim) == (28, 3584, 28, 4, 18944)
    assert m.experts == "mot" and m.qk_norm and m.qkv_bias and m.rope_theta == 1e6
    assert (m.vision_width, m.vision_depth, m.vision_heads, m.vision_patch) == (1152, 26, 16, 14)
    assert m.image_shape[-1] == 16 and config.data.sequence.patch_size == 16  # f = 8, 2x2
    assert config.data.vocab_size == 152_064


@pytest.mark.slow
def test_a_2_layer_preset_train_step_compiles_sharded_for_v5e_2x2():
    # the decoder's and the ViT's attention in each of their 2 blocks, forward and backward
    check_sharded_2_layer_compile("bagel.py:7B", SHRINK)
