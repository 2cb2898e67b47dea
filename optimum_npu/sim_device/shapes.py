"""Every value's shape, derived from the program itself, before anything runs.

A program declares the shape of each value (`Program.values`), and device memory is
reserved from those declarations. Nothing ties a declaration to what an op returns, though:
`arange(end=2**36)` declared as a 4-element value would pass the size checks and allocate
512 GiB on the host at run time. So at load we run the whole program once on the meta device
(tensors with a shape and a dtype, no storage; each op computes only its output's shape) and
require every op output to be exactly what the program declares. After that, every tensor a
run creates has a size the program states, and the memory checks built on the declarations
cover every intermediate.

The same walk follows which values are views of the caller's inputs (the runtime binds inputs
by reference, and a copy step passes a tensor on without copying it), so that a program that
writes into one of them (`copy_(x, 7.0)`, or through a view of x) is refused: a run never
modifies the caller's tensors. Refusing at load costs nothing per run, where copying every
input on every run would cost a copy of each input.

Ops whose output shape depends on tensor contents (`nonzero`, `repeat_interleave` with a
tensor of counts) cannot be sized this way and are refused: a compiled program has static
shapes.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .collectives import ALL_GATHER, ALL_REDUCE
from .ops import resolve_op
from .program import PROGRAM_DTYPES, ArtifactError, Program, Ref, StepKind, decode_arg

_META = torch.device("meta")


def _fail(where: str, what: str) -> None:
    raise ArtifactError(f"invalid program: {where} {what}")


def _empty(shape, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=_META)


def _bind(arg: Any, env: dict[str, torch.Tensor]) -> Any:
    if type(arg) is Ref:
        return env[arg.name]
    if type(arg) is list:
        return [_bind(a, env) for a in arg]
    return arg


def _ref_names(arg: Any) -> list[str]:
    if type(arg) is Ref:
        return [arg.name]
    if type(arg) is list:
        return [n for a in arg for n in _ref_names(a)]
    return []


def _results(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


class _Walk:
    """The program's values as meta tensors, and which of them may share memory with an input."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.device_float = PROGRAM_DTYPES[program.device_dtype]
        self.env: dict[str, torch.Tensor] = {}
        self.aliases: dict[str, frozenset[str]] = {}   # value -> the inputs it may be a view of
        for spec in program.inputs:
            self.env[spec.name] = _empty(spec.shape, PROGRAM_DTYPES[spec.dtype])
            self.aliases[spec.name] = frozenset([spec.name])
        for spec in program.weights + program.buffers:
            local = program.local_spec(spec, 0)   # every rank holds a same-size shard
            self.env[spec.name] = _empty(local.shape, PROGRAM_DTYPES[spec.dtype])

    def declare(self, name: str, value, where: str) -> None:
        """`value` (what an op or copy produced) becomes value `name`: it must be what the program declares."""
        if not isinstance(value, torch.Tensor):
            _fail(where, f"produces {name!r}, which is not a tensor")
        spec = self.program.values.get(name)
        if spec is None:
            _fail(where, f"produces {name!r}, which the program's values do not declare")
        if tuple(value.shape) != spec.shape:
            _fail(where, f"produces {name!r} of shape {list(value.shape)}; the program declares {list(spec.shape)}")
        if value.dtype != PROGRAM_DTYPES[spec.dtype]:   # sizes are accounted in the declared dtype
            _fail(where, f"produces {name!r} as {value.dtype}; the program declares {spec.dtype}")
        self.env[name] = value

    def copy_step(self, step, where: str) -> None:
        for src, dst in zip(step.inputs, step.outputs):
            value = self.env[src]
            if step.kind == StepKind.H2D and step.cast_to_device_float and value.is_floating_point():
                value = _empty(value.shape, self.device_float)
            self.declare(dst, value, where)
            self.aliases[dst] = self.aliases.get(src, frozenset()) | self.aliases.get(dst, frozenset())

    def op(self, call, float_dtype: torch.dtype, where: str) -> None:
        op = resolve_op(call.target)
        args = decode_arg(call.args, float_dtype)
        kwargs = {k: decode_arg(v, float_dtype) for k, v in call.kwargs.items()}
        self.refuse_writes_to_inputs(op, args, kwargs, where)
        if call.target in (ALL_REDUCE, ALL_GATHER):
            results = [self.collective(call.target, args, kwargs)]
        else:
            args, kwargs = _on_meta(op, args, kwargs)
            try:
                results = _results(op(*_bind(args, self.env), **_bind(kwargs, self.env)))
            except ArtifactError:
                raise
            except Exception as error:  # the op refuses these arguments, or its size depends on data
                _fail(where, f"({call.target}) cannot run on the declared shapes: {type(error).__name__}: "
                             f"{str(error).splitlines()[0][:200] if str(error) else ''}")
        if len(call.outputs) > len(results):
            _fail(where, f"({call.target}) names {len(call.outputs)} outputs, the op returns {len(results)}")
        viewed = frozenset().union(*(self.aliases.get(n, frozenset()) for n in self.viewed_names(op, args, kwargs)))
        for name, value in zip(call.outputs, results):
            if name:
                self.declare(name, value, f"{where} ({call.target})")
                self.aliases[name] = viewed

    def collective(self, target: str, args: list, kwargs: dict) -> torch.Tensor:
        """Across the group: an all-reduce keeps the shape of a rank's part; an all-gather joins
        the `tensor_parallel_size` parts along `dim`, then keeps the positions in `sources`."""
        x = self.env[args[0].name]
        if target == ALL_REDUCE:
            return _empty(x.shape, x.dtype)
        dim, sources = args[1], args[2]
        if not -x.dim() <= dim < x.dim():
            raise ArtifactError(f"invalid program: an all-gather joins along dimension {dim} of a {x.dim()}-d value")
        shape = list(x.shape)
        joined = shape[dim] * self.program.tensor_parallel_size
        if any(not 0 <= s < joined for s in sources):
            raise ArtifactError(f"invalid program: an all-gather keeps positions outside [0, {joined})")
        shape[dim] = len(sources) if sources else joined
        return _empty(shape, x.dtype)

    @staticmethod
    def viewed_names(op: torch._ops.OpOverload, args: list, kwargs: dict) -> list[str]:
        """Values the op's outputs may share memory with: the arguments its schema annotates
        with an alias set (views, in-place ops), conservatively whichever set the outputs name."""
        names = []
        for argument, value in _bound_arguments(op, args, kwargs):
            if argument.alias_info is not None:
                names += _ref_names(value)
        return names

    def refuse_writes_to_inputs(self, op: torch._ops.OpOverload, args: list, kwargs: dict, where: str) -> None:
        for argument, value in _bound_arguments(op, args, kwargs):
            if argument.alias_info is not None and argument.alias_info.is_write:
                hit = sorted(set().union(*(self.aliases.get(n, frozenset()) for n in _ref_names(value))))
                if hit:
                    _fail(where, f"writes into input {hit[0]!r} ({op}): a program never modifies the caller's tensors")


