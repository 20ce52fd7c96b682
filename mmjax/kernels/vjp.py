"""Attention as one `jax.custom_vjp` over a (forward, backward) pair in the caller's layout.

Every flash-attention backend (Mosaic, Triton, interpret mode, and the XLA formulas of
`reference.py`) is a forward q/k/v/mask -> (o [B, Sq, H, D], lse [B, H, Sq] f32) and a
backward -> (dq, dk, dv). With the residuals in that one layout, a backend can be chosen
inside the forward and the backward separately (`jax.lax.platform_dependent` at lowering
time) and both choices agree whatever the platform.

The mask's arrays that are concrete when traced (no ids, or ids closed over as constants)
stay concrete inside forward and backward -- the block maps are then computed with numpy and
size the kernels' grids exactly -- while traced ones become int operands of the custom_vjp
(cotangent float0).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.kernels.masks import MaskSpec

Array = jnp.ndarray

Forward = Callable[[Array, Array, Array, MaskSpec], tuple[Array, Array]]
Backward = Callable[[Array, Array, Array, MaskSpec, Array, Array, Array], tuple[Array, ...]]


def _split(mask: MaskSpec) -> tuple[Callable[[list[Array]], MaskSpec], list[Array]]:
    """(rebuild, traced leaves): rebuild(traced leaves) is `mask` with its concrete leaves."""
    leaves, treedef = jax.tree.flatten(mask)
    traced = [i for i, x in enumerate(leaves) if isinstance(x, jax.core.Tracer)]

    def rebuild(operands: list[Array]) -> MaskSpec:
        filled = list(leaves)
        for i, x in zip(traced, operands, strict=True):
            filled[i] = x
        return jax.tree.unflatten(treedef, filled)

    return rebuild, [leaves[i] for i in traced]


def flash_vjp(forward: Forward, backward: Backward) -> Callable[..., Array]:
    """(q, k, v, mask) -> o, differentiable in q, k and v through `backward`.

    `forward(q, k, v, mask)` returns (o, lse); `backward(q, k, v, mask, o, lse, do)` returns
    (dq, dk, dv). Residuals: q, k, v, the mask's traced arrays, o and lse.
    """

    def attend(q: Array, k: Array, v: Array, mask: MaskSpec) -> Array:
        rebuild, operands = _split(mask)

        @jax.custom_vjp
        def run(q, k, v, operands):
            return forward(q, k, v, rebuild(operands))[0]

        def run_fwd(q, k, v, operands):
            o, lse = forward(q, k, v, rebuild(operands))
            return o, (q, k, v, operands, o, lse)

        def run_bwd(res, do):
            q, k, v, operands, o, lse = res
            dq, dk, dv = backward(q, k, v, rebuild(operands), o, lse, do)
            no_grad = [np.zeros(jnp.shape(x), jax.dtypes.float0) for x in operands]
            return dq, dk, dv, no_grad

        run.defvjp(run_fwd, run_bwd)
        return run(q, k, v, operands)

    return attend
