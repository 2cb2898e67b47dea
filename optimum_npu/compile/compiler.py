"""`compile_from_torch`: a torch module -> a device program (`CompiledModel`), ready to
save as `.rbln` or to run.

Passes, in order: export (torch.export), op support (device or host fallback),
fusion, scheduling with dtype lowering and host<->device copies, memory planning, and
the memory check against the target NPU. Costs are priced by the device's cost model.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..sim_device.artifact import Artifact
from ..sim_device.cost_model import CostModel
from ..sim_device.memory import DeviceMemoryError, format_gib
from ..sim_device.program import DEVICE_DTYPES, DTYPE_NAMES, PROGRAM_DTYPES, Program, TensorSpec, dtype_name
from ..sim_device.specs import NPU_PRESETS, DEFAULT_NPU, get_npu_spec
from .frontend import export_graph
from .fusion import fuse
from .memory_planner import plan_memory
from .op_support import Category
from .schedule import FLOAT_DTYPES, build_steps

NUMERICS = ("device", "exact")


class CompiledModel(Artifact):
    """A compiled program and its weights. `save(path)` writes the `.rbln` file,
    `create_runtime(...)` loads it onto simulated devices."""

    def create_runtime(self, tensor_type: str = "pt", device=None, activate_profiler: bool = False, **kwargs):
        from ..sim_device.runtime import Runtime

        return Runtime(self, tensor_type=tensor_type, device=device, activate_profiler=activate_profiler, **kwargs)

    @property
    def device_bytes(self) -> int:
        """DRAM needed on each device (the largest rank)."""
        plan = self.program.memory
        return max(plan.total_bytes(r) for r in range(plan.num_devices))

    @property
    def estimated_latency_s(self) -> float:
        """Simulated time of one run (attention priced at full KV length)."""
        cost_model = CostModel(get_npu_spec(self.program.npu))
        total = cost_model.run_overhead()
        for step in self.program.steps:
            cost = cost_model.step(step.kind, step.flops, step.vector_flops, step.bytes_read + step.bytes_written)
            total += cost.total_s if step.kind == "kernel" else cost
        return total

    def summary(self) -> str:
        p, plan = self.program, self.program.memory
        kinds = [s.kind for s in p.steps]
        return (
            f"{p.npu} x{p.tensor_parallel_size}, {p.device_dtype}, numerics={p.numerics}: "
            f"{kinds.count('kernel')} device kernels, {kinds.count('host')} host segments, "
            f"{kinds.count('h2d') + kinds.count('d2h')} HDMA copies; per device: weights {format_gib(plan.weights_bytes[0])}, "
            f"buffers {format_gib(plan.buffers_bytes[0])}, activations {format_gib(plan.activations_bytes[0])}; "
            f"estimated {self.estimated_latency_s * 1e3:.3f} ms per run"
        )


def _normalize_dtype(dtype) -> str:
    if isinstance(dtype, torch.dtype):
        dtype = DTYPE_NAMES.get(dtype, str(dtype))
    if dtype not in DEVICE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(repr, DEVICE_DTYPES))} (the device computes in 16 bits); got {dtype!r}")
    return dtype


def _inputs_from_info(input_info, on_meta: bool) -> tuple:
    if not isinstance(input_info, (list, tuple)) or not input_info:
        raise ValueError("input_info must be a non-empty list of (name, shape, dtype) triples")
    seen, tensors = set(), []
    for item in input_info:
        if not (isinstance(item, (list, tuple)) and len(item) == 3):
            raise ValueError(f"each input_info entry must be a (name, shape, dtype) triple, got {item!r}")
        name, shape, dtype = item
        if not isinstance(name, str) or not name.isidentifier() or name in seen:
            raise ValueError(f"input_info names must be unique identifiers, got {name!r}")
        seen.add(name)
        if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"input_info shape of {name!r} must be a list of positive ints (static shapes), got {shape!r}")
        if isinstance(dtype, torch.dtype):
            dtype = dtype_name(dtype)
        if dtype not in PROGRAM_DTYPES:
            raise ValueError(f"input_info dtype of {name!r} must be one of {', '.join(PROGRAM_DTYPES)}, got {dtype!r}")
        tensors.append(torch.zeros(tuple(shape), dtype=PROGRAM_DTYPES[dtype], device="meta" if on_meta else "cpu"))
    return tuple(tensors)


def _check_fits(program: Program, npu: str) -> None:
    spec = get_npu_spec(npu)
    plan = program.memory
    need = max(plan.total_bytes(r) for r in range(plan.num_devices))
    if need <= spec.usable_dram_bytes:
        return
    per_device_fixed = plan.weights_bytes[0] + plan.buffers_bytes[0]
    devices_needed = math.ceil(per_device_fixed * plan.num_devices / max(1, spec.usable_dram_bytes - plan.activations_bytes[0]))
    bigger = [n for n, s in sorted(NPU_PRESETS.items()) if s.usable_dram_bytes >= need]
    raise DeviceMemoryError(
        f"The compiled program needs {format_gib(need)} per device (weights {format_gib(plan.weights_bytes[0])}, "
        f"buffers {format_gib(plan.buffers_bytes[0])}, activations {format_gib(plan.activations_bytes[0])}), "
        f"but a {npu} device has {format_gib(spec.usable_dram_bytes)} usable. To fit: reduce the batch size or "
        f"sequence length" + (f", target {' / '.join(bigger)}" if bigger else "")
        + f", or split the weights over ~{devices_needed} devices with tensor parallelism "
        "(tensor_parallel_size, which this version's compiler does not implement yet)."
    )


def compile_from_torch(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | None = None,
    input_info: Sequence[tuple[str, Sequence[int], str | torch.dtype]] | None = None,
    npu: str = DEFAULT_NPU,
    tensor_parallel_size: int = 1,
    dtype: str | torch.dtype = "bfloat16",
    numerics: str = "device",
) -> CompiledModel:
    """Compile `module` for the simulated NPU.

    Inputs are declared by `example_inputs` (tensors) or `input_info=[(name, shape,
    dtype), ...]`; shapes are static. `dtype` is the device's 16-bit compute type.
    `numerics="exact"` keeps fp32 weights so the simulator can run in fp32 (sizes and
    costs stay those of `dtype`). A module on the meta device compiles too: the result
    tells sizes and costs (and raises if they don't fit) but cannot be saved or run.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    get_npu_spec(npu)
    device_dtype = _normalize_dtype(dtype)
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive int, got {tensor_parallel_size!r}")
    if tensor_parallel_size > 1:
        raise ValueError(
            "tensor_parallel_size > 1 needs the compiler's tensor-parallel pass, which is not implemented yet; "
            "use tensor_parallel_size=1"
        )
    if (example_inputs is None) == (input_info is None):
        raise ValueError("pass exactly one of example_inputs (tensors) or input_info ([(name, shape, dtype), ...])")
    on_meta = any(p.is_meta for p in module.parameters()) or any(b.is_meta for b in module.buffers())
    if example_inputs is not None:
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = [example_inputs]
        if not all(isinstance(t, torch.Tensor) for t in example_inputs):
            raise TypeError("example_inputs must be a list of tensors")
        example_inputs = tuple(t.to("meta") if on_meta else t for t in example_inputs)
    else:
        example_inputs = _inputs_from_info(input_info, on_meta)

    with tqdm(total=5, desc="Compiling", unit="pass", delay=1.0, leave=False) as progress:
        progress.set_postfix_str(refresh=False, s="export")
        input_names = [info[0] for info in input_info] if input_info is not None else None
        graph = export_graph(module, example_inputs, input_names)
        for node in graph.nodes:
            if node.category is Category.HOST and node.mutates:
                raise ValueError(f"{node.target} writes device state in place but runs as a host fallback; not supported")
        progress.update()
        progress.set_postfix_str(refresh=False, s="fusion")
        groups = fuse(graph.nodes)
        progress.update()
        progress.set_postfix_str(refresh=False, s="schedule")
        steps, values, outputs = build_steps(graph, groups, device_dtype)
        progress.update()
        progress.set_postfix_str(refresh=False, s="memory")

        def on_device(spec: TensorSpec) -> TensorSpec:
            return TensorSpec(spec.name, spec.shape, device_dtype if spec.dtype in FLOAT_DTYPES else spec.dtype)

        weights = [on_device(s) for s in graph.weights]
        buffers = [on_device(s) for s in graph.buffers]
        plan = plan_memory(steps, values, weights, buffers)
        program = Program(
            npu=npu, device_dtype=device_dtype, numerics=numerics, tensor_parallel_size=tensor_parallel_size,
            inputs=graph.inputs, outputs=outputs, weights=weights, buffers=buffers,
            values=dict(sorted(values.items())), steps=steps, memory=plan,
        )
        _check_fits(program, npu)
        progress.update()
        progress.set_postfix_str(refresh=False, s="weights")
        tensors = None
        if graph.tensors is not None:
            # Buffers that start as zeros (KV caches) are created on load instead of stored.
            program.zero_init = sorted(b.name for b in graph.buffers if not graph.tensors[b.name].any())
            # The device stores floats in its 16-bit type; exact numerics keeps fp32 for the simulator.
            store = torch.float32 if numerics == "exact" else PROGRAM_DTYPES[device_dtype]
            tensors = {
                name: (t.to(store) if t.is_floating_point() else t).contiguous().clone()
                for name, t in graph.tensors.items()
                if name not in program.zero_init
            }
        progress.update()
    return CompiledModel(program=program, tensors=tensors)
