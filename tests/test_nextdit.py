"""Lumina-Next's DiT with cross-attention (BLIP3-o's generator): the closed cross-attention
at init, masked condition tokens, its 2D RoPE, training, scanning and sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmjax.nn.nextdit import NextDiT, grid_rope_angles
from mmjax.parallel import DEFAULT_RULES, make_mesh

F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32, attention_impl="xla")
GRID, CHANNELS, COND = 4, 6, 10  # a 4x4 grid of 6-d features; 10-d condition tokens


def dit(**kw) -> NextDiT:
    fields = dict(width=32, depth=2, num_heads=2, mlp_dim=64, time_width=16, **F32) | kw
    return NextDiT(**fields)


def inputs(seed: int = 0, batch: int = 2, tokens: int = 5) -> tuple:
    keys = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(keys[0], (batch, GRID, GRID, CHANNELS))
    t = jax.random.uniform(keys[1], (batch,))
    cond = jax.random.normal(keys[2], (batch, tokens, COND))
    return x, t, cond


def init(model: NextDiT, *args) -> dict:
    return nn.unbox(model.init(jax.random.key(0), *args))["params"]


def open_gates(params: dict, value: float = 0.5) -> dict:
    """The parameters with every block's cross-attention gate set to `value`."""
    return {
        k: (
            v | {"cross_gate": jnp.full_like(v["cross_gate"], value)}
            if k.startswith("block")
            else v
        )
        for k, v in params.items()
    }


def test_cross_attention_starts_closed_and_opens_through_its_gates():
    """Gates at 0 (official init): the cross-attention's weights get no gradient, its gates
    do, and the grid hears the condition only through the pooled timestep embedding."""
    model = dit()
    x, t, cond = inputs()
    params = init(model, x, t, cond)

    def loss(p):
        return jnp.mean(model.apply({"params": p}, x, t, cond) ** 2)

    grads = jax.grad(loss)(params)["block0"]
    for name in ("cross_query", "cross_key", "cross_value"):
        assert np.abs(np.asarray(grads[name]["kernel"])).max() == 0.0
    assert np.abs(np.asarray(grads["cross_gate"])).max() > 0
    # Other cross-attention weights change nothing while the gates are closed, and change
    # the prediction once they open
    other = {
        **params,
        "block0": params["block0"] | {"cross_value": params["block1"]["cross_value"]},
    }

    def apply(p):
        return np.asarray(model.apply({"params": p}, x, t, cond))

    np.testing.assert_array_equal(apply(other), apply(params))
    assert np.abs(apply(open_gates(other)) - apply(open_gates(params))).max() > 1e-4
    opened = open_gates(params)
    grads = jax.grad(loss)(opened)["block0"]
    assert np.abs(np.asarray(grads["cross_key"]["kernel"])).max() > 0


@settings(max_examples=10, deadline=None, database=None)
@given(valid=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_padded_condition_tokens_change_nothing(valid, seed):
    model = dit(depth=1)
    x, t, cond = inputs(tokens=5)
    params = open_gates(init(model, x, t, cond))
    mask = jnp.asarray([[1] * valid + [0] * (5 - valid)] * 2, jnp.int32)
    junk = jax.random.normal(jax.random.key(seed), cond.shape) * 10
    padded = jnp.where(mask[..., None] > 0, cond, junk)
    want = model.apply({"params": params}, x, t, cond[:, :valid])
    got = model.apply({"params": params}, x, t, padded, mask)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_grid_rope_turns_half_the_frequencies_by_the_row_and_half_by_the_column():
    """Lumina-Next's 2D RoPE: each axis has head_dim / 4 frequencies theta^(-4i / head_dim)
    (`get_2d_rotary_pos_embed_lumina` with dim = head_dim / 2 per axis)."""
    angles = np.asarray(grid_rope_angles(3, 5, 16, 100.0))[0]  # [15, 8]
    freqs = 100.0 ** (-np.arange(4) * 4 / 16)
    for r in range(3):
        for c in range(5):
            np.testing.assert_allclose(angles[r * 5 + c], [*(r * freqs), *(c * freqs)], rtol=1e-6)


def test_self_attention_sees_positions():
    """Without RoPE a DiT of per-cell layers is permutation-equivariant; with it, moving the
    cells moves the prediction by more than the permutation."""
    model = dit()
    x, t, cond = inputs()
    params = open_gates(init(model, x, t, cond))
    out = model.apply({"params": params}, x, t, cond)
    flipped = model.apply({"params": params}, x[:, ::-1], t, cond)[:, ::-1]
    assert np.abs(np.asarray(flipped - out)).max() > 1e-3


def test_flow_matching_on_a_conditional_grid_lowers_the_loss():
    """Two conditions, two target grids: the velocity loss falls well below its start."""
    model = dit()
    targets = jax.random.normal(jax.random.key(3), (2, GRID, GRID, CHANNELS))
    conds = jax.random.normal(jax.random.key(4), (2, 3, COND))
    params = init(model, targets, jnp.zeros(2), conds)
    opt = optax.adam(3e-3)
    state = opt.init(params)

    def loss_fn(p, rng):
        k1, k2 = jax.random.split(rng)
        idx = jnp.arange(16) % 2
        x0, c = targets[idx], conds[idx]
        t = jax.random.uniform(k1, (16,))
        noise = jax.random.normal(k2, x0.shape)
        xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        return jnp.mean((model.apply({"params": p}, xt, t, c) - (noise - x0)) ** 2)

    @jax.jit
    def step(p, s, rng):
        value, g = jax.value_and_grad(loss_fn)(p, rng)
        updates, s = opt.update(g, s)
        return optax.apply_updates(p, updates), s, value

    rngs = jax.random.split(jax.random.key(5), 150)
    first = float(loss_fn(params, rngs[0]))
    for rng in rngs:
        params, state, _ = step(params, state, rng)
    last = np.mean([float(loss_fn(params, r)) for r in jax.random.split(jax.random.key(6), 8)])
    assert last < 0.5 * first


def test_scanned_and_rematerialised_stacks_equal_the_unrolled_one():
    model = dit(depth=3)
    x, t, cond = inputs()
    params = open_gates(init(model, x, t, cond))
    want = model.apply({"params": params}, x, t, cond)
    blocks = [params.pop(f"block{i}") for i in range(3)]
    scanned = params | {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    for kw in (dict(scan_layers=True), dict(scan_layers=True, remat_policy="full")):
        got = dit(depth=3, **kw).apply({"params": scanned}, x, t, cond)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_sharded_equals_one_device():
    model = dit()
    x, t, cond = inputs(batch=4)
    params = open_gates(init(model, x, t, cond))

    def loss(p):
        return jnp.mean(model.apply({"params": p}, x, t, cond) ** 2)

    grad = jax.jit(jax.value_and_grad(loss))
    want_loss, want = grad(params)
    with (
        jax.set_mesh(make_mesh(dict(data=2, fsdp=2, tensor=2))),
        nn.logical_axis_rules(DEFAULT_RULES),
    ):
        got_loss, got = grad(params)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, want)


def test_bad_shapes_are_clear_errors():
    x, t, cond = inputs()
    with pytest.raises(ValueError, match="not divisible by patch 3"):
        dit(patch_size=3).init(jax.random.key(0), x, t, cond)
    with pytest.raises(ValueError, match="head_dim divisible by 4"):
        dit(num_heads=4, width=24).init(jax.random.key(0), x, t, cond)
