"""Static cost figures for a compiled train step: collectives from HLO, matmul FLOPs from a jaxpr.

Used by the ahead-of-time report (`python -m mmjax.aot`): it compiles a step for a TPU topology
with libtpu's compile-only devices, where nothing can run or be profiled, and wants to say what
one step costs per chip. Three pieces:

- `collective_stats` reads the optimized per-device HLO text (`Compiled.as_text()`) and counts
  the collectives as they execute, loops multiplied out.
- `dot_flops` counts matmul/convolution FLOPs in a jaxpr, which (unlike XLA's cost analysis)
  sees through loops with their trip counts and through Pallas kernels that declare a cost.
- `hbm_bytes` estimates the bytes the same program reads and writes, loops multiplied out.
- `roofline` turns per-chip FLOPs and bytes into a lower bound on step time for a `Chip`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterator
from typing import Any

from mmjax.parallel.chips import Chip

# ---------------------------------------------------------------------------------------------
# Collectives in HLO text
# ---------------------------------------------------------------------------------------------

COLLECTIVE_KINDS = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
)
"""The kinds `collective_stats` reports, as XLA spells the opcodes."""

UNKNOWN_TRIP_COUNTS = "unknown_trip_counts"
"""Key in `collective_stats`' result: the number of while loops counted once (trip unknown)."""

# Opcode -> kind. The async `-start` halves count as their kind; `-done` halves are skipped.
_KIND_OF_OPCODE = {
    **{k: k for k in COLLECTIVE_KINDS},
    **{f"{k}-start": k for k in COLLECTIVE_KINDS},
    "ragged-all-to-all": "all-to-all",
}
# Ops we look through when following a loop counter (they don't change its value).
_TRANSPARENT = ("copy", "bitcast", "convert", "reshape")

_COMPUTATION_HEADER = re.compile(r"^\s*(ENTRY\s+)?%?(?P<name>[^\s(={}]+)\s*(\(.*)?\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?P<root>ROOT\s+)?%?(?P<name>[^\s=]+)\s+=\s+(?P<rest>\S.*)$")
_OPCODE = re.compile(r"\s*(?P<op>[\w\-]+)\(")
_ARRAY = re.compile(r"\b(?P<dtype>[a-z][a-z0-9]*)\[(?P<dims>[^\]]*)\]")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_CHAIN_ID = re.compile(r'\bchain_id="([^"]*)"')


def _split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside (), {} and []."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


@dataclasses.dataclass
class _Instruction:
    name: str
    shape: str  # the printed shape, layouts included
    opcode: str
    operand_text: str  # the text between the opcode's parentheses
    attrs: str  # everything after the operand list
    is_root: bool

    @functools.cached_property
    def operands(self) -> list[str]:
        # Each operand prints as "%name", or as "shape %name" in older dumps.
        return [part.split()[-1].lstrip("%") for part in _split_top_level(self.operand_text)]

    def called(self, key: str) -> list[str]:
        """Computations named by attribute `key` (`calls`, `body`, `branch_computations`, ...)."""
        m = re.search(rf"(?:^|[\s,]){key}=(\{{[^}}]*\}}|%?[^\s,]+)", self.attrs)
        if not m:
            return []
        return [n.strip().lstrip("%") for n in m.group(1).strip("{}").split(",") if n.strip()]


@dataclasses.dataclass
class _Computation:
    name: str
    instructions: list[_Instruction]

    def __post_init__(self) -> None:
        self.by_name = {i.name: i for i in self.instructions}
        roots = [i for i in self.instructions if i.is_root]
        self.root = roots[0] if roots else (self.instructions[-1] if self.instructions else None)
        # async op -> its -done, looking through -update ops in between.
        self.done_of: dict[str, _Instruction] = {}
        for inst in self.instructions:
            if inst.opcode.endswith("-done") and inst.operands:
                source = self.by_name.get(inst.operands[0])
                while source is not None and source.opcode.endswith("-update") and source.operands:
                    source = self.by_name.get(source.operands[0])
                if source is not None:
                    self.done_of[source.name] = inst

    def resolve(self, name: str) -> _Instruction | None:
        """The instruction `name`, looking through copies, bitcasts and converts."""
        inst = self.by_name.get(name)
        while inst is not None and inst.opcode in _TRANSPARENT and inst.operands:
            inst = self.by_name.get(inst.operands[0])
        return inst


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group that opens at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced parentheses in HLO: {text[start : start + 200]!r}")


