"""The block math every flash-attention kernel variant shares, on values, not refs.

A variant (`pallas_tpu`: one grid step per listed block; `pallas_gpu`: a loop over the
listed blocks inside one program) only decides where blocks come from and where the running
state lives (VMEM scratch or a loop carry); the token mask, the online-softmax update, the
final normalisation and the backward's block updates are these functions. All accumulate
in f32 whatever the input dtype. A logit soft cap (Gemma 2) is applied where the scores
are formed (`scores`), so the forward and the backward's recomputation agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray

# Finite stand-ins for -inf: masked logits and the running max start here, so a row that has
# seen nothing yet computes exp(NEG - NEG) = 1 (then zeroed by the mask), never inf - inf.
NEG = -0.7 * float(np.finfo(np.float32).max)
# Log-sum-exp stored for rows that see nothing: exp(s - EMPTY_LSE) underflows to 0.
EMPTY_LSE = 0.5 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static (hashable) parameters of one kernel call.

    One config per pallas_call: the forward, dq and dk/dv kernels may tile differently.
    `kv_slots` / `q_slots` size the reduction axes of the grid variant: the largest
    non-empty count when the metadata is known at trace time, None when it is traced (the
    extent is then the traced maximum, a dynamic grid bound). The loop variant ignores them.
    `num_warps` / `num_stages` are Triton launch parameters (None: not a Triton call).
    `kv_head_split` splits a kv head's query-head group over that many dk/dv programs (the
    loop variant), whose partial sums the wrapper adds: more programs when few kv heads
    would leave streaming multiprocessors idle.
    """

    variant: str  # "grid" (TPU, scalar prefetch) or "loop" (GPU; CPU interpret mode)
    block_q: int
    block_kv: int
    scale: float
    causal: bool
    window: int | None
    use_span: bool
    groups: int
    num_q_blocks: int  # nq
    num_kv_blocks: int  # nk
    kv_slots: int | None
    q_slots: int | None
    interpret: object  # False, True, or pltpu.InterpretParams
    debug: bool
    num_warps: int | None = None
    num_stages: int | None = None
    kv_head_split: int = 1  # loop dk/dv: programs per kv head, each a share of its group
    soft_cap: float | None = None  # logits s -> soft_cap * tanh(s / soft_cap) before the mask


def check_soft_cap(soft_cap: float | None) -> float | None:
    """`soft_cap` as a python float (None stays None); ValueError unless positive and finite."""
    if soft_cap is None:
        return None
    if isinstance(soft_cap, bool) or not isinstance(soft_cap, (int, float, np.number)):
        raise ValueError(f"logits_soft_cap must be a positive number or None, got {soft_cap!r}")
    value = float(soft_cap)
    if not (0.0 < value < float("inf")):
        raise ValueError(f"logits_soft_cap must be positive and finite, got {soft_cap!r}")
    return value


def dot(a: Array, b: Array, contract: tuple[int, int]) -> Array:
    """a @ b contracting a's axis contract[0] with b's axis contract[1], f32 accumulation.

    f32 operands ask for HIGHEST precision (TPU / GPU otherwise round them to bf16 / tf32
    passes); bf16 operands use the native matrix-unit path.
    """
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def token_mask(
    q_ids: tuple[Array, Array, Array], kv_ids: tuple[Array, Array], kv_start: Array, cfg: Config
) -> Array:
    """[bq, bk] bool: the contract's rule for one block.

    q_ids = (segment, span, position) columns [bq, 1]; kv_ids = (segment, span) rows
    [1, bk]; the keys sit at positions kv_start + 0..bk-1.
    """
    q_seg, q_span, q_pos = q_ids
    kv_seg, kv_span = kv_ids
    mask = (q_seg == kv_seg) & (q_seg != 0)
    kv_pos = kv_start + jax.lax.broadcasted_iota(jnp.int32, (1, cfg.block_kv), 1)
    if cfg.causal:
        visible = kv_pos <= q_pos
        if cfg.use_span:
            visible = visible | ((q_span == kv_span) & (q_span != 0))
        mask = mask & visible
    if cfg.window is not None:  # |i - j| < w, without abs (Mosaic lowers it per chip kind)
        offset = q_pos - kv_pos
        mask = mask & (offset < cfg.window) & (-offset < cfg.window)
    return mask


