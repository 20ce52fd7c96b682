"""The Qwen2-VL and Qwen2.5-VL paper presets build and their sharded train steps compile for
a TPU topology (compile-only devices, `mmjax.aot`): the packed ViT's segment-id attention and
the LM's run as Mosaic kernels inside shard_map. Shrunk in depth and sequence only; widths,
heads, M-RoPE sections and the ViT's window blocks are the released models'."""

import pytest
from accelerators import check_sharded_2_layer_compile

from mmjax.train.config_cli import load_config

SHRINK = [
    "model.depth=2",
    "model.vision.depth=2",
    "batch_size=4",
    "data.sequence.max_len=256",
    "data.sequence.patch_capacity=256",
    "data.sequence.min_pixels=3136",
    "data.sequence.max_pixels=50176",
    "mesh.data=1",
    "mesh.fsdp=2",
    "mesh.tensor=2",
]


@pytest.mark.parametrize(
    "experiment", ["qwen2_vl.py:2B", "qwen2_vl.py:72B", "qwen2_5_vl.py:3B", "qwen2_5_vl.py:72B"]
)
def test_the_paper_presets_are_the_released_shapes(experiment):
    config = load_config(f"experiments/{experiment}")
    model = config.model
    assert model.mrope_sections == (16, 24, 24)
    assert (model.width // model.num_heads) // 2 == sum(model.mrope_sections)
    assert (model.vision.width, model.vision.depth, model.vision.num_heads) == (1280, 32, 16)
    assert config.init_from.format == "hf_qwen_vl" and config.optimizer.frozen == ("vision/**",)
    qwen25 = experiment.startswith("qwen2_5")
    assert config.data.sequence.window_size == (112 if qwen25 else 0)
    assert model.vision.get("global_every", 0) == (8 if qwen25 else 0)
    assert config.data.sequence.box_format == ("absolute" if qwen25 else "relative")


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["qwen2_vl.py:2B", "qwen2_5_vl.py:3B"])
def test_a_2_layer_preset_train_step_compiles_sharded_for_v5e_2x2(experiment):
    overrides = list(SHRINK)
    if experiment.startswith("qwen2_5"):
        overrides.append("model.vision.global_every=2")  # one window block, one global
    # the ViT's and the LM's attention in each of their 2 blocks, forward and backward
    check_sharded_2_layer_compile(experiment, overrides)
