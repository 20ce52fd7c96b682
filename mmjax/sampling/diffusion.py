"""Diffusion samplers and classifier-free guidance, as pure functions to call under `jax.jit`.

Each sampler takes `denoise_fn(x_t, t) -> prediction` (eps for DDPM / DDIM, v = eps - x0 for
the rectified-flow Euler sampler; the conventions of `mmjax.objectives.diffusion`) and loops
with `lax.fori_loop`, so one compiled step serves all steps. `t` reaches `denoise_fn` as one
time per leading row of x: int32 [B] in [0, T) for DDPM / DDIM, f32 [B] in [0, 1] for flow.
Step counts are Python ints (static); the schedule and the initial noise may be traced.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.objectives.diffusion import Schedule

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]


def cfg(cond_pred: jax.Array, uncond_pred: jax.Array, scale: float | jax.Array) -> jax.Array:
    """Classifier-free guidance, uncond + scale * (cond - uncond) (Ho & Salimans, 2022, Eq. 6).

    Computed as (1 - scale) * uncond + scale * cond, so scale 1 gives the conditional and
    scale 0 the unconditional prediction exactly; callers set the scale (3 in Transfusion).
    """
    return (1.0 - scale) * uncond_pred + scale * cond_pred


def guided(cond_fn: DenoiseFn, uncond_fn: DenoiseFn, scale: float | jax.Array) -> DenoiseFn:
    """The denoise_fn that combines a conditional and an unconditional one with `cfg`."""

    def denoise_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        return cfg(cond_fn(x, t), uncond_fn(x, t), scale)

    return denoise_fn


def spaced_timesteps(num_train_steps: int, num_steps: int) -> np.ndarray:
    """`num_steps` increasing, evenly spaced t in [0, T), from 0 to T - 1 inclusive.

    With num_steps = T, all steps. (Respacing of Nichol & Dhariwal, 2021, Sec. 4.)
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"num_steps must be in [1, {num_train_steps}], got {num_steps}")
    if num_steps == 1:
        return np.array([num_train_steps - 1])
    return np.round(np.linspace(0, num_train_steps - 1, num_steps)).astype(np.int32)


def _x0_from_eps(x: jax.Array, eps: jax.Array, ab: jax.Array) -> jax.Array:
    """x0 predicted from eps: (x_t - sqrt(1 - ab) eps) / sqrt(ab) (Ho et al., 2020, Eq. 4)."""
    return (x - jnp.sqrt(1.0 - ab) * eps) / jnp.sqrt(ab)


def _discrete_loop(
    denoise_fn: DenoiseFn,
    x_T: jax.Array,
    schedule: Schedule,
    num_steps: int | None,
    step: Callable[..., jax.Array],
) -> jax.Array:
    """Runs `step(i, x, eps, ab, ab_prev)` from the noisiest spaced t down to t = 0."""
    ts = spaced_timesteps(schedule.num_steps, num_steps or schedule.num_steps)
    ab_seq = jnp.asarray(schedule.alpha_bars)[ts]
    ab_prev_seq = jnp.concatenate([jnp.ones((1,), ab_seq.dtype), ab_seq[:-1]])
    ts = jnp.asarray(ts)

    def body(j: int, x: jax.Array) -> jax.Array:
        i = len(ts) - 1 - j
        t = jnp.full(x.shape[:1], ts[i], jnp.int32)
        eps = denoise_fn(x, t).astype(jnp.float32)
        return step(i, x, eps, ab_seq[i], ab_prev_seq[i]).astype(x.dtype)

    return jax.lax.fori_loop(0, len(ts), body, x_T)


