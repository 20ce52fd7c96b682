"""Device meshes from config: axes (data, fsdp, tensor), -1 fills the remaining devices."""

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from mmjax.parallel.axes import MESH_AXES


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves sizes for (data, fsdp, tensor); at most one -1 takes the devices left over."""
    unknown = sorted(set(axis_sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axes {unknown}; valid: {list(MESH_AXES)}")
    sizes = [int(axis_sizes.get(a, 1)) for a in MESH_AXES]
    asked = dict(zip(MESH_AXES, sizes, strict=True))
    fills = [i for i, s in enumerate(sizes) if s == -1]
    if len(fills) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive with at most one -1, got {asked}")
    known = math.prod(s for s in sizes if s != -1)
    if fills and num_devices % known == 0:
        sizes[fills[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {asked} does not fit the {num_devices} available devices")
    return tuple(sizes)


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, tensor), all of Auto type, over `devices` (default all)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(axis_sizes, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)
