"""Parameters get the shardings their logical names map to; sharded steps equal one device."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO, tiny_clip_config
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import models, parallel
from mmjax.train.config_cli import load_config
from mmjax.train.loop import Trainer

MESHES = {
    "fsdp8": dict(data=1, fsdp=8, tensor=1),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}


def _trainer(mesh: dict, devices=None) -> Trainer:
    config = tiny_clip_config()
    config.mesh.update(mesh)
    return Trainer(config, workdir=None, devices=devices)


def _example(trainer: Trainer) -> dict:
    return next(trainer.data_iterator())


@pytest.mark.parametrize("mesh", MESHES.values(), ids=MESHES.keys())
def test_every_parameter_gets_the_sharding_of_its_logical_names(mesh):
    trainer = _trainer(mesh)
    example = _example(trainer)
    state, _ = trainer.init_state(example)

    def init_params(rng):
        return trainer.model.init(rng, {k: v[:1] for k, v in example.items()})["params"]

    boxed = jax.eval_shape(init_params, jax.random.key(0))
    logical = nn.get_partition_spec(boxed)
    expected = nn.logical_to_mesh_sharding(logical, trainer.mesh, trainer.rules)
    flat_state = jax.tree_util.tree_leaves_with_path(state.params)
    flat_expected = jax.tree_util.tree_leaves(
        expected, is_leaf=lambda x: isinstance(x, NamedSharding)
    )
    assert len(flat_state) == len(flat_expected) > 10
    sharded_dims = 0
    for (path, leaf), want in zip(flat_state, flat_expected, strict=True):
        name = jax.tree_util.keystr(path)
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), name
        sharded_dims += sum(axis is not None for axis in want.spec)
    assert sharded_dims > 10  # the mesh really shards most parameters
    # spot check the vocabulary table: ('vocab', 'embed') -> (tensor, fsdp)
    emb = state.params["text_tower"]["token_embedding"]["embedding"]
    assert emb.sharding.spec == PartitionSpec("tensor", "fsdp")


@pytest.mark.parametrize("mesh", MESHES.values(), ids=MESHES.keys())
@pytest.mark.slow
def test_sharded_step_equals_single_device_step(mesh):
    single = _trainer(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    sharded = _trainer(mesh)
    example = _example(single)
    results = []
    for trainer in (single, sharded):
        state, shardings = trainer.init_state(example)
        init = jax.device_get(state.params)
        with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
            step = trainer.jit_train_step(shardings)
            for _ in range(2):  # the warmup's first learning rate is 0
                state, metrics = step(state, parallel.global_batch(example, trainer.mesh))
        results.append((float(metrics["loss"]), jax.device_get(state.params)))
    (loss1, params1), (loss8, params8) = results
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), init, params1)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the step really changed the parameters
    np.testing.assert_allclose(loss8, loss1, atol=1e-5, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), params1, params8
    )


# (experiment, variant): parameter count of the published model (open_clip / HF configs)
PAPER_PARAMS = {
    ("clip", "B/32"): 151.3e6,
    ("clip", "B/16"): 149.6e6,
    ("clip", "L/14"): 427.6e6,
    ("siglip", "B/16"): 203.2e6,
    ("siglip", "L/16"): 652.2e6,
    ("siglip", "So400m/14"): 877.4e6,
}


@pytest.mark.parametrize("experiment, variant", PAPER_PARAMS)
@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=128), dict(data=16, fsdp=16, tensor=4)])
def test_paper_variants_shard_evenly_on_a_pod(experiment, variant, mesh):
    """Every sharded parameter dimension divides evenly on a 256-device pod mesh (abstractly),
    and the parameter count is the published one."""
    config = load_config(os.path.join(REPO, "experiments", f"{experiment}.py") + f":{variant}")
    config.model.text.vocab_size = config.data.vocab_size
    model = models.build_model(config.model)
    size = config.data.image_size
    example = {
        "image": jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
        "text": jax.ShapeDtypeStruct((1, config.data.max_text_len), jnp.int32),
    }
    boxed = jax.eval_shape(lambda r, x: model.init(r, x)["params"], jax.random.key(0), example)
    rules = parallel.validate_rules(config.mesh.rules)
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, **mesh}
    specs = nn.get_partition_spec(boxed)
    shapes = nn.meta.unbox(boxed)
    num_params = 0
    for spec, leaf in zip(
        jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)),
        jax.tree.leaves(shapes),
        strict=True,
    ):
        mesh_axes = nn.logical_to_mesh_axes(spec, rules)
        for dim, axes in zip(leaf.shape, mesh_axes, strict=False):
            axes = (axes,) if isinstance(axes, str) else axes or ()
            shards = math.prod(sizes[a] for a in axes)
            assert dim % shards == 0, (spec, leaf.shape, mesh)
        num_params += leaf.size
    expected = PAPER_PARAMS[experiment, variant]
    assert abs(num_params - expected) / expected < 0.01, num_params
