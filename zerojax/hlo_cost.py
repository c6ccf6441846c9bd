"""What one device does in a compiled program, read from its optimized HLO text.

XLA's `compiled.cost_analysis()` counts the body of a `while` loop once, whatever its trip
count, and the train step runs its layers (and micro-batches) as loops: for a 70B Llama it
reports the FLOPs of about one layer. This module walks the HLO instead and multiplies
every loop body by its `known_trip_count`:

- `flops`: 2 * M * N * K of every `dot` (in fusions too): the matrix work the peak
  FLOP/s of an accelerator is quoted for; element-wise work is left out.
- `bytes`: operand + result bytes of every instruction outside fusions (a fusion counts
  its own operands and result), as XLA's cost analysis counts "bytes accessed".
- `collectives`: per kind (all-gather, reduce-scatter, all-reduce, all-to-all,
  collective-permute), the bytes of the collective's data per device (all-gather: its
  result; reduce-scatter: its operand; the others: their operand) and the bytes a ring
  algorithm sends per device over the group of n devices: (n-1)/n of that for
  all-gather, reduce-scatter and all-to-all, 2(n-1)/n for all-reduce, all of it for
  collective-permute.

`analyze(text)` returns the whole program's `Cost` and, separately, the cost of each loop
at the top level (not nested in another loop), so a caller can tell the micro-batch loop
of a train step (trip count = gradient_accumulation_steps) from what runs once per step.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterator

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4,
                "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z]\w*)\[([^\]]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_NAME = re.compile(r"%([\w.\-]+)")
# Instructions that move no data of their own (or whose bodies are counted instead).
_NO_BYTES = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call",
             "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "domain",
             "add-dependency", "iota"}


@dataclasses.dataclass
class Cost:
    """Per-device work of a program (or a part of it); collectives keyed by kind."""

    flops: float = 0.0
    bytes: float = 0.0
    collective_bytes: dict = dataclasses.field(default_factory=dict)   # kind -> data bytes
    wire_bytes: dict = dataclasses.field(default_factory=dict)         # kind -> bytes sent (ring)

    def add(self, other: "Cost", times: float = 1.0) -> None:
        self.flops += times * other.flops
        self.bytes += times * other.bytes
        for mine, theirs in ((self.collective_bytes, other.collective_bytes),
                             (self.wire_bytes, other.wire_bytes)):
            for kind, value in theirs.items():
                mine[kind] = mine.get(kind, 0.0) + times * value

    def scaled(self, times: float) -> "Cost":
        out = Cost()
        out.add(self, times)
        return out

    def minus(self, other: "Cost") -> "Cost":
        out = Cost()
        out.add(self)
        out.add(other, -1.0)
        return out

    @property
    def total_wire_bytes(self) -> float:
        return float(sum(self.wire_bytes.values()))


@dataclasses.dataclass
class Loop:
    trip_count: int | None          # None: XLA did not know it (counted once)
    cost: Cost                      # the whole loop: body x trip count


@dataclasses.dataclass
class Analysis:
    total: Cost
    top_loops: list                 # Loop per while loop not nested in another
    unknown_trip_counts: int        # loops counted once because their trip count is unknown


@dataclasses.dataclass
class _Instruction:
    name: str
    type: str
    opcode: str
    operands: list
    attrs: str


@dataclasses.dataclass
class _Computation:
    name: str
    instructions: list


def shape_bytes(type_text: str) -> float:
    """Bytes of an HLO type: 'f32[8,4]{1,0}' or a tuple '(f32[2], bf16[3,3])'."""
    total = 0.0
    for dtype, dims in _SHAPE.findall(type_text):
        if dtype not in _DTYPE_BYTES:
            continue
        total += _DTYPE_BYTES[dtype] * math.prod(_dims(dims))
    return total


def _dims(text: str) -> list[int]:
    return [int(re.sub(r"[^\d]", "", d) or 0) for d in text.split(",") if d.strip()]


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start]."""
    depth = 0
    pairs = {"(": ")", "{": "}", "[": "]"}
    closing = set(pairs.values())
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            depth += 1
        elif c in closing:
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _parse_instruction(line: str) -> _Instruction | None:
    found = _INSTRUCTION.match(line)
    if not found:
        return None
    name, rest = found.groups()
    rest = rest.strip()
    if rest.startswith("("):                        # a tuple type
        end = _balanced(rest, 0)
    else:
        end = rest.find(" ")
        end = len(rest) if end < 0 else end
    type_text, rest = rest[:end], rest[end:].strip()
    paren = rest.find("(")
    if paren < 0:
        return None
    opcode = rest[:paren].strip()
    close = _balanced(rest, paren)
    operands = _NAME.findall(rest[paren:close])
    return _Instruction(name, type_text, opcode, operands, rest[close:])


def parse(text: str) -> tuple[dict, str | None]:
    """Computations by name, and the entry computation's name."""
    computations: dict[str, _Computation] = {}
    entry = None
    current = None
    for line in text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header:
                current = _Computation(header.group(2), [])
                if header.group(1):
                    entry = current.name
            continue
        if line.strip() == "}":
            computations[current.name] = current
            current = None
            continue
        instruction = _parse_instruction(line)
        if instruction is not None:
            current.instructions.append(instruction)
    return computations, entry


def _attr_names(attrs: str, key: str) -> list[str]:
    found = re.search(re.escape(key) + r"=(\{[^}]*\}|%[\w.\-]+)", attrs)
    return _NAME.findall(found.group(1)) if found else []