def ddpm_sample(
    denoise_fn: DenoiseFn,
    x_T: jax.Array,
    rng: jax.Array,
    schedule: Schedule,
    *,
    num_steps: int | None = None,
    temperature: float | jax.Array = 1.0,
    clip_x0: float | None = None,
) -> jax.Array:
    """DDPM ancestral sampling with the posterior variance beta_tilde (Ho et al., 2020, Alg. 2).

    x_{t-1} ~ N(mu_tilde(x_t, x0_hat), temperature^2 * beta_tilde_t) with x0_hat from the
    predicted eps (Eq. 7); no noise at the last step. `num_steps` < T respaces the schedule
    (Nichol & Dhariwal, 2021, Sec. 4: beta_i = 1 - ab_i / ab_{i-1} on the subsequence).
    `temperature` scales the per-step noise, as in MAR / Fluid / UniFluid sampling; x_T is
    the caller's N(0, I) draw. `clip_x0` clips x0_hat to [-clip_x0, clip_x0].
    """

    def step(i, x, eps, ab, ab_prev):
        alpha = ab / ab_prev
        beta = 1.0 - alpha
        x0 = _x0_from_eps(x, eps, ab)
        if clip_x0 is not None:
            x0 = jnp.clip(x0, -clip_x0, clip_x0)
        mean = (jnp.sqrt(ab_prev) * beta * x0 + jnp.sqrt(alpha) * (1.0 - ab_prev) * x) / (1.0 - ab)
        var = beta * (1.0 - ab_prev) / (1.0 - ab)
        z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
        return mean + temperature * jnp.sqrt(var) * z

    return _discrete_loop(denoise_fn, x_T, schedule, num_steps, step)


def ddim_sample(
    denoise_fn: DenoiseFn,
    x_T: jax.Array,
    schedule: Schedule,
    *,
    num_steps: int = 250,
    eta: float = 0.0,
    rng: jax.Array | None = None,
    temperature: float | jax.Array = 1.0,
    clip_x0: float | None = None,
) -> jax.Array:
    """DDIM sampling on `num_steps` evenly spaced steps (Song et al., 2021, Eq. 12 and 16).

    x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps + sigma z, with
    sigma = eta * sqrt((1 - ab_prev) / (1 - ab)) * sqrt(1 - ab / ab_prev): eta = 0 is the
    deterministic sampler, eta = 1 equals (respaced) DDPM. eta > 0 needs `rng`. Transfusion
    samples with 250 of its 1,000 steps (Sec. 4.1).
    """
    if eta != 0.0 and rng is None:
        raise ValueError("ddim_sample: eta > 0 draws noise and needs an rng")

    def step(i, x, eps, ab, ab_prev):
        x0 = _x0_from_eps(x, eps, ab)
        if clip_x0 is not None:
            x0 = jnp.clip(x0, -clip_x0, clip_x0)
            eps = (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1.0 - ab)
        sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
        x_prev = jnp.sqrt(ab_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma**2, 0.0)) * eps
        if eta != 0.0:
            z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
            x_prev = x_prev + temperature * sigma * z
        return x_prev

    return _discrete_loop(denoise_fn, x_T, schedule, num_steps, step)


def flow_times(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """num_steps + 1 times from 1 to 0; shift s maps t -> s t / (1 + (s - 1) t) (SD3, Sec. 5.3.2).

    s > 1 spends more steps at high noise (as SD3 does for high resolutions).
    """
    t = np.linspace(1.0, 0.0, num_steps + 1)
    return (shift * t / (1.0 + (shift - 1.0) * t)).astype(np.float32)


def euler_sample(
    denoise_fn: DenoiseFn, x_1: jax.Array, *, num_steps: int = 50, shift: float = 1.0
) -> jax.Array:
    """Euler integration of the rectified-flow ODE dx/dt = v(x, t) from t = 1 (noise) to 0.

    x_{t'} = x_t + (t' - t) v(x_t, t) with v = eps - x0 predicted by `denoise_fn`; x_1 is the
    caller's N(0, I) draw.
    """
    if num_steps < 1:
        raise ValueError(f"euler_sample: num_steps must be >= 1, got {num_steps}")
    times = jnp.asarray(flow_times(num_steps, shift))

    def body(i: int, x: jax.Array) -> jax.Array:
        t = jnp.full(x.shape[:1], times[i], jnp.float32)
        v = denoise_fn(x, t).astype(jnp.float32)
        return (x + (times[i + 1] - times[i]) * v).astype(x.dtype)

    return jax.lax.fori_loop(0, num_steps, body, x_1)


__all__ = [
    "DenoiseFn",
    "cfg",
    "ddim_sample",
    "ddpm_sample",
    "euler_sample",
    "flow_times",
    "guided",
    "spaced_timesteps",
]
