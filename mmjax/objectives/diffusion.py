"""Diffusion objectives: DDPM epsilon-prediction and rectified flow, as pure array functions.

Two processes, picked by name (`PROCESSES`):

- "ddpm": x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps for a discrete t in [0, T), target eps
  (Ho et al., 2020, Eq. 4 and 14), with a `Schedule` giving ab_t = alpha_bar(t): `cosine`
  (Nichol & Dhariwal, 2021, Eq. 17; Transfusion, Zhou et al., 2024, Sec. 4.1: 1,000 steps)
  or `linear` (Ho et al., 2020, Sec. 4). Index t = 0 is DDPM's first noising step (t = 1
  in the paper), as in improved-diffusion.
- "flow": rectified flow, x_t = (1 - t) x0 + t eps for t in [0, 1], target v = eps - x0
  (Liu et al., 2022; SD3, Esser et al., 2024, Sec. 2 and 3.1 for logit-normal t).

The model call is the caller's: `add_noise` draws t and noise and returns the model input
and the regression target; `diffusion_loss` is the masked mean squared error between the
model's prediction and that target. Time may be drawn per group of elements (one t per image,
broadcast to the image's patches in a packed sequence, as Transfusion does, Sec. 2.2), and
the loss averaged only over the elements a mask keeps (image patches, not text).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Metrics = dict[str, jax.Array]
PROCESSES = ("ddpm", "flow")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """A discrete noise schedule of T steps: f32 numpy arrays [T] indexed by t in [0, T).

    numpy, not device arrays: a schedule is made while a step is built, where no op may run
    on a device (compile-only TPU devices cannot); traced code indexes `jnp.asarray` of it.

    Attributes:
      betas: beta_t, the variance added at step t.
      alphas: 1 - beta_t.
      alpha_bars: prod_{s <= t} alpha_s, decreasing from near 1 to near 0.
    """

    betas: np.ndarray
    alphas: np.ndarray
    alpha_bars: np.ndarray

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]


def _from_betas(betas: np.ndarray) -> Schedule:
    alphas = 1.0 - betas
    alpha_bars = np.cumprod(alphas)  # in float64, then cast
    return Schedule(
        betas=betas.astype(np.float32),
        alphas=alphas.astype(np.float32),
        alpha_bars=alpha_bars.astype(np.float32),
    )


def cosine_schedule(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Cosine schedule (Nichol & Dhariwal, 2021, Eq. 17): f(t) = cos((t/T + s)/(1 + s) pi/2)^2.

    beta_t = min(1 - f(t + 1) / f(t), max_beta), so alpha_bar stays a product of the betas
    and the last step's beta is clipped at 0.999 (their Sec. 3.2).
    """

    def f(t: np.ndarray) -> np.ndarray:
        return np.cos((t / num_steps + s) / (1 + s) * np.pi / 2) ** 2

    t = np.arange(num_steps, dtype=np.float64)
    betas = np.minimum(1.0 - f(t + 1) / f(t), max_beta)
    return _from_betas(betas)


def linear_schedule(
    num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Schedule:
    """Linear betas from 1e-4 to 0.02 (Ho et al., 2020, Sec. 4), rescaled as 1000 / T."""
    scale = 1000.0 / num_steps
    betas = np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)
    return _from_betas(betas)


SCHEDULES = {"cosine": cosine_schedule, "linear": linear_schedule}


def make_schedule(name: str, num_steps: int = 1000) -> Schedule:
    """The schedule named by a config (`cosine` or `linear`) with `num_steps` steps."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown diffusion schedule {name!r}; valid: {sorted(SCHEDULES)}")
    return SCHEDULES[name](num_steps)


def _expand(a: jax.Array, x: jax.Array) -> jax.Array:
    """`a` shaped like x's leading dims, with trailing unit dims to broadcast against x."""
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def q_sample(x0: jax.Array, t: jax.Array, noise: jax.Array, schedule: Schedule) -> jax.Array:
    """DDPM forward process q(x_t | x0) (Ho et al., 2020, Eq. 4).

    `t` is int in [0, T), shaped like x0's leading dims (e.g. [B], or [B, S] per token) and
    broadcast over the rest.
    """
    ab = _expand(jnp.asarray(schedule.alpha_bars)[t], x0)
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise


