"""Memory planning: where each activation lives in the device's DRAM arena.

Weights and buffers are allocated once for the program's life. Activations (inputs
copied in, kernel outputs) live from the step that writes them to the last step that
reads them; values inside a fused kernel stay in SRAM and take no DRAM. Offsets are
assigned greedily, largest first, at the lowest offset that does not overlap a live
neighbour (the classic greedy-by-size planner); the arena's size is the peak.
"""

from __future__ import annotations

from ..sim_device.program import MemoryPlan, Step, TensorSpec, aligned


def plan_memory(
    steps: list[Step], values: dict[str, TensorSpec], weights: list[TensorSpec], buffers: list[TensorSpec]
) -> MemoryPlan:
    resident = {s.name for s in weights + buffers}
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, step in enumerate(steps):
        if step.kind in ("kernel", "h2d"):
            for name in step.outputs:
                if name not in resident:
                    first.setdefault(name, i)
                    last[name] = max(last.get(name, i), i)
        if step.kind in ("kernel", "d2h"):
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
    return MemoryPlan(
        weights_bytes=[sum(s.nbytes for s in weights)],
        buffers_bytes=[sum(s.nbytes for s in buffers)],
        activations_bytes=[arena],
        offsets=dict(sorted(offsets.items())),
    )
