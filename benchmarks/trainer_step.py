"""The trainer's own jitted training step, compiled once for a benchmark, with its FLOPs."""

import collections
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from step_matmuls import step_matmuls  # benchmarks/ is on sys.path as the script's folder


class CompiledStep(NamedTuple):
    compiled: Any  # (state, batch) -> (state, metrics)
    state: Any
    batch: Any  # on the trainer's mesh
    flops: float  # XLA's cost analysis of the compiled step
    matmuls: collections.Counter  # step_matmuls of the jitted step


def compile_trainer_step(trainer: Any, batch: dict, log: Callable[[str], None]) -> CompiledStep:
    """The trainer's step compiled for `batch`, its initial state, FLOPs and matmuls."""
    import flax.linen as nn
    import jax

    from mmjax import parallel

    state, shardings = trainer.init_state(batch)
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        device_batch = parallel.global_batch(batch, trainer.mesh)
        jitted = trainer.jit_train_step(shardings)
        t0 = time.perf_counter()
        compiled = jitted.lower(state, device_batch).compile()
        log(f"mmjax step compiled in {time.perf_counter() - t0:.1f}s")
        matmuls = step_matmuls(jitted, state, device_batch)
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return CompiledStep(compiled, state, device_batch, float(cost["flops"]), matmuls)
