"""DenseGeneral's matmul with a hand-written VJP equals autodiff of the plain contraction."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmjax.nn.dense import DenseGeneral, matmul


@settings(deadline=None, max_examples=8)
@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    in_shape=st.lists(st.integers(1, 6), min_size=1, max_size=2),
    features=st.lists(st.integers(1, 6), min_size=1, max_size=2),
    seed=st.integers(0, 2**16),
)
@pytest.mark.slow
def test_dense_value_and_grads_equal_autodiff_of_dot_general(lead, in_shape, features, seed):
    n_in = len(in_shape)
    axes = tuple(f"a{i}" for i in range(n_in + len(features)))
    layer = DenseGeneral(tuple(features), axes, num_in=n_in, dtype=jnp.float32)
    kx, kp, kc = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (*lead, *in_shape))
    # (the layer's `init` field shadows Module.init)
    params = nn.meta.unbox(nn.Module.init(layer, kp, x)["params"])
    cot = jax.random.normal(kc, (*lead, *features))

    def reference(params, x):
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x, params["kernel"], (contract, ((), ())))
        return jnp.sum((y + params["bias"]) * cot)

    def ours(params, x):
        return jnp.sum(layer.apply({"params": params}, x) * cot)

    value, grads = jax.value_and_grad(ours, argnums=(0, 1))(params, x)
    ref_value, ref_grads = jax.value_and_grad(reference, argnums=(0, 1))(params, x)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_matmul_second_order_and_vmap():
    """The custom VJP composes with vmap and with a second derivative (jvp of grad)."""
    kx, kk = jax.random.split(jax.random.key(0))
    x, k = jax.random.normal(kx, (3, 4, 5)), jax.random.normal(kk, (5, 2))
    np.testing.assert_allclose(jax.vmap(matmul, (0, None))(x, k), x @ k, rtol=1e-6)

    def loss(f, k):
        return jnp.sum(jnp.tanh(f(x[0], k)) ** 2)

    hvp = jax.jvp(jax.grad(lambda k: loss(matmul, k)), (k,), (jnp.ones_like(k),))[1]
    ref = jax.jvp(jax.grad(lambda k: loss(jnp.matmul, k)), (k,), (jnp.ones_like(k),))[1]
    np.testing.assert_allclose(hvp, ref, rtol=1e-5, atol=1e-6)
