"""Run a compiled program on simulated devices.

The host executes every op for real, with the device's numerics:

- ``numerics="device"`` + bf16: device kernels run natively in bf16 on the host where the
  CPU has bf16 matmul instructions, elsewhere as fp16 below (`host_math.py`; the route is in
  `Runtime.host_math`, `OPTIMUM_NPU_HOST_MATH` overrides it);
- ``numerics="device"`` + fp16: device kernels compute in fp32 and their outputs are
  rounded to fp16 at kernel boundaries (fp16 matmuls are unusably slow on CPUs, and a
  fused kernel keeps its intermediates in wide accumulators anyway);
- ``numerics="exact"`` (simulator only): everything in fp32, to tell porting bugs from
  16-bit rounding. Memory and time are still those of the 16-bit device program.

Host-fallback segments always compute in fp32. Each step advances a simulated clock by
what `CostModel` prices it at; with the profiler on, each step also becomes a trace slice
on every device that runs it.

A program compiled for N devices (tensor parallelism) runs, by default, all N ranks in
this process: each rank holds its shard of the split weights and KV cache and computes its
part in the device numerics, and collectives combine the ranks' results in the device's
precision (`collectives.py`); ops on values every rank shares run once, and the matmuls and
attention run for all ranks in one host call (`rank_batching.py`). Under `torchrun`
with a process group of N processes, each process runs one rank on one device and the
collectives go through `torch.distributed`: the same artifact, the same outputs.

A runtime executes only programs that pass `validation.validate_program` (allowlisted ops,
typed arguments, consistent sizes), whether loaded from a file or handed over in memory.
Device memory is reserved, from sizes recomputed from the program, before any host tensor
is created. `run` is thread-safe: runtimes that share a timeline (and so device state, like
a KV cache) run one at a time, under the timeline's lock.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import host_math
from . import memory as device_memory
from .artifact import Artifact
from .collectives import InProcessCollectives, ProcessGroupCollectives
from .cost_model import CostModel, StepCost
from .executor import STACKED, BoundOp, generate
from .host_linear import PackedLinear, PackedWeights, packing_available
from .ops import collective_ops, resolve_op
from .profiler import DEVICE_SYNC, EXTERNAL_HDMA, HOST, NEURAL_ENGINE, TASK_DMA, Trace
from .session import Session, active_session
from .program import DEVICE_DTYPES, PROGRAM_DTYPES, Program, Ref, Step, StepKind, TensorShard, TensorSpec, decode_arg
from .rank_batching import Stacked
from .shapes import peak_unplaced_bytes
from .specs import get_npu_spec
from .topology import Ring
from .validation import validate_program


class Timeline:
    """The simulated clock of a set of devices and, when profiling, the trace of what ran.

    Runtimes sharing a timeline share device state too (weights, KV cache): `lock`
    serialises their runs, so two threads never interleave on that state or on the clock.
    """

    def __init__(self) -> None:
        self.clock_s = 0.0
        self.trace = Trace()
        self.lock = threading.RLock()


@dataclass(frozen=True)
class Numerics:
    """How the host emulates the device's float arithmetic."""

    compute_dtype: torch.dtype          # host dtype of device float tensors
    round_to: torch.dtype | None        # rounding applied at kernel boundaries

    @classmethod
    def for_program(cls, program: Program, bf16_route: str = "native") -> Numerics:
        """`bf16_route`: how the host computes bf16 device numerics (`host_math.py`)."""
        if program.numerics == "exact":
            return cls(torch.float32, None)
        if program.device_dtype == "bfloat16":
            return cls(torch.bfloat16, None) if bf16_route == "native" else cls(torch.float32, torch.bfloat16)
        return cls(torch.float32, torch.float16)

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        if self.round_to is not None:
            t = t.to(self.round_to)
        return t.to(self.compute_dtype)

    def round(self, t: torch.Tensor) -> torch.Tensor:
        if self.round_to is None or not t.is_floating_point() or t.dtype != self.compute_dtype:
            return t
        return t.to(self.round_to).to(self.compute_dtype)


