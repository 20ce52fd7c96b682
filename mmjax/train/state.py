"""The train state: step, parameters and optimizer state, one pytree."""

from typing import Any

import flax.struct
import jax
import optax


class TrainState(flax.struct.PyTreeNode):
    """Everything a step updates; checkpointed whole."""

    step: jax.Array
    params: Any
    opt_state: Any

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation) -> "TrainState":
        return cls(
            step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params)
        )
