"""Staged training from config: frozen parameters, and a run initialised from subtrees of an
earlier run's workdir (BLIP-2 stage 2 from stage 1, a VLM or UniFluid on a trained CLIP tower).

Parameter paths are the "/"-joined keys of the params tree, e.g.
`vit/encoder/block0/attn/query/kernel`. A pattern matches a path segment by segment: within a
segment `*`, `?` and `[...]` work as in fnmatch; a segment `**` matches any number of segments,
none included. So `vit/**` is every parameter under `vit`, `**/bias` every bias and
`lm/block[01]/**` the first two LM blocks. A pattern that matches no parameter is an error.

`config.optimizer.frozen` (patterns): those parameters get no update (optax.set_to_zero in an
optax.multi_transform, so the optimizer holds no moments for them) and no gradient (stop_gradient
in the loss, so the backward pass skips their weight gradients); they stay bit-identical.

`config.init_from = dict(format="workdir", path=EARLIER_WORKDIR, step=-1, load={dst: src})`:
after this run's own initialisation, each subtree `dst` of its params is replaced by the subtree
`src` of the earlier run's params at checkpoint `step` (-1: the latest complete one); empty
`load` copies the whole tree. Both subtrees must hold the same paths and shapes (dtypes are cast
to this run's). The earlier workdir is only read. Resuming this run's own workdir takes
precedence: a run initialises from `init_from` only when it has no checkpoint yet.
"""

import fnmatch
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import optax
import orbax.checkpoint as ocp
from etils import epath

from mmjax.errors import UserError
from mmjax.train.checkpoint import COMMIT_MARKER
from mmjax.train.restore import read_config

WORKDIR_FORMAT = "workdir"
TRAINED, FROZEN = "trained", "frozen"
MAX_LISTED = 3  # mismatches named in one error line


# ------------------------------------------------------------------------------------ paths
def path_name(keys: Sequence[Any]) -> str:
    """A pytree key path as "a/b/c"."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def param_paths(params: Any) -> dict[str, Any]:
    """{"a/b/c": leaf} of a params tree; a logically boxed parameter is one leaf."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]
    return {path_name(keys): leaf for keys, leaf in flat}


def matches(pattern: str, path: str) -> bool:
    """True if `pattern` (module docstring) matches the whole "/"-joined `path`."""
    return _match(pattern.strip("/").split("/"), path.split("/"))


