"""Which attention backend runs, decided when the program is lowered, and kernels in shard_map.

One traced attention call carries every backend: `jax.lax.platform_dependent` keeps the
Mosaic kernel for "tpu", the Triton kernel for "cuda" and "rocm" and, by default (CPU), the
kernel in interpret mode or the XLA reference; lowering for a platform keeps only its branch. So a
step traced on a CPU host and lowered for a TPU topology (ahead-of-time compilation,
`python -m mmjax.aot`) holds Mosaic calls, not interpret-mode HLO. The forward and the
backward choose separately, inside one `jax.custom_vjp` whose residuals have the same
layout on every platform (`vjp.flash_vjp`).

Under a device mesh (`jax.set_mesh`), XLA cannot partition a Pallas call, so the kernels
run inside `jax.shard_map`: batch over the mesh axes the caller's partition names for it,
heads over those named for heads (when both q and kv heads divide), each device attending
its own shard. A sequence split over devices is not a kernel's job: "auto" leaves it to the
XLA reference and XLA's partitioner, "pallas" refuses it.

On GPU, "auto" sends what cuDNN's fused attention can express (no ids, no window, no
offset, no logit soft cap, equal lengths, bf16/f16, head_dim <= 128) to
`jax.nn.dot_product_attention`'s cuDNN kernel when cuDNN is installed (a GPU host), and the
rest to the Triton kernel.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mmjax.kernels.masks import MaskSpec
from mmjax.kernels.pallas_attention import kernel_backward, kernel_forward, plan
from mmjax.kernels.reference import attention_reference, reference_backward, reference_forward
from mmjax.kernels.vjp import flash_vjp

Array = jnp.ndarray

# On CPU, "auto" runs the Pallas kernel (interpret mode) from this many query x key pairs on.
# Measured (benchmarks/attention.py, 8 heads, head_dim 64, causal, fwd+bwd per step): 128^2
# 12 vs 10 ms, 256^2 82 vs 46 ms, 512^2 272 vs 121 ms, 1024^2 1.3 s vs 0.30 s (xla vs
# pallas); the kernel compiles ~3 s slower, so below 512^2 the reference wins overall, and
# above it the reference's S x S temporaries grow (1 GB at S = 4096) while the kernel's don't.
CPU_PALLAS_MIN_PAIRS = 512 * 512

Partition = Sequence[str | tuple[str, ...] | None] | None


def _pallas_pair(q: Array, k: Array, mask: MaskSpec, options: dict, platform: str):
    p = plan(q.shape, k.shape, mask, platform=platform, **options)
    return functools.partial(kernel_forward, p=p), functools.partial(kernel_backward, p=p)


def _flash(
    q: Array, k: Array, v: Array, mask: MaskSpec, scale: float | None, impl: str,
    soft_cap: float | None,
):  # fmt: skip
    """The custom_vjp attention whose forward and backward pick their platform's backend."""
    options = {"scale": scale}
    if soft_cap is not None:
        options["logits_soft_cap"] = soft_cap
    tpu, gpu = (_pallas_pair(q, k, mask, options, p) for p in ("tpu", "gpu"))
    if impl == "pallas" or q.shape[1] * k.shape[1] >= CPU_PALLAS_MIN_PAIRS:
        cpu = _pallas_pair(q, k, mask, options, "cpu")
    else:
        cpu = (
            functools.partial(reference_forward, **options),
            functools.partial(reference_backward, **options),
        )

    def forward(q, k, v, mask):
        def on(backend):
            return lambda q, k, v: backend[0](q, k, v, mask)

        return jax.lax.platform_dependent(
            q, k, v, tpu=on(tpu), cuda=on(gpu), rocm=on(gpu), default=on(cpu)
        )

    def backward(q, k, v, mask, o, lse, do):
        def on(backend):
            return lambda *args: backend[1](*args[:3], mask, *args[3:])

        args = (q, k, v, o, lse, do)
        return jax.lax.platform_dependent(
            *args, tpu=on(tpu), cuda=on(gpu), rocm=on(gpu), default=on(cpu)
        )

    return flash_vjp(forward, backward)(q, k, v, mask)


def cudnn_eligible(
    q: Array, k: Array, mask: MaskSpec, logits_soft_cap: float | None = None
) -> bool:
    """Whether cuDNN's fused attention expresses this call exactly (the contract's rows all
    see themselves: no ids, no window, no offset, Sq == Sk; and it has no logit soft cap)."""
    no_ids = all(
        getattr(mask, name) is None
        for name in ("segment_ids", "kv_segment_ids", "span_ids", "kv_span_ids")
    )
    return (
        no_ids
        and logits_soft_cap is None
        and mask.window is None
        and isinstance(mask.q_offset, int)
        and mask.q_offset == 0
        and q.shape[1] == k.shape[1]
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and q.shape[-1] <= 128
        and q.shape[-1] % 8 == 0
    )


