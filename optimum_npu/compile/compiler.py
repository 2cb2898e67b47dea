"""`compile_from_torch`: a torch module -> a device program (`CompiledModel`), ready to
save as `.rbln` or to run.

The compiler is the list `PASSES`, run in order over one `Compilation` (`export` and
`compile_exported` split it after the first pass, to compile one export for several targets): export
(torch.export), tensor-parallel splitting (when compiling for several devices), fusion,
scheduling with dtype lowering and host<->device copies, memory planning, the memory check
against the target NPU, and storing the weights. Costs are priced by the device's cost model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..sim_device.artifact import Artifact
from ..sim_device.cost_model import CostModel, RunEstimate, estimate_run
from ..sim_device.machine import Ring, default_group
from ..sim_device.memory import DeviceMemoryError
from ..sim_device.program import (
    DEVICE_DTYPES, DTYPE_NAMES, NUMERICS, PROGRAM_DTYPES, Program, Step, StepKind, TensorSpec, dtype_name,
)
from ..sim_device.specs import NPU_PRESETS, DEFAULT_NPU, get_npu_spec
from ..sim_device.stats import format_bytes
from . import cache as compile_cache
from .frontend import Graph, export_graph
from .fusion import Group, fuse
from .memory_planner import plan_memory
from .op_support import Category
from .progress import track
from .schedule import FLOAT_DTYPES, build_steps
from .tensor_parallel import ShardingPlan, resident_bytes_per_rank, split_graph


@dataclass(repr=False)
class CompiledModel(Artifact):
    """A compiled program and its weights. `save(path)` writes the `.rbln` file,
    `create_runtime(...)` loads it onto simulated devices."""

    # How the model was split over devices (None for one device, or when loaded: it is not saved).
    sharding_plan: ShardingPlan | None = field(default=None, compare=False)
    from_cache = False     # loaded from the compile cache instead of compiled (not saved)

    def create_runtime(self, tensor_type: str = "pt", device=None, activate_profiler: bool = False, **kwargs):
        from ..sim_device.runtime import Runtime

        return Runtime(self, tensor_type=tensor_type, device=device, activate_profiler=activate_profiler, **kwargs)

    @property
    def device_bytes(self) -> int:
        """DRAM needed on each device (the largest rank)."""
        plan = self.program.memory
        return max(plan.total_bytes(r) for r in range(plan.num_devices))

    def cost_model(self) -> CostModel:
        """The cost model of one device of this program, its ranks placed as `machine.default_group` guesses."""
        spec = get_npu_spec(self.program.npu)
        return CostModel(spec, ring=Ring.over(default_group(spec, self.program.tensor_parallel_size)))

    def estimate(self, kv_len: int | None = None) -> RunEstimate:
        """Simulated time of one run, priced as the runtime's clock prices it, with attention at
        `kv_len` KV positions per sequence (its context including this run's tokens; None: the
        full capacity of the KV cache, the worst case). The estimate says which (`kv_label`)."""
        if kv_len is not None and (isinstance(kv_len, bool) or not isinstance(kv_len, int) or kv_len < 1):
            raise ValueError(f"kv_len must be a positive int (KV positions per sequence) or None, got {kv_len!r}")
        return estimate_run(self.program, self.cost_model(), kv_len)

    @property
    def estimated_latency_s(self) -> float:
        """Simulated time of one run with attention at the full KV capacity (see `estimate`)."""
        return self.estimate().total_s

    def summary(self) -> str:
        p, plan = self.program, self.program.memory
        count = {kind: sum(s.kind == kind for s in p.steps) for kind in StepKind}
        def per_rank(values: list[int]) -> str:
            return format_bytes(values[0]) if len(set(values)) == 1 else " / ".join(format_bytes(v) for v in values)

        return (
            f"{p.npu} x{p.tensor_parallel_size}, {p.device_dtype}, numerics={p.numerics}: "
            f"{count[StepKind.KERNEL]} device kernels, {count[StepKind.HOST]} host segments, "
            f"{count[StepKind.H2D] + count[StepKind.D2H]} HDMA copies, {count[StepKind.COLLECTIVE]} collectives; "
            f"per device: weights {per_rank(plan.weights_bytes)}, buffers {per_rank(plan.buffers_bytes)}, "
            f"activations {per_rank(plan.activations_bytes)}; estimated {self.estimated_latency_s * 1e3:.3f} ms per run"
            # which KV length attention was priced at, for a program that has attention
            + (f" ({self.estimate().kv_label})" if any(s.dynamic_cost for s in p.steps) else "")
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


TENSOR_PARALLEL_CANDIDATES = (1, 2, 4, 8, 16, 32)


class ProgramTooLargeError(DeviceMemoryError):
    """The compiled program does not fit one device of its NPU. Carries the `program` (its
    memory plan says what needs what) and the smallest tensor-parallel size that would fit."""

    def __init__(self, message: str, program: Program, smallest_tensor_parallel_size: int | None):
        super().__init__(message)
        self.program = program
        self.smallest_tensor_parallel_size = smallest_tensor_parallel_size


@dataclass
class Compilation:
    """What the passes share: the request, then what each pass produces for the next."""

    module: torch.nn.Module | None        # None: compiling an already exported graph
    example_inputs: tuple
    input_names: list[str] | None
    npu: str
    device_dtype: str
    numerics: str
    tensor_parallel_size: int
    graph: Graph | None = None
    unsplit_graph: Graph | None = None    # as exported, before the tensor-parallel split
    sharding: ShardingPlan | None = None
    groups: list[Group] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    values: dict[str, TensorSpec] = field(default_factory=dict)
    outputs: list[TensorSpec] = field(default_factory=list)
    program: Program | None = None
    tensors: dict[str, torch.Tensor] | None = None


def _export(c: Compilation) -> None:
    c.graph = _exported(c.module, c.example_inputs, c.input_names)


def _exported(module: torch.nn.Module, example_inputs: tuple, input_names: list[str] | None) -> Graph:
    graph = export_graph(module, example_inputs, input_names)
    for node in graph.nodes:
        if node.category is Category.HOST and node.mutates:
            raise ValueError(f"{node.target} writes device state in place but runs as a host fallback; not supported")
    return graph


def _split_tensor_parallel(c: Compilation) -> None:
    c.unsplit_graph = c.graph  # what the smallest-fitting-size advice splits at other sizes
    if c.tensor_parallel_size > 1:
        c.graph, c.sharding = split_graph(c.graph, c.tensor_parallel_size)


def _fuse(c: Compilation) -> None:
    c.groups = fuse(c.graph.nodes)


def _schedule(c: Compilation) -> None:
    c.steps, c.values, c.outputs = build_steps(c.graph, c.groups, c.device_dtype)


def _plan_memory(c: Compilation) -> None:
    def on_device(spec: TensorSpec) -> TensorSpec:
        return TensorSpec(spec.name, spec.shape, c.device_dtype if spec.dtype in FLOAT_DTYPES else spec.dtype)

    graph = c.graph
    weights = [on_device(s) for s in graph.weights]
    buffers = [on_device(s) for s in graph.buffers]
    plan = plan_memory(c.steps, c.values, weights, buffers, graph.tensor_shards, c.tensor_parallel_size, c.npu)
    c.program = Program(
        npu=c.npu, device_dtype=c.device_dtype, numerics=c.numerics, tensor_parallel_size=c.tensor_parallel_size,
        inputs=graph.inputs, outputs=c.outputs, weights=weights, buffers=buffers,
        values=dict(sorted(c.values.items())), steps=c.steps, memory=plan,
        tensor_shards=dict(sorted(graph.tensor_shards.items())),
    )


def _smallest_fitting_tensor_parallel_size(c: Compilation, usable: int) -> int | None:
    """The smallest tensor-parallel size whose weights, buffers and (this size's) activations
    fit one device, from the sharding plan of each candidate size; None if none does."""
    activations = max(c.program.memory.activations_bytes)
    spec = get_npu_spec(c.npu)
    for size in TENSOR_PARALLEL_CANDIDATES:
        if size > c.tensor_parallel_size and max(resident_bytes_per_rank(c.unsplit_graph, size, c.device_dtype, spec)) \
                + activations <= usable:
            return size
    return None


def _check_fits(c: Compilation) -> None:
    program, npu = c.program, c.npu
    spec = get_npu_spec(npu)
    plan = program.memory
    need = max(plan.total_bytes(r) for r in range(plan.num_devices))
    if need <= spec.usable_dram_bytes:
        return
    rank = max(range(plan.num_devices), key=plan.total_bytes)
    bigger = [n for n, s in sorted(NPU_PRESETS.items()) if s.usable_dram_bytes >= need]
    tp = _smallest_fitting_tensor_parallel_size(c, spec.usable_dram_bytes)
    split = (f"compile for tensor_parallel_size={tp} (the smallest that fits: each device then holds 1/{tp} of "
             "the split weights and KV cache)" if tp else "no tensor_parallel_size up to 32 fits either")
    raise ProgramTooLargeError(
        f"The compiled program needs {format_bytes(need)} per device (weights {format_bytes(plan.weights_bytes[rank])}, "
        f"buffers {format_bytes(plan.buffers_bytes[rank])}, activations {format_bytes(plan.activations_bytes[rank])}) "
        f"at tensor_parallel_size={program.tensor_parallel_size}, but a {npu} device has "
        f"{format_bytes(spec.usable_dram_bytes)} usable. To fit: {split}; or reduce the batch size or sequence length"
        + (f", or target {' / '.join(bigger)}" if bigger else "") + ".",
        program, tp,
    )


def _store_weights(c: Compilation) -> None:
    graph, program = c.graph, c.program
    if graph.tensors is None:
        return
    # Buffers that start as zeros (KV caches) are created on load instead of stored.
    program.zero_init = sorted(b.name for b in graph.buffers if not graph.tensors[b.name].any())
    # The device stores floats in its 16-bit type; exact numerics keeps fp32 for the simulator.
    # Tensors are stored whole: each rank cuts its shard at load (`Program.tensor_shards`).
    store = torch.float32 if c.numerics == "exact" else PROGRAM_DTYPES[c.device_dtype]
    c.tensors = {
        name: (t.to(store) if t.is_floating_point() else t).contiguous().clone()
        for name, t in graph.tensors.items()
        if name not in program.zero_init
    }


PASSES: list[tuple[str, Callable[[Compilation], None]]] = [
    ("export", _export),
    ("tensor parallel", _split_tensor_parallel),
    ("fusion", _fuse),
    ("schedule", _schedule),
    ("memory", _plan_memory),
    ("fit", _check_fits),
    ("weights", _store_weights),
]


def compile_from_torch(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | None = None,
    input_info: Sequence[tuple[str, Sequence[int], str | torch.dtype]] | None = None,
    npu: str = DEFAULT_NPU,
    tensor_parallel_size: int = 1,
    dtype: str | torch.dtype = "bfloat16",
    numerics: str = "device",
    cache: bool = False,
) -> CompiledModel:
    """Compile `module` for the simulated NPU.

    Inputs are declared by `example_inputs` (tensors) or `input_info=[(name, shape,
    dtype), ...]`; shapes are static. `dtype` is the device's 16-bit compute type.
    `numerics="exact"` keeps fp32 weights so the simulator can run in fp32 (sizes and
    costs stay those of `dtype`). `tensor_parallel_size=N` splits the model over N devices
    (`tensor_parallel/`). A module on the meta device compiles too: the result tells
    sizes and costs (and raises if they don't fit) but cannot be saved or run.

    `cache=True`: the program is looked up in the compile cache (`cache.py`) and stored there
    when compiled, keyed by the module (`Key.add_module`: its code, attributes and weights), the
    inputs' names, shapes and dtypes, and the target. A program from the cache has
    `from_cache=True`. A module on the meta device is cached as its program alone (sizes and
    costs, as it compiles).
    """
    target = _checked_target(npu, tensor_parallel_size, dtype, numerics)
    traced = _traced_inputs(module, example_inputs, input_info)
    key = _cache_key(*traced, target) if cache else None
    if key is not None:
        compiled = compile_cache.load(key)
        if compiled is not None:
            compiled.from_cache = True
            return compiled
    compiled = _run_passes(Compilation(*traced, *target), PASSES)
    if key is not None:
        compile_cache.store(key, compiled)
    return compiled


def _cache_key(module, example_inputs, input_names, target) -> str | None:
    """The compile cache's key of one `compile_from_torch` call. Inputs count by name, shape and
    dtype only: torch.export traces with fake tensors of them. None: a module the key cannot describe."""
    key = compile_cache.Key().add("compile_from_torch", target, input_names,
                                  [(tuple(t.shape), t.dtype) for t in example_inputs])
    try:
        return key.add_module(module).hexdigest()
    except compile_cache.Uncacheable:
        return None


def export(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | None = None,
    input_info: Sequence[tuple[str, Sequence[int], str | torch.dtype]] | None = None,
) -> Graph:
    """The export pass alone: `module` traced into the compiler's graph. The graph does not
    depend on the target (NPU, dtype, numerics, tensor-parallel size), so one export can be
    compiled for several targets with `compile_exported`: what makes a planner's sweep over
    tensor-parallel sizes cheap (torch.export is most of a compilation's time)."""
    return _exported(*_traced_inputs(module, example_inputs, input_info))


def compile_exported(graph: Graph, npu: str = DEFAULT_NPU, tensor_parallel_size: int = 1,
                     dtype: str | torch.dtype = "bfloat16", numerics: str = "device") -> CompiledModel:
    """`compile_from_torch` from an `export`ed graph (the passes after export; they leave the
    graph as it was, so it can be compiled again for another target)."""
    if not isinstance(graph, Graph):
        raise TypeError(f"graph must be a Graph from compiler.export, got {type(graph).__name__}")
    c = Compilation(None, (), None, *_checked_target(npu, tensor_parallel_size, dtype, numerics), graph=graph)
    return _run_passes(c, PASSES[1:])


def _checked_target(npu, tensor_parallel_size, dtype, numerics) -> tuple[str, str, str, int]:
    """(npu, device dtype, numerics, tensor-parallel size), in `Compilation`'s order, checked."""
    get_npu_spec(npu)
    device_dtype = _normalize_dtype(dtype)
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive int, got {tensor_parallel_size!r}")
    return npu, device_dtype, numerics, tensor_parallel_size


def _traced_inputs(module, example_inputs, input_info) -> tuple:
    """(module, example inputs, input names) checked, the inputs on the module's device."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if hasattr(module, "rbln_config"):  # the public mark of a compiled optimum-npu model (a diffusers one is a Module)
        raise TypeError(f"module is an already compiled {type(module).__name__}: compile the torch module it came from, "
                        "or load a compiled folder with from_pretrained")
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
    return module, example_inputs, [info[0] for info in input_info] if input_info is not None else None


def _run_passes(c: Compilation, passes) -> CompiledModel:
    what = f"Compiling {type(c.module).__name__}" if c.module is not None else "Compiling"
    for _, run_pass in track(passes, what, "pass", label=lambda named: named[0], leave=False):
        run_pass(c)
    return CompiledModel(program=c.program, tensors=c.tensors, sharding_plan=c.sharding)