def flow_sample(x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Rectified-flow interpolation x_t = (1 - t) x0 + t noise; t in [0, 1] as in `q_sample`."""
    t = _expand(t, x0)
    return (1.0 - t) * x0 + t * noise


def sample_timesteps(
    rng: jax.Array, shape: tuple[int, ...], num_steps: int, max_level: jax.Array | float = 1.0
) -> jax.Array:
    """Uniform discrete t in [0, max_level * num_steps), int32 (Ho et al., 2020, Algorithm 1).

    floor(U[0, 1) * T) rather than `randint`, which compiles several times slower on CPU.
    """
    u = jax.random.uniform(rng, shape, jnp.float32) * max_level
    return jnp.minimum(jnp.floor(u * num_steps), num_steps - 1).astype(jnp.int32)


def sample_flow_times(
    rng: jax.Array,
    shape: tuple[int, ...],
    *,
    logit_normal: bool = False,
    loc: float = 0.0,
    scale: float = 1.0,
) -> jax.Array:
    """Flow times in [0, 1]: uniform, or logit-normal sigmoid(N(loc, scale^2)) (SD3, Sec. 3.1)."""
    if logit_normal:
        return jax.nn.sigmoid(loc + scale * jax.random.normal(rng, shape, jnp.float32))
    return jax.random.uniform(rng, shape, jnp.float32)


def per_element(values: jax.Array, group_ids: jax.Array) -> jax.Array:
    """values [..., G] gathered by group_ids [..., S] into [..., S] (0 where an id is < 0).

    E.g. one t per image [B, M] to one t per token [B, S], given each token's image index in
    its row (-1 for text and padding).
    """
    idx = jnp.clip(group_ids, 0, values.shape[-1] - 1)
    picked = jnp.take_along_axis(values, idx.astype(jnp.int32), axis=-1)
    return jnp.where(group_ids >= 0, picked, jnp.zeros((), values.dtype))


class Noised(NamedTuple):
    """What `add_noise` returns; x_t and target have x0's shape and dtype."""

    x_t: jax.Array  # the model's input
    target: jax.Array  # eps ("ddpm") or v = eps - x0 ("flow"); 0 where a group id is < 0
    t: jax.Array  # one time per example or per group: int32 in [0, T) or f32 in [0, 1]
    t_elem: jax.Array  # t per element of group_ids' shape (equal to t without group_ids)
    noise: jax.Array  # the Gaussian noise drawn


def add_noise(
    rng: jax.Array,
    x0: jax.Array,
    *,
    process: str = "ddpm",
    schedule: Schedule | None = None,
    group_ids: jax.Array | None = None,
    num_groups: int | None = None,
    logit_normal: bool = False,
    max_level: jax.Array | float = 1.0,
) -> Noised:
    """Draws t and noise, and returns the noised input and regression target of `process`.

    Without `group_ids`, one t per leading row of x0 (t shaped [x0.shape[0]]). With
    `group_ids` (int, shaped like x0's leading dims, e.g. [B, S] for patches [B, S, D]; -1
    outside any group), one t per group: t is [..., num_groups] and every element of group g
    gets t[..., g] (one t per image in a packed sequence, Transfusion Sec. 2.2). Elements
    with id < 0 keep x0 and get target 0 and t_elem 0. "ddpm" uses `schedule` (default:
    `cosine_schedule(1000)`); "flow" draws t uniformly or logit-normal. `max_level`
    (broadcastable to t, in (0, 1]) caps each t at that fraction of the noise range.
    """
    if process not in PROCESSES:
        raise ValueError(f"unknown diffusion process {process!r}; valid: {list(PROCESSES)}")
    if group_ids is not None:
        if num_groups is None:
            raise ValueError("add_noise: group_ids needs num_groups (images per row)")
        if group_ids.shape != x0.shape[: group_ids.ndim]:
            raise ValueError(
                f"add_noise: group_ids {group_ids.shape} is not a prefix of x0 {x0.shape}"
            )
        t_shape = (*group_ids.shape[:-1], num_groups)
    else:
        t_shape = x0.shape[:1]
    k_t, k_noise = jax.random.split(rng)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    x = x0.astype(jnp.float32)
    if process == "ddpm":
        schedule = cosine_schedule() if schedule is None else schedule
        t = sample_timesteps(k_t, t_shape, schedule.num_steps, max_level)
        t_elem = t if group_ids is None else per_element(t, group_ids)
        x_t, target = q_sample(x, t_elem, noise, schedule), noise
    else:
        t = sample_flow_times(k_t, t_shape, logit_normal=logit_normal) * max_level
        t_elem = t if group_ids is None else per_element(t, group_ids)
        x_t, target = flow_sample(x, t_elem, noise), noise - x
    if group_ids is not None:
        inside = _expand(group_ids >= 0, x)
        x_t = jnp.where(inside, x_t, x)
        target = jnp.where(inside, target, 0.0)
    return Noised(x_t.astype(x0.dtype), target.astype(x0.dtype), t, t_elem, noise)


def diffusion_loss(
    pred: jax.Array, target: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
    """Mean squared error between the model's prediction and `add_noise`'s target.

    The simple loss of Ho et al., 2020, Eq. 14 (eps) or the flow-matching loss (v). `weights`
    (bool mask or float, shaped like pred's leading dims, e.g. [B, S], or like pred) scales each
    element; the loss is sum(w * err) / sum(w) over all elements, so masked elements (w = 0)
    change neither the loss nor any gradient, whatever their prediction (NaN included).
    """
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    if weights is None:
        loss = jnp.mean(jnp.square(diff))
        count = jnp.asarray(diff.size, jnp.float32)
    else:
        w = jnp.broadcast_to(_expand(weights.astype(jnp.float32), diff), diff.shape)
        keep = w != 0
        # Select before squaring, so a masked NaN prediction gets a zero (not NaN) gradient.
        diff = jnp.where(keep, diff, 0.0)
        loss = jnp.sum(w * jnp.square(diff)) / jnp.maximum(jnp.sum(w), 1e-12)
        count = jnp.sum(keep.astype(jnp.float32))
    return loss, {"diffusion_loss": loss, "diffusion_elements": count}


def cfg_keep_mask(rng: jax.Array, shape: tuple[int, ...], drop_prob: float) -> jax.Array:
    """Bool mask, False with probability `drop_prob`: which conditions to keep in training.

    Dropping the condition (e.g. the caption, 10% in Transfusion Sec. 4.1) trains the
    unconditional model that classifier-free guidance needs (Ho & Salimans, 2022, Sec. 3.2).
    """
    return jax.random.uniform(rng, shape) >= drop_prob


__all__ = [
    "PROCESSES",
    "SCHEDULES",
    "Noised",
    "Schedule",
    "add_noise",
    "cfg_keep_mask",
    "cosine_schedule",
    "diffusion_loss",
    "flow_sample",
    "linear_schedule",
    "make_schedule",
    "per_element",
    "q_sample",
    "sample_flow_times",
    "sample_timesteps",
]
