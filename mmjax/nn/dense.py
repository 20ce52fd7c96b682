"""A DenseGeneral whose kernel is created in its final shape, so logical axes fit its rank.

(flax's DenseGeneral initialises a flat 2D kernel and reshapes it, which breaks logical
partitioning of multi-axis kernels such as [embed, heads, head_dim].)
"""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.nn.initializers import logical


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [N, in] @ kernel [in, out], differentiated by the two plain matmuls of its VJP.

    Autodiff's weight gradient contracts the activations' leading axis; XLA's CPU backend then
    writes large activation gradients transposed before the dot (8% of a Transfusion training
    step, benchmarks/transfusion_step.py). Transposing the small operand here avoids that; on
    accelerators it is the same arithmetic.
    """
    return x @ kernel


def _matmul_fwd(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple]:
    return x @ kernel, (x, kernel)


def _matmul_bwd(res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = res
    return g @ kernel.T, x.T @ g


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dtypes(module: nn.Module) -> dict[str, Any]:
    """`module`'s compute and parameter dtypes as the keywords its sublayers take."""
    return {"dtype": module.dtype, "param_dtype": module.param_dtype}


INITS = {"xavier_uniform": ("fan_avg", "uniform"), "lecun_normal": ("fan_in", "truncated_normal")}


def kernel_init(init: str, n_in: int, n_out: int, leading: int = 0) -> Any:
    """The initializer `init` (an INITS name or "zeros") of a kernel [*lead, *in, *out] with
    `leading` axes of separate kernels (experts) before its `n_in` in and `n_out` out axes."""
    if init == "zeros":
        return nn.initializers.zeros_init()
    mode, distribution = INITS[init]
    return nn.initializers.variance_scaling(
        1.0,
        mode,
        distribution,
        in_axis=tuple(range(leading, leading + n_in)),
        out_axis=tuple(range(leading + n_in, leading + n_in + n_out)),
        batch_axis=tuple(range(leading)),
    )


class DenseGeneral(nn.Module):
    """Contracts the last `num_in` axes of x with a kernel [*in, *features] (`kernel_axes`)."""

    features: Sequence[int]
    kernel_axes: Sequence[str | None]
    num_in: int = 1
    use_bias: bool = True
    init: str = "xavier_uniform"  # | lecun_normal | zeros
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        in_shape = x.shape[-self.num_in :]
        features = tuple(self.features)
        if len(self.kernel_axes) != len(in_shape) + len(features):
            raise ValueError(
                f"kernel_axes {self.kernel_axes} do not match kernel rank "
                f"{len(in_shape) + len(features)}"
            )
        n_in = len(in_shape)
        init = kernel_init(self.init, n_in, len(features))
        kernel = self.param(
            "kernel", logical(init, *self.kernel_axes), (*in_shape, *features), self.param_dtype
        )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        size = math.prod(in_shape)
        y = matmul(x.reshape(-1, size), kernel.reshape(size, -1))
        y = y.reshape(*x.shape[: x.ndim - n_in], *features)
        if self.use_bias:
            bias = self.param(
                "bias",
                logical(nn.initializers.zeros_init(), *self.kernel_axes[n_in:]),
                features,
                self.param_dtype,
            )
            y = y + bias.astype(self.dtype)
        return y
