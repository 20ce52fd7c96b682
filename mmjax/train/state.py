"""The train state: step, parameters, optimizer state and NaN counters, one pytree."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


class TrainState(flax.struct.PyTreeNode):
    """Everything a step updates; checkpointed whole."""

    step: jax.Array
    params: Any
    opt_state: Any
    bad_steps: jax.Array  # consecutive steps with a non-finite loss or gradient
    skipped_steps: jax.Array  # all updates skipped for that reason so far

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation) -> "TrainState":
        zero = jnp.zeros((), jnp.int32)
        return cls(
            step=zero, params=params, opt_state=tx.init(params), bad_steps=zero, skipped_steps=zero
        )
