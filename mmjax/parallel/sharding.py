"""Shardings of parameters, train states and batches from logical axis names."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES = ("data", "fsdp")


class UnevenShardingError(ValueError):
    """A parameter dimension the mesh axes of its logical name do not divide."""


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence) -> Any:
    """Maps a tree of boxed (LogicallyPartitioned) abstract values to NamedShardings.

    Raises UnevenShardingError naming the first parameter whose dimension the mesh axes its logical
    name maps to do not divide (e.g. a width of 1,152 over 256 fsdp devices)."""
    specs = nn.get_partition_spec(abstract_tree)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    _check_even(nn.meta.unbox(abstract_tree), shardings, abstract_tree)
    return shardings


def _check_even(shapes: Any, shardings: Any, boxed: Any) -> None:
    """UnevenShardingError unless each dimension splits evenly over its sharding's devices."""
    names = {
        jax.tree_util.keystr(path): getattr(leaf, "names", None)
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
        )[0]
    }
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    for (path, leaf), sharding in zip(flat, jax.tree.leaves(shardings), strict=True):
        for dim, (size, entry) in enumerate(zip(leaf.shape, sharding.spec, strict=False)):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
            devices = int(np.prod([sharding.mesh.shape[a] for a in axes]))
            if size % devices:
                key = jax.tree_util.keystr(path)
                logical = names.get(key) or ()
                which = f" ({logical[dim]!r})" if dim < len(logical) else ""
                where = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
                raise UnevenShardingError(
                    f"{where}: dimension {dim}{which} of size {size} does not "
                    f"split over mesh axes {tuple(axes)} = {devices} devices; choose mesh sizes "
                    "that divide it (e.g. move devices from fsdp to data)"
                )


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
