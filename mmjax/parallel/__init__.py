"""Meshes, the logical axis vocabulary, shardings of params and batches, multi-host start."""

from mmjax.parallel.axes import DEFAULT_RULES, LOGICAL_AXES, MESH_AXES, validate_rules
from mmjax.parallel.distributed import maybe_initialize
from mmjax.parallel.mesh import make_mesh, mesh_shape
from mmjax.parallel.sharding import (
    UnevenShardingError,
    batch_sharding,
    global_batch,
    init_sharded,
    logical_shardings,
)

__all__ = [
    "DEFAULT_RULES",
    "LOGICAL_AXES",
    "MESH_AXES",
    "UnevenShardingError",
    "batch_sharding",
    "global_batch",
    "init_sharded",
    "logical_shardings",
    "make_mesh",
    "maybe_initialize",
    "mesh_shape",
    "validate_rules",
]