def _trip_count(attrs: str) -> int | None:
    found = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', attrs)
    return int(found.group(1)) if found else None


def group_size(attrs: str, devices: int) -> int:
    """Devices in each replica group of a collective (every device when not given)."""
    found = re.search(r"replica_groups=(\S+(?: \{[^}]*\})?)", attrs)
    if not found:
        return devices
    text = found.group(1)
    if text.startswith("mesh["):                    # mesh['axis_0'=4,'axis_1'=2] {'axis_0'}
        sizes = dict((k, int(v)) for k, v in re.findall(r"'([^']+)'=(\d+)", text))
        chosen = re.search(r"\{([^}]*)\}", text[text.find("]"):])
        if chosen:
            names = re.findall(r"'([^']+)'", chosen.group(1))
            if names and all(n in sizes for n in names):
                return math.prod(sizes[n] for n in names)
        return devices
    iota = re.match(r"\[([\d,]+)\]<=", text)        # [groups,size]<=[devices]
    if iota:
        return _dims(iota.group(1))[-1]
    first = re.match(r"\{\{([^}]*)\}", text)         # {{0,1,2,3},{4,5,6,7}}
    if first:
        return max(1, len([x for x in first.group(1).split(",") if x.strip()]))
    return devices


def _collective(instruction: _Instruction, shapes: dict, devices: int) -> tuple[str, float, float] | None:
    opcode = instruction.opcode
    kind = next((k for k in COLLECTIVES if opcode in (k, k + "-start")), None)
    if kind is None:
        return None
    operand_bytes = sum(shape_bytes(shapes.get(o, "")) for o in instruction.operands)
    if kind == "all-gather":
        data = shape_bytes(instruction.type)
        if opcode.endswith("-start"):               # (operand, result): the result is the gathered data
            data -= operand_bytes
    else:
        data = operand_bytes
    if kind == "collective-permute":
        return kind, data, data
    n = group_size(instruction.attrs, devices)
    share = (n - 1) / n if n > 1 else 0.0
    return kind, data, data * share * (2 if kind == "all-reduce" else 1)


def _dot_flops(instruction: _Instruction, shapes: dict) -> float:
    if instruction.opcode != "dot" or not instruction.operands:
        return 0.0
    lhs = _SHAPE.search(shapes.get(instruction.operands[0], ""))
    result = _SHAPE.search(instruction.type)
    if not lhs or not result:
        return 0.0
    lhs_dims = _dims(lhs.group(2))
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.attrs)
    k = math.prod(lhs_dims[int(d)] for d in contracting.group(1).split(",") if d) if contracting else 1
    return 2.0 * math.prod(_dims(result.group(2))) * k


def analyze(text: str, devices: int) -> Analysis:
    """Per-device cost of an optimized HLO module (`compiled.as_text()`) on `devices` devices."""
    computations, entry = parse(text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    shapes = {i.name: i.type for c in computations.values() for i in c.instructions}
    fused = {name for c in computations.values() for i in c.instructions if i.opcode == "fusion"
             for name in _attr_names(i.attrs, "calls")}
    memo: dict[str, Cost] = {}
    unknown = [0]

    def children(computation: _Computation) -> Iterator[tuple[_Instruction, str, float]]:
        for i in computation.instructions:
            if i.opcode == "while":
                trips = _trip_count(i.attrs)
                if trips is None:
                    unknown[0] += 1
                for body in _attr_names(i.attrs, "body"):
                    yield i, body, float(trips or 1)
                for cond in _attr_names(i.attrs, "condition"):
                    yield i, cond, float((trips or 1) + 1)
            else:
                for key in ("calls", "branch_computations", "true_computation", "false_computation"):
                    for callee in _attr_names(i.attrs, key):
                        yield i, callee, 1.0

    def local(computation: _Computation) -> Cost:
        cost = Cost()
        in_fusion = computation.name in fused
        for i in computation.instructions:
            cost.flops += _dot_flops(i, shapes)
            collective = _collective(i, shapes, devices)
            if collective is not None:
                kind, data, wire = collective
                cost.collective_bytes[kind] = cost.collective_bytes.get(kind, 0.0) + data
                cost.wire_bytes[kind] = cost.wire_bytes.get(kind, 0.0) + wire
            if not in_fusion and i.opcode not in _NO_BYTES and not i.opcode.endswith("-done"):
                cost.bytes += shape_bytes(i.type) + sum(shape_bytes(shapes.get(o, "")) for o in i.operands)
        return cost

    def total(name: str, stack: tuple = ()) -> Cost:
        if name in memo:
            return memo[name]
        computation = computations.get(name)
        cost = Cost()
        if computation is None or name in stack:
            return cost
        cost.add(local(computation))
        for _, callee, times in children(computation):
            cost.add(total(callee, stack + (name,)), times)
        memo[name] = cost
        return cost

    whole = total(entry)
    loops: list[Loop] = []

    def top_loops(name: str, seen: set) -> None:
        if name in seen or name not in computations:
            return
        seen.add(name)
        for i, callee, times in children(computations[name]):
            if i.opcode == "while":
                if callee in _attr_names(i.attrs, "body"):
                    loop = Cost()
                    loop.add(total(callee), times)
                    for cond in _attr_names(i.attrs, "condition"):
                        loop.add(total(cond), times + 1)
                    loops.append(Loop(_trip_count(i.attrs), loop))
            else:
                top_loops(callee, seen)

    top_loops(entry, set())
    return Analysis(whole, loops, unknown[0])
