"""Turn a program's steps into one straight-line Python function, once, at load time.

Interpreting op by op costs a few microseconds of Python per op, which for an LLM decode
step of ~600 small ops is as much as the math. Like torch.fx's code generation, we write
the schedule out as plain statements and compile them:

    e[12] = o[3](e[5], e[7], c[2])        # an op: callables, values and constants by index
    e[13] = rnd(e[12])                    # fp16 emulation: round a kernel output
    e[5] = None                           # free a value after its last use

The generated text contains only integer indices and the fixed helper names above,
never a name, string or number read from the artifact (those stay in the `c` / `k`
lists), so a program's text cannot inject code. What the `o` callables are is decided
before this point: the runtime binds only allowlisted operators (`ops.resolve_op`) to
programs that passed `validation.validate_program` (arguments typed by each op's
schema, every value defined before it is read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .program import Ref, Step


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


@dataclass
class Executable:
    function: Callable            # run(e, o, c, k, dev, rnd, up, dyn) -> e
    slots: dict[str, int]         # value name -> index in the environment list
    ops: list[Callable] = field(default_factory=list)
    constants: list = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)


class _Writer:
    def __init__(self) -> None:
        self.slots: dict[str, int] = {}
        self.ops: list[Callable] = []
        self.constants: list = []
        self.kwargs: list[dict] = []
        self.lines = ["def run(e, o, c, k, dev, rnd, up, dyn):"]

    def slot(self, name: str) -> str:
        return f"e[{self.slots.setdefault(name, len(self.slots))}]"

    def expr(self, arg: Any) -> str:
        if type(arg) is Ref:
            return self.slot(arg.name)
        if type(arg) is list and _has_ref(arg):
            return "[" + "".join(f"{self.expr(a)}, " for a in arg) + "]"
        self.constants.append(arg)
        return f"c[{len(self.constants) - 1}]"

    def emit(self, line: str) -> None:
        self.lines.append("    " + line)

    def call(self, op: BoundOp) -> str:
        self.ops.append(op.fn)
        parts = [self.expr(a) for a in op.args]
        if any(_has_ref(v) for v in op.kwargs.values()):
            parts.append("**{" + ", ".join(f"{self.expr(key)}: {self.expr(v)}" for key, v in op.kwargs.items()) + "}")
        elif op.kwargs:
            self.kwargs.append(op.kwargs)
            parts.append(f"**k[{len(self.kwargs) - 1}]")
        return f"o[{len(self.ops) - 1}](" + ", ".join(parts) + ")"


def generate(steps: list[tuple[Step, list[BoundOp], list[str]]], dynamic_ops: set[str], rounding: bool) -> Executable:
    """`steps`: (step, its bound ops, values to free after it). Ops named in `dynamic_ops`
    report their arguments to `dyn(step_index, op, args)` after running (for pricing)."""
    w = _Writer()
    for index, (step, ops, frees) in enumerate(steps):
        if step.kind == "h2d":
            for src, dst in zip(step.inputs, step.outputs):
                w.emit(f"{w.slot(dst)} = " + (f"dev({w.slot(src)})" if step.cast_to_device_float else w.slot(src)))
        elif step.kind == "d2h":
            for src, dst in zip(step.inputs, step.outputs):
                w.emit(f"{w.slot(dst)} = {w.slot(src)}")
        else:
            if step.kind == "host":  # host fallback computes in fp32
                for name in step.inputs:
                    w.emit(f"{w.slot(name)} = up({w.slot(name)})")
            for op in ops:
                call = w.call(op)
                if len(op.outputs) == 1:
                    w.emit(f"{w.slot(op.outputs[0])} = {call}" if op.outputs[0] else call)
                else:
                    w.emit(f"t = {call}")
                    for position, name in enumerate(op.outputs):
                        if name:
                            w.emit(f"{w.slot(name)} = t[{position}]")
                if op.target in dynamic_ops:
                    w.ops.append(op)  # the BoundOp itself, so `dyn` knows which op it prices
                    w.emit(f"dyn({index}, o[{len(w.ops) - 1}], ({''.join(w.expr(a) + ', ' for a in op.args)}))")
            if step.kind == "kernel" and rounding:
                for name in step.outputs:
                    w.emit(f"{w.slot(name)} = rnd({w.slot(name)})")
        for name in frees:
            w.emit(f"{w.slot(name)} = None")
    w.emit("return e")
    namespace: dict = {}
    exec(compile("\n".join(w.lines), "<rbln program>", "exec"), {"__builtins__": {}}, namespace)
    return Executable(namespace["run"], w.slots, w.ops, w.constants, w.kwargs)
