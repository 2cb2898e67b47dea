"""Memory planning: where each activation lives in the device's DRAM arena.

Weights and buffers are allocated once for the program's life, each in whole DRAM pages (small
ones packed); under tensor parallelism each rank holds its shard of the split ones
(`tensor_shards`) and all of the others. Activations (inputs
copied in, kernel outputs) live from the step that writes them to the last step that
reads them; values inside a fused kernel stay in SRAM and take no DRAM. Offsets are
assigned greedily, largest first, at the lowest offset that does not overlap a live
neighbour (the classic greedy-by-size planner); the arena's size is the peak.
"""

from __future__ import annotations

from ..sim_device.program import (MemoryPlan, Step, StepKind, TensorShard, TensorSpec, aligned, host_only_weights,
                                  resident_bytes)
from ..sim_device.specs import DEFAULT_NPU, NPUSpec, get_npu_spec

WRITES_DRAM = (StepKind.KERNEL, StepKind.COLLECTIVE, StepKind.H2D)
READS_DRAM = (StepKind.KERNEL, StepKind.COLLECTIVE, StepKind.D2H)


def _local_bytes(specs: list[TensorSpec], shards: dict[str, TensorShard], rank: int, npu: NPUSpec) -> int:
    return sum(resident_bytes(spec, shards.get(spec.name), rank, npu) for spec in specs)


def plan_memory(
    steps: list[Step], values: dict[str, TensorSpec], weights: list[TensorSpec], buffers: list[TensorSpec],
    shards: dict[str, TensorShard] | None = None, tensor_parallel_size: int = 1, npu: str = DEFAULT_NPU,
) -> MemoryPlan:
    """`weights` / `buffers` in full shapes, each taking whole DRAM pages of `npu` from a page on
    (`NPUSpec.resident_bytes`), but for weights no step reads (they stay on the host,
    `Program.host_only_weights`); `values` as one device sees them."""
    spec = get_npu_spec(npu)
    shards = shards or {}
    on_host = host_only_weights(weights, steps)
    weights = [w for w in weights if w.name not in on_host]
    resident = {s.name for s in weights + buffers}
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, step in enumerate(steps):
        if step.kind in WRITES_DRAM:
            for name in step.outputs:
                if name not in resident:
                    first.setdefault(name, i)
                    last[name] = max(last.get(name, i), i)
        if step.kind in READS_DRAM:
            for name in step.inputs:
                if name in first:
                    last[name] = i
    placed: list[tuple[int, int, int, int]] = []   # (offset, size, first, last)
    offsets: dict[str, int] = {}
    for name in sorted(first, key=lambda n: (-values[n].nbytes, first[n], n)):
        size, lo, hi = aligned(values[name].nbytes), first[name], last[name]
        offset = 0
        for other_offset, other_size, other_lo, other_hi in sorted(placed):
            if other_hi < lo or other_lo > hi:
                continue  # not alive at the same time
            if offset + size <= other_offset:
                break
            offset = max(offset, other_offset + other_size)
        placed.append((offset, size, lo, hi))
        offsets[name] = offset
    arena = max((o + s for o, s, _, _ in placed), default=0)
    ranks = range(tensor_parallel_size)
    return MemoryPlan(
        weights_bytes=[_local_bytes(weights, shards, rank, spec) for rank in ranks],
        buffers_bytes=[_local_bytes(buffers, shards, rank, spec) for rank in ranks],
        activations_bytes=[arena] * tensor_parallel_size,  # every rank runs the same steps on same-size values
        offsets=dict(sorted(offsets.items())),
    )
