"""The simulated NPU: hardware presets, device memory, runtime, cost model, profiler.

This layer imports nothing else of optimum_npu.
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