@dataclass
class DeviceMemoryUsage:
    device: int
    npu: str
    weights_bytes: int
    buffers_bytes: int
    activations_bytes: int           # the arena, plus the peak of host-fallback values
    capacity_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.buffers_bytes + self.activations_bytes


@dataclass
class RuntimeStats:
    """Simulated device time, cumulated over runs, and device memory."""

    runs: int = 0
    last_run_s: float = 0.0
    total_s: float = 0.0
    device_kernels_s: float = 0.0        # kernels on the device (compute and Task DMA overlap inside)
    neural_engine_busy_s: float = 0.0
    task_dma_busy_s: float = 0.0
    external_hdma_s: float = 0.0
    host_fallback_s: float = 0.0
    collectives_s: float = 0.0           # Device Sync: all-reduce / all-gather between the devices
    overhead_s: float = 0.0
    memory: list[DeviceMemoryUsage] = field(default_factory=list)

    def add_step(self, kind: StepKind, cost: StepCost) -> float:
        """Account one step; returns how long it took."""
        if kind == StepKind.KERNEL:
            self.device_kernels_s += cost.total_s
            self.neural_engine_busy_s += cost.compute_s
            self.task_dma_busy_s += cost.dma_s
        elif kind == StepKind.HOST:
            self.host_fallback_s += cost.total_s
        elif kind == StepKind.COLLECTIVE:
            self.collectives_s += cost.total_s
        else:
            self.external_hdma_s += cost.total_s
        return cost.total_s

    def add_breakdown(self, other: RuntimeStats) -> None:
        self.device_kernels_s += other.device_kernels_s
        self.neural_engine_busy_s += other.neural_engine_busy_s
        self.task_dma_busy_s += other.task_dma_busy_s
        self.external_hdma_s += other.external_hdma_s
        self.host_fallback_s += other.host_fallback_s
        self.collectives_s += other.collectives_s
        self.overhead_s += other.overhead_s

    @property
    def total_time_s(self) -> float:
        """Time of the steps and overheads accounted here."""
        return (self.device_kernels_s + self.external_hdma_s + self.host_fallback_s + self.collectives_s
                + self.overhead_s)

    def __str__(self) -> str:
        gib = device_memory.format_gib
        lines = [
            f"runs: {self.runs}   simulated device time: {self.total_s * 1e3:.3f} ms total, "
            f"{self.last_run_s * 1e3:.3f} ms last run",
            f"  device kernels {self.device_kernels_s * 1e3:.3f} ms (neural engines busy "
            f"{self.neural_engine_busy_s * 1e3:.3f} ms, Task DMA busy {self.task_dma_busy_s * 1e3:.3f} ms)",
            f"  External HDMA {self.external_hdma_s * 1e3:.3f} ms, host fallback {self.host_fallback_s * 1e3:.3f} ms, "
            f"collectives {self.collectives_s * 1e3:.3f} ms, launch/sync overhead {self.overhead_s * 1e3:.3f} ms",
        ]
        for m in self.memory:
            lines.append(
                f"  npu{m.device} ({m.npu}): {gib(m.total_bytes)} of {gib(m.capacity_bytes)} "
                f"(weights {gib(m.weights_bytes)}, buffers {gib(m.buffers_bytes)}, activations {gib(m.activations_bytes)})"
            )
        return "\n".join(lines)


def _op_callable(target: str) -> Callable:
    """The function that executes allowlisted op `target` (the device kernels run their Python
    implementation directly, skipping the dispatcher)."""
    op = resolve_op(target)
    if target in collective_ops():
        return op  # collective steps are emitted as calls to the runtime's collectives, not this
    if target.startswith("rbln."):
        from .kernels import IMPLEMENTATIONS

        return IMPLEMENTATIONS[target]
    return op


def _to_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() and t.dtype != torch.float32 else t


