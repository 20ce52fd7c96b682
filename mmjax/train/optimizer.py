"""Optimizer from config: AdamW, linear warmup + cosine decay, gradient clipping, decay mask,
and frozen parameters (`frozen`: path patterns, mmjax/train/stages.py)."""

from typing import Any

import jax
import ml_collections
import optax

from mmjax.train.stages import freeze_optimizer

NO_DECAY_NAMES = ("bias", "scale", "embedding", "pos_embedding", "cls", "logit_scale")


def weight_decay_mask(params: Any) -> Any:
    """True for weight matrices; False for biases, norm scales, embeddings and scalars."""

    def decays(path, leaf) -> bool:
        names = [getattr(p, "key", getattr(p, "name", "")) for p in path]
        return leaf.ndim >= 2 and not any(n in NO_DECAY_NAMES for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine to `lr * end_factor`."""
    warmup = min(cfg.warmup_steps, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.end_factor,
    )


def make_optimizer(
    cfg: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optimizer, schedule) for `config.optimizer`; clipping, AdamW and weight decay
    see only the parameters that `frozen` leaves to train."""
    if cfg.name != "adamw":
        raise ValueError(f"unknown optimizer.name {cfg.name!r}; valid: ['adamw']")
    schedule = learning_rate_schedule(cfg, total_steps)
    chain = []
    if cfg.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    chain.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=weight_decay_mask,
        )
    )
    tx = optax.chain(*chain)
    frozen = tuple(cfg.get("frozen", ()))
    return (freeze_optimizer(tx, frozen) if frozen else tx), schedule
