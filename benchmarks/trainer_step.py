"""The trainer's own jitted training step, compiled once for a benchmark, with its FLOPs."""

import time
from collections.abc import Callable
from typing import Any


def compile_trainer_step(trainer: Any, batch: dict, log: Callable[[str], None]):
    """(compiled step, initial state, device batch, step FLOPs from XLA's cost analysis)."""
    import flax.linen as nn
    import jax

    from mmjax import parallel

    state, shardings = trainer.init_state(batch)
    with jax.set_mesh(trainer.mesh), nn.logical_axis_rules(trainer.rules):
        device_batch = parallel.global_batch(batch, trainer.mesh)
        t0 = time.perf_counter()
        compiled = trainer.jit_train_step(shardings).lower(state, device_batch).compile()
        log(f"mmjax step compiled in {time.perf_counter() - t0:.1f}s")
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return compiled, state, device_batch, float(cost["flops"])
