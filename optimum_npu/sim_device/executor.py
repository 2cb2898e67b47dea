"""Emit a program's steps as one straight-line Python function, once, at load time.

Interpreting op by op costs a few microseconds of Python per op, which for an LLM decode
step of ~600 small ops is as much as the math. Like torch.fx's code generation, we write
the schedule out as plain statements and compile them:

    e[12] = o[3](e[5], e[7], c[2])        # an op: callables, values and constants by index
    e[13] = rnd(e[12])                    # fp16 emulation: round a kernel output
    e[5] = None                           # free a value after its last use
    e[20] = reduce([e[14], e[17]], e[9])  # a collective over every rank's value (+ residual)
    t = o[4](c[5], e[3], e[8])            # a matmul / attention for every rank in one call
    if t is not None:                     # (`rank_batching.py`), else once per rank
    e[21] = o[5](c[6], e[21], c[7])       # a small op once on a rank-stacked activation
    e[14], e[17], = e[21].unbind()        # a rank-stacked activation cut into the ranks' values

The function is `run(x, e)`: `e` is the environment (a list of values), `x` the `RunContext`
whose fields its first line binds to the locals above (`o`, `c`, `k`, `dev`, `rnd`, `up`,
`dyn`, `reduce`, `gather`), so the body reads locals as fast as arguments.

A value of a tensor-parallel program is held in one of a few forms (`Form`): shared by the
ranks (one slot), per rank (one slot per rank), rank-stacked (one [N, ...] tensor), or a split
weight's `Stacked` storage; `_Writer.forms` says which, and its transitions (`to_per_rank`,
`produced`, `to_shared`, `release`) emit the code that moves a value between them.

The generated text contains only integer indices and the fixed helper names above,
never a name, string or number read from the artifact (those stay in the `c` / `k`
lists), so a program's text cannot inject code. What the `o` callables are is decided
before this point: the runtime binds only allowlisted operators (`ops.resolve_op`) to
programs that passed `validation.validate_program` (arguments typed by each op's
schema, every value defined before it is read).
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .collectives import ALL_REDUCE
from .program import Ref, Step, StepKind
from .rank_batching import (
    CHECKED_ELEMENTWISE_OPS, ELEMENTWISE_OPS, SHAPE_OPS, CheckedElementwise, RowsCache, Stacked, all_rank_form,
    elementwise,
)

STACKED = -1   # the rank in the slot key of a split value's rank-stacked form ([N, ...]; for a split
               # weight / buffer, its `Stacked` storage)


def _has_ref(arg: Any) -> bool:
    return type(arg) is Ref or (type(arg) is list and any(_has_ref(a) for a in arg))


@dataclass
class BoundOp:
    """One op call: the callable and its decoded arguments (tensors as `Ref`)."""

    fn: Callable
    target: str
    args: list
    kwargs: dict
    outputs: list[str]


class Form(enum.Flag):
    """How the executor holds a value of a tensor-parallel program. A value no rank holds apart
    is shared (no flag): one slot, read by every rank. A value that differs per rank is held
    `PER_RANK` (slots (name, rank)), `STACKED` (one [N, ...] tensor in slot (name, STACKED), as
    an all-rank call returned it), or both once the stacked tensor was cut into per-rank views;
    a split weight / buffer with rank-stacked storage is `PER_RANK | STORAGE` (its `Stacked` in
    slot (name, STACKED))."""

    PER_RANK = enum.auto()
    STACKED = enum.auto()
    STORAGE = enum.auto()


SHARED = Form(0)


@dataclass
class RunContext:
    """What the generated function calls besides its environment, bound to locals in its first line."""

    ops: list[Callable]                 # o: the op callables, by index
    constants: list                     # c: constant arguments, by index
    kwargs: list[dict]                  # k: constant keyword arguments, by index
    to_device: Callable                 # dev: an input cast to the device's float type
    round: Callable                     # rnd: a kernel output rounded to the device's precision
    to_fp32: Callable                   # up: a host-fallback input in fp32
    price: Callable                     # dyn(step_index, op, args): a dynamic-cost op's arguments, for pricing
    all_reduce: Callable                # reduce(per-rank values, residual)
    all_gather: Callable                # gather(per-rank values, dim, sources)


PROLOGUE = ("o, c, k, dev, rnd, up, dyn, reduce, gather = "
            "x.ops, x.constants, x.kwargs, x.to_device, x.round, x.to_fp32, x.price, x.all_reduce, x.all_gather")


@dataclass
class Executable:
    run: Callable                 # run(x: RunContext, e: list) -> e
    slots: dict[tuple[str, int], int]   # (value name, rank) -> index in the environment list; rank 0
                                        # for a value all ranks share, STACKED for the rank-stacked
                                        # form of a split value
    ops: list[Callable] = field(default_factory=list)
    constants: list = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    rows_cache: RowsCache = field(default_factory=RowsCache)   # the attention forms' batch rows, per run


class _Writer:
    def __init__(self, num_ranks: int, split_state: set[str], stacked_state: set[str],
                 ndims: dict[str, int], rank_batching: bool) -> None:
        self.num_ranks = num_ranks
        self.rank_batching = rank_batching   # all-rank calls where they exist; else every op per rank
        self.ndims = ndims   # value name -> dimensions (the same on every rank)
        # The form of every value that differs per rank (absent: shared).
        self.forms: dict[str, Form] = {
            name: Form.PER_RANK | (Form.STORAGE if name in stacked_state else SHARED) for name in split_state}
        self.slots: dict[tuple[str, int], int] = {}
        self.ops: list[Callable] = []
        self.constants: list = []
        self.kwargs: list[dict] = []
        self.rows_cache = RowsCache()
        self.lines = ["def run(x, e):", "    " + PROLOGUE]
        self.indent = 1

    # ---- forms -------------------------------------------------------------------------

    def split(self, name: str) -> bool:
        """Whether `name` differs per rank."""
        return name in self.forms

    def held(self, name: str, form: Form) -> bool:
        return form in self.forms.get(name, SHARED)

    def to_per_rank(self, names: list[str]) -> None:
        """Cut rank-stacked values into one slot per rank before something reads them per rank."""
        for name in names:
            if self.split(name) and not self.held(name, Form.PER_RANK):
                self.cut(name)
                self.forms[name] |= Form.PER_RANK

    def produced(self, names: list[str], stacked: bool) -> None:
        """Op outputs that differ per rank, held rank-stacked or per rank."""
        for name in names:
            if name:
                keep = self.forms.get(name, SHARED) & Form.STORAGE
                self.forms[name] = keep | (Form.STACKED if stacked else Form.PER_RANK)

    def to_shared(self, name: str) -> None:
        """A collective's result: the same on every rank."""
        self.forms.pop(name, None)

    def slot(self, name: str, rank: int = 0) -> str:
        key = (name, rank if name in self.forms else 0)
        return f"e[{self.slots.setdefault(key, len(self.slots))}]"

    def slot_of(self, name: str, rank: int) -> str:
        return f"e[{self.slots.setdefault((name, rank), len(self.slots))}]"

    def expr(self, arg: Any, rank: int = 0) -> str:
        if type(arg) is Ref:
            return self.slot(arg.name, rank)
        if type(arg) is list and _has_ref(arg):
            return "[" + "".join(f"{self.expr(a, rank)}, " for a in arg) + "]"
        return self.constant(arg)

    def constant(self, value: Any) -> str:
        self.constants.append(value)
        return f"c[{len(self.constants) - 1}]"

    def emit(self, line: str) -> None:
        self.lines.append("    " * self.indent + line)

    def rank_slots(self, name: str) -> str:
        return "[" + "".join(f"{self.slot(name, rank)}, " for rank in range(self.num_ranks)) + "]"

    def cut(self, name: str) -> None:
        """Emit: rank-stacked value `name` cut into its per-rank slots."""
        self.emit("".join(f"{self.slot(name, rank)}, " for rank in range(self.num_ranks))
                  + f"= {self.slot_of(name, STACKED)}.unbind()")

    def clear_ranks(self, name: str) -> None:
        """Emit: the per-rank slots of `name` released."""
        self.emit("".join(f"{self.slot(name, rank)} = " for rank in range(self.num_ranks)) + "None")

    def call(self, op: BoundOp, rank: int) -> str:
        self.ops.append(op.fn)
        parts = [self.expr(a, rank) for a in op.args]
        if any(_has_ref(v) for v in op.kwargs.values()):
            parts.append("**{" + ", ".join(f"{self.expr(key)}: {self.expr(v, rank)}" for key, v in op.kwargs.items()) + "}")
        elif op.kwargs:
            self.kwargs.append(op.kwargs)
            parts.append(f"**k[{len(self.kwargs) - 1}]")
        return f"o[{len(self.ops) - 1}](" + ", ".join(parts) + ")"

    def on_stacked(self, op: BoundOp) -> str | None:
        """One call of the op on its rank-stacked inputs (`rank_batching.SHAPE_OPS` /
        `ELEMENTWISE_OPS`), or None if the op or the form of its inputs does not allow it."""
        if _has_ref(list(op.kwargs.values())) or op.kwargs.get("alpha", 1) != 1:
            return None
        refs = [(i, a) for i, a in enumerate(op.args) if _has_ref(a)]
        per_rank = [i for i, a in refs if any(self.split(n) for n in _ref_names(a))]
        if not all(self.held(n, Form.STACKED) for i in per_rank for n in _ref_names(op.args[i])):
            return None
        run: Callable = op.fn
        args, kwargs = list(op.args), dict(op.kwargs)
        if op.target in SHAPE_OPS:
            if [i for i, _ in refs] != [0] or per_rank != [0]:
                return None
            rewritten = SHAPE_OPS[op.target](args, kwargs, self.num_ranks)
            if rewritten is None:
                return None
            args, kwargs = rewritten
        elif op.target in ELEMENTWISE_OPS or op.target in CHECKED_ELEMENTWISE_OPS:
            if any(type(a) is list for _, a in refs):
                return None
            ndims = [self.ndims.get(a.name) for _, a in refs]
            rank_ndims = {self.ndims.get(op.args[i].name) for i in per_rank}
            if op.target in CHECKED_ELEMENTWISE_OPS:
                run = CheckedElementwise()
                kwargs["stacked"] = tuple(per_rank)
            elif None in ndims or len(rank_ndims) > 1 or max(ndims) > min(rank_ndims):
                # a shared operand with more dimensions than a rank's part: align at run time
                run = elementwise
                kwargs["stacked"] = tuple(per_rank)
        else:
            return None

        def form(arg: Any) -> str:
            if type(arg) is list:
                return "[" + "".join(f"{form(a)}, " for a in arg) + "]"
            if type(arg) is Ref:
                return self.slot_of(arg.name, STACKED) if self.split(arg.name) else self.slot(arg.name)
            return self.constant(arg)

        self.ops.append(run)
        parts = ([] if run is op.fn else [self.constant(op.fn)]) + [form(a) for a in args]
        if kwargs:
            self.kwargs.append(kwargs)
            parts.append(f"**k[{len(self.kwargs) - 1}]")
        return f"o[{len(self.ops) - 1}](" + ", ".join(parts) + ")"

    def over_ranks(self, op: BoundOp) -> tuple[str, bool] | None:
        """One call of the op's all-rank form and whether its result is rank-stacked (None if it
        has none): per-rank values as lists, split weights / buffers as their `Stacked` storage."""
        first = op.args[0] if op.args else None
        form_of = all_rank_form(op.target, input_per_rank=type(first) is Ref and self.split(first.name))
        if form_of is None or len(op.outputs) > 1 or any(
                type(a) is list and _has_ref(a) for a in (*op.args, *op.kwargs.values())):
            return None

        def form(arg: Any) -> str:
            if type(arg) is not Ref:
                return self.constant(arg)
            if self.held(arg.name, Form.STORAGE):
                return self.slot_of(arg.name, STACKED)
            if self.held(arg.name, Form.STACKED):
                return f"{self.constant(Stacked)}({self.slot_of(arg.name, STACKED)})"
            if self.split(arg.name):
                return self.rank_slots(arg.name)
            return self.slot(arg.name)

        self.ops.append(functools.partial(form_of.run, rows_cache=self.rows_cache) if form_of.reads_rows
                        else form_of.run)
        parts = [self.constant(op.fn)] + [form(a) for a in op.args]
        if op.kwargs:
            parts.append("**{" + ", ".join(f"{self.constant(key)}: {form(v)}" for key, v in op.kwargs.items()) + "}")
        return f"o[{len(self.ops) - 1}](" + ", ".join(parts) + ")", form_of.stacked_result

    def ranks_of(self, names: list[str]) -> range:
        """Ranks to emit an op for: all when it reads a per-rank value, else one (shared by all)."""
        return range(self.num_ranks) if any(self.split(n) for n in names) else range(1)

    def assign(self, call: str, targets: list[str]) -> None:
        """`call`'s result into `targets` (one per output; empty for an output nobody reads)."""
        if len(targets) == 1:
            self.emit(f"{targets[0]} = {call}" if targets[0] else call)
            return
        self.emit(f"t = {call}")
        for position, target in enumerate(targets):
            if target:
                self.emit(f"{target} = t[{position}]")

    def op(self, op: BoundOp, index: int, dynamic: bool) -> None:
        """Emit one op: once if it reads only shared values; else on its rank-stacked inputs, or
        through its all-rank form with a per-rank fallback, or once per rank."""
        names = _ref_names((op.args, list(op.kwargs.values())))
        ranks = self.ranks_of(names)
        batching = len(ranks) > 1 and self.rank_batching
        if batching and not dynamic:
            call = self.on_stacked(op)
            if call is not None:
                self.assign(call, [name and self.slot_of(name, STACKED) for name in op.outputs])
                self.produced(op.outputs, stacked=True)
                return
        if len(ranks) > 1:  # the outputs differ per rank: their slots are per rank from here
            for name in op.outputs:
                if name:
                    self.forms.setdefault(name, SHARED)
        batched = self.over_ranks(op) if batching else None
        if batched is None:
            self.to_per_rank(names)
            self.per_rank_calls(op, ranks)
            stacked_result = False
        else:
            stacked_result = self.all_rank_call(op, ranks, names, *batched)
        if len(ranks) > 1:
            self.produced(op.outputs, stacked=stacked_result)
        if dynamic:  # priced once, from rank 0's arguments: every rank does the same work
            self.ops.append(op)  # the BoundOp itself, so `dyn` knows which op it prices
            self.emit(f"dyn({index}, o[{len(self.ops) - 1}], ({''.join(self.rank0(a) + ', ' for a in op.args)}))")

    def per_rank_calls(self, op: BoundOp, ranks: range) -> None:
        for rank in ranks:
            self.assign(self.call(op, rank), [name and self.slot(name, rank) for name in op.outputs])

    def all_rank_call(self, op: BoundOp, ranks: range, names: list[str], call: str, stacked_result: bool) -> bool:
        """Emit the op's all-rank `call` and, where it returns None, the per-rank calls (reading
        stacked inputs cut into the ranks' values there only). Returns whether the result is stacked."""
        self.emit(f"t = {call}")
        output = op.outputs[0] if op.outputs else None
        if output:
            self.emit("if t is not None:")
            if stacked_result:
                self.emit(f"    {self.slot_of(output, STACKED)} = t")
            else:
                for rank in ranks:
                    self.emit(f"    {self.slot(output, rank)} = t[{rank}]")
            self.emit("else:")
        else:
            self.emit("if t is None:")
        self.indent += 1
        cut = [n for n in dict.fromkeys(names) if self.split(n) and not self.held(n, Form.PER_RANK)]
        for name in cut:
            self.cut(name)
        self.per_rank_calls(op, ranks)
        for name in cut:
            self.clear_ranks(name)
        if stacked_result and output:  # the per-rank fallback's results, stacked
            self.emit(f"{self.slot_of(output, STACKED)} = {self.constant(torch.stack)}({self.rank_slots(output)})")
            self.clear_ranks(output)
        self.indent = 1
        return stacked_result

    def rank0(self, arg: Any) -> str:
        """Rank 0's value of `arg`, whichever form it is held in."""
        if type(arg) is Ref and self.held(arg.name, Form.STACKED) and not self.held(arg.name, Form.PER_RANK):
            return f"{self.slot_of(arg.name, STACKED)}[0]"
        return self.expr(arg)

    def collective(self, op: BoundOp) -> None:
        """Every rank's operand in one list; the result is the same on every rank (one slot)."""
        x, *rest = op.args
        self.to_per_rank([x.name])
        (out,) = op.outputs
        if op.target == ALL_REDUCE:
            residual = rest[0] if rest else op.kwargs.get("residual")
            self.emit(f"{self.slot(out)} = reduce({self.rank_slots(x.name)}, {self.expr(residual)})")
        else:
            dim, sources = rest
            self.emit(f"{self.slot(out)} = gather({self.rank_slots(x.name)}, {self.constant(dim)}, "
                      f"{self.constant(sources)})")
        self.to_shared(out)

    def release(self, name: str) -> None:
        """Emit: every form of `name` freed (after its last use)."""
        if self.held(name, Form.STACKED):
            self.emit(f"{self.slot_of(name, STACKED)} = None")
        if not self.split(name) or self.held(name, Form.PER_RANK):
            for rank in self.ranks_of([name]):
                self.emit(f"{self.slot(name, rank)} = None")

    def round_output(self, name: str) -> None:
        if self.held(name, Form.STACKED):
            slot = self.slot_of(name, STACKED)
            self.emit(f"{slot} = rnd({slot})")
        if not self.split(name) or self.held(name, Form.PER_RANK):
            for rank in self.ranks_of([name]):
                self.emit(f"{self.slot(name, rank)} = rnd({self.slot(name, rank)})")


