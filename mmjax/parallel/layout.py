"""Convert parameters between the scanned and unscanned layouts of transformer stacks.

`nn.transformer.Transformer` stores its blocks in one of two layouts. Unscanned
(`scan_layers=False`) they are `P/block0` ... `P/block{n-1}`; scanned (`scan_layers=True`) the
first n - 1 are one module `P/layers` whose every parameter has a leading axis of size n - 1,
and the last one is `P/last` (a stack of depth 1 has only `last`; one built without its last
block only `layers`). A checkpoint written in one layout is restored into a model built in the
other with `to_layout`, so scanning stays a compile-time choice rather than part of the
checkpoint format.

Paths are "/"-joined parameter paths (`train.stages.param_paths`): of unboxed arrays in the
source, of arrays, ShapeDtypeStructs or flax logical boxes of them in the target. A stack is
found by its first `block{i}`, `layers` or `last` path segment; `P` is what precedes it.
"""

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import jax.numpy as jnp
import numpy as np

_BLOCK = re.compile(r"block(\d+)")
LAYERS, LAST = "layers", "last"


class Shaped(Protocol):
    """Anything with a shape: a numpy or jax array, a jax.ShapeDtypeStruct."""

    @property
    def shape(self) -> Sequence[int]: ...


@dataclass(frozen=True)
class _Site:
    """Where a parameter sits in a stack: `prefix/<block>/rest`, <block> being `block{index}`,
    `layers` or `last` (index None for the last two)."""

    prefix: tuple[str, ...]
    kind: str  # "block", LAYERS or LAST
    index: int | None
    rest: tuple[str, ...]

    def path(self, kind: str, index: int | None = None) -> str:
        """The same parameter of another block of this stack."""
        module = f"block{index}" if kind == "block" else kind
        return "/".join((*self.prefix, module, *self.rest))


@dataclass(frozen=True)
class _Stack:
    """One stack on one side: unscanned `depth` blocks, or scanned `layers` stacked blocks
    (plus `last` if has_last)."""

    scanned: bool
    layers: int = 0
    has_last: bool = False
    unscanned_depth: int = 0

    @property
    def depth(self) -> int:
        return self.layers + self.has_last if self.scanned else self.unscanned_depth

    def describe(self) -> str:
        if not self.scanned:
            return f"unscanned, {self.depth} blocks"
        last = " + last" if self.has_last else ", no last"
        return f"scanned, {self.layers} layers{last}"


def _site(path: str) -> _Site | None:
    """The stack site of `path` (its first `block{i}`, `layers` or `last` segment that is not
    the leaf), or None if it has none."""
    segments = path.split("/")
    for k, segment in enumerate(segments[:-1]):
        match = _BLOCK.fullmatch(segment)
        if match or segment in (LAYERS, LAST):
            kind = "block" if match else segment
            index = int(match.group(1)) if match else None
            return _Site(tuple(segments[:k]), kind, index, tuple(segments[k + 1 :]))
    return None


def _shape(x: Any) -> tuple[int, ...]:
    """The shape of an array or ShapeDtypeStruct, or of the value in a flax logical box."""
    return tuple(getattr(x, "value", x).shape)


def _name(prefix: tuple[str, ...]) -> str:
    return "/".join(prefix) or "<root>"