def _host_math(program: Program) -> host_math.HostMath:
    """The host's route for the program's float math: for bf16 device numerics, `host_math.choose`
    given what the weights and buffers (every rank's shard of the split ones) take as fp32."""
    if program.numerics == "exact":
        return host_math.HostMath("fp32", "exact numerics compute in fp32")
    if program.device_dtype != "bfloat16":
        return host_math.HostMath("fp32", "fp16 device numerics compute in fp32 (fp16 matmuls are slow on CPUs)")
    fp32_bytes = 0
    for spec in program.weights + program.buffers:
        if spec.dtype in DEVICE_DTYPES:
            ranks = program.tensor_parallel_size if spec.name in program.tensor_shards else 1
            fp32_bytes += sum(4 * program.local_spec(spec, rank).numel for rank in range(ranks))
    return host_math.choose(fp32_bytes)


def cut_shard(tensor: torch.Tensor, shard: TensorShard, rank: int) -> torch.Tensor:
    """The part of a full weight / buffer that `rank` holds (its own copy)."""
    ranges = shard.ranges[rank]
    if len(ranges) == 1:
        start, length = ranges[0]
        return tensor.narrow(shard.dim, start, length).clone()
    return tensor.index_select(shard.dim, torch.tensor(shard.indices(rank), dtype=torch.long))


def distributed_rank(tensor_parallel_size: int) -> int | None:
    """This process's rank when it is one of `tensor_parallel_size` processes of an initialised
    torch.distributed group (torchrun); None when all ranks run here."""
    if tensor_parallel_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None
    world = torch.distributed.get_world_size()
    if world != tensor_parallel_size:
        raise ValueError(
            f"This program was compiled for tensor_parallel_size={tensor_parallel_size}, but torch.distributed "
            f"runs {world} processes: start torchrun with --nproc-per-node {tensor_parallel_size} (one process per "
            "device), or run without torchrun to run every device in this process."
        )
    return torch.distributed.get_rank()


class _SharedMemory:
    """Device allocations of weights / buffers shared by several runtimes, freed with the last one."""

    def __init__(self) -> None:
        self.allocation_ids: list[str] = []
        self.users = 0


def _release(activations_id: str, shared: _SharedMemory) -> None:
    device_memory.release(activations_id)
    shared.users -= 1
    if shared.users == 0:
        for allocation_id in shared.allocation_ids:
            device_memory.release(allocation_id)
        shared.allocation_ids.clear()