def _ref_names(arg: Any) -> list[str]:
    if type(arg) is Ref:
        return [arg.name]
    if type(arg) in (list, tuple):
        return [n for a in arg for n in _ref_names(a)]
    return []


def emit_program(steps: list[tuple[Step, list[BoundOp], list[str]]], dynamic_ops: set[str], rounding: bool,
             num_ranks: int = 1, split_state: set[str] = frozenset(),
             stacked_state: set[str] = frozenset(), ndims: dict[str, int] | None = None,
             rank_batching: bool = True) -> Executable:
    """`steps`: (step, its bound ops, values to free after it). Ops named in `dynamic_ops`
    report their arguments to `dyn(step_index, op, args)` after running (for pricing).

    `num_ranks` tensor-parallel ranks run in this process; `split_state` names the weights /
    buffers that differ per rank. An op reading a per-rank value is emitted once per rank; an
    op reading only values every rank shares (the residual stream after an all-reduce, norms,
    position tables) runs once and its result is shared, as each device would compute the same.
    Matmuls and attention over per-rank values run for all ranks in one call where
    `rank_batching` has a form for them, reading the split weights / buffers named in
    `stacked_state` from their rank-stacked storage (slot key (name, STACKED)). A per-rank
    activation such a call returns rank-stacked stays so through the small shape and exact
    elementwise ops that follow (one call on the stacked tensor), and is cut into the ranks'
    values only where something reads them per rank. `ndims` (value name -> dimensions) lets an
    elementwise op on stacked values be called directly when no operand needs aligning. With
    `rank_batching` off, every op reading a per-rank value is emitted once per rank."""
    w = _Writer(num_ranks, split_state, stacked_state, ndims or {}, rank_batching)
    for index, (step, ops, frees) in enumerate(steps):
        if step.kind == StepKind.H2D:
            for src, dst in zip(step.inputs, step.outputs):
                w.emit(f"{w.slot(dst)} = " + (f"dev({w.slot(src)})" if step.cast_to_device_float else w.slot(src)))
        elif step.kind == StepKind.D2H:
            w.to_per_rank(list(step.inputs))
            for src, dst in zip(step.inputs, step.outputs):
                w.emit(f"{w.slot(dst)} = {w.slot(src)}")
        elif step.kind == StepKind.COLLECTIVE:
            for op in ops:
                w.collective(op)
        else:
            if step.kind == StepKind.HOST:  # host fallback computes in fp32
                w.to_per_rank(list(step.inputs))
                for name in step.inputs:
                    for rank in w.ranks_of([name]):
                        w.emit(f"{w.slot(name, rank)} = up({w.slot(name, rank)})")
            for op in ops:
                w.op(op, index, op.target in dynamic_ops)
            if step.kind == StepKind.KERNEL and rounding:
                for name in step.outputs:
                    w.round_output(name)
        for name in frees:
            w.release(name)
    w.emit("return e")
    namespace: dict = {}
    exec(compile("\n".join(w.lines), "<rbln program>", "exec"), {"__builtins__": {}}, namespace)
    return Executable(namespace["run"], w.slots, w.ops, w.constants, w.kwargs, w.rows_cache)
