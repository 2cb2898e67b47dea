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
attention run for all ranks in one host call (`rank_batching.py`; `Runtime(rank_batching=False)`
or OPTIMUM_NPU_RANK_BATCHING=0 runs every op once per rank instead, with the same bits). Under `torchrun`
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
import weakref
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import memory as device_memory
from .artifact import Artifact
from .collectives import InProcessCollectives, ProcessGroupCollectives
from .cost_model import CostModel, StepCost
from .device_state import DeviceState, Timeline, ranks_here
from .executor import STACKED, BoundOp, RunContext, emit_program
from .host_linear import PackedLinear, packing_available
from .host_math import Numerics, for_program as host_math_for
from .machine import Ring, devices as machine_devices, pick_devices
from .ops import collective_ops, resolve_op
from .profiler import DEVICE_SYNC, EXTERNAL_HDMA, HOST, NEURAL_ENGINE, TASK_DMA, Trace
from .session import Session, active_session
from .program import PROGRAM_DTYPES, Ref, Step, StepKind, decode_arg
from .rank_batching import Stacked, enabled as rank_batching_enabled
from .specs import get_npu_spec
from .stats import RuntimeStats
from .validation import validate_program


def _op_callable(target: str) -> Callable:
    """The function that executes allowlisted op `target` (the device kernels run their Python
    implementation directly, skipping the dispatcher)."""
    op = resolve_op(target)
    if target in collective_ops():
        return op  # collective steps are emitted as calls to the runtime's collectives, not this
    if target.startswith("rbln."):
        from .kernels import IMPLEMENTATIONS
        from .quant_kernels import IMPLEMENTATIONS as QUANT_IMPLEMENTATIONS

        return {**IMPLEMENTATIONS, **QUANT_IMPLEMENTATIONS}[target]
    return op


def _to_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() and t.dtype != torch.float32 else t


class _DynamicCosts:
    """What the attention ops of one run read: they read only the KV in use, so they are priced from
    the run's positions. (Not a method of the runtime: the run context holds `record`, and a bound
    method would make a cycle that keeps a dropped runtime, and its device memory, until the next
    garbage collection.)"""

    def __init__(self, float_bytes: int) -> None:
        self.float_bytes = float_bytes
        self.steps: dict[int, list] = {}   # step index -> [flops, bytes] of its attention ops
        self.costs: dict = {}

    def record(self, step_index: int, op: BoundOp, args: tuple) -> None:
        from .kernels import attention_cost
        from .moe import MOE_EXPERTS

        if op.target == MOE_EXPERTS:  # priced by the experts this layer's tokens pick: every call apart
            flops, read, written = attention_cost(op.target, args, float_bytes=self.float_bytes)
        else:
            # Every layer of a run reads the same position inputs: price each distinct call once per
            # run (index tensors by identity, data tensors by shape, scalars by value).
            key = (op.target, *(
                (id(a) if not a.is_floating_point() else tuple(a.shape)) if isinstance(a, torch.Tensor) else a
                for a in args
            ))
            if key not in self.costs:
                self.costs[key] = attention_cost(op.target, args, float_bytes=self.float_bytes)
            flops, read, written = self.costs[key]
        entry = self.steps.setdefault(step_index, [0.0, 0])
        entry[0] += flops
        entry[1] += read + written

    def start(self) -> None:
        """A run begins: no figures yet."""
        self.steps, self.costs = {}, {}


def _read_artifact(compiled: str | os.PathLike | Artifact, name: str | None) -> tuple[Artifact, str]:
    """The artifact to run (read from its path) and the runtime's name."""
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
    return compiled, name or "compiled"