class Runtime:
    """Loads a `.rbln` program onto simulated devices and runs it.

    `Runtime(path_or_compiled, tensor_type="pt", device=None, activate_profiler=False)`.
    `share_state_with=other_runtime` makes this runtime use the other's weights and
    buffers of the same names (e.g. a decoder and its prefill sharing weights and KV cache):
    they are allocated once.
    """

    def __init__(
        self,
        compiled: str | os.PathLike | Artifact,
        tensor_type: str = "pt",
        device: int | list[int] | None = None,
        activate_profiler: bool = False,
        share_state_with: Runtime | None = None,
        name: str | None = None,
        keep_values: bool = False,
    ):
        if tensor_type not in ("pt", "np"):
            raise ValueError(f"tensor_type must be 'pt' or 'np', got {tensor_type!r}")
        if isinstance(compiled, (str, os.PathLike)):
            name = name or Path(compiled).name
            with device_memory.host_memory(f"reading {name}"):
                compiled = Artifact.load(compiled)
        if not isinstance(compiled, Artifact):
            raise TypeError(f"Runtime needs a path to a .rbln file or a compiled model, got {type(compiled).__name__}")
        if compiled.tensors is None:
            raise ValueError(
                "This program was compiled on the meta device (sizes and costs only, no weights): "
                "it cannot run. Compile a module with real weights."
            )
        self.program = program = compiled.program
        validate_program(program)  # also for in-memory programs: this is what executes
        self.name = name or "compiled"
        # Debugging: keep every intermediate value of a run (none freed), read by `last_values`.
        self.keep_values = keep_values
        self._last_env: list | None = None
        self.tensor_type = tensor_type
        self.spec = get_npu_spec(program.npu)
        if share_state_with is not None:  # shared weights and KV cache: one host dtype
            self.host_math = share_state_with.host_math
        else:
            self.host_math = _host_math(program)
        self.numerics = Numerics.for_program(program, self.host_math.route)
        self._device_float_bytes = PROGRAM_DTYPES[program.device_dtype].itemsize
        group = self._pick_devices(device, share_state_with)   # one device per rank
        # The ranks this process runs: all of them, or its own under torchrun.
        own_rank = distributed_rank(program.tensor_parallel_size)
        self.ranks = list(range(program.tensor_parallel_size)) if own_rank is None else [own_rank]
        self.device_group = group
        self.devices = [group[rank] for rank in self.ranks]
        machine = device_memory.devices()
        self.cost_model = CostModel(self.spec, ring=Ring.over([machine[d] for d in group]))
        self.profiler_active = activate_profiler
        # Runtimes sharing state run on the same devices one after another: one clock, one trace.
        self.timeline = share_state_with.timeline if share_state_with is not None else Timeline()
        self.stats = RuntimeStats()

        shared = share_state_with._rank_state if share_state_with is not None else [{} for _ in self.ranks]
        owned = [spec for spec in program.weights + program.buffers if spec.name not in shared[0]]
        for spec in owned:
            if spec.name not in program.zero_init and spec.name not in compiled.tensors:
                raise ValueError(
                    f"{self.name} does not store {spec.name!r}: its weights live in a sibling artifact. "
                    "Load that one first and pass its runtime as share_state_with="
                )
        # Reserve device memory first, from sizes recomputed from the tensor specs (each rank's
        # shard), so a program that does not fit fails with DeviceMemoryError before any host
        # tensor is created. What a run creates beyond the plan is covered too (sizes from shapes
        # checked against the ops at validation, `shapes.derive_shapes`): host-fallback values are
        # in no device plan, so they are reserved with the activations; intermediates inside fused
        # kernels stay on chip on the device, so they are not reserved, but the simulator creates
        # them on this host, so a program whose run would not fit in the device's DRAM is refused.
        unplaced = peak_unplaced_bytes(program, (StepKind.HOST,))
        scratch = peak_unplaced_bytes(program, (StepKind.KERNEL, StepKind.COLLECTIVE))
        buffer_names = {b.name for b in program.buffers}
        usage = []
        for rank, d in zip(self.ranks, self.devices):
            local = [program.resident_bytes(spec, rank) for spec in owned]
            buffers = sum(n for spec, n in zip(owned, local) if spec.name in buffer_names)
            usage.append(DeviceMemoryUsage(
                device=d, npu=self.spec.name, weights_bytes=sum(local) - buffers, buffers_bytes=buffers,
                activations_bytes=program.memory.activations_bytes[rank] + unplaced, capacity_bytes=self.spec.usable_dram_bytes,
            ))
        advice = ("Close other runtimes on the device, pick another device, or recompile with a smaller batch or "
                  "sequence length, for an NPU with more memory (npu='RBLN-CR03'), or split over more devices with "
                  "tensor_parallel_size.")
        for m in usage:
            if m.total_bytes + scratch > m.capacity_bytes:
                raise device_memory.DeviceMemoryError(
                    f"Runtime({self.name}) needs {device_memory.format_gib(m.total_bytes + scratch)} on npu{m.device} "
                    f"(of which {device_memory.format_gib(scratch)} for intermediates inside kernels), more than the "
                    f"{device_memory.format_gib(m.capacity_bytes)} a {self.spec.name} has. {advice}"
                )
        allocations = []
        try:
            if any(m.weights_bytes + m.buffers_bytes for m in usage):
                allocations.append(device_memory.allocate(
                    f"Runtime({self.name}) weights", {m.device: m.weights_bytes + m.buffers_bytes for m in usage},
                    advice, kind="weights",
                ))
            allocations.append(device_memory.allocate(
                f"Runtime({self.name})", {m.device: m.activations_bytes for m in usage}, advice
            ))
            self._stacked: dict[str, torch.Tensor] = dict(share_state_with._stacked) if share_state_with else {}
            with device_memory.host_memory(f"loading Runtime({self.name})"):
                self._rank_state = self._load_state(compiled, shared)
        except BaseException:
            for allocation in allocations:
                device_memory.release(allocation.id)
            raise
        self._state = self._rank_state[0]  # the first rank's (replicated tensors are the same on all)
        *state, activations = allocations
        # Weights and buffers stay allocated while any runtime sharing them is alive.
        self._shared_memory = share_state_with._shared_memory if share_state_with is not None else _SharedMemory()
        self._shared_memory.allocation_ids.extend(a.id for a in state)
        self._shared_memory.users += 1
        self._packed_weights = share_state_with._packed_weights if share_state_with is not None else PackedWeights()
        self._finalizer = weakref.finalize(self, _release, activations.id, self._shared_memory)
        self.stats.memory = usage

        self._prepare_steps()

    # ---- set-up ----------------------------------------------------------------------

    def _load_state(self, compiled: Artifact, shared: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """Device state of each rank this process runs: weights and buffers (its shard of the split
        ones) in the host dtype the numerics mode computes in. Replicated tensors are one tensor
        shared by the ranks; when several ranks run here, a split one is one rank-stacked tensor
        (`self._stacked`, [ranks, *shard shape]) whose slices are the ranks' shards, so a matmul
        or attention can run for all ranks in one call (`rank_batching.py`)."""
        program = self.program
        states: list[dict[str, torch.Tensor]] = [{} for _ in self.ranks]
        for spec in program.weights + program.buffers:
            shard = program.tensor_shards.get(spec.name)
            local = program.local_spec(spec, self.ranks[0])
            if spec.name in shared[0]:
                for i, rank in enumerate(self.ranks):
                    if tuple(shared[i][spec.name].shape) != local.shape:
                        raise ValueError(
                            f"cannot share {spec.name!r}: shape {list(shared[i][spec.name].shape)} in the other "
                            f"runtime, {list(local.shape)} here (were the two programs compiled from the same model?)"
                        )
                    states[i][spec.name] = shared[i][spec.name]
                continue
            if shard is None:
                states[0][spec.name] = self._device_copy(compiled, spec, self.ranks[0])
                for state in states[1:]:
                    state[spec.name] = states[0][spec.name]
            elif len(self.ranks) == 1:
                states[0][spec.name] = self._device_copy(compiled, spec, self.ranks[0])
            else:
                stacked = torch.stack([self._device_copy(compiled, spec, rank) for rank in self.ranks])
                self._stacked[spec.name] = stacked
                for i, state in enumerate(states):
                    state[spec.name] = stacked[i]
        return states

    def _device_copy(self, compiled: Artifact, spec: TensorSpec, rank: int) -> torch.Tensor:
        """Rank `rank`'s part of weight / buffer `spec` (its shard if split), in the host dtype the
        numerics mode computes in; zeros for a buffer that starts zeroed."""
        program = self.program
        if spec.name in program.zero_init:
            dtype = self.numerics.compute_dtype if spec.dtype in DEVICE_DTYPES else PROGRAM_DTYPES[spec.dtype]
            return torch.zeros(program.local_spec(spec, rank).shape, dtype=dtype)
        tensor = compiled.tensors[spec.name]
        shard = program.tensor_shards.get(spec.name)
        if shard is not None:
            tensor = cut_shard(tensor, shard, rank)
        return self.numerics.to_device(tensor) if tensor.is_floating_point() else tensor.clone()

    def _pick_devices(self, device, share_state_with) -> list[int]:
        machine = device_memory.devices()
        needed = self.program.tensor_parallel_size
        if share_state_with is not None and device is None:
            device = share_state_with.device_group
        if device is None:
            matching = [d.index for d in machine if d.spec.name == self.spec.name]
            if len(matching) < needed:
                present = sorted({d.spec.name for d in machine})
                raise ValueError(
                    f"This program was compiled for {needed} x {self.spec.name}, but the simulated machine has "
                    f"{len(matching)} such device(s) (it has: {', '.join(present)}). Set OPTIMUM_NPU_SYSTEM, "
                    f"e.g. OPTIMUM_NPU_SYSTEM={self.spec.name}x{max(1, needed // self.spec.devices_per_card)}."
                )
            return matching[:needed]
        indices = [device] if isinstance(device, int) else list(device)
        if len(indices) != needed or not all(isinstance(i, int) for i in indices):
            raise ValueError(f"device must be {needed} device index(es) for this program, got {device!r}")
        for i in indices:
            if not 0 <= i < len(machine):
                raise ValueError(f"device {i} does not exist: the simulated machine has devices 0..{len(machine) - 1}")
            if machine[i].spec.name != self.spec.name:
                raise ValueError(f"device {i} is a {machine[i].spec.name}, this program was compiled for {self.spec.name}")
        return indices

    def _prepare_steps(self) -> None:
        from .kernels import KERNEL_OPS

        program, compute = self.program, self.numerics.compute_dtype
        last_use: dict[str, int] = {}
        for i, step in enumerate(program.steps):
            for name in step.inputs:
                last_use[name] = i
        keep = {s.name for s in program.outputs} | set(self._state)
        frees: list[list[str]] = [[] for _ in program.steps]
        for name, i in last_use.items():
            if name not in keep and not self.keep_values:
                frees[i].append(name)
        pack = packing_available(compute)
        bound = []
        for step, to_free in zip(program.steps, frees):
            float_dtype = compute if step.kind == StepKind.KERNEL else torch.float32
            ops = []
            for call in step.ops:
                args = decode_arg(call.args, float_dtype)
                fn = _op_callable(call.target)
                if (pack and step.kind == StepKind.KERNEL and call.target == "aten.linear.default" and not call.kwargs
                        and len(args) >= 2 and type(args[1]) is Ref and args[1].name in self._state):
                    fn = PackedLinear(self._packed_weights)  # a weight of the program: packed once on the host
                ops.append(BoundOp(fn, call.target, args, {k: decode_arg(v, float_dtype) for k, v in call.kwargs.items()},
                                   call.outputs))
            bound.append((step, ops, to_free))
        rank_count = len(self.ranks)
        split = {name for name, tensor in self._state.items()
                 if any(states[name] is not tensor for states in self._rank_state[1:])}
        stacked = {name for name in split if name in self._stacked}
        ndims = {spec.name: len(spec.shape)
                 for spec in (*program.inputs, *program.weights, *program.buffers, *program.values.values())}
        self._executable = generate(bound, set(KERNEL_OPS), rounding=self.numerics.round_to is not None,
                                    num_ranks=rank_count, split_state=split, stacked_state=stacked, ndims=ndims)
        if rank_count == program.tensor_parallel_size:
            self._collectives = InProcessCollectives(self.numerics.round)
        else:
            self._collectives = ProcessGroupCollectives(self.numerics.round)
        slots = self._executable.slots
        self._env_template = [None] * len(slots)
        for i, states in enumerate(self._rank_state):
            for name, tensor in states.items():
                if (name, i) in slots:
                    self._env_template[slots[name, i]] = tensor
        for name in stacked:
            if (name, STACKED) in slots:
                self._env_template[slots[name, STACKED]] = Stacked(self._stacked[name],
                                                                  [state[name] for state in self._rank_state])
        self._input_slots = [slots.get((spec.name, 0)) for spec in program.inputs]

        # Steps with static costs take the same time every run: price and sum them once.
        self._static_cost = [None if s.dynamic_cost else self.cost_model.price(s) for s in program.steps]
        self._static_breakdown = RuntimeStats(overhead_s=self.cost_model.run_overhead())
        for step, cost in zip(program.steps, self._static_cost):
            if cost is not None:
                self._static_breakdown.add_step(step.kind, cost)

    def tensor(self, name: str, rank: int | None = None) -> torch.Tensor:
        """Weight or buffer `name` of the program as the device state holds it (host compute dtype):
        rank `rank`'s part of a tensor split over tensor-parallel ranks (`program.tensor_shards`
        says which part), by default the first rank this process runs. For reading: the device
        state itself is returned, not a copy."""
        rank = self.ranks[0] if rank is None else rank
        if rank not in self.ranks:
            raise ValueError(f"rank {rank} does not run in this process (it runs ranks {self.ranks})")
        state = self._rank_state[self.ranks.index(rank)]
        if name not in state:
            raise KeyError(f"{self.name} has no weight or buffer {name!r}")
        return state[name]

    # ---- running ---------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        return self.run(*args, **kwargs)

    def run(self, *args, **kwargs):
        """Run the program on inputs (by position or name). Safe to call from several threads:
        runs on one timeline are serialised (see `Timeline`)."""
        with self.timeline.lock:
            if not self._finalizer.alive:
                raise RuntimeError(f"Runtime({self.name!r}) was closed: its device memory is released. "
                                   "Create a new Runtime to run the program again.")
            # no_grad, not inference_mode: outputs are ordinary tensors that HF code may edit in place
            # (diffusers' Cosmos pipeline zeroes the padding of the text embeddings it gets back).
            with torch.no_grad(), device_memory.host_memory(f"running Runtime({self.name})"):
                return self._run(*args, **kwargs)

    def _run(self, *args, **kwargs):
        session = active_session()
        if session is None:
            return self._run_steps(None, args, kwargs)
        with session.lock:  # the host's code up to here is on the session's clock; the run is next
            session.begin_call()
            return self._run_steps(session, args, kwargs)

    def _run_steps(self, session: Session | None, args: tuple, kwargs: dict):
        inputs = dict(zip((s.name for s in self.program.inputs), self._bind_inputs(args, kwargs)))
        env = list(self._env_template)
        for slot, value in zip(self._input_slots, inputs.values()):
            if slot is not None:
                env[slot] = value
        dynamic: dict[int, list] = {}   # step index -> [flops, bytes] of its attention ops
        self._run_costs: dict = {}
        executable, numerics = self._executable, self.numerics
        executable.function(
            env, executable.ops, executable.constants, executable.kwargs, numerics.to_device, numerics.round,
            _to_fp32, lambda index, op, op_args: self._record_dynamic(dynamic, index, op, op_args),
            self._collectives.all_reduce, self._collectives.all_gather,
        )
        self._account_run(dynamic, session)
        if self.keep_values:
            self._last_env = env
        outputs = []
        for spec in self.program.outputs:  # in the dtype the module returned (exact mode computes in fp32)
            slot = executable.slots.get((spec.name, 0))
            value = env[slot] if slot is not None else inputs[spec.name]
            dtype = PROGRAM_DTYPES[spec.dtype]
            outputs.append(value if value.dtype == dtype else value.to(dtype))
        if self.tensor_type == "np":
            outputs = [o.float().numpy() if o.dtype == torch.bfloat16 else o.numpy() for o in outputs]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _record_dynamic(self, dynamic: dict, step_index: int, op: BoundOp, args: tuple) -> None:
        """Attention reads only the KV in use: price it from this run's positions."""
        from .kernels import attention_cost

        # Every layer of a run reads the same position inputs: price each distinct call once per
        # run (index tensors by identity, data tensors by shape, scalars by value).
        key = (op.target, *(
            (id(a) if not a.is_floating_point() else tuple(a.shape)) if isinstance(a, torch.Tensor) else a for a in args
        ))
        if key not in self._run_costs:
            self._run_costs[key] = attention_cost(op.target, args, float_bytes=self._device_float_bytes)
        flops, read, written = self._run_costs[key]
        entry = dynamic.setdefault(step_index, [0.0, 0])
        entry[0] += flops
        entry[1] += read + written

    def _account_run(self, dynamic: dict[int, list], session: Session | None) -> None:
        """Advance the simulated clock over one run; trace each step when profiling (this runtime's
        profiler, or a `session.profile` recording the whole process)."""
        timeline, stats, steps = self.timeline, self.stats, self.program.steps
        start = timeline.clock_s
        if self.profiler_active or session is not None:
            targets = [(timeline.trace, 0.0)] if self.profiler_active else []
            if session is not None:  # the run started at the session's clock
                targets.append((session.trace, session.clock_s - start))
            t = start
            for i, (step, cost) in enumerate(zip(steps, self._static_cost)):
                if cost is None:
                    cost = self.cost_model.price(step, *dynamic.get(i, (0.0, 0)))
                t += stats.add_step(step.kind, cost)
                for trace, offset in targets:
                    self._trace_step(trace, step, cost, t + offset)
            stats.overhead_s += self.cost_model.run_overhead()
            elapsed = t + self.cost_model.run_overhead() - start
            if session is not None:
                session.end_call(f"run {self.name}", elapsed)
        else:
            stats.add_breakdown(self._static_breakdown)
            elapsed = self._static_breakdown.total_time_s
            for i, (flops, nbytes) in dynamic.items():
                elapsed += stats.add_step(StepKind.KERNEL, self.cost_model.price(steps[i], flops, nbytes))
        timeline.clock_s = start + elapsed
        stats.runs += 1
        stats.last_run_s = elapsed
        stats.total_s += elapsed

    def _trace_step(self, trace: Trace, step: Step, cost: StepCost, end: float) -> None:
        """Add the slices of one step that ended at `end` to `trace`, on every device running it
        (the ranks run the same step on same-size shards at the same time)."""
        start = end - cost.total_s
        if step.kind == StepKind.HOST:
            trace.add(HOST, step.name, start, cost.total_s, None, flops=cost.flops, bytes=cost.bytes)
            return
        for device in self.devices:
            if step.kind == StepKind.KERNEL:
                trace.add(NEURAL_ENGINE, step.name, start, cost.compute_s, device, flops=cost.flops)
                trace.add(TASK_DMA, step.name, start, cost.dma_s, device, bytes=cost.bytes)
            elif step.kind == StepKind.COLLECTIVE:
                trace.add(DEVICE_SYNC, step.name, start, cost.total_s, device, bytes=cost.bytes,
                          ring=self.cost_model.ring.spans, devices=self.cost_model.ring.size)
            else:
                trace.add(EXTERNAL_HDMA, step.name, start, cost.total_s, device, bytes=cost.bytes,
                          direction=step.kind.value)

    def _bind_inputs(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        specs = self.program.inputs
        expected = ", ".join(s.describe() for s in specs)
        if len(args) > len(specs):
            raise TypeError(f"run() takes {len(specs)} input(s) ({expected}), got {len(args)}")
        values: dict[str, Any] = dict(zip([s.name for s in specs], args))
        for key, value in kwargs.items():
            if key not in {s.name for s in specs}:
                raise TypeError(f"run() got an unknown input {key!r}; inputs are: {expected}")
            if key in values:
                raise TypeError(f"run() got input {key!r} twice (by position and by name)")
            values[key] = value
        missing = [s.name for s in specs if s.name not in values]
        if missing:
            raise TypeError(f"run() is missing input(s) {missing}; inputs are: {expected}")
        bound = []
        for spec in specs:
            value = values[spec.name]
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(value)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"input {spec.name!r} must be a torch.Tensor or numpy array, got {type(value).__name__}")
            if tuple(value.shape) != spec.shape:
                raise ValueError(
                    f"input {spec.name!r} has shape {list(value.shape)}, but the program was compiled for "
                    f"{list(spec.shape)} (shapes are static: recompile for other shapes)"
                )
            if value.dtype != PROGRAM_DTYPES[spec.dtype]:
                raise TypeError(f"input {spec.name!r} has dtype {value.dtype}, the program expects {spec.dtype}")
            bound.append(value)
        return bound

    def last_values(self) -> dict[str, torch.Tensor]:
        """Every value of the last run by name (rank 0's), as the device held it; needs `keep_values=True`."""
        if not self.keep_values:
            raise ValueError("create the runtime with keep_values=True to read a run's intermediate values")
        if self._last_env is None:
            raise ValueError("no run yet")
        env = self._last_env
        return {name: env[slot] for (name, rank), slot in self._executable.slots.items()
                if rank == 0 and isinstance(env[slot], torch.Tensor)}

    # ---- profiling and lifetime ------------------------------------------------------

    def save_trace(self, path: str | os.PathLike = "trace.json") -> str:
        if not self.profiler_active:
            raise ValueError("The profiler is off: create the runtime with activate_profiler=True")
        return self.timeline.trace.save(path)

    def close(self) -> None:
        """Free the device memory this runtime holds; `run` refuses afterwards. Waits for a run in flight."""
        with self.timeline.lock:
            self._finalizer()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Runtime({self.name!r}, npu={self.spec.name}, devices={self.devices}, numerics={self.program.numerics}, "
                f"host_math={self.host_math.route})")
