"""Hard routing of tokens to modality experts: grouped matmuls that cost one expert's FLOPs.

BAGEL's Mixture-of-Transformers (Deng et al., 2025) gives every token the weights
of its modality's expert (understanding: text and ViT tokens; generation: VAE latents). The
routing is known from the layout, not learned, so a `Routing` sorts the [B, L] tokens of a
batch into expert order once per forward pass, each device's rows among themselves (a global
sort would gather every token to every device); layers then run `grouped_matmul` over the
sorted tokens (each group against its expert's kernel) and per-expert norms. Its forward pass
and input gradient are `jax.lax.ragged_dot`, which XLA's TPU cost analysis counts as one dense
matmul of the active width; the ragged dot's kernel gradient would cost every expert's full
matmul, so `grouped_matmul` computes it in `WEIGHT_GRAD_BLOCKS` blocks of sorted tokens
instead, each through its own expert: (1 + (G - 1) / blocks) times the active FLOPs
(benchmarks/mot_flops.py measures the step). With one expert, routing is the identity and the
layers are plain dense ones: the dense baseline of the same code.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from mmjax.kernels.dispatch import dividing_mesh_axes
from mmjax.nn.dense import kernel_init, matmul
from mmjax.nn.initializers import logical

TOKENS = ("batch", "act_embed")  # sorted tokens [N, width]: N = B * L, split like a batch
WEIGHT_GRAD_BLOCKS = 16


@struct.dataclass
class Routing:
    """Where each of a batch's B * L tokens goes. The batch is cut into S blocks of rows, one
    per device along the mesh axes `axes` that hold the batch (S = 1 without a mesh), and each
    block's tokens are sorted by expert within the block, so no token leaves its device:
    `order` [S, n] (n = B * L / S; the block-local index of the k-th token in expert order;
    None: one expert, identity), `inverse` [S, n] (where token i lands), `group_sizes` [S, G]
    and `experts` [N] (the expert of the k-th sorted token, N = S * n)."""

    order: jax.Array | None
    inverse: jax.Array | None
    group_sizes: jax.Array
    experts: jax.Array
    shape: tuple[int, int] = struct.field(pytree_node=False)
    axes: tuple[str, ...] = struct.field(pytree_node=False, default=())

    @property
    def num_experts(self) -> int:
        return self.group_sizes.shape[-1]

    def sort(self, x: jax.Array) -> jax.Array:
        """[B, L, ...] in sequence order -> [N, ...] in expert order (block by block)."""
        return _permute(x.reshape(-1, *x.shape[2:]), self.order)

    def unsort(self, y: jax.Array) -> jax.Array:
        """[N, ...] in expert order -> [B, L, ...] in sequence order."""
        return _permute(y, self.inverse).reshape(*self.shape, *y.shape[1:])


def _permute(flat: jax.Array, index: jax.Array | None) -> jax.Array:
    """flat [N, ...] reordered within each of index's S blocks by index [S, n]."""
    if index is None:
        return flat
    blocks = flat.reshape(index.shape[0], -1, *flat.shape[1:])
    out = jax.vmap(lambda rows, i: jnp.take(rows, i, axis=0))(blocks, index)
    return out.reshape(flat.shape)


def route(expert_ids: jax.Array, num_experts: int) -> Routing:
    """The Routing of tokens whose expert is `expert_ids` [B, L] (ints in [0, num_experts)),
    block-local on the active mesh (the axes the logical "batch" axis maps to)."""
    shape = tuple(expert_ids.shape)
    axes = dividing_mesh_axes(nn.logical_to_mesh_axes(("batch",))[0], shape[0])
    blocks = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes)
    ids = expert_ids.reshape(blocks, -1).astype(jnp.int32)
    if num_experts == 1:
        sizes = jnp.full((blocks, 1), ids.shape[1], jnp.int32)
        return Routing(None, None, sizes, jnp.zeros((ids.size,), jnp.int32), shape, axes)
    order = jnp.argsort(ids, axis=1, stable=True)
    inverse = jnp.argsort(order, axis=1)
    sizes = jax.vmap(lambda i: jnp.bincount(i, length=num_experts))(ids).astype(jnp.int32)
    experts = jnp.take_along_axis(ids, order, axis=1).reshape(-1)
    return Routing(order, inverse, sizes, experts, shape, axes)


