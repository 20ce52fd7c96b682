"""Frozen parameters, and the parameter paths and patterns that name them (and `init_from`'s
subtrees, train/workdir.py).

Parameter paths are the "/"-joined keys of the params tree, e.g.
`vit/encoder/block0/attn/query/kernel`. A pattern matches a path segment by segment: within a
segment `*`, `?` and `[...]` work as in fnmatch; a segment `**` matches any number of segments,
none included. So `vit/**` is every parameter under `vit`, `**/bias` every bias and
`lm/block[01]/**` the first two LM blocks. A pattern that matches no parameter is an error.

`config.optimizer.frozen` (patterns): those parameters get no update (optax.set_to_zero in an
optax.multi_transform, so the optimizer holds no moments for them) and no gradient (stop_gradient
in the loss, so the backward pass skips their weight gradients); they stay bit-identical.
"""

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import optax

from mmjax.errors import UserError

TRAINED, FROZEN = "trained", "frozen"


# ------------------------------------------------------------------------------------ paths
def path_name(keys: Sequence[Any]) -> str:
    """A pytree key path as "a/b/c"."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def param_paths(params: Any) -> dict[str, Any]:
    """{"a/b/c": leaf} of a params tree; a logically boxed parameter is one leaf."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0]
    return {path_name(keys): leaf for keys, leaf in flat}


def replace_leaves(tree: Any, values: Mapping[str, Any]) -> Any:
    """`tree` with the leaves at the "/"-joined paths of `values` replaced."""

    def pick(keys, leaf):
        return values.get(path_name(keys), leaf)

    return jax.tree_util.tree_map_with_path(pick, tree)


def matches(pattern: str, path: str) -> bool:
    """True if `pattern` (module docstring) matches the whole "/"-joined `path`."""
    return _match(pattern.strip("/").split("/"), path.split("/"))


def _match(pattern: list[str], path: list[str]) -> bool:
    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(_match(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], pattern[0]) and _match(pattern[1:], path[1:])


def top_level(paths: Sequence[str]) -> list[str]:
    return sorted({p.split("/")[0] for p in paths})


def frozen_mask(params: Any, patterns: Sequence[str]) -> Any:
    """A tree of bools shaped like `params` (boxed parameters as leaves): True where a pattern
    matches. UserError for a pattern that matches nothing."""
    paths = list(param_paths(params))
    for pattern in patterns:
        if not any(matches(pattern, p) for p in paths):
            raise UserError(
                f"optimizer.frozen pattern {pattern!r} matches no parameter; the top-level "
                f"names are {top_level(paths)} (paths are '/'-joined, '**' spans segments)"
            )
    return jax.tree_util.tree_map_with_path(
        lambda keys, _: any(matches(p, path_name(keys)) for p in patterns), params, is_leaf=is_box
    )


# --------------------------------------------------------------------------------- freezing
def freeze_optimizer(
    tx: optax.GradientTransformation, patterns: Sequence[str]
) -> optax.GradientTransformation:
    """`tx` on the parameters no pattern matches, zero updates (and no state) on the rest."""
    patterns = tuple(patterns)

    def labels(params: Any) -> Any:
        return jax.tree.map(lambda f: FROZEN if f else TRAINED, frozen_mask(params, patterns))

    return optax.multi_transform({TRAINED: tx, FROZEN: optax.set_to_zero()}, labels)


def stop_frozen_gradients(loss_fn: Callable, patterns: Sequence[str]) -> Callable:
    """`loss_fn(params, batch, rng)` with the frozen parameters behind stop_gradient: their
    gradients are exact zeros and the backward pass need not compute them."""
    patterns = tuple(patterns)

    def loss(params: Any, batch: Any, rng: jax.Array):
        mask = frozen_mask(params, patterns)
        params = jax.tree.map(
            lambda frozen, p: jax.lax.stop_gradient(p) if frozen else p, mask, params
        )
        return loss_fn(params, batch, rng)

    return loss