def full_or_masked(is_full: Array, update: Callable, make_mask: Callable[[], Array], carry):
    """update(carry, None) on a FULL block (no mask built), else update(carry, make_mask()).

    One scalar branch per grid step (the grid variant); the loop variant never branches
    (`full_then_partial`)."""
    return jax.lax.cond(
        is_full,
        lambda c: update(c, None),
        lambda c: update(c, make_mask()),
        carry,
    )


def full_then_partial(full: Array, count: Array, body: Callable, carry):
    """Runs body(t, carry, masked) for t < full with masked=False, then for full <= t <
    count with masked=True: two branch-free loops over a FULL-first block list."""
    carry = jax.lax.fori_loop(0, full, lambda t, c: body(t, c, False), carry)
    return jax.lax.fori_loop(full, count, lambda t, c: body(t, c, True), carry)


def init_softmax(block_q: int, head_dim: int) -> tuple[Array, Array, Array]:
    """Running (max m [bq, 1], sum l [bq, 1], weighted values acc [bq, D]) before any block."""
    return (
        jnp.full((block_q, 1), NEG, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
        jnp.zeros((block_q, head_dim), jnp.float32),
    )


def scores(q: Array, k: Array, scale: float, soft_cap: float | None) -> tuple[Array, Array | None]:
    """(s [bq, bk] f32, ds/ds_raw or None): the scaled logits q k^T * scale, soft-capped to
    soft_cap * tanh(./soft_cap) when a cap is given, with the cap's derivative 1 - tanh^2."""
    s = dot(q, k, (1, 1)) * scale
    if soft_cap is None:
        return s, None
    t = jnp.tanh(s / soft_cap)
    return soft_cap * t, 1.0 - t * t


def softmax_update(
    state: tuple[Array, Array, Array], q: Array, k: Array, v: Array, mask: Array | None,
    scale: float, soft_cap: float | None = None,
) -> tuple[Array, Array, Array]:  # fmt: skip
    """One kv block of the online softmax: the new (m, l, acc)."""
    m_prev, l_prev, acc = state
    s, _ = scores(q, k, scale, soft_cap)  # [bq, bk] f32
    if mask is not None:
        s = jnp.where(mask, s, NEG)
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)  # a row with nothing visible yet has m_new = NEG
    alpha = jnp.exp(m_prev - m_new)
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    return m_new, l_new, alpha * acc + dot(p.astype(v.dtype), v, (1, 0))


def finish_softmax(state: tuple[Array, Array, Array]) -> tuple[Array, Array]:
    """(o [bq, D] f32, lse [bq, 1]); rows that saw nothing give o = 0, lse = EMPTY_LSE."""
    m, total, acc = state
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    return acc / safe, jnp.where(seen, m + jnp.log(safe), EMPTY_LSE)


def probs_and_dscores(
    q: Array, k: Array, v: Array, do: Array, lse: Array, delta: Array, mask: Array | None,
    scale: float, soft_cap: float | None = None,
) -> tuple[Array, Array]:  # fmt: skip
    """Recomputed probabilities p [bq, bk] and dS = p * (dO V^T - delta), both f32; with a
    soft cap, dS is taken back through it (times 1 - tanh^2) to the uncapped scores."""
    s, dcap = scores(q, k, scale, soft_cap)
    if mask is not None:
        s = jnp.where(mask, s, NEG)
    p = jnp.exp(s - lse)
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    ds = p * (dot(do, v, (1, 1)) - delta)
    return p, ds if dcap is None else ds * dcap


def dq_update(
    dq: Array, q: Array, k: Array, v: Array, do: Array, lse: Array, delta: Array,
    mask: Array | None, scale: float, soft_cap: float | None = None,
) -> Array:  # fmt: skip
    """dq [bq, D] += dS K for one kv block (the caller multiplies by scale at the end)."""
    _, ds = probs_and_dscores(q, k, v, do, lse, delta, mask, scale, soft_cap)
    return dq + dot(ds.astype(k.dtype), k, (1, 0))


def dkv_update(
    dkv: tuple[Array, Array], q: Array, k: Array, v: Array, do: Array, lse: Array,
    delta: Array, mask: Array | None, scale: float, soft_cap: float | None = None,
) -> tuple[Array, Array]:  # fmt: skip
    """(dk, dv) [bk, D] += (dS^T Q, P^T dO) for one q block (dk unscaled)."""
    dk, dv = dkv
    p, ds = probs_and_dscores(q, k, v, do, lse, delta, mask, scale, soft_cap)
    return dk + dot(ds.astype(q.dtype), q, (0, 0)), dv + dot(p.astype(do.dtype), do, (0, 0))
