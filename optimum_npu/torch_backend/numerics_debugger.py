"""Where does 16-bit break my model? Run a module's compiled program in the device numerics beside
the same program in exact fp32, and compare every op's output.

    report = compare_numerics(model, [x], dtype="float16", tolerance=0.01)
    print(report)                   # one row per op: its error against fp32
    report.first_failure            # the first op whose error passes the tolerance (or None)
    values = run_until(model, [x], "linear_2")   # intermediate tensors up to that op, in device numerics

Both programs come from one export (`compiler.export` + `compile_exported`), so their values
have the same names (torch.export's node names: `linear_2`, `softmax`, ...) and the comparison is
op by op. An op's error is max|device - exact| / max|exact| over its output, with non-finite
device values (an fp16 overflow to inf, a NaN) reported as such; the "first failure" is the first
op in program order whose error passes `tolerance` or whose output turns non-finite where the
exact one is finite. Values are those the device holds: inside a fused kernel the intermediates
stay wide (fp16 numerics round at kernel boundaries), as on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..compile.compiler import compile_exported, export
from ..sim_device.specs import DEFAULT_NPU


@dataclass
class OpError:
    index: int
    target: str            # "aten.linear.default"
    value: str             # the value's name in the program ("linear_2")
    shape: tuple
    error: float           # max |device - exact| / max |exact| (inf when the device value is not finite)
    max_abs_exact: float
    non_finite: int        # device elements that are inf / NaN where the exact value is finite

    def __str__(self) -> str:
        flag = f"  {self.non_finite} non-finite" if self.non_finite else ""
        return (f"{self.index:4d}  {self.target:38s} {self.value:24s} {str(list(self.shape)):18s} "
                f"rel err {self.error:9.3g}  max|fp32| {self.max_abs_exact:9.3g}{flag}")


@dataclass
class NumericsReport:
    dtype: str
    tolerance: float
    ops: list[OpError]

    @property
    def first_failure(self) -> OpError | None:
        return next((op for op in self.ops if op.non_finite or op.error > self.tolerance), None)

    def __str__(self) -> str:
        first = self.first_failure
        head = (f"{len(self.ops)} ops in {self.dtype} against exact fp32, tolerance {self.tolerance:g}: "
                + (f"first failure at op {first.index} ({first.target} -> {first.value})" if first
                   else "no op passes it"))
        return "\n".join([head, *map(str, self.ops)])


def _runtimes(module, example_inputs, dtype, npu):
    graph = export(module, example_inputs=example_inputs)
    runtimes = []
    for numerics in ("device", "exact"):
        compiled = compile_exported(graph, npu=npu, dtype=dtype, numerics=numerics)
        runtime = compiled.create_runtime(keep_values=True)
        runtime(*example_inputs)
        runtimes.append(runtime)
    return runtimes


def _ordered_ops(program):
    """(index, target, value name) of every op output, in program order."""
    index = 0
    for step in program.steps:
        for call in step.ops:
            for name in call.outputs:
                if name:
                    yield index, call.target, name
            index += 1


def compare_numerics(module: torch.nn.Module, example_inputs, dtype: str = "bfloat16", tolerance: float = 0.01,
                     npu: str = DEFAULT_NPU) -> NumericsReport:
    """Run `module` compiled for `dtype` in the device numerics and in exact fp32 on `example_inputs`;
    report every op's error (see the module docstring)."""
    if not (isinstance(tolerance, (int, float)) and tolerance > 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a positive number (relative error), got {tolerance!r}")
    example_inputs = list(example_inputs)
    device, exact = _runtimes(module, example_inputs, dtype, npu)
    try:
        device_values, exact_values = device.last_values(), exact.last_values()
        rows = []
        for index, target, name in _ordered_ops(device.program):
            d, e = device_values.get(name), exact_values.get(name)
            if d is None or e is None or not d.is_floating_point():
                continue
            d, e = d.float(), e.float()
            finite = torch.isfinite(e)
            non_finite = int((~torch.isfinite(d) & finite).sum())
            scale = e[finite].abs().max().item() if finite.any() else 0.0
            diff = (d - e)[finite].abs().max().item() if finite.any() else 0.0
            error = math.inf if non_finite else (diff / scale if scale > 0 else diff)
            rows.append(OpError(index, target, name, tuple(d.shape), error, scale, non_finite))
        return NumericsReport(dtype, tolerance, rows)
    finally:
        device.close()
        exact.close()


def run_until(module: torch.nn.Module, example_inputs, value: str, dtype: str = "bfloat16",
              numerics: str = "device", npu: str = DEFAULT_NPU) -> dict[str, torch.Tensor]:
    """The values of `module`'s compiled program up to and including op output `value` (its name
    in the program, as `compare_numerics` lists them), in program order, as the device holds them.
    The simulator runs the whole program and returns this prefix of it."""
    example_inputs = list(example_inputs)
    graph = export(module, example_inputs=example_inputs)
    compiled = compile_exported(graph, npu=npu, dtype=dtype, numerics=numerics)
    names = [name for _, _, name in _ordered_ops(compiled.program)]
    if value not in names:
        raise ValueError(f"no op output named {value!r} in the program; its values are: {', '.join(names)}")
    with compiled.create_runtime(keep_values=True) as runtime:
        runtime(*example_inputs)
        values = runtime.last_values()
    prefix = names[:names.index(value) + 1]
    return {name: values[name] for name in prefix if name in values}
