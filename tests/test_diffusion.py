"""Diffusion objectives and samplers: schedules, forward-process moments, exact denoisers, a
tiny trained denoiser, masked loss, per-image time, classifier-free guidance.

The exact-denoiser tests use data from a known Gaussian N(mu, sigma^2), for which the optimal
predictions have closed forms: every sampler fed them must return samples of N(mu, sigma^2).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmjax.objectives.diffusion import (
    add_noise,
    cfg_keep_mask,
    cosine_schedule,
    diffusion_loss,
    flow_sample,
    linear_schedule,
    make_schedule,
    q_sample,
    sample_flow_times,
)
from mmjax.sampling.diffusion import (
    cfg,
    ddim_sample,
    ddpm_sample,
    euler_sample,
    guided,
    spaced_timesteps,
)

COSINE = cosine_schedule(1000)
LINEAR = linear_schedule(1000)
AB = {"cosine": np.asarray(COSINE.alpha_bars), "linear": np.asarray(LINEAR.alpha_bars)}
MU = jnp.array([1.5, -0.5])
SIGMA = jnp.array([0.5, 1.2])
N_SAMPLES = 4000


def _normal(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """Test inputs from numpy: JAX random ops each cost a compile on a busy CPU."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- schedules -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_schedule_shape_and_range(name):
    sched = make_schedule(name, 1000)
    ab = AB[name]
    assert sched.num_steps == 1000
    assert sched.betas.shape == sched.alphas.shape == sched.alpha_bars.shape == (1000,)
    assert np.all(np.diff(ab) < 0), "alpha_bar must decrease strictly"
    assert np.all((ab > 0) & (ab <= 1))
    assert np.all(np.asarray(sched.betas) <= 0.999)
    assert ab[0] > 0.999 and ab[-1] < 1e-3
    np.testing.assert_allclose(np.cumprod(np.asarray(sched.alphas)), ab, rtol=1e-4, atol=1e-9)


def test_cosine_ends():
    assert AB["cosine"][0] > 0.9999 and AB["cosine"][-1] < 1e-6
    assert float(COSINE.betas[-1]) == pytest.approx(0.999)


@settings(max_examples=50, deadline=None)
@given(t1=st.integers(0, 999), t2=st.integers(0, 999), name=st.sampled_from(["cosine", "linear"]))
def test_alpha_bar_monotone(t1, t2, name):
    ab = AB[name]
    if t1 < t2:
        assert ab[t1] > ab[t2]
    assert 0 < ab[t1] <= 1


@settings(max_examples=50, deadline=None)
@given(t=st.integers(0, 997))
def test_cosine_matches_eq17(t):
    """Away from the clipped last step, alpha_bar after step t is f(t + 1) / f(0)."""
    s = 0.008

    def f(u):
        return np.cos((u / 1000 + s) / (1 + s) * np.pi / 2) ** 2

    assert AB["cosine"][t] == pytest.approx(f(t + 1) / f(0), rel=1e-4, abs=1e-8)


def test_unknown_names():
    with pytest.raises(ValueError, match="schedule"):
        make_schedule("sigmoid")
    with pytest.raises(ValueError, match="process"):
        add_noise(jax.random.key(0), jnp.zeros((2, 3)), process="edm")
    with pytest.raises(ValueError, match="num_steps"):
        spaced_timesteps(1000, 1001)


# --- forward process -------------------------------------------------------------------------

_q_sample, _flow_sample = jax.jit(q_sample), jax.jit(flow_sample)


@settings(max_examples=8, deadline=None)
@given(t=st.integers(0, 999))
def test_q_sample_moments(t):
    x0 = np.array([1.0, -2.0, 0.5], np.float32)
    noise = _normal(t, (20000, 3))
    x_t = _q_sample(np.broadcast_to(x0, noise.shape), np.full((20000,), t), noise, COSINE)
    ab = AB["cosine"][t]
    np.testing.assert_allclose(jnp.mean(x_t, 0), np.sqrt(ab) * x0, atol=0.03)
    np.testing.assert_allclose(jnp.var(x_t, 0), np.full(3, 1 - ab), atol=0.03)


@settings(max_examples=8, deadline=None)
@given(t=st.floats(0.0, 1.0))
def test_flow_sample_moments(t):
    x0 = np.array([1.0, -2.0, 0.5], np.float32)
    noise = _normal(1, (20000, 3))
    x_t = _flow_sample(np.broadcast_to(x0, noise.shape), np.full((20000,), t), noise)
    np.testing.assert_allclose(jnp.mean(x_t, 0), (1 - t) * x0, atol=0.03)
    np.testing.assert_allclose(jnp.var(x_t, 0), np.full(3, t**2), atol=0.03)


