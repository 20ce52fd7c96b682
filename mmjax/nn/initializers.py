"""Parameter initialisers annotated with logical axis names."""

from collections.abc import Callable

import flax.linen as nn


def logical(init: Callable, *axes: str | None) -> Callable:
    """Wraps `init` so the parameter carries logical axis names (one per dimension)."""
    return nn.with_logical_partitioning(init, axes)
