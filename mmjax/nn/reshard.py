"""Resharding an activation from its weight's split to the batch's, in steps XLA can take."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec


def from_width_to_batch_split(x: jnp.ndarray, axes: tuple[str | None, ...]) -> jnp.ndarray:
    """`nn.with_logical_constraint(x, axes)` (axes[0] "batch") for an x whose last dimension
    comes out split like the "embed" axis of parameters (a row lookup, a small Dense).

    On a mesh where "batch" is split over data x fsdp and "embed" over fsdp, XLA's
    partitioner finds no direct path between the two (the last dim split over fsdp and
    replicated over data, against the first split over both) and replicates the whole tensor
    ("Involuntary full rematerialization"), forward or backward. Passing through the
    sharding in between -- the first dim split over the batch axes the width is not split
    over, the last still over its own -- makes each step cheap: a local slice then an
    all-to-all, and in the backward an all-to-all then an all-gather.
    """
    batch, width = _mesh_axes("batch"), _mesh_axes("embed")
    if set(batch) & set(width) and not jax.sharding.get_abstract_mesh().empty:
        rest = tuple(a for a in batch if a not in width) or None
        middle = PartitionSpec(rest, *([None] * (x.ndim - 2)), width)
        x = jax.lax.with_sharding_constraint(x, middle)
    return nn.with_logical_constraint(x, axes)


def _mesh_axes(logical_name: str) -> tuple[str, ...]:
    """The mesh axes the active logical-axis rules map `logical_name` to (none: ())."""
    (entry,) = nn.logical_to_mesh_axes((logical_name,))
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
