"""Hard routing of tokens to modality experts: grouped matmuls that cost one expert's FLOPs.

BAGEL's Mixture-of-Transformers (Deng et al., 2025, Sec. 2.1) gives every token the weights
of its modality's expert (understanding: text and ViT tokens; generation: VAE latents). The
routing is known from the layout, not learned, so a `Routing` sorts the [B, L] tokens of a
batch into expert order once per forward pass; layers then run `jax.lax.ragged_dot`, a
grouped matmul over the sorted tokens (each group against its expert's kernel), and
per-expert norms. XLA's TPU cost analysis counts the ragged dot as one dense matmul of the
active width (benchmarks/mot_flops.py measures it). With one expert, routing is the identity
and the layers are plain dense ones: the dense baseline of the same code.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from mmjax.nn.dense import INITS
from mmjax.nn.initializers import logical

TOKENS = ("batch", "act_embed")  # sorted tokens [N, width]: N = B * L, split like a batch


@struct.dataclass
class Routing:
    """Where each of a batch's B * L tokens goes: `order` [N] (the flat token index of the
    k-th token in expert order; None: one expert, identity), `inverse` [N] (where token i lands),
    `group_sizes` [G] and `experts` [N] (the expert of the k-th sorted token)."""

    order: jax.Array | None
    inverse: jax.Array | None
    group_sizes: jax.Array
    experts: jax.Array
    shape: tuple[int, int] = struct.field(pytree_node=False)

    @property
    def num_experts(self) -> int:
        return self.group_sizes.shape[0]

    def sort(self, x: jax.Array) -> jax.Array:
        """[B, L, ...] in sequence order -> [N, ...] in expert order."""
        flat = x.reshape(-1, *x.shape[2:])
        return flat if self.order is None else jnp.take(flat, self.order, axis=0)

    def unsort(self, y: jax.Array) -> jax.Array:
        """[N, ...] in expert order -> [B, L, ...] in sequence order."""
        flat = y if self.inverse is None else jnp.take(y, self.inverse, axis=0)
        return flat.reshape(*self.shape, *y.shape[1:])


def route(expert_ids: jax.Array, num_experts: int) -> Routing:
    """The Routing of tokens whose expert is `expert_ids` [B, L] (ints in [0, num_experts))."""
    shape = tuple(expert_ids.shape)
    n = expert_ids.size
    if num_experts == 1:
        ones = jnp.zeros((n,), jnp.int32)
        return Routing(None, None, jnp.full((1,), n, jnp.int32), ones, shape)
    flat = expert_ids.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n, dtype=order.dtype))
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return Routing(order, inverse, sizes, jnp.take(flat, order), shape)


class ExpertDense(nn.Module):
    """Per-expert dense layers over sorted tokens: x [N, *in] -> [N, *features], token k
    through the kernel of expert `routing.experts[k]` (one grouped matmul, `ragged_dot`).

    Kernels are [G, *in, *features] with `kernel_axes` naming the in and feature axes (the
    leading axis is "expert"); one expert gives a plain matmul."""

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    num_experts: int
    num_in: int = 1
    use_bias: bool = True
    init: str = "xavier_uniform"  # | lecun_normal | zeros (nn.dense.INITS)
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, routing: Routing) -> jax.Array:
        in_shape, features = x.shape[x.ndim - self.num_in :], tuple(self.features)
        n_in = len(in_shape)
        if self.init == "zeros":
            init = nn.initializers.zeros_init()
        else:
            mode, distribution = INITS[self.init]
            init = nn.initializers.variance_scaling(
                1.0,
                mode,
                distribution,
                in_axis=tuple(range(1, 1 + n_in)),
                out_axis=tuple(range(1 + n_in, 1 + n_in + len(features))),
                batch_axis=(0,),
            )
        kernel = self.param(
            "kernel",
            logical(init, "expert", *self.kernel_axes),
            (self.num_experts, *in_shape, *features),
            self.param_dtype,
        )
        size_in = 1
        for d in in_shape:
            size_in *= d
        lhs = x.reshape(-1, size_in).astype(self.dtype)
        rhs = kernel.reshape(self.num_experts, size_in, -1).astype(self.dtype)
        if self.num_experts == 1:
            y = lhs @ rhs[0]
        else:
            y = jax.lax.ragged_dot(lhs, rhs, routing.group_sizes)
        y = y.reshape(*x.shape[: x.ndim - n_in], *features)
        if self.use_bias:
            axes = self.kernel_axes[n_in:]
            bias = self.param(
                "bias",
                logical(nn.initializers.zeros_init(), "expert", *axes),
                (self.num_experts, *features),
                self.param_dtype,
            )
            y = y + per_token(bias, routing, x.shape[0]).astype(self.dtype)
        return y


class ExpertRMSNorm(nn.Module):
    """RMSNorm over the last axis of sorted tokens [N, ..., D], with each expert's own scale
    (BAGEL's input/post-attention norms, QK-norms and final norm of the generation expert)."""

    num_experts: int
    epsilon: float = 1e-6
    axis_name: str = "embed"
    dtype: jnp.dtype = jnp.bfloat16
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, routing: Routing) -> jax.Array:
        scale = self.param(
            "scale",
            logical(nn.initializers.ones_init(), "expert", self.axis_name),
            (self.num_experts, x.shape[-1]),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        s = per_token(scale, routing, x.shape[0])
        s = s.reshape(s.shape[0], *([1] * (x.ndim - 2)), s.shape[-1])
        return (normed * s).astype(self.dtype)


def per_token(table: jax.Array, routing: Routing, n: int) -> jax.Array:
    """Each sorted token's row of a per-expert `table` [G, ...] -> [n, ...]."""
    if table.shape[0] == 1:
        return jnp.broadcast_to(table[0], (n, *table.shape[1:]))
    return jnp.take(table, routing.experts, axis=0)
