"""Checks that make a program read from an untrusted file safe to hand to the runtime.

Two passes, both raising `ArtifactError` and nothing else:

1. `validate_program_json`: the JSON has the program's shape (a small schema: exact keys,
   JSON types, bounded ints, finite floats), so building the dataclasses cannot fail with
   a KeyError or TypeError. Op arguments are left to pass 2, which walks them by the op's
   schema, never deeper.
2. `validate_program`: what the runtime relies on. Ops are allowlisted and their arguments
   typed (`ops.py`); every value is defined before a step reads it; tensor sizes are sane;
   every op output has the shape and dtype the program declares, derived by running the
   program on the meta device (`shapes.py`), and no op writes into an input; the memory
   plan's figures agree with sizes recomputed from the tensor specs (the header cannot make
   device-memory accounting lie).

New step kinds add a rule to `_STEP_RULES`; new program fields add a key to `_PROGRAM`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from .ops import check_op_arguments, check_op_outputs, collective_ops
from .program import (
    DEVICE_DTYPES, MATMUL_FORMATS, NUMERICS, PROGRAM_DTYPES, STEP_KINDS, ArtifactError, Program, Step, StepKind, TensorSpec, aligned,
)
from .shapes import derive_shapes
from .specs import NPU_PRESETS

MAX_TENSOR_ELEMENTS = 2**40      # 1 Ti elements: far beyond any device's DRAM
MAX_RANK = 16                    # dimensions of a tensor
MAX_BYTES = 2**62                # any byte count in a program
MAX_TENSOR_PARALLEL_SIZE = 1024
MAX_NAME_CHARS = 1024


# --- pass 1: JSON structure ---------------------------------------------------------------

Check = Callable[[object, str], None]


def _fail(where: str, what: str) -> None:
    raise ArtifactError(f"invalid program: {where} {what}")


def _string(value, where: str) -> None:
    if type(value) is not str or not 0 < len(value) <= MAX_NAME_CHARS:
        _fail(where, f"must be a non-empty string of at most {MAX_NAME_CHARS} characters")


def _optional_name(value, where: str) -> None:
    """An op output name: "" for an output that is not used."""
    if value != "":
        _string(value, where)


def _count(value, where: str) -> None:
    if type(value) is not int or not 0 <= value <= MAX_BYTES:
        _fail(where, f"must be an integer in [0, 2**62], got {_short(value)}")


def _amount(value, where: str) -> None:
    if type(value) not in (int, float) or not (math.isfinite(value) and 0 <= value <= 1e30):
        _fail(where, f"must be a finite non-negative number, got {_short(value)}")


def _flag(value, where: str) -> None:
    if type(value) is not bool:
        _fail(where, f"must be true or false, got {_short(value)}")


def _step_kind(value, where: str) -> None:
    if value not in STEP_KINDS or type(value) is not str:
        _fail(where, f"is {_short(value)}; known step kinds: {', '.join(STEP_KINDS)}")


def _json_list(value, where: str) -> None:
    if type(value) is not list:
        _fail(where, "must be a list")


def _json_object(value, where: str) -> None:
    if type(value) is not dict:
        _fail(where, "must be an object")


def _list_of(item: Check) -> Check:
    def check(value, where: str) -> None:
        _json_list(value, where)
        for i, v in enumerate(value):
            item(v, f"{where}[{i}]")
    return check


def _map_of(item: Check) -> Check:
    def check(value, where: str) -> None:
        _json_object(value, where)
        for key, v in value.items():
            _string(key, f"a key of {where}")
            item(v, f"{where}[{key!r}]")
    return check


def _object(required: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    optional = optional or {}

    def check(value, where: str) -> None:
        _json_object(value, where)
        missing = set(required) - set(value)
        unknown = set(value) - set(required) - set(optional)
        if missing:
            _fail(where, f"lacks keys {sorted(missing)}")
        if unknown:
            _fail(where, f"has unknown keys {sorted(unknown)[:5]}")
        for key, v in value.items():
            (required.get(key) or optional[key])(v, f"{where}.{key}")
    return check


def _matmul_format(value, where: str) -> None:
    if value not in MATMUL_FORMATS:
        _fail(where, f"must be one of {MATMUL_FORMATS}, got {value!r}")


_TENSOR_SPEC = _object({"name": _string, "shape": _list_of(_count), "dtype": _string})
_OP = _object({"target": _string, "args": _json_list, "kwargs": _json_object, "outputs": _list_of(_optional_name)})
_STEP = _object({
    "kind": _step_kind, "name": _string, "inputs": _list_of(_string), "outputs": _list_of(_string),
    "ops": _list_of(_OP), "flops": _amount, "vector_flops": _amount, "bytes_read": _count,
    "bytes_written": _count, "cast_to_device_float": _flag, "dynamic_cost": _flag,
}, optional={"matmul_rows": _count, "matmul_format": _matmul_format, "sequences": _count})
_MEMORY = _object({
    "weights_bytes": _list_of(_count), "buffers_bytes": _list_of(_count),
    "activations_bytes": _list_of(_count), "offsets": _map_of(_count),
})
_PROGRAM = _object(
    {
        "npu": _string, "device_dtype": _string, "numerics": _string, "tensor_parallel_size": _count,
        "inputs": _list_of(_TENSOR_SPEC), "outputs": _list_of(_TENSOR_SPEC), "weights": _list_of(_TENSOR_SPEC),
        "buffers": _list_of(_TENSOR_SPEC), "values": _map_of(_TENSOR_SPEC), "steps": _list_of(_STEP),
        "memory": _MEMORY,
    },
    optional={
        "zero_init": _list_of(_string), "external": _list_of(_string),
        "tensor_shards": _map_of(_object({"dim": _count, "ranges": _list_of(_list_of(_list_of(_count)))})),
    },
)


def validate_program_json(data) -> None:
    """ArtifactError unless `data` has the JSON structure of a `Program`."""
    _PROGRAM(data, "program")


# --- pass 2: what the runtime relies on ---------------------------------------------------


def _check_spec(spec: TensorSpec, where: str) -> None:
    if spec.dtype not in PROGRAM_DTYPES:
        _fail(where, f"{spec.name!r} has dtype {spec.dtype!r}; known dtypes: {', '.join(PROGRAM_DTYPES)}")
    if len(spec.shape) > MAX_RANK:
        _fail(where, f"{spec.name!r} has {len(spec.shape)} dimensions (at most {MAX_RANK})")
    if any(type(d) is not int or d < 0 for d in spec.shape):
        _fail(where, f"{spec.name!r} has a negative or non-integer dimension in {list(spec.shape)}")
    if spec.numel > MAX_TENSOR_ELEMENTS:
        _fail(where, f"{spec.name!r} has shape {list(spec.shape)}: more than 2**40 elements")


def _check_header_fields(program: Program) -> None:
    if program.npu not in NPU_PRESETS:
        _fail("npu", f"{program.npu!r} is not a known NPU ({', '.join(sorted(NPU_PRESETS))})")
    if program.device_dtype not in DEVICE_DTYPES:
        _fail("device_dtype", f"{program.device_dtype!r} is not one of {DEVICE_DTYPES}")
    if program.numerics not in NUMERICS:
        _fail("numerics", f"{program.numerics!r} is not one of {NUMERICS}")
    tp = program.tensor_parallel_size
    if type(tp) is not int or not 1 <= tp <= MAX_TENSOR_PARALLEL_SIZE:
        _fail("tensor_parallel_size", f"must be an integer in [1, {MAX_TENSOR_PARALLEL_SIZE}], got {tp!r}")


def _check_tensors(program: Program) -> None:
    for group in ("inputs", "outputs", "weights", "buffers"):
        for spec in getattr(program, group):
            _check_spec(spec, group)
    for name, spec in program.values.items():
        _check_spec(spec, "values")
        if spec.name != name:
            _fail("values", f"entry {name!r} describes {spec.name!r}")
    resident = [s.name for s in program.inputs + program.weights + program.buffers]
    if len(set(resident)) != len(resident):
        _fail("inputs / weights / buffers", "repeat a name")
    buffers = {s.name for s in program.buffers}
    if not set(program.zero_init) <= buffers:
        _fail("zero_init", f"names {sorted(set(program.zero_init) - buffers)[:5]}, which are not buffers")
    stored = buffers | {s.name for s in program.weights}
    if not set(program.external) <= stored:
        _fail("external", f"names {sorted(set(program.external) - stored)[:5]}, which are not weights or buffers")
    _check_tensor_shards(program)


def _check_tensor_shards(program: Program) -> None:
    """Each shard names a weight / buffer, a dimension it has, one list of in-bounds ranges per
    rank, and the same local size on every rank (every device runs the same program)."""
    specs = {s.name: s for s in program.weights + program.buffers}
    tp = program.tensor_parallel_size
    for name, shard in program.tensor_shards.items():
        where = f"tensor_shards[{name!r}]"
        if name not in specs:
            _fail(where, "names no weight or buffer of the program")
        shape = specs[name].shape
        if not shard.dim < len(shape):
            _fail(where, f"splits dimension {shard.dim} of a {len(shape)}-d tensor")
        if len(shard.ranges) != tp:
            _fail(where, f"has {len(shard.ranges)} rank(s) of ranges for {tp} device(s)")
        for rank, ranges in enumerate(shard.ranges):
            if not ranges or any(len(r) != 2 or r[1] == 0 or r[0] + r[1] > shape[shard.dim] for r in ranges):
                _fail(where, f"rank {rank} has ranges {_short(ranges)} outside [0, {shape[shard.dim]})")
        if len({shard.local_size(rank) for rank in range(tp)}) != 1:
            _fail(where, "gives the ranks slices of different sizes")


@dataclass
class _Scope:
    """What the steps checked so far leave behind."""

    defined: set[str]             # values a later step may read
    max_numel: int                # elements of the largest tensor the program declares


# Op arguments that give the shape of a tensor the op creates or views: their product can
# never exceed the largest tensor of the program (else `full(size=[2**40])` would allocate it).
_SHAPE_ARGUMENTS = ("size", "shape", "repeats", "sizes")


def _copy_rule(step: Step, scope: _Scope, where: str) -> None:
    if step.ops or len(step.inputs) != len(step.outputs):
        _fail(where, "is a copy: it has no ops and one output per input")
    _require_defined(step.inputs, scope.defined, where)
    scope.defined.update(step.outputs)


def _ops_rule(step: Step, scope: _Scope, where: str) -> None:
    if any(call.target in collective_ops() for call in step.ops):
        _fail(where, "runs a collective inside a kernel or host segment (collectives are steps of their own)")
    _run_ops(step, scope, where)


def _collective_rule(step: Step, scope: _Scope, where: str) -> None:
    if len(step.ops) != 1 or step.ops[0].target not in collective_ops():
        _fail(where, f"is a collective: exactly one op of {collective_ops()}")
    _run_ops(step, scope, where)


def _run_ops(step: Step, scope: _Scope, where: str) -> None:
    _require_defined(step.inputs, scope.defined, where)
    produced: set[str] = set()
    for i, call in enumerate(step.ops):
        for name, value in check_op_arguments(call.target, call.args, call.kwargs):
            if name in _SHAPE_ARGUMENTS and type(value) is list:
                if math.prod(abs(v) for v in value if type(v) is int) > scope.max_numel:
                    _fail(f"{where} op {i}", f"({call.target}) has {name}={value}, larger than any tensor of the program")
        check_op_outputs(call.target, call.outputs)
        _require_defined(_refs((call.args, list(call.kwargs.values()))), scope.defined, f"{where} op {i}", produced)
        produced.update(name for name in call.outputs if name)
    if not set(step.outputs) <= produced:
        _fail(where, f"lists outputs {sorted(set(step.outputs) - produced)[:5]} that none of its ops produce")
    scope.defined.update(produced)


# How each step kind is checked, given what the steps before it defined (which it extends).
_STEP_RULES: dict[str, Callable[[Step, _Scope, str], None]] = {
    StepKind.KERNEL: _ops_rule, StepKind.HOST: _ops_rule, StepKind.H2D: _copy_rule, StepKind.D2H: _copy_rule,
    StepKind.COLLECTIVE: _collective_rule,
}
assert set(_STEP_RULES) == set(STEP_KINDS)


def _refs(args) -> list[str]:
    """Value names referenced by already type-checked arguments (nesting is the schema's)."""
    if type(args) in (list, tuple):
        return [name for a in args for name in _refs(a)]
    if type(args) is dict and "ref" in args:
        return [args["ref"]]
    return []


def _require_defined(names, defined: set[str], where: str, also_defined: set[str] = frozenset()) -> None:
    undefined = [n for n in names if n not in defined and n not in also_defined]
    if undefined:
        _fail(where, f"reads {undefined[:5]} before any step defines them")


def _check_steps(program: Program) -> None:
    specs = program.inputs + program.outputs + program.weights + program.buffers + list(program.values.values())
    scope = _Scope(
        defined={s.name for s in program.inputs + program.weights + program.buffers},
        max_numel=max((s.numel for s in specs), default=0),
    )
    for index, step in enumerate(program.steps):
        where = f"step {index} ({step.name!r})"
        if step.kind not in _STEP_RULES:
            _fail(where, f"has kind {step.kind!r}; known kinds: {', '.join(STEP_KINDS)}")
        _STEP_RULES[step.kind](step, scope, where)
    _require_defined([s.name for s in program.outputs], scope.defined, "outputs")


def _check_memory_plan(program: Program) -> None:
    """The plan's figures must agree with the sizes of the program's tensors, so accounting
    based on them cannot under-count (the runtime recomputes weights and buffers anyway)."""
    plan, tp = program.memory, program.tensor_parallel_size
    for field in ("weights_bytes", "buffers_bytes", "activations_bytes"):
        if len(getattr(plan, field)) != tp:
            _fail(f"memory.{field}", f"has {len(getattr(plan, field))} entries for {tp} device(s)")
    # Each rank holds its shard of every split tensor and all of every replicated one.
    for field, specs in (("weights_bytes", program.weights), ("buffers_bytes", program.buffers)):
        local = [sum(program.resident_bytes(s, rank) for s in specs) for rank in range(tp)]
        if getattr(plan, field) != local:
            _fail(f"memory.{field}", f"{getattr(plan, field)} does not match the {local} bytes of the tensors "
                                     "each rank holds")
    placed = 0
    arena = plan.activations_bytes[0]
    for name, offset in plan.offsets.items():
        if name not in program.values:
            _fail("memory.offsets", f"places {name!r}, which is not a value of the program")
        end = offset + program.values[name].nbytes
        if end > arena:
            _fail("memory.offsets", f"places {name!r} at bytes [{offset}, {end}), beyond the {arena}-byte arena")
        placed += aligned(program.values[name].nbytes)
    if any(a > placed for a in plan.activations_bytes):
        _fail("memory.activations_bytes", f"{plan.activations_bytes} exceeds the {placed} bytes of the values placed")


def validate_program(program: Program) -> None:
    """ArtifactError unless the runtime can execute `program` as the compiler would have made it."""
    _check_header_fields(program)
    _check_tensors(program)
    _check_steps(program)
    derive_shapes(program)
    _check_memory_plan(program)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
