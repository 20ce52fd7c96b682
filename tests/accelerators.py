"""Compiling for accelerators this machine does not have: libtpu's compile-only TPU devices,
and the Triton IR inside a program lowered for CUDA."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from mmjax.aot import no_persistent_cache

__all__ = [
    "check_sharded_2_layer_compile",
    "no_persistent_cache",
    "ops_named",
    "tpu_devices",
    "tpu_mesh",
    "triton_modules",
]


def tpu_devices(topology: str) -> list:
    """libtpu's compile-only devices for `topology` (no TPU needed, only the libtpu wheel)."""
    from jax.experimental.topologies import get_topology_desc

    return list(get_topology_desc(platform="tpu", topology_name=topology).devices)


def tpu_mesh(topology: str, shape: tuple[int, ...], names: tuple[str, ...]) -> Mesh:
    """A mesh of `topology`'s compile-only devices with Auto axes."""
    devices = np.asarray(tpu_devices(topology)).reshape(shape)
    return Mesh(devices, names, axis_types=(AxisType.Auto,) * len(names))


def triton_modules(lowered: jax.stages.Lowered) -> list:
    """The Triton modules (MLIR) of every `__gpu$xla.gpu.triton` call in a CUDA lowering.

    Pallas serialises each kernel's Triton IR as bytecode into the call's backend config;
    this parses it back with the Triton dialect registered, so a test can read the loops.
    """
    from jax._src.interpreters import mlir
    from jax._src.lib import triton
    from jax._src.lib.mlir import ir

    blobs = []

    def walk(op) -> None:
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    attrs = inner.operation.attributes
                    if inner.operation.name == "stablehlo.custom_call" and "triton" in str(
                        attrs["call_target_name"]
                    ):
                        config = ir.DictAttr(attrs["mhlo.backend_config"])
                        blobs.append(ir.StringAttr(config["ir"]).value_bytes)
                    walk(inner.operation)

    walk(lowered.compiler_ir("stablehlo").operation)
    context = ir.Context()
    context.append_dialect_registry(mlir.upstream_dialects)
    triton.dialect.register_dialect(context)
    context.load_all_available_dialects()
    with context:
        return [ir.Module.parse(blob) for blob in blobs]


def ops_named(op, name: str) -> list:
    """Every operation called `name` nested anywhere inside `op`."""
    found = []
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                if inner.operation.name == name:
                    found.append(inner.operation)
                found += ops_named(inner.operation, name)
    return found


def check_sharded_2_layer_compile(experiment: str, overrides: list[str]) -> dict:
    """Compiles a paper preset shrunk to 2 blocks a stack (`overrides`) for v5e:2x2 with
    `mmjax.aot`: it fits, its 2 stacks' attention runs as Pallas calls in each of their 2
    blocks, forward and backward, and FSDP gathers the weights. Returns the report."""
    from mmjax.aot import compile_train_step
    from mmjax.train.config_cli import apply_overrides, load_config

    config = load_config(f"experiments/{experiment}")
    apply_overrides(config, overrides)
    report = compile_train_step(config, "v5e:2x2")
    assert report["chips"] == 4 and report["fits"]
    assert report["pallas_calls"] >= 2 * 2 * 2
    assert report["collectives"]["all-gather"]["count"] > 0
    return report
