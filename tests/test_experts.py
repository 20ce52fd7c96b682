"""Hard routing to modality experts (nn/experts.py): the grouped matmul equals its per-token
reference with gradients, costs the active expert's FLOPs, and the routing round-trips."""

import jax
import jax.numpy as jnp
import numpy as np
from accelerators import tpu_devices
from hypothesis import given, settings
from hypothesis import strategies as st

from mmjax.nn.experts import grouped_matmul, route


def reference(x, w, experts):
    """Each row times its own expert's kernel, one row at a time."""
    return jnp.einsum("nk,nkf->nf", x, w[experts])


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=2, max_size=4).filter(lambda s: sum(s) > 0),
    seed=st.integers(0, 2**16),
)
def test_grouped_matmul_and_its_gradients_equal_the_per_row_reference(sizes, seed):
    rng = np.random.default_rng(seed)
    n, g = sum(sizes), len(sizes)
    x = jnp.asarray(rng.normal(size=(n, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(g, 6, 5)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(n, 5)), jnp.float32)
    experts = jnp.asarray(np.repeat(np.arange(g), sizes))
    gs = jnp.asarray(sizes, jnp.int32)
    y, vjp = jax.vjp(lambda x, w: grouped_matmul(x, w, gs), x, w)
    y_ref, vjp_ref = jax.vjp(lambda x, w: reference(x, w, experts), x, w)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(vjp(dy), vjp_ref(dy), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_a_grouped_matmul_step_costs_the_active_experts_flops_on_tpu():
    """XLA's TPU cost analysis of forward + both gradients, against one dense matmul's."""
    device = tpu_devices("v5e:2x2")[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    n, k, f = 2048, 256, 512

    def spec(*shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    def step(x, w, gs):
        return jax.grad(lambda x, w: jnp.sum(grouped_matmul(x, w, gs) ** 2), (0, 1))(x, w)

    def dense(x, w):
        return jax.grad(lambda x, w: jnp.sum((x @ w) ** 2), (0, 1))(x, w)

    def flops(fn, *args):
        return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]

    routed = flops(step, spec(n, k), spec(2, k, f), spec(2, dtype=jnp.int32))
    one = flops(dense, spec(n, k), spec(k, f))
    assert 0.99 < routed / one < 1.05  # dw: 1 + 1/16 of a matmul; x and dx exact


def test_routing_sorts_by_expert_and_restores_the_sequence():
    ids = jnp.asarray([[0, 1, 1, 0, 0], [1, 0, 0, 0, 1]])
    routing = route(ids, 2)
    x = jnp.arange(10.0).reshape(2, 5, 1)
    np.testing.assert_array_equal(routing.group_sizes, [[6, 4]])
    np.testing.assert_array_equal(routing.experts, [0] * 6 + [1] * 4)
    np.testing.assert_array_equal(routing.sort(x)[:, 0], [0, 3, 4, 6, 7, 8, 1, 2, 5, 9])
    np.testing.assert_array_equal(routing.unsort(routing.sort(x)), x)
    one = route(ids, 1)
    np.testing.assert_array_equal(one.unsort(one.sort(x)), x)
