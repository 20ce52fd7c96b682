"""Parameter initialisers annotated with logical axis names."""

from collections.abc import Callable

import flax.linen as nn

Initializer = Callable


def logical(init: Initializer, *axes: str | None) -> Initializer:
    """Wraps `init` so the parameter carries logical axis names (one per dimension)."""
    return nn.with_logical_partitioning(init, axes)


def dense_init(*axes: str | None) -> Initializer:
    """Xavier-uniform kernel init with logical axes (the ViT/CLIP default for dense layers)."""
    return logical(nn.initializers.xavier_uniform(), *axes)


def zeros_init(*axes: str | None) -> Initializer:
    """Zeros with logical axes (biases)."""
    return logical(nn.initializers.zeros_init(), *axes)
