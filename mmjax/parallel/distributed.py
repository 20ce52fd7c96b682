"""Multi-host start: `jax.distributed.initialize` behind a config flag or MMJAX_DISTRIBUTED=1."""

import os

import jax


def maybe_initialize(enabled: bool) -> None:
    """Initialises the JAX distributed runtime once when asked by config or environment.

    On TPU pods and SLURM/GPU clusters `jax.distributed.initialize()` discovers the
    coordinator itself; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID (read here) as launch/local_multiprocess.sh does.
    """
    if not (enabled or os.environ.get("MMJAX_DISTRIBUTED") == "1"):
        return
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        kwargs = dict(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    jax.distributed.initialize(**kwargs)