def _on_meta(op: torch._ops.OpOverload, args: list, kwargs: dict) -> tuple[list, dict]:
    """The call with its `device` argument, if the schema has one, set to meta: factory ops
    (`arange`, `full`) and `to(device)` then make a shape, never storage."""
    positional = [a.name for a in op._schema.arguments if not a.kwarg_only]
    if "device" in positional and positional.index("device") < len(args):
        args = list(args)
        args[positional.index("device")] = _META
    elif any(a.name == "device" for a in op._schema.arguments):
        kwargs = {**kwargs, "device": _META}
    return args, kwargs


def _bound_arguments(op: torch._ops.OpOverload, args: list, kwargs: dict):
    schema = op._schema
    positional = [a for a in schema.arguments if not a.kwarg_only]
    by_name = {a.name: a for a in schema.arguments}
    return [*zip(positional, args), *((by_name[k], v) for k, v in kwargs.items() if k in by_name)]


def derive_shapes(program: Program) -> None:
    """ArtifactError unless running `program` on the meta device gives every op output the shape
    and dtype the program declares, and no op writes into an input. Call after the dataflow checks
    (`validation._check_steps`): every value read is defined, every op allowlisted and typed."""
    walk = _Walk(program)
    compute = walk.device_float
    for index, step in enumerate(program.steps):
        where = f"step {index} ({step.name!r})"
        if step.kind in (StepKind.H2D, StepKind.D2H):
            walk.copy_step(step, where)
            continue
        if step.kind == StepKind.HOST:   # host fallbacks compute in fp32 (the runtime upcasts their inputs)
            for name in step.inputs:
                if walk.env[name].is_floating_point():
                    walk.env[name] = _empty(walk.env[name].shape, torch.float32)
        for i, call in enumerate(step.ops):
            walk.op(call, torch.float32 if step.kind == StepKind.HOST else compute, f"{where} op {i}")


def peak_unplaced_bytes(program: Program, kinds: tuple[StepKind, ...]) -> int:
    """Most bytes that outputs of ops of steps of `kinds` outside the device's memory plan hold at
    once in one run: host-fallback values, or intermediates inside fused kernels, which the arena
    (`memory.offsets`) does not place but the simulator creates on the host all the same. From the
    declared shapes `derive_shapes` checked, each freed after its last use; floats of host steps at 4
    bytes (the host computes them in fp32), others in their declared dtype, as the arena counts them."""
    placed = program.memory.offsets
    produced: list[list[tuple[str, int]]] = [[] for _ in program.steps]
    last_use: dict[str, int] = {}
    for index, step in enumerate(program.steps):
        for name in step.inputs:
            if name in last_use:
                last_use[name] = index
        if step.kind not in kinds:
            continue
        widened = step.kind == StepKind.HOST
        for call in step.ops:
            for name in call.outputs:
                if name and name not in placed and name not in last_use:
                    produced[index].append((name, _bytes(program, name, widened)))
                    last_use[name] = index
    freed = [0] * len(program.steps)
    sizes = {name: n for entries in produced for name, n in entries}
    kept = {s.name for s in program.outputs}
    for name, index in last_use.items():
        if name not in kept:
            freed[index] += sizes[name]
    peak = live = 0
    for index in range(len(program.steps)):
        live += sum(n for _, n in produced[index])
        peak = max(peak, live)
        live -= freed[index]
    return peak


def _bytes(program: Program, name: str, widened: bool) -> int:
    spec = program.values[name]
    dtype = PROGRAM_DTYPES[spec.dtype]
    itemsize = 4 if widened and dtype.is_floating_point and dtype.itemsize < 4 else dtype.itemsize
    return math.prod(spec.shape) * itemsize