@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_add_noise_one_time_per_image(process):
    """Packed rows: every patch of an image shares its t; text keeps x0 and has target 0."""
    ids = jnp.array([[-1, 0, 0, 0, -1, 1, 1, -1], [2, 2, -1, -1, 0, 0, 1, -1]])
    x0 = _normal(0, (2, 8, 4))
    noise_fn = functools.partial(add_noise, process=process, group_ids=ids, num_groups=3)
    out = jax.jit(noise_fn)(jax.random.key(1), x0)
    assert out.t.shape == (2, 3) and out.t_elem.shape == (2, 8)
    ids, out = np.asarray(ids), jax.tree.map(np.asarray, out)
    inside = ids >= 0
    t_elem, t = out.t_elem, out.t
    for b in range(2):
        for pos in range(8):
            if inside[b, pos]:
                assert t_elem[b, pos] == t[b, ids[b, pos]]
    assert len(np.unique(t)) > 1, "times are drawn per image, not per batch"
    np.testing.assert_array_equal(out.x_t[~inside], x0[~inside])
    np.testing.assert_array_equal(out.target[~inside], 0.0)
    t_elem = t_elem[..., None]
    if process == "ddpm":
        ab = AB["cosine"][out.t_elem][..., None]
        expected_x = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * out.noise
        expected_target = out.noise
    else:
        expected_x = (1 - t_elem) * x0 + t_elem * out.noise
        expected_target = out.noise - x0
    np.testing.assert_allclose(out.x_t[inside], expected_x[inside], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.target[inside], expected_target[inside], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_max_level_caps_each_rows_time(process):
    """Rows capped at 0.5 draw t from the lower half of the range; the others from all of it."""
    cap = jnp.where(jnp.arange(4000) % 2 == 0, 0.5, 1.0)
    noise_fn = functools.partial(add_noise, process=process, max_level=cap)
    t = np.asarray(jax.jit(noise_fn)(jax.random.key(3), jnp.zeros((4000, 2))).t)
    top = 1000 if process == "ddpm" else 1.0
    capped, free = t[0::2] / top, t[1::2] / top
    assert capped.max() < 0.5 and capped.mean() == pytest.approx(0.25, abs=0.02)
    assert free.max() > 0.95 and free.mean() == pytest.approx(0.5, abs=0.03)


def test_logit_normal_times():
    """sigmoid(N(0, 1)): symmetric about 0.5, 73% within [0.25, 0.75] (uniform: 50%)."""
    draw = jax.jit(lambda k: sample_flow_times(k, (20000,), logit_normal=True))
    t = np.asarray(draw(jax.random.key(0)))
    assert t.min() > 0 and t.max() < 1
    assert np.median(t) == pytest.approx(0.5, abs=0.01)
    assert np.mean(np.abs(t - 0.5) <= 0.25) == pytest.approx(0.727, abs=0.015)


# --- masked loss -----------------------------------------------------------------------------


def test_masked_loss_ignores_masked_elements():
    x, target = _normal(0, (3, 6, 4)), _normal(1, (3, 6, 4))
    mask = _normal(2, (3, 6)) > 0
    mask[0, 0] = True
    w0 = jnp.eye(4)

    @jax.jit
    @jax.value_and_grad
    def loss(w, garbage):
        pred = x @ w
        # Masked-out predictions replaced by anything (NaN too) that may also depend on w.
        pred = jnp.where(mask[..., None], pred, garbage + 100.0 * jnp.sum(w))
        return diffusion_loss(pred, target, mask)[0]

    ref = np.mean(np.square(x @ np.eye(4) - target)[mask])
    base, grad = loss(w0, 0.0)
    np.testing.assert_allclose(base, ref, rtol=1e-6)
    for garbage in [1e3, -7.0, jnp.nan]:
        value, g = loss(w0, garbage)
        np.testing.assert_allclose(value, base, rtol=1e-6)
        np.testing.assert_allclose(g, grad, rtol=1e-6)

    grad_pred = jax.jit(jax.grad(lambda p: diffusion_loss(p, target, mask)[0]))(x)
    np.testing.assert_array_equal(np.asarray(grad_pred)[~mask], 0.0)
    masked_loss = jax.jit(diffusion_loss)
    _, metrics = masked_loss(x, target, mask)
    assert float(metrics["diffusion_elements"]) == mask.sum() * 4
    empty, _ = masked_loss(x, target, np.zeros_like(mask))  # a batch without images
    assert float(empty) == 0.0


# --- exact denoisers: samplers recover N(mu, sigma^2) ----------------------------------------


def _exact_eps(schedule):
    def eps(x, t):
        ab = jnp.asarray(schedule.alpha_bars)[t][:, None]
        var = ab * SIGMA**2 + 1 - ab
        return jnp.sqrt(1 - ab) / var * (x - jnp.sqrt(ab) * MU)

    return eps


def _exact_v(x, t):
    t = t[:, None]
    var = (1 - t) ** 2 * SIGMA**2 + t**2
    return -MU + (t - (1 - t) * SIGMA**2) / var * (x - (1 - t) * MU)


def _check_gaussian(samples):
    """Mean within 4 standard errors of mu (plus a little), std within 6% of sigma."""
    samples = np.asarray(samples)
    mu, sigma = np.asarray(MU), np.asarray(SIGMA)
    assert np.all(np.abs(samples.mean(0) - mu) < 0.08 * sigma), samples.mean(0)
    np.testing.assert_allclose(samples.std(0), sigma, rtol=0.06)


def _noise(seed=0):
    return _normal(seed, (N_SAMPLES, 2))


@pytest.mark.parametrize(("schedule", "num_steps"), [("cosine", None), ("linear", 250)])
def test_ddpm_exact_denoiser(schedule, num_steps):
    sched = make_schedule(schedule)
    sample = jax.jit(
        lambda x, rng: ddpm_sample(_exact_eps(sched), x, rng, sched, num_steps=num_steps)
    )
    _check_gaussian(sample(_noise(), jax.random.key(1)))


@pytest.mark.parametrize(("num_steps", "eta"), [(250, 0.0), (50, 0.0), (50, 1.0)])
def test_ddim_exact_denoiser(num_steps, eta):
    sample = jax.jit(
        lambda x: ddim_sample(
            _exact_eps(COSINE), x, COSINE, num_steps=num_steps, eta=eta, rng=jax.random.key(2)
        )
    )
    _check_gaussian(sample(_noise()))


@pytest.mark.parametrize(("num_steps", "shift"), [(100, 1.0), (100, 3.0)])
def test_euler_exact_velocity(num_steps, shift):
    sample = jax.jit(lambda x: euler_sample(_exact_v, x, num_steps=num_steps, shift=shift))
    _check_gaussian(sample(_noise()))


def test_ddpm_seeded_and_temperature():
    eps = _exact_eps(COSINE)

    @jax.jit
    def sample(rng, temperature):
        return ddpm_sample(eps, _noise(), rng, COSINE, num_steps=100, temperature=temperature)

    a, b = sample(jax.random.key(3), 1.0), sample(jax.random.key(3), 1.0)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, sample(jax.random.key(4), 1.0))
    cold = sample(jax.random.key(3), 0.5)
    assert np.all(np.asarray(jnp.std(cold, 0)) < 0.9 * np.asarray(jnp.std(a, 0)))