def _match(pattern: list[str], path: list[str]) -> bool:
    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(_match(pattern[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], pattern[0]) and _match(pattern[1:], path[1:])


def _top_level(paths: Sequence[str]) -> list[str]:
    return sorted({p.split("/")[0] for p in paths})


def frozen_mask(params: Any, patterns: Sequence[str]) -> Any:
    """A tree of bools shaped like `params` (boxed parameters as leaves): True where a pattern
    matches. UserError for a pattern that matches nothing."""
    paths = list(param_paths(params))
    for pattern in patterns:
        if not any(matches(pattern, p) for p in paths):
            raise UserError(
                f"optimizer.frozen pattern {pattern!r} matches no parameter; the top-level "
                f"names are {_top_level(paths)} (paths are '/'-joined, '**' spans segments)"
            )
    return jax.tree_util.tree_map_with_path(
        lambda keys, _: any(matches(p, path_name(keys)) for p in patterns), params, is_leaf=_is_box
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


# ------------------------------------------------------------------------ init from workdir
def check_workdir_source(init_from: Mapping[str, Any]) -> None:
    """Early checks of a `format="workdir"` init_from (before any model is built)."""
    path = init_from.get("path", "")
    if not path:
        raise UserError("init_from.format=workdir needs init_from.path (an earlier run's workdir)")
    load = dict(init_from.get("load") or {})
    for dst, src in load.items():
        if not isinstance(src, str):
            raise UserError(f"init_from.load maps {dst!r} to {src!r}: expected a param path")


def check_load(init_from: Mapping[str, Any], params: Any) -> None:
    """Checks, before anything is computed, that `load_from_workdir` can fill `params` (or
    their shapes): one UserError line for a missing workdir, checkpoint, prefix or a mismatch."""
    with _EarlierRun(init_from) as earlier:
        earlier.pairs(params)


def load_from_workdir(init_from: Mapping[str, Any], params: Any, shardings: Any) -> Any:
    """`params` with the subtrees `init_from.load` names replaced by the earlier run's
    (module docstring), placed with `shardings`; one UserError line for any mismatch."""
    with _EarlierRun(init_from) as earlier:
        pairs = earlier.pairs(params)
        restored = earlier.read(pairs, params, shardings)
    print(f"Initialised {len(pairs)} parameters from the {earlier.model} model in {earlier.where}")
    return _replace(params, {dst: restored[src] for dst, src in pairs.items()})


class _EarlierRun:
    """An earlier run's checkpoint at `init_from.step`, opened read-only."""

    def __init__(self, init_from: Mapping[str, Any]):
        self.workdir = os.path.abspath(init_from["path"])
        try:
            self.model = read_config(self.workdir).model.get("name", "?")
        except UserError as e:
            raise UserError(f"init_from.path: {e}") from None
        self.load = dict(init_from.get("load") or {"": ""})
        directory = os.path.join(self.workdir, "checkpoints")
        complete = [
            int(s)
            for s in (os.listdir(directory) if os.path.isdir(directory) else ())
            if s.isdigit()
            and all(
                os.path.exists(os.path.join(directory, s, *item, COMMIT_MARKER))
                for item in ((), ("state",))
            )
        ]
        self.step = _pick_step(complete, directory, int(init_from.get("step", -1)))
        self.where = f"{self.workdir} step {self.step}"
        # Orbax's item handler, not a CheckpointManager: nothing is created, locked or logged
        self.state_dir = epath.Path(directory) / str(self.step) / "state"
        self.handler = ocp.PyTreeCheckpointHandler()
        self.saved = param_paths(self.handler.metadata(self.state_dir).tree["params"])

    def __enter__(self) -> "_EarlierRun":
        return self

    def __exit__(self, *exc) -> None:
        self.handler.close()

    def pairs(self, params: Any) -> dict[str, str]:
        """{dst path: src path} of every parameter the load copies, checked."""
        here = param_paths(params)
        pairs = _pair(self.load, here, self.saved, self.where)
        problems = []
        for dst, src in pairs.items():
            want, got = tuple(nn.meta.unbox(here[dst]).shape), tuple(self.saved[src].shape)
            if want != got:
                name = dst if dst == src else f"{src} (for {dst})"
                problems.append(f"{name} is {got} in {self.where} but {want} here")
        _raise(problems)
        return pairs

    def read(self, pairs: Mapping[str, str], params: Any, shardings: Any) -> dict[str, jax.Array]:
        """{src path: array} of the source parameters in `pairs`, read straight onto the
        shardings and dtypes of their destinations; nothing else of the checkpoint is read."""
        here, placed = param_paths(params), param_paths(shardings)
        item: dict = {}
        for dst, src in pairs.items():
            node = item.setdefault("params", {})
            *parents, leaf = src.split("/")
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = jax.ShapeDtypeStruct(
                here[dst].shape, here[dst].dtype, sharding=placed[dst]
            )
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(
                sharding=a.sharding, global_shape=a.shape, dtype=a.dtype
            ),
            item,
        )
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        return param_paths(self.handler.restore(self.state_dir, args=args)["params"])


def _pick_step(complete: Sequence[int], directory: str, step: int) -> int:
    """`step`, or the latest complete checkpoint for -1."""
    if not complete:
        raise UserError(f"init_from: no complete checkpoint in {directory}")
    if step == -1:
        return max(complete)
    if step not in complete:
        raise UserError(
            f"init_from.step {step} has no complete checkpoint in {directory}; "
            f"available: {sorted(complete)}"
        )
    return step


def _under(prefix: str, paths: Mapping[str, Any]) -> dict[str, str]:
    """{relative path: path} of the paths at or under `prefix` ("" is the root)."""
    prefix = prefix.strip("/")
    if not prefix:
        return {p: p for p in paths}
    out = {p[len(prefix) + 1 :]: p for p in paths if p.startswith(prefix + "/")}
    if prefix in paths:
        out[""] = prefix
    return out


def _pair(
    load: Mapping[str, str], here: Mapping[str, Any], saved: Mapping[str, Any], where: str
) -> dict[str, str]:
    """{dst path: src path} for every parameter `load` copies."""
    pairs: dict[str, str] = {}
    problems = []
    for dst_prefix, src_prefix in load.items():
        dst, src = _under(dst_prefix, here), _under(src_prefix, saved)
        if not dst:
            raise UserError(
                f"init_from.load: {dst_prefix!r} names no parameter of this model; its top-level "
                f"names are {_top_level(here)}"
            )
        if not src:
            raise UserError(
                f"init_from.load: {src_prefix!r} is not in {where}; its top-level names are "
                f"{_top_level(saved)}"
            )
        problems += [
            f"{src[r]} is in {where} but {_join(dst_prefix, r)} is not here"
            for r in sorted(src.keys() - dst.keys())
        ]
        problems += [
            f"{dst[r]} is here but {_join(src_prefix, r)} is not in {where}"
            for r in sorted(dst.keys() - src.keys())
        ]
        for r in sorted(dst.keys() & src.keys()):
            if dst[r] in pairs:
                raise UserError(f"init_from.load: {dst[r]} is loaded by two entries of {load}")
            pairs[dst[r]] = src[r]
    _raise(problems)
    return pairs


def _raise(problems: Sequence[str]) -> None:
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise UserError("init_from: " + "; ".join(problems[:MAX_LISTED]) + more)


def _join(prefix: str, relative: str) -> str:
    return "/".join(p for p in (prefix.strip("/"), relative) if p)


def _replace(params: Any, values: Mapping[str, jax.Array]) -> Any:
    """`params` with the leaves at the paths of `values` replaced."""

    def pick(keys, leaf):
        return values.get(path_name(keys), leaf)

    return jax.tree_util.tree_map_with_path(pick, params)
