"""The measured f32 matmul peak the step benchmarks compare against (JAX and torch)."""

import time


def matmul_probe(n: int):
    """() -> {"jax": GFLOP/s, "torch": GFLOP/s} of one f32 n x n @ n x n matmul in each."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(a.T.copy())
    ta, tb = torch.from_numpy(a), torch.from_numpy(a.T.copy())
    mm = jax.jit(jnp.matmul)
    fns = {"jax": lambda: jax.block_until_ready(mm(ja, jb)), "torch": lambda: torch.mm(ta, tb)}
    for fn in fns.values():
        fn()

    def probe() -> dict[str, float]:
        out = {}
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name] = 2 * n**3 / (time.perf_counter() - t0) / 1e9
        return out

    return probe