def _parse_instruction(line: str) -> _Instruction | None:
    m = _INSTRUCTION.match(line)
    if not m:
        return None
    rest = m.group("rest")
    if rest.startswith("("):  # tuple shape
        end = _balanced(rest, 0)
    else:
        end = rest.find(" ")
        if end < 0:
            return None
    shape, tail = rest[:end], rest[end:]
    op = _OPCODE.match(tail)
    if not op:
        return None
    open_paren = op.end() - 1
    close = _balanced(tail, open_paren)
    return _Instruction(
        name=m.group("name").lstrip("%"),
        shape=shape,
        opcode=op.group("op"),
        operand_text=tail[open_paren + 1 : close - 1],
        attrs=tail[close:],
        is_root=bool(m.group("root")),
    )


def _parse_module(hlo_text: str) -> tuple[dict[str, _Computation], str]:
    """Computations by name, and the name of the ENTRY computation."""
    computations: dict[str, _Computation] = {}
    entry = None
    name: str | None = None
    lines: list[str] = []  # the current computation's instructions, wrapped lines joined

    for line in hlo_text.splitlines():
        if name is None:
            m = _COMPUTATION_HEADER.match(line)
            if m and not line.lstrip().startswith("HloModule"):
                name, lines = m.group("name"), []
                if m.group(1):
                    entry = name
        elif line.strip().startswith("}"):
            parsed = [_parse_instruction(text) for text in lines]
            computations[name] = _Computation(name, [i for i in parsed if i is not None])
            name = None
        elif _INSTRUCTION.match(line) or not lines:
            lines.append(line)
        elif line.strip():
            lines[-1] += " " + line.strip()  # an instruction printed over several lines
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return computations, entry


def _element_bits(dtype: str) -> int:
    if dtype == "pred":
        return 8
    if dtype in ("token", "opaque"):
        return 0
    m = re.match(r"[a-z]+?(\d+)", dtype)  # f32 -> 32, bf16 -> 16, f8e4m3fn -> 8, c64 -> 64
    if not m:
        raise ValueError(f"unknown HLO element type {dtype!r}")
    return int(m.group(1))


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """The (dtype, dims) leaves of a printed HLO shape, in order."""
    out = []
    for m in _ARRAY.finditer(shape):
        dims = tuple(int(d.strip().lstrip("<=")) for d in m.group("dims").split(",") if d.strip())
        out.append((m.group("dtype"), dims))
    return out


def _nbytes(arrays: list[tuple[str, tuple[int, ...]]]) -> float:
    return sum(math.prod(dims) * _element_bits(dtype) / 8 for dtype, dims in arrays)


