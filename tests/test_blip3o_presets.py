"""BLIP3-o's paper presets are the released models' shapes (Qwen2.5-VL-3B/7B backbones, the
official NextDiTCrossAttn, 64 queries, pooled EVA-CLIP-E features), and the 8B's sharded train
step compiles for a TPU topology (compile-only devices, `mmjax.aot`): shrunk in depth and
sequence only."""

import pytest
from accelerators import check_sharded_2_layer_compile

from mmjax.train.config_cli import load_config

SHRINK = [
    "model.backbone.depth=2",
    "model.backbone.vision.depth=2",
    "model.dit.depth=2",
    "batch_size=8",
    "data.sequence.max_len=320",  # the chat prompt of a synthetic caption and 64 queries
    "mesh.data=1",
    "mesh.fsdp=2",
    "mesh.tensor=2",
]


@pytest.mark.parametrize("size,backbone", [("4B", (36, 2048, 16, 2)), ("8B", (28, 3584, 28, 4))])
def test_the_paper_presets_are_the_released_shapes(size, backbone):
    config = load_config(f"experiments/blip3o.py:{size}")
    m = config.model
    b = m.backbone
    assert b.name == "qwen_vl" and (b.depth, b.width, b.num_heads, b.num_kv_heads) == backbone
    assert b.vision.width == 1280 and b.vision.global_every == 8  # Qwen2.5-VL's ViT
    d = m.dit
    assert (d.width, d.depth, d.num_heads, d.mlp_dim, d.patch_size) == (1792, 24, 28, 4864, 1)
    assert m.num_queries == config.data.sequence.num_queries == 64
    assert tuple(m.image_shape) == (8, 8, 1792)  # EVA-CLIP-E's 32x32 at 448 px, pooled 4x4
    assert config.optimizer.frozen == ("backbone/**",) and config.init_from.family == "qwen_vl"
    assert config.data.vocab_size == 151_643


@pytest.mark.slow
def test_a_2_layer_8b_train_step_compiles_sharded_for_v5e_2x2():
    # the backbone's and the DiT's attention (the queries' gradient runs back through the
    # frozen backbone)
    check_sharded_2_layer_compile("blip3o.py:8B", SHRINK)