def routed_matmul(x: jax.Array, w: jax.Array, routing: Routing) -> jax.Array:
    """Sorted tokens x [N, K] times their experts' kernels w [G, K, F]: one `grouped_matmul`
    per block of the routing, inside `jax.shard_map` over its mesh axes (the kernels enter
    whole, as FSDP gathers them; their gradient is summed over the blocks)."""
    if not routing.axes:
        return grouped_matmul(x, w, routing.group_sizes[0])
    axes = routing.axes

    def local(x: jax.Array, w: jax.Array, sizes: jax.Array) -> jax.Array:
        return grouped_matmul(x, jax.lax.pcast(w, axes, to="varying"), sizes[0])

    spec = jax.sharding.PartitionSpec(axes, None)
    return jax.shard_map(
        local,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(spec, jax.sharding.PartitionSpec(), spec),
        out_specs=spec,
        axis_names=set(axes),
    )(x, w, routing.group_sizes)


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
        init = kernel_init(self.init, n_in, len(features), leading=1)
        kernel = self.param(
            "kernel",
            logical(init, "expert", *self.kernel_axes),
            (self.num_experts, *in_shape, *features),
            self.param_dtype,
        )
        size_in = math.prod(in_shape)
        lhs = x.reshape(-1, size_in).astype(self.dtype)
        rhs = kernel.reshape(self.num_experts, size_in, -1).astype(self.dtype)
        one = self.num_experts == 1
        y = matmul(lhs, rhs[0]) if one else routed_matmul(lhs, rhs, routing)
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


@jax.custom_vjp
def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [N, K] sorted into groups of `group_sizes` [G] rows, each row times its group's
    w [G, K, F] -> [N, F]."""
    return jax.lax.ragged_dot(x, w, group_sizes)


def _grouped_matmul_fwd(x, w, group_sizes):
    return grouped_matmul(x, w, group_sizes), (x, w, group_sizes)


def _grouped_matmul_bwd(residuals, dy):
    x, w, group_sizes = residuals
    dx = jax.lax.ragged_dot(dy, jnp.swapaxes(w, 1, 2), group_sizes)
    dw = grouped_weight_grad(x, dy, group_sizes, w.shape[0])
    return dx.astype(x.dtype), dw.astype(w.dtype), None


grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_weight_grad(
    x: jax.Array, dy: jax.Array, group_sizes: jax.Array, num_groups: int
) -> jax.Array:
    """dw[g] = x_g^T dy_g [G, K, F] for rows sorted into groups, in WEIGHT_GRAD_BLOCKS static
    blocks of rows: each block's rows of its first row's group through one matmul, then, for
    each group boundary, the rows of the later group in the block where it starts (G - 1
    more matmuls of a block)."""
    n, k = x.shape
    blocks = min(WEIGHT_GRAD_BLOCKS, n)
    size = -(-n // blocks)
    pad = blocks * size - n
    x = jnp.pad(x, ((0, pad), (0, 0))).reshape(blocks, size, k)
    dy = jnp.pad(dy, ((0, pad), (0, 0))).reshape(blocks, size, -1)
    ends = jnp.cumsum(group_sizes)
    # each row's group; the padding rows get num_groups, which nothing adds into
    index = jnp.arange(blocks * size)[:, None]
    groups = jnp.sum(index >= ends[None, :], axis=1).reshape(blocks, size)
    first = groups[:, 0]
    dw = jnp.zeros((num_groups + 1, k, dy.shape[-1]), jnp.float32)
    outer = functools.partial(jnp.einsum, "tk,tf->kf", preferred_element_type=jnp.float32)
    for b in range(blocks):
        mine = (groups[b] == first[b])[:, None].astype(dy.dtype)
        dw = dw.at[first[b]].add(outer(x[b], dy[b] * mine))
    for j in range(1, num_groups):
        b = jnp.minimum((ends[j - 1]) // size, blocks - 1)  # the block where group j starts
        rows = (groups[b] == j) & (first[b] != j)
        dw = dw.at[j].add(outer(x[b], dy[b] * rows[:, None].astype(dy.dtype)))
    return dw[:num_groups]