class _Tree:
    """One side's paths, with the stack each prefix holds worked out on demand."""

    def __init__(self, leaves: Mapping[str, Any], side: str) -> None:
        self.leaves, self.side = leaves, side
        self.sites: dict[tuple[str, ...], list[tuple[str, _Site]]] = {}
        self._stacks: dict[tuple[str, ...], _Stack | None] = {}  # memo: once per prefix
        for path in leaves:
            site = _site(path)
            if site is not None:
                self.sites.setdefault(site.prefix, []).append((path, site))

    def stack(self, prefix: tuple[str, ...]) -> _Stack | None:
        """The stack at `prefix`, None if there is none; ValueError if it mixes layouts or its
        stacked parameters disagree on the number of layers."""
        if prefix not in self._stacks:
            self._stacks[prefix] = self._find_stack(prefix)
        return self._stacks[prefix]

    def _find_stack(self, prefix: tuple[str, ...]) -> _Stack | None:
        sites = self.sites.get(prefix)
        if not sites:
            return None
        kinds = {site.kind for _, site in sites}
        if "block" in kinds and kinds & {LAYERS, LAST}:
            raise ValueError(
                f"to_layout: {self.side} stack {_name(prefix)} mixes block{{i}} with "
                f"layers/last modules, so its layout is ambiguous"
            )
        if "block" in kinds:
            return _Stack(False, unscanned_depth=1 + max(site.index for _, site in sites))
        stacked = {path: _shape(self.leaves[path]) for path, site in sites if site.kind == LAYERS}
        sizes = {shape[0] if shape else None for shape in stacked.values()}
        if len(sizes) > 1 or None in sizes:
            listing = ", ".join(f"{p} {s}" for p, s in sorted(stacked.items()))
            raise ValueError(
                f"to_layout: {self.side} stack {_name(prefix)}'s layers parameters do not share "
                f"one leading layers axis: {listing}"
            )
        return _Stack(True, layers=sizes.pop() if sizes else 0, has_last=LAST in kinds)


def _stack_arrays(arrays: list[Any]) -> Any:
    """Stack along a new axis 0: numpy stays numpy (host memory), anything else goes to jnp."""
    if all(isinstance(a, np.ndarray) for a in arrays):
        return np.stack(arrays)
    return jnp.stack(arrays)


def to_layout(source: Mapping[str, Any], target: Mapping[str, Shaped]) -> dict[str, Any]:
    """`source` (path -> array) rearranged into `target`'s layout (path -> anything with a
    shape), returning exactly target's paths: a checkpoint restored into a model whose stacks
    are scanned where the checkpoint's are not, or the other way round.

    A path that `source` holds with the target's shape is passed through unchanged. For a stack
    that is scanned on one side and unscanned on the other, `P/block{i}/rest` is
    `P/layers/rest[i]` (i < n - 1) or `P/last/rest`, and `P/layers/rest` stacks
    `P/block{0..n-2}/rest` along a new axis 0 while `P/last/rest` is `P/block{n-1}/rest`; any
    number of stacks (an image and a text tower) convert at once. A target path that cannot be
    built (no source, another shape, a stack of another depth) is a one-line ValueError.
    """
    src, tgt = _Tree(source, "source"), _Tree(target, "target")
    return {path: _build(path, _shape(like), src, tgt) for path, like in target.items()}


def _build(path: str, shape: tuple[int, ...], src: _Tree, tgt: _Tree) -> Any:
    """The array for target `path` of `shape`: passed through or converted from `src`."""
    if path in src.leaves and _shape(src.leaves[path]) == shape:
        return src.leaves[path]
    site = _site(path)
    theirs = None if site is None else src.stack(site.prefix)
    if site is None or theirs is None:
        if path in src.leaves:
            _mismatch(path, shape, path, _shape(src.leaves[path]))
        raise ValueError(f"to_layout: target {path} {shape} has no source (no such path)")
    ours = tgt.stack(site.prefix)
    assert ours is not None  # `path` itself is one of its parameters
    if ours.depth != theirs.depth:
        raise ValueError(
            f"to_layout: stack {_name(site.prefix)} has depth {theirs.depth} in the source "
            f"({theirs.describe()}) but {ours.depth} in the target ({ours.describe()}); "
            f"cannot build {path} {shape}"
        )
    if ours.scanned == theirs.scanned:  # same layout: only the path itself would do
        if path in src.leaves:
            _mismatch(path, shape, path, _shape(src.leaves[path]))
        raise ValueError(f"to_layout: target {path} {shape} has no source (no such path)")
    if site.kind == "block":  # scanned -> unscanned
        index = site.index
        if index < theirs.layers:
            stacked = _get(src, path, shape, site.path(LAYERS))
            want = (theirs.layers, *shape)
            if _shape(stacked) != want:
                _mismatch(path, shape, site.path(LAYERS), _shape(stacked), want)
            return stacked[index, ...]  # `...`: a 0-d numpy array, not a numpy scalar
        return _get(src, path, shape, site.path(LAST), check=shape)
    if site.kind == LAST:  # unscanned -> scanned
        return _get(src, path, shape, site.path("block", ours.layers), check=shape)
    # LAYERS: unscanned -> scanned; _Tree.stack checked that shape[0] is ours.layers
    blocks = [
        _get(src, path, shape, site.path("block", i), check=shape[1:]) for i in range(shape[0])
    ]
    return _stack_arrays(blocks)