# --- a tiny trained denoiser -----------------------------------------------------------------


def _mlp_init(seed, sizes=(3, 64, 64, 2)):
    return [
        (_normal(seed + i, (m, n)) / np.sqrt(m), np.zeros(n, np.float32))
        for i, (m, n) in enumerate(itertools.pairwise(sizes))
    ]


def _mlp(params, x, t):
    h = jnp.concatenate([x, t[..., None]], axis=-1)
    for w, b in params[:-1]:
        h = jax.nn.silu(h @ w + b)
    w, b = params[-1]
    return h @ w + b


def _blob_batches(seed, shape, process):
    """(x0, noise, t) for `shape` = (steps, batch): two Gaussian blobs in 2D, t per point."""
    rng = np.random.default_rng(seed)
    centers = np.array([[-1.0, -1.0], [1.0, 0.5]], np.float32)
    x0 = centers[rng.integers(0, 2, shape)] + 0.1 * _normal(seed + 1, (*shape, 2))
    if process == "ddpm":
        t = rng.integers(0, COSINE.num_steps, shape).astype(np.int32)
    else:
        t = rng.uniform(size=shape).astype(np.float32)
    return x0, _normal(seed + 2, (*shape, 2)), t


@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_tiny_denoiser_loss_falls(process):
    """A few hundred Adam steps of a tiny MLP on 2D blobs lower the held-out loss."""

    def loss_fn(params, batch):
        x0, noise, t = batch
        if process == "ddpm":
            x_t, target, t_in = q_sample(x0, t, noise, COSINE), noise, t / COSINE.num_steps
        else:
            x_t, target, t_in = flow_sample(x0, t, noise), noise - x0, t
        return diffusion_loss(_mlp(params, x_t, t_in), target)[0]

    opt = optax.adam(3e-3)

    @jax.jit
    def train_and_eval(params, batches, held_out):
        def step(carry, batch):
            params, state = carry
            grads = jax.grad(loss_fn)(params, batch)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (trained, _), _ = jax.lax.scan(step, (params, opt.init(params)), batches)
        return loss_fn(params, held_out), loss_fn(trained, held_out)

    batches = _blob_batches(0, (300, 128), process)
    held_out = _blob_batches(10, (4096,), process)
    before, after = map(float, train_and_eval(_mlp_init(20), batches, held_out))
    assert after < 0.7 * before, (before, after)


# --- classifier-free guidance ----------------------------------------------------------------


def test_cfg_endpoints_and_extrapolation():
    cond, uncond = jnp.asarray(_normal(0, (5, 3))), jnp.asarray(_normal(1, (5, 3)))
    np.testing.assert_array_equal(cfg(cond, uncond, 1.0), cond)
    np.testing.assert_array_equal(cfg(cond, uncond, 0.0), uncond)
    np.testing.assert_allclose(cfg(cond, uncond, 3.0), uncond + 3 * (cond - uncond), rtol=1e-5)
    fn = guided(lambda x, t: cond, lambda x, t: uncond, 3.0)
    np.testing.assert_allclose(fn(None, None), cfg(cond, uncond, 3.0))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_drop_condition_rate(p):
    keep = cfg_keep_mask(jax.random.key(0), (100_000,), p)
    assert keep.dtype == jnp.bool_
    assert float(1 - jnp.mean(keep)) == pytest.approx(p, abs=0.005)
