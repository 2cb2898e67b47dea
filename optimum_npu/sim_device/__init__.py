"""The simulated NPU: hardware presets, device memory, runtime, cost model, profiler.

This layer imports nothing else of optimum_npu. Its modules, by job:

| job | modules |
|---|---|
| the program format | `program` (plain data), `ops` (the allowlist), `validation`, `shapes`, `artifact` (.rbln files) |
| the machine | `specs` (presets), `machine` (devices, cards, NUMA, links), `memory` (who holds DRAM), `smi` |
| loading | `device_state` (per-rank tensors, allocations, the clock), `host_math` (host numerics) |
| running | `runtime` (bind inputs, run, account), `executor` (emits a program's code), `rank_batching`, `kernels`, `collectives`, `host_linear` |
| time, power and reports | `cost_model`, `power`, `profiler`, `session`, `stats` |
"""

from .artifact import Artifact, ArtifactError
from .machine import Device, devices
from .memory import DeviceMemoryError, HostMemoryError
from .runtime import Runtime, RuntimeStats
from .specs import NPU_PRESETS, NPUSpec, get_npu_spec

__all__ = [
    "Artifact", "ArtifactError", "Device", "DeviceMemoryError", "HostMemoryError", "NPUSpec", "NPU_PRESETS", "Runtime",
    "RuntimeStats", "devices", "get_npu_spec",
]