def _get(
    src: _Tree, path: str, shape: tuple[int, ...], name: str, check: tuple | None = None
) -> Any:
    """Source `name` for target `path`; ValueError if absent or (with `check`) of another
    shape than `check`."""
    if name not in src.leaves:
        raise ValueError(f"to_layout: target {path} {shape} needs source {name}, which is absent")
    value = src.leaves[name]
    if check is not None and _shape(value) != tuple(check):
        _mismatch(path, shape, name, _shape(value), tuple(check))
    return value


def _mismatch(
    path: str, shape: tuple, name: str, got: tuple, want: tuple | None = None
) -> NoReturn:
    """Raise the one-line shape mismatch error (`want`: the shape `name` would need)."""
    if want is None:
        raise ValueError(f"to_layout: target {path} is {shape}, but source {name} is {got}")
    raise ValueError(
        f"to_layout: target {path} {shape} needs source {name} of shape {want}, but it is {got}"
    )


def differs_by_layout(source_paths: Iterable[str], target_paths: Iterable[str]) -> bool:
    """True if the two path sets differ, and only in stacks that are scanned on one side and
    unscanned on the other holding the same parameters: `to_layout` is then what restores one
    into the other. Depths are checked by `to_layout`, which sees the shapes."""
    source, target = set(source_paths), set(target_paths)
    src_layouts, tgt_layouts = _layouts(source), _layouts(target)
    flipped = {
        prefix
        for prefix in src_layouts.keys() & tgt_layouts.keys()
        if {src_layouts[prefix], tgt_layouts[prefix]} == {"scanned", "unscanned"}
    }

    def canonical(path: str) -> object:
        """(prefix, rest) for a parameter of a flipped stack, whatever its block; else path."""
        site = _site(path)
        return (site.prefix, site.rest) if site and site.prefix in flipped else path

    differing = source ^ target
    return (
        bool(differing)
        and all(isinstance(canonical(p), tuple) for p in differing)
        and {canonical(p) for p in source} == {canonical(p) for p in target}
        and all(_uniform(paths, prefix) for paths in (source, target) for prefix in flipped)
    )


def _uniform(paths: Iterable[str], prefix: tuple[str, ...]) -> bool:
    """Whether every block module of the stack at `prefix` (block{i}, layers, last) holds the
    same parameters, as a Transformer's blocks do."""
    rests: dict[tuple[str, int | None], set[tuple[str, ...]]] = {}
    for path in paths:
        site = _site(path)
        if site is not None and site.prefix == prefix:
            rests.setdefault((site.kind, site.index), set()).add(site.rest)
    return len({frozenset(r) for r in rests.values()}) <= 1


def _layouts(paths: Iterable[str]) -> dict[tuple[str, ...], str]:
    """{stack prefix: "scanned", "unscanned" or "mixed"} of a path set."""
    kinds: dict[tuple[str, ...], set[bool]] = {}
    for path in paths:
        site = _site(path)
        if site is not None:
            kinds.setdefault(site.prefix, set()).add(site.kind != "block")
    names = {frozenset({True}): "scanned", frozenset({False}): "unscanned"}
    return {prefix: names.get(frozenset(k), "mixed") for prefix, k in kinds.items()}
