"""What a loaded program holds on its devices: per-rank weights and buffers, their device memory,
and the clock of the devices.

One `DeviceState` is shared by the runtimes of one model (a decoder's prefill and decode graphs
share weights and KV cache): a runtime created with `share_state_with=` uses the state's
tensors of the names its program has, and adds those it brings. Tensors of one name are one
tensor for all of them. Weights and buffers stay allocated while any runtime using the state is
alive; each runtime has its own activations allocation.

Device memory is reserved, from sizes recomputed from the program, before any host tensor is
created, so a program that does not fit fails with DeviceMemoryError first.
"""

from __future__ import annotations

import threading

import torch

from . import memory as device_memory
from .artifact import Artifact
from .host_linear import PackedWeights
from .host_math import HostMath, Numerics
from .profiler import Trace
from .program import DEVICE_DTYPES, PROGRAM_DTYPES, Program, StepKind, TensorShard, TensorSpec
from .shapes import peak_unplaced_bytes
from .specs import NPUSpec
from .stats import DeviceMemoryUsage, format_bytes

ADVICE = ("Close other runtimes on the device, pick another device, or recompile with a smaller batch or "
          "sequence length, for an NPU with more memory (npu='RBLN-CR03'), or split over more devices with "
          "tensor_parallel_size.")


class Timeline:
    """The simulated clock of a set of devices and, when profiling, the trace of what ran.

    Runtimes sharing a timeline share device state too (weights, KV cache): `lock`
    serialises their runs, so two threads never interleave on that state or on the clock.
    """

    def __init__(self) -> None:
        self.clock_s = 0.0
        self.trace = Trace()
        self.lock = threading.RLock()


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


def ranks_here(tensor_parallel_size: int) -> list[int]:
    """The ranks this process runs: all of them, or its own under torchrun."""
    own_rank = distributed_rank(tensor_parallel_size)
    return list(range(tensor_parallel_size)) if own_rank is None else [own_rank]


class DeviceState:
    """Weights and buffers of the ranks this process runs, their device memory, and one timeline.

    `per_rank[i]` maps names to rank `ranks[i]`'s tensor, in the host dtype the numerics mode
    computes in. Replicated tensors are one tensor shared by the ranks; when several ranks run
    here, a split one is a view of one rank-stacked tensor (`stacked[name]`, [ranks, *shard
    shape]) so that a matmul or attention can run for all ranks in one call (`rank_batching.py`).
    `packed_weights` holds host-packed copies of linear weights (`host_linear.py`).
    """

    def __init__(self, device_group: list[int], ranks: list[int], host_math: HostMath):
        self.device_group = device_group          # one device per rank of the program
        self.ranks = ranks
        self.host_math = host_math                # one host dtype for tensors runtimes share
        self.timeline = Timeline()
        self.per_rank: list[dict[str, torch.Tensor]] = [{} for _ in ranks]
        self.stacked: dict[str, torch.Tensor] = {}
        self.packed_weights = PackedWeights()
        self._weight_allocations: list[str] = []
        self._users = 0

    def tensors(self, names) -> list[dict[str, torch.Tensor]]:
        """Each rank's tensors of `names` (those the state holds)."""
        return [{n: state[n] for n in names if n in state} for state in self.per_rank]

    def load(self, compiled: Artifact, numerics: Numerics, spec: NPUSpec, devices: list[int],
             name: str) -> tuple[list[DeviceMemoryUsage], str]:
        """Reserve device memory for `compiled`'s program on `devices` (one per rank of `ranks`) and
        load the weights and buffers the state does not hold yet. Returns the memory per device and
        the id of the activations allocation, released by `leave`."""
        program, owner = compiled.program, f"Runtime({name})"
        held = self.per_rank[0]
        owned = [s for s in program.weights + program.buffers if s.name not in held]
        for tensor_spec in owned:
            if tensor_spec.name not in program.zero_init and tensor_spec.name not in compiled.tensors:
                raise ValueError(
                    f"{name} does not store {tensor_spec.name!r}: its weights live in a sibling artifact. "
                    "Load that one first and pass its runtime as share_state_with="
                )
        usage = memory_usage(program, owned, self.ranks, devices, spec)
        allocations = reserve(usage, program, spec, owner)
        try:
            with device_memory.host_memory(f"loading {owner}"):
                new, stacked = self._load_tensors(compiled, numerics)
        except BaseException:
            for allocation in allocations:
                device_memory.release(allocation.id)
            raise
        for state, loaded in zip(self.per_rank, new):
            state.update(loaded)
        self.stacked.update(stacked)
        *weights, activations = allocations
        self._weight_allocations.extend(a.id for a in weights)
        self._users += 1
        return usage, activations.id

    def leave(self, activations_id: str) -> None:
        """A runtime using this state is gone: free its activations, and the weights with the last one."""
        device_memory.release(activations_id)
        self._users -= 1
        if self._users == 0:
            for allocation_id in self._weight_allocations:
                device_memory.release(allocation_id)
            self._weight_allocations.clear()

    def _load_tensors(self, compiled: Artifact, numerics: Numerics):
        """The program's weights and buffers the state lacks, per rank, and the rank-stacked storage of
        the split ones; checks those it has against the program's shapes."""
        program = compiled.program
        held = self.per_rank
        states: list[dict[str, torch.Tensor]] = [{} for _ in self.ranks]
        stacked: dict[str, torch.Tensor] = {}
        for spec in program.weights + program.buffers:
            local = program.local_spec(spec, self.ranks[0])
            if spec.name in held[0]:
                for i in range(len(self.ranks)):
                    if tuple(held[i][spec.name].shape) != local.shape:
                        raise ValueError(
                            f"cannot share {spec.name!r}: shape {list(held[i][spec.name].shape)} in the other "
                            f"runtime, {list(local.shape)} here (were the two programs compiled from the same model?)"
                        )
                continue
            if spec.name not in program.tensor_shards:
                states[0][spec.name] = device_copy(compiled, spec, self.ranks[0], numerics)
                for state in states[1:]:
                    state[spec.name] = states[0][spec.name]
            elif len(self.ranks) == 1:
                states[0][spec.name] = device_copy(compiled, spec, self.ranks[0], numerics)
            else:
                stacked[spec.name] = torch.stack([device_copy(compiled, spec, rank, numerics) for rank in self.ranks])
                for i, state in enumerate(states):
                    state[spec.name] = stacked[spec.name][i]
        return states, stacked