def _collective_bytes(inst: _Instruction, comp: _Computation) -> float:
    """Bytes of the result of one collective (for `-start` ops: of what its `-done` returns)."""
    if not inst.opcode.endswith("-start"):
        return _nbytes(_arrays(inst.shape))
    done = comp.done_of.get(inst.name)
    if done is not None:
        return _nbytes(_arrays(done.shape))
    # No -done in this computation: read the start's own shape. Drop the u32[]/s32[] context
    # scalars async ops carry; all but all-reduce-start hold (operands..., results...).
    arrays = [a for a in _arrays(inst.shape) if not (a[0] in ("u32", "s32") and a[1] == ())]
    if inst.opcode != "all-reduce-start" and inst.shape.startswith("("):
        arrays = arrays[len(arrays) // 2 :]
    return _nbytes(arrays)


def _constant(inst: _Instruction | None) -> int | None:
    if inst is None or inst.opcode != "constant":
        return None
    text = inst.operand_text.strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else None


def _tuple_index(inst: _Instruction | None) -> int | None:
    """k when `inst` is get-tuple-element(parameter, index=k), else None."""
    if inst is None or inst.opcode != "get-tuple-element":
        return None
    m = re.search(r"\bindex=(\d+)", inst.attrs)
    return int(m.group(1)) if m else None


def _infer_trip_count(
    loop: _Instruction, caller: _Computation, computations: dict[str, _Computation]
) -> int | None:
    """Trip count of a while loop: its known_trip_count, else the counted-loop pattern.

    TPU HLO drops `known_trip_count`, so we read the usual `i = c0; while i < n: i += step`
    shape: the condition compares tuple element k with a constant, the init tuple holds a
    constant at k, and the body adds a constant (or a loop-invariant element) to element k.
    """
    m = _TRIP_COUNT.search(loop.attrs)
    if m:
        return int(m.group(1))
    cond = computations.get(next(iter(loop.called("condition")), ""))
    body = computations.get(next(iter(loop.called("body")), ""))
    if cond is None or body is None or cond.root is None or body.root is None:
        return None
    if cond.root.opcode != "compare" or len(cond.root.operands) != 2:
        return None
    direction = re.search(r"direction=(\w+)", cond.root.attrs)
    if not direction:
        return None
    a, b = (cond.resolve(o) for o in cond.root.operands)
    flip = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE", "NE": "NE", "EQ": "EQ"}
    op = direction.group(1)
    if _tuple_index(a) is not None and _constant(b) is not None:
        k, limit = _tuple_index(a), _constant(b)
    elif _tuple_index(b) is not None and _constant(a) is not None:
        k, limit, op = _tuple_index(b), _constant(a), flip[op]
    else:
        return None
    init = caller.resolve(loop.operands[0]) if loop.operands else None
    if init is None or init.opcode != "tuple" or body.root.opcode != "tuple":
        return None

    def initial(index: int) -> int | None:
        ops = init.operands
        return _constant(caller.resolve(ops[index])) if index < len(ops) else None

    def step_value(inst: _Instruction | None) -> int | None:
        value = _constant(inst)
        j = _tuple_index(inst)
        # A loop-invariant element (one the body passes through unchanged) also works.
        ops = body.root.operands
        if (
            value is None
            and j is not None
            and j < len(ops)
            and _tuple_index(body.resolve(ops[j])) == j
        ):
            value = initial(j)
        return value

    start = initial(k)
    update = body.resolve(body.root.operands[k]) if k < len(body.root.operands) else None
    if start is None or update is None or len(update.operands) != 2:
        return None
    x, y = (body.resolve(o) for o in update.operands)
    if update.opcode == "add":
        if _tuple_index(x) == k:
            step = step_value(y)
        elif _tuple_index(y) == k:
            step = step_value(x)
        else:
            return None
    elif update.opcode == "subtract" and _tuple_index(x) == k:
        step = step_value(y)
        step = None if step is None else -step
    else:
        return None
    if not step:
        return None
    span = limit - start
    if op == "LT" and step > 0:
        return max(0, -(-span // step))
    if op == "LE" and step > 0:
        return max(0, span // step + 1)
    if op == "GT" and step < 0:
        return max(0, -(-span // step))
    if op == "GE" and step < 0:
        return max(0, span // step + 1)
    if op == "NE" and span % step == 0 and span // step >= 0:
        return span // step
    return None


@dataclasses.dataclass
class _Totals:
    count: dict[str, float] = dataclasses.field(default_factory=dict)
    nbytes: dict[str, float] = dataclasses.field(default_factory=dict)
    unknown_trip_counts: int = 0

    def add_one(self, kind: str, nbytes: float) -> None:
        self.count[kind] = self.count.get(kind, 0) + 1
        self.nbytes[kind] = self.nbytes.get(kind, 0.0) + nbytes

    def add(self, other: _Totals, times: int = 1) -> None:
        for kind in other.count:
            self.count[kind] = self.count.get(kind, 0) + times * other.count[kind]
            self.nbytes[kind] = self.nbytes.get(kind, 0.0) + times * other.nbytes[kind]
        self.unknown_trip_counts += other.unknown_trip_counts

    def total_bytes(self) -> float:
        return sum(self.nbytes.values())


class _CollectiveCounter:
    def __init__(self, hlo_text: str) -> None:
        self.computations, self.entry = _parse_module(hlo_text)
        self.memo: dict[str, _Totals] = {}

    def totals(self, name: str) -> _Totals:
        """Collectives of one execution of a (non-fusion) computation, callees included."""
        if name not in self.memo:
            self.memo[name] = _Totals()  # guards against cycles, which valid HLO never has
            totals = _Totals()
            self._scan(self.computations[name], totals, chains=set())
            self.memo[name] = totals
        return self.memo[name]

    def _scan(self, comp: _Computation, totals: _Totals, chains: set) -> None:
        for inst in comp.instructions:
            kind = _KIND_OF_OPCODE.get(inst.opcode)
            if kind is not None:
                nbytes = _collective_bytes(inst, comp)
                chain = _CHAIN_ID.search(inst.attrs)
                if chain:
                    # TPU splits one async collective into start/continuation/done fusions that
                    # each hold a copy of it, tagged with the same chain_id: count it once.
                    key = (chain.group(1), kind, nbytes)
                    if key in chains:
                        continue
                    chains.add(key)
                totals.add_one(kind, nbytes)
            elif inst.opcode == "fusion":
                callee = next(iter(inst.called("calls")), None)
                if callee is None or callee not in self.computations:
                    continue
                if callee.startswith("all-reduce-scatter") or "AllReduceScatter" in inst.attrs:
                    # TPU's reduce-scatter fusion wraps an all-reduce of the padded input and
                    # returns this device's shard: it is one reduce-scatter of that shard.
                    totals.add_one("reduce-scatter", _nbytes(_arrays(inst.shape)))
                else:
                    self._scan(self.computations[callee], totals, chains)
            elif inst.opcode == "while":
                trips = _infer_trip_count(inst, comp, self.computations)
                if trips is None:
                    totals.unknown_trip_counts += 1
                    trips = 1
                for body in inst.called("body"):
                    totals.add(self._totals_or_empty(body), trips)
                for cond in inst.called("condition"):
                    totals.add(self._totals_or_empty(cond), trips + 1)
            elif inst.opcode == "conditional":
                branches = inst.called("branch_computations") or [
                    *inst.called("true_computation"),
                    *inst.called("false_computation"),
                ]
                options = [self._totals_or_empty(b) for b in branches]
                if options:
                    # One branch runs; count the one that moves the most (an upper bound).
                    totals.add(max(options, key=lambda t: (t.total_bytes(), sum(t.count.values()))))
            elif inst.opcode == "call":
                for callee in inst.called("to_apply"):
                    totals.add(self._totals_or_empty(callee))
            elif inst.opcode in ("async-start", "custom-call"):
                for callee in inst.called("calls") + inst.called("called_computations"):
                    totals.add(self._totals_or_empty(callee))

    def _totals_or_empty(self, name: str) -> _Totals:
        return self.totals(name) if name in self.computations else _Totals()


def collective_stats(hlo_text: str) -> dict[str, Any]:
    """Collectives one execution of a compiled SPMD module performs, per device.

    `hlo_text` is the optimized HLO of the per-device program (`Compiled.as_text()`). Returns
    `{kind: {"count": n, "bytes": b}}` for each kind in `COLLECTIVE_KINDS` that occurs, where b
    sums the sizes of the collectives' results (for all-gather the gathered array, for
    reduce-scatter this device's shard). Collectives are counted as they execute, walking from
    ENTRY through fusions, calls, async wrappers, conditionals and whiles:

    - a while body counts trip-count times: `known_trip_count` from the backend config, else
      the counted-loop pattern of the condition and body (TPU HLO drops the config). A loop
      whose count can't be found counts once and adds 1 to `result["unknown_trip_counts"]`
      (the key is present only when nonzero);
    - a conditional counts its branch that moves the most bytes (an upper bound);
    - async `-start` ops count as their kind (bytes from what the `-done` returns), `-done`
      ops are skipped, and TPU's async collective fusions (start/continuation/done fusions
      sharing a `chain_id`) count once.
    """
    totals = _CollectiveCounter(hlo_text)
    result = totals.totals(totals.entry)
    out: dict[str, Any] = {
        kind: {"count": int(result.count[kind]), "bytes": float(result.nbytes[kind])}
        for kind in COLLECTIVE_KINDS
        if kind in result.count
    }
    if result.unknown_trip_counts:
        out[UNKNOWN_TRIP_COUNTS] = result.unknown_trip_counts
    return out


# ---------------------------------------------------------------------------------------------
# HBM traffic in HLO text
# ---------------------------------------------------------------------------------------------

# Ops that move no data of their own: names for buffers, tuples, constants, control.
_NO_TRAFFIC = {
    "parameter", "tuple", "get-tuple-element", "bitcast", "constant", "after-all",
    "partition-id", "replica-id", "opt-barrier", "add-dependency", "while", "conditional",
    "call",
}  # fmt: skip
# Ops inside a fusion that read only part of a parameter (a scanned stack's layer weights).
_SLICING = ("dynamic-slice", "slice", "gather")


class _TrafficCounter:
    """Bytes each executed instruction reads and writes (fusions, custom calls, copies,
    collectives, ...), loop bodies times their trip counts: an estimate of HBM traffic."""

    def __init__(self, hlo_text: str) -> None:
        self.computations, self.entry = _parse_module(hlo_text)
        self.memo: dict[str, float] = {}

    def total(self, name: str) -> float:
        if name not in self.memo:
            self.memo[name] = 0.0
            self.memo[name] = self._scan(self.computations[name])
        return self.memo[name]

    def _sub(self, name: str) -> float:
        return self.total(name) if name in self.computations else 0.0

    def _scan(self, comp: _Computation) -> float:
        total = 0.0
        for inst in comp.instructions:
            if inst.opcode == "while":
                trips = _infer_trip_count(inst, comp, self.computations) or 1
                total += trips * sum(self._sub(b) for b in inst.called("body"))
            elif inst.opcode == "conditional":
                branches = inst.called("branch_computations") or [
                    *inst.called("true_computation"),
                    *inst.called("false_computation"),
                ]
                total += max((self._sub(b) for b in branches), default=0.0)
            elif inst.opcode == "call":
                total += sum(self._sub(c) for c in inst.called("to_apply"))
            elif inst.opcode not in _NO_TRAFFIC and not inst.opcode.endswith("-done"):
                total += self._written(inst, comp) + self._read(inst, comp)
        return total

    def _written(self, inst: _Instruction, comp: _Computation) -> float:
        if inst.opcode in _KIND_OF_OPCODE:
            return _collective_bytes(inst, comp)
        return _nbytes(_arrays(inst.shape))

    def _read(self, inst: _Instruction, comp: _Computation) -> float:
        """Operand bytes; a fusion reads only the slices it takes of a sliced parameter."""
        fused = None
        if inst.opcode == "fusion":
            fused = self.computations.get(next(iter(inst.called("calls")), ""))
        total = 0.0
        for index, operand in enumerate(inst.operands):
            source = comp.by_name.get(operand)
            full = _nbytes(_arrays(source.shape)) if source is not None else 0.0
            taken = _sliced_read(fused, index) if fused is not None else None
            total += full if taken is None else min(full, taken)
        return total


def _sliced_read(fused: _Computation, index: int) -> float | None:
    """Bytes a fused computation reads of its parameter `index` when every use slices it
    (None: it reads the whole parameter)."""
    params = [i for i in fused.instructions if i.opcode == "parameter"]
    param = next((p for p in params if p.operand_text.strip() == str(index)), None)
    if param is None:
        return None
    users = [i for i in fused.instructions if param.name in i.operands]
    if not users or any(u.opcode not in _SLICING or u.operands[0] != param.name for u in users):
        return None
    return sum(_nbytes(_arrays(u.shape)) for u in users)


def hbm_bytes(hlo_text: str) -> float:
    """Bytes one execution of a compiled module reads and writes, per device: every
    executed instruction's operands and results (a fusion's sliced parameters by the slices
    it takes), while bodies times their trip counts, the costliest branch of a conditional.
    XLA's own cost analysis counts a loop body once, which undercounts a scanned stack."""
    counter = _TrafficCounter(hlo_text)
    return counter.total(counter.entry)


# ---------------------------------------------------------------------------------------------
# Matmul FLOPs in a jaxpr
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DotFlops:
    """Matmul FLOPs of a jaxpr, with what the count could not see.

    flops: 2*M*N*K summed over dot_general, ragged_dot_general and convolution equations, as
        executed (scan bodies times their length, shard_map bodies times their shard count,
        cond: the max branch; a `jax.lax.platform_dependent` cond: the branch lowered for
        the platform asked for).
    pallas_calls: pallas_call equations met (counted by their cost_estimate flops).
    pallas_calls_without_estimate: those with no cost_estimate, counted as 0.
    while_loops: while loops met; their bodies count once (trip counts aren't static).
    """

    flops: float
    pallas_calls: int = 0
    pallas_calls_without_estimate: int = 0
    while_loops: int = 0


def _dot_general_flops(eqn: Any) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    rhs_free = [d for i, d in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch)]
    # lhs holds batch x free x contracting; the rhs adds its free dims.
    return 2.0 * math.prod(lhs) * math.prod(rhs_free)


def _ragged_dot_flops(eqn: Any) -> float:
    """ragged_dot_general (grouped matmul, as in MoE): each lhs element meets one group's rhs."""
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    numbers = eqn.params["ragged_dot_dimension_numbers"]
    (_, rhs_contract), (_, rhs_batch) = numbers.dot_dimension_numbers
    skip = (*rhs_contract, *rhs_batch, *numbers.rhs_group_dimensions)
    return 2.0 * math.prod(lhs) * math.prod(d for i, d in enumerate(rhs) if i not in skip)


def _conv_flops(eqn: Any) -> float:
    out = eqn.outvars[0].aval.shape
    kernel = eqn.invars[1].aval.shape
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
    in_features = kernel[rhs_spec[1]]  # already divided by feature_group_count
    window = math.prod(kernel[d] for d in rhs_spec[2:])
    return 2.0 * math.prod(out) * in_features * window


def _subjaxprs(value: Any) -> Iterator[Any]:
    """The open jaxprs in one eqn param value (a (Closed)Jaxpr, or a tuple/list of them)."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    items = value if isinstance(value, (tuple, list)) else (value,)
    for item in items:
        if isinstance(item, ClosedJaxpr):
            yield item.jaxpr
        elif isinstance(item, Jaxpr):
            yield item


def _shard_count(params: dict) -> int:
    """How many shards a shard_map body runs as: the product of its manual mesh axes."""
    mesh = params.get("mesh")
    axes = None
    for key in ("newly_manual_axes", "manual_axes", "axis_names"):
        if params.get(key) is not None:
            axes = params[key]
            break
    if mesh is None:
        return 1
    sizes = dict(mesh.shape)
    if axes is None:
        axes = sizes.keys()
    return math.prod(sizes[a] for a in axes)


@dataclasses.dataclass
class _FlopAcc:
    platform: str | None
    pallas_calls: int = 0
    pallas_calls_without_estimate: int = 0
    while_loops: int = 0


def _jaxpr_flops(jaxpr: Any, acc: _FlopAcc) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        params = eqn.params
        if name == "dot_general":
            total += _dot_general_flops(eqn)
        elif name == "ragged_dot_general":
            total += _ragged_dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "pallas_call":
            # The kernel body sees blocks, not arrays: trust the declared cost instead.
            acc.pallas_calls += 1
            estimate = params.get("cost_estimate")
            if estimate is None:
                acc.pallas_calls_without_estimate += 1
            else:
                total += float(estimate.flops)
        elif name == "cond":
            branches = list(_subjaxprs(params["branches"]))
            chosen = _platform_branch(params.get("branches_platforms"), acc.platform)
            if chosen is not None:
                branches = [branches[chosen]]
            total += max((_jaxpr_flops(j, acc) for j in branches), default=0)
        else:
            if name == "while":
                acc.while_loops += 1
            times = 1
            if name == "scan":
                times = params["length"]
            elif name == "shard_map":
                times = _shard_count(params)
            # Any other wrapper (jit, custom_jvp_call, custom_vjp_call, remat, while, ...):
            # count every jaxpr it holds once.
            for value in params.values():
                for sub in _subjaxprs(value):
                    total += times * _jaxpr_flops(sub, acc)
    return total


def _platform_branch(branches_platforms: Any, platform: str | None) -> int | None:
    """Which branch of a `platform_dependent` cond lowers for `platform` (None: not such a
    cond, or no platform asked): the one naming it, else the default (platforms None)."""
    if branches_platforms is None or platform is None:
        return None
    for i, platforms in enumerate(branches_platforms):
        if platforms is None or platform in platforms:
            return i
    return None


def dot_flops_report(jaxpr: Any, platform: str | None = None) -> DotFlops:
    """`DotFlops` of a Jaxpr or ClosedJaxpr (e.g. `jax.jit(f).trace(*args).jaxpr`).

    `platform` ("tpu", "cuda", "cpu") counts each `platform_dependent` choice as lowered for
    it (without: the costliest branch)."""
    acc = _FlopAcc(platform)
    flops = _jaxpr_flops(getattr(jaxpr, "jaxpr", jaxpr), acc)
    return DotFlops(flops, acc.pallas_calls, acc.pallas_calls_without_estimate, acc.while_loops)


def dot_flops(jaxpr: Any, platform: str | None = None) -> float:
    """Matmul FLOPs (2*M*N*K per dot_general, likewise convolutions) of a (Closed)Jaxpr.

    The jaxpr of a jit-ed step describes the global computation, so this is the total over all
    devices; inside shard_map bodies (per-shard shapes) it multiplies by the shard count. See
    `dot_flops_report` for the Pallas calls and while loops this cannot fully count, and
    `platform`.
    """
    return dot_flops_report(jaxpr, platform).flops


# ---------------------------------------------------------------------------------------------
# Roofline
# ---------------------------------------------------------------------------------------------


def roofline(
    flops_per_chip: float, bytes_per_chip: float, collective_bytes_per_chip: float, chip: Chip
) -> dict[str, Any]:
    """A lower bound on step time on `chip`, assuming compute, HBM and ICI traffic overlap.

    Each term is the work divided by the chip's peak rate (`peak_flops_bf16`, `hbm_bandwidth`,
    `ici_bandwidth`, which is the bidirectional total over all links, so `collective_s` is
    optimistic). Inputs are per chip: where a jax device is a fraction of a chip
    (`chip.devices_per_chip` > 1), sum the per-device figures over the chip's devices first.
    Returns compute_s, memory_s, collective_s, step_s (their max) and bound (the name of the
    largest term: "compute", "memory" or "collective").
    """
    terms = {
        "compute": flops_per_chip / chip.peak_flops_bf16,
        "memory": bytes_per_chip / chip.hbm_bandwidth,
        "collective": collective_bytes_per_chip / chip.ici_bandwidth,
    }
    bound = max(terms, key=lambda k: terms[k])
    return {
        "compute_s": terms["compute"],
        "memory_s": terms["memory"],
        "collective_s": terms["collective"],
        "step_s": terms[bound],
        "bound": bound,
    }
