"""The matmuls of a jitted step, each timed alone: how fast the step could be if nothing else
cost anything.

A step's time cannot fall below the time of its matmuls. `step_matmuls` walks the step's
jaxpr (forward, autodiff's backward and the optimizer: every `dot_general`, inside nested
jaxprs too, `scan` bodies counted `length` times) and `time_matmuls` runs each distinct shape
alone, jitted in JAX and as the equivalent `torch.einsum`, on random f32 operands. The sum
of count x median time is the matmul-only step time in each engine: a bound on the step's
samples/s and on its fraction of the matmul peak that no fusion or scheduling can beat.
"""

import collections
import math
import statistics
import string
import time
from collections.abc import Callable
from typing import Any

MatmulKey = tuple[tuple[int, ...], tuple[int, ...], tuple, str]  # lhs, rhs, dims, dtype


def step_matmuls(fn: Callable, *args: Any) -> collections.Counter:
    """{(lhs shape, rhs shape, dimension numbers, dtype): how often the step runs it}."""
    import jax
    from jax.extend.core import jaxprs_in_params

    counts: collections.Counter = collections.Counter()

    def walk(jaxpr, times: int) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                lhs, rhs = (v.aval for v in eqn.invars)
                (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
                dims = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
                counts[(lhs.shape, rhs.shape, dims, str(lhs.dtype))] += times
            scan = eqn.primitive.name == "scan"
            inner = times * int(eqn.params["length"]) if scan else times
            for sub in jaxprs_in_params(eqn.params):
                walk(sub, inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr, 1)
    return counts


def matmul_flops(key: MatmulKey) -> int:
    """2 x (batch x lhs-free x rhs-free: the output's size) x (contracted size)."""
    lhs, rhs, ((lc, rc), (_, rb)), _ = key
    contracted = math.prod(lhs[d] for d in lc)
    out = math.prod(n for d, n in enumerate(lhs) if d not in lc)  # batch and lhs-free
    out *= math.prod(n for d, n in enumerate(rhs) if d not in rc and d not in rb)
    return 2 * out * contracted


def einsum_spec(key: MatmulKey) -> str:
    """The einsum equation of a dot_general, output laid out as XLA's (batch, lhs, rhs free)."""
    lhs, rhs, ((lc, rc), (lb, rb)), _ = key
    letters = iter(string.ascii_letters)
    ls = [next(letters) for _ in lhs]
    rs = [next(letters) for _ in rhs]
    for a, b in zip(lc + lb, rc + rb, strict=True):
        rs[b] = ls[a]
    batch = [ls[d] for d in lb]
    out = batch + [ls[d] for d in range(len(lhs)) if d not in lc and d not in lb]
    out += [rs[d] for d in range(len(rhs)) if d not in rc and d not in rb]
    return f"{''.join(ls)},{''.join(rs)}->{''.join(out)}"


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` runs, after one warm-up (and compile) run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _blocking(fn: Callable, *args: Any) -> Any:
    """fn(*args), waited for: JAX dispatches asynchronously."""
    import jax

    return jax.block_until_ready(fn(*args))


def time_matmuls(counts: collections.Counter, repeats: int = 5) -> dict[str, Any]:
    """Matmul-only step time (seconds) in JAX and torch, the matmuls' FLOPs and count, and
    `shapes`: (einsum, count, GFLOP/s in JAX, in torch) per shape, the slowest first."""
    import functools

    import jax
    import numpy as np
    import torch
    from jax import lax

    rng = np.random.default_rng(0)
    total = {"jax": 0.0, "torch": 0.0}
    flops = 0
    shapes = []
    for key, count in counts.items():
        lhs_shape, rhs_shape, dims, _ = key
        a = rng.standard_normal(lhs_shape, np.float32)
        b = rng.standard_normal(rhs_shape, np.float32)
        dot = jax.jit(functools.partial(lax.dot_general, dimension_numbers=dims))
        ja, jb = jax.device_put(a), jax.device_put(b)
        jax_run = functools.partial(_blocking, dot, ja, jb)
        spec = einsum_spec(key)
        torch_run = functools.partial(torch.einsum, spec, torch.from_numpy(a), torch.from_numpy(b))
        seconds = {"jax": median_seconds(jax_run, repeats)}
        seconds["torch"] = median_seconds(torch_run, repeats)
        for name, t in seconds.items():
            total[name] += count * t
        key_flops = matmul_flops(key)
        flops += count * key_flops
        rate = {name: key_flops / t / 1e9 for name, t in seconds.items()}
        label = f"{spec} {lhs_shape}x{rhs_shape}"
        shapes.append((count * min(seconds.values()), label, count, rate["jax"], rate["torch"]))
    shapes = [row[1:] for row in sorted(shapes, reverse=True)]
    return {"seconds": total, "flops": flops, "matmuls": sum(counts.values()), "shapes": shapes}