def device_copy(compiled: Artifact, spec: TensorSpec, rank: int, numerics: Numerics) -> torch.Tensor:
    """Rank `rank`'s part of weight / buffer `spec` (its shard if split), in the host dtype the
    numerics mode computes in; zeros for a buffer that starts zeroed."""
    program = compiled.program
    if spec.name in program.zero_init:
        dtype = numerics.compute_dtype if spec.dtype in DEVICE_DTYPES else PROGRAM_DTYPES[spec.dtype]
        return torch.zeros(program.local_spec(spec, rank).shape, dtype=dtype)
    tensor = compiled.tensors[spec.name]
    shard = program.tensor_shards.get(spec.name)
    if shard is not None:
        tensor = cut_shard(tensor, shard, rank)
    return numerics.to_device(tensor) if tensor.is_floating_point() else tensor.clone()


def memory_usage(program: Program, owned: list[TensorSpec], ranks: list[int], devices: list[int],
                 spec: NPUSpec) -> list[DeviceMemoryUsage]:
    """Device memory of a runtime of `program` that loads the weights and buffers `owned`, per device.

    What a run creates beyond the plan is covered too (sizes from shapes checked against the ops
    at validation, `shapes.derive_shapes`): host-fallback values are in no device plan, so they
    count with the activations."""
    unplaced = peak_unplaced_bytes(program, (StepKind.HOST,))
    buffer_names = {b.name for b in program.buffers}
    usage = []
    for rank, d in zip(ranks, devices):
        local = [program.resident_bytes(s, rank) for s in owned]
        buffers = sum(n for s, n in zip(owned, local) if s.name in buffer_names)
        usage.append(DeviceMemoryUsage(
            device=d, npu=spec.name, weights_bytes=sum(local) - buffers, buffers_bytes=buffers,
            activations_bytes=program.memory.activations_bytes[rank] + unplaced, capacity_bytes=spec.usable_dram_bytes,
        ))
    return usage


def reserve(usage: list[DeviceMemoryUsage], program: Program, spec: NPUSpec,
            owner: str) -> list[device_memory.Allocation]:
    """Record `usage` in the allocation registry: the weights and buffers (if any), then the
    activations, last. Intermediates inside fused kernels stay on chip on the device, so they are
    not reserved, but the simulator creates them on this host: a program whose run would not fit in
    the device's DRAM is refused."""
    scratch = peak_unplaced_bytes(program, (StepKind.KERNEL, StepKind.COLLECTIVE))
    for m in usage:
        if m.total_bytes + scratch > m.capacity_bytes:
            raise device_memory.DeviceMemoryError(
                f"{owner} needs {format_bytes(m.total_bytes + scratch)} on npu{m.device} "
                f"(of which {format_bytes(scratch)} for intermediates inside kernels), more than the "
                f"{format_bytes(m.capacity_bytes)} a {spec.name} has. {ADVICE}"
            )
    allocations = []
    try:
        if any(m.weights_bytes + m.buffers_bytes for m in usage):
            allocations.append(device_memory.allocate(
                f"{owner} weights", {m.device: m.weights_bytes + m.buffers_bytes for m in usage}, ADVICE, kind="weights",
            ))
        allocations.append(device_memory.allocate(owner, {m.device: m.activations_bytes for m in usage}, ADVICE))
    except BaseException:
        for allocation in allocations:
            device_memory.release(allocation.id)
        raise
    return allocations