class Runtime:
    """Loads a `.rbln` program onto simulated devices and runs it.

    `Runtime(path_or_compiled, tensor_type="pt", device=None, activate_profiler=False)`.
    `share_state_with=other_runtime` (or its `.state`, a `DeviceState`) makes this runtime use
    the other's weights and buffers of the same names, and its clock (e.g. a decoder and its
    prefill sharing weights and KV cache): they are allocated once.
    """

    def __init__(
        self,
        compiled: str | os.PathLike | Artifact,
        tensor_type: str = "pt",
        device: int | list[int] | None = None,
        activate_profiler: bool = False,
        share_state_with: Runtime | DeviceState | None = None,
        name: str | None = None,
        keep_values: bool = False,
        rank_batching: bool | None = None,
    ):
        if tensor_type not in ("pt", "np"):
            raise ValueError(f"tensor_type must be 'pt' or 'np', got {tensor_type!r}")
        compiled, self.name = _read_artifact(compiled, name)
        self.program = program = compiled.program
        validate_program(program)  # also for in-memory programs: this is what executes
        # Debugging: keep every intermediate value of a run (none freed), read by `last_values`.
        self.keep_values = keep_values
        self._last_env: list | None = None
        # All ranks' matmuls and attention in one host call (`rank_batching.py`); off: once per rank.
        self.rank_batching = rank_batching_enabled() if rank_batching is None else bool(rank_batching)
        self.tensor_type = tensor_type
        self.spec = get_npu_spec(program.npu)
        state = share_state_with.state if isinstance(share_state_with, Runtime) else share_state_with
        if state is not None and device is None:
            device = state.device_group
        group = pick_devices(self.spec, program.tensor_parallel_size, device)   # one device per rank
        self.ranks = ranks_here(program.tensor_parallel_size)
        if state is None:
            state = DeviceState(group, self.ranks, host_math_for(program))
        elif state.ranks != self.ranks:
            raise ValueError(f"cannot share device state: it holds ranks {state.ranks}, this program runs {self.ranks}")
        self.state = state
        self.host_math = state.host_math   # shared weights and KV cache: one host dtype
        self.numerics = Numerics.for_program(program, self.host_math.route)
        self._dynamic = _DynamicCosts(PROGRAM_DTYPES[program.device_dtype].itemsize)
        self.device_group = group
        self.devices = [group[rank] for rank in self.ranks]
        machine = machine_devices()
        self.cost_model = CostModel(self.spec, ring=Ring.over([machine[d] for d in group]))
        self.profiler_active = activate_profiler
        self.stats = RuntimeStats()
        self.stats.memory, activations = state.load(compiled, self.numerics, self.spec, self.devices, self.name)
        self._finalizer = weakref.finalize(self, state.leave, activations)
        # This program's weights and buffers, per rank (the state may hold more, of sibling programs).
        self._rank_state = state.tensors([s.name for s in program.weights + program.buffers])
        self._state = self._rank_state[0]  # the first rank's (replicated tensors are the same on all)
        self._prepare_steps()

    @property
    def timeline(self) -> Timeline:
        """The clock (and trace) of the devices, shared by the runtimes sharing this device state."""
        return self.state.timeline

    # ---- set-up ----------------------------------------------------------------------

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
                    fn = PackedLinear(self.state.packed_weights)  # a weight of the program: packed once on the host
                ops.append(BoundOp(fn, call.target, args, {k: decode_arg(v, float_dtype) for k, v in call.kwargs.items()},
                                   call.outputs))
            bound.append((step, ops, to_free))
        rank_count = len(self.ranks)
        split = {name for name, tensor in self._state.items()
                 if any(states[name] is not tensor for states in self._rank_state[1:])}
        stacked = {name for name in split if name in self.state.stacked} if self.rank_batching else set()
        ndims = {spec.name: len(spec.shape)
                 for spec in (*program.inputs, *program.weights, *program.buffers, *program.values.values())}
        self._executable = executable = emit_program(
            bound, set(KERNEL_OPS), rounding=self.numerics.round_to is not None, num_ranks=rank_count,
            split_state=split, stacked_state=stacked, ndims=ndims, rank_batching=self.rank_batching)
        if rank_count == program.tensor_parallel_size:
            collectives = InProcessCollectives(self.numerics.round)
        else:
            collectives = ProcessGroupCollectives(self.numerics.round)
        self._context = RunContext(
            ops=executable.ops, constants=executable.constants, kwargs=executable.kwargs,
            to_device=self.numerics.to_device, round=self.numerics.round, to_fp32=_to_fp32, price=self._dynamic.record,
            all_reduce=collectives.all_reduce, all_gather=collectives.all_gather)
        slots = executable.slots
        self._env_template = [None] * len(slots)
        for i, states in enumerate(self._rank_state):
            for name, tensor in states.items():
                if (name, i) in slots:
                    self._env_template[slots[name, i]] = tensor
        for name in stacked:
            if (name, STACKED) in slots:
                self._env_template[slots[name, STACKED]] = Stacked(self.state.stacked[name],
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
        executable = self._executable
        self._dynamic.start()
        try:
            executable.run(self._context, env)
        finally:
            executable.rows_cache.clear()
        self._account_run(self._dynamic.steps, session)
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
