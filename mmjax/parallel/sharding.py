"""Shardings of parameters, train states and batches from logical axis names."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence) -> Any:
    """Maps a tree of boxed (LogicallyPartitioned) abstract values to NamedShardings."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def init_sharded(
    init_fn: Callable[..., Any], mesh: Mesh, rules: Sequence, *args: Any
) -> tuple[Any, Any]:
    """Runs `init_fn(*args)` under jit so every leaf is created directly with its sharding.

    `init_fn` returns a tree with boxed logical metadata; the result is unboxed.
    Returns (tree, shardings).
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_shardings(abstract, mesh, rules)
    with nn.logical_axis_rules(rules):
        tree = jax.jit(lambda *a: nn.meta.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return tree, shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a batch: leading dim split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's local batch into global arrays sharded over data x fsdp."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
