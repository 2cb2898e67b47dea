"""What a run cost: simulated time per track, device memory per device, and how both print.

`format_bytes` is the one byte formatter of the package (error messages, `optimum-npu smi`,
the stats of runtimes and models); `memory_summary` is the one "npu0 1.20 GiB, ..." line
that model and pipeline statistics print.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .program import StepKind
from .specs import GiB

if TYPE_CHECKING:
    from .cost_model import StepCost


def format_bytes(nbytes: float) -> str:
    """Bytes in the largest binary unit that keeps them readable (GiB for model-sized figures)."""
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= size / 100 or unit == "KiB" and nbytes >= 1024:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} B"


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


def memory_summary(usages: list[DeviceMemoryUsage]) -> str:
    """Device memory in use, one 'npuN SIZE' per device."""
    return ", ".join(f"npu{m.device} {format_bytes(m.total_bytes)}" for m in usages)


def sum_memory(usages) -> list[DeviceMemoryUsage]:
    """`DeviceMemoryUsage`s summed per device, by device id (a model's runtimes, a model and its sub-models)."""
    per_device: dict[int, DeviceMemoryUsage] = {}
    for m in usages:
        total = per_device.setdefault(m.device, DeviceMemoryUsage(m.device, m.npu, 0, 0, 0, m.capacity_bytes))
        total.weights_bytes += m.weights_bytes
        total.buffers_bytes += m.buffers_bytes
        total.activations_bytes += m.activations_bytes
    return [per_device[d] for d in sorted(per_device)]


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
        size = format_bytes
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
                f"  npu{m.device} ({m.npu}): {size(m.total_bytes)} of {size(m.capacity_bytes)} "
                f"(weights {size(m.weights_bytes)}, buffers {size(m.buffers_bytes)}, activations {size(m.activations_bytes)})"
            )
        return "\n".join(lines)