@functools.cache
def cudnn_available() -> bool:
    """True where JAX finds cuDNN (a GPU host): only there can its attention be traced."""
    x = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.bfloat16)
    try:
        jax.eval_shape(lambda q: jax.nn.dot_product_attention(q, q, q, implementation="cudnn"), x)
    except Exception:  # any failure means cuDNN cannot be used here
        return False
    return True


def _attend_local(
    q, k, v, mask: MaskSpec, scale: float | None, impl: str, soft_cap: float | None
) -> Array:
    """Attention of one device's shard (or of the whole arrays without a mesh)."""
    if impl == "auto" and cudnn_eligible(q, k, mask, soft_cap) and cudnn_available():
        cudnn = functools.partial(
            jax.nn.dot_product_attention,
            scale=scale,
            is_causal=mask.causal,
            implementation="cudnn",
        )
        return jax.lax.platform_dependent(
            q, k, v, cuda=cudnn, default=lambda q, k, v: _flash(q, k, v, mask, scale, impl, None)
        )
    return _flash(q, k, v, mask, scale, impl, soft_cap)


def _axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _dividing(axes: tuple[str, ...], sizes: dict[str, int], *dims: int) -> tuple[str, ...]:
    """The longest prefix of `axes` whose device count divides every one of `dims`."""
    while axes and any(d % math.prod(sizes[a] for a in axes) for d in dims):
        axes = axes[:-1]
    return axes


def dividing_mesh_axes(entry: str | tuple[str, ...] | None, *dims: int) -> tuple[str, ...]:
    """The free axes of the active mesh that `entry` (a PartitionSpec entry) names, with more
    than one device, cut to the longest prefix whose device count divides every one of `dims`;
    () without a multi-device mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    sizes = dict(mesh.shape)
    free = [a for a in mesh.axis_names if a not in mesh.manual_axes and sizes[a] > 1]
    return _dividing(tuple(a for a in _axes(entry) if a in free), sizes, *dims)


def attention_on_mesh(
    q: Array, k: Array, v: Array, mask: MaskSpec, *, scale: float | None, impl: str,
    partition: Partition = None, logits_soft_cap: float | None = None,
) -> Array:  # fmt: skip
    """Kernel attention, inside `jax.shard_map` when a multi-device mesh is active.

    `partition` is how the caller's activations [batch, seq, heads, head_dim] map to mesh
    axes (a PartitionSpec-like 4-tuple); without it, the batch is split over every mesh
    axis and heads stay whole. Axes that do not divide the batch (or both head counts) are
    dropped, i.e. replicated. `impl` is "auto" or "pallas"; `logits_soft_cap` as in
    `attention_reference`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    free = [a for a in mesh.axis_names if a not in mesh.manual_axes] if not mesh.empty else []
    sizes = dict(mesh.shape) if free else {}
    if math.prod(sizes[a] for a in free) <= 1:
        return _attend_local(q, k, v, mask, scale, impl, logits_soft_cap)
    if partition is None:
        partition = (tuple(free), None, None, None)
    seq_axes = [a for a in _axes(partition[1]) if a in free and sizes[a] > 1]
    if seq_axes:
        if impl == "pallas":
            raise ValueError(
                f"the Pallas attention kernel cannot split the sequence over mesh axes "
                f"{seq_axes}: map the 'length' axis to no mesh axis, or use impl='xla'"
            )
        return attention_reference(q, k, v, mask, scale=scale, logits_soft_cap=logits_soft_cap)
    batch = _dividing(tuple(a for a in _axes(partition[0]) if a in free), sizes, q.shape[0])
    heads = _dividing(
        tuple(a for a in _axes(partition[2]) if a in free and a not in batch),
        sizes,
        q.shape[2],
        k.shape[2],
    )
    qkv_spec = P(batch or None, None, heads or None, None)

    # Per-row mask arrays travel with their batch shard; the rest stays closed over.
    leaves, treedef = jax.tree.flatten(mask)
    per_row = [
        i for i, x in enumerate(leaves) if jnp.ndim(x) >= 1 and jnp.shape(x)[0] == q.shape[0]
    ]

    def local(q, k, v, rows):
        filled = list(leaves)
        for i, x in zip(per_row, rows, strict=True):
            filled[i] = x
        mask = jax.tree.unflatten(treedef, filled)
        return _attend_local(q, k, v, mask, scale, impl, logits_soft_cap)

    rows = [leaves[i] for i in per_row]
    row_specs = [P(batch or None, *([None] * (jnp.ndim(x) - 1))) for x in rows]
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, row_specs),
        out_specs=qkv_spec,
        axis_names=set(free),
        check_vma=False,
    )(q, k, v, rows)
