"""The simulated device behind the eager `rbln` torch device: its numerics, its DRAM, its clock.

`eager.py` turns torch's dispatcher calls into calls here; this file knows nothing of the
dispatcher. One `EagerDevice` stands for one device of the simulated machine:

- numerics: float tensors are held in the device's 16-bit type (bf16 natively; fp16 as fp32
  values rounded to fp16 after every op, as the runtime emulates it), or fp32 in
  `numerics="exact"`; a tensor keeps the dtype the user asked for, its values are the device's.
- memory: every tensor's bytes (16-bit floats) count against the device's usable DRAM. The
  shared allocation registry (`sim_device.memory`, what `optimum-npu smi` and other processes
  see) holds this device's reservation, grown in chunks so that a small tensor does not write
  a registry file; a tensor that does not fit raises `DeviceMemoryError` before any host memory
  is taken.
- time: each op is priced by the device's `CostModel` (a kernel, an External HDMA copy, or a
  host fallback with its copies), on a clock of its own, traced when profiling.
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..sim_device import memory as device_memory
from ..sim_device.cost_model import CostModel, StepCost
from ..sim_device.profiler import EXTERNAL_HDMA, HOST, NEURAL_ENGINE, TASK_DMA, Trace
from ..sim_device.program import NUMERICS, StepKind
from ..sim_device.runtime import RuntimeStats
from ..sim_device.session import active_session
from ..sim_device.specs import DEFAULT_NPU, get_npu_spec

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
RESERVATION_CHUNK = 64 * 1024**2  # bytes the registry reservation grows by, at least


@dataclass(frozen=True)
class EagerSettings:
    npu: str = DEFAULT_NPU
    dtype: str = "bfloat16"
    numerics: str = "device"
    device: int = 0                 # which device of the simulated machine "rbln" is
    activate_profiler: bool = False

    def checked(self) -> EagerSettings:
        get_npu_spec(self.npu)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(map(repr, DTYPES))}, got {self.dtype!r}")
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {self.numerics!r}")
        machine = device_memory.devices()
        if isinstance(self.device, bool) or not isinstance(self.device, int) or not 0 <= self.device < len(machine):
            raise ValueError(f"device must be a device index 0..{len(machine) - 1}, got {self.device!r}")
        if machine[self.device].spec.name != get_npu_spec(self.npu).name:
            raise ValueError(f"device {self.device} is a {machine[self.device].spec.name}, not a {self.npu}: "
                             "pass npu= of that device or another device=")
        return self


class EagerDevice:
    def __init__(self, settings: EagerSettings):
        self.settings = settings.checked()
        self.spec = get_npu_spec(settings.npu)
        self.cost_model = CostModel(self.spec)
        if settings.numerics == "exact":
            self.compute_dtype, self.round_to = torch.float32, None
        elif settings.dtype == "bfloat16":
            self.compute_dtype, self.round_to = torch.bfloat16, None
        else:  # fp16 matmuls are unusably slow on CPUs: fp32, rounded to fp16 after each op
            self.compute_dtype, self.round_to = torch.float32, torch.float16
        self.float_bytes = DTYPES[settings.dtype].itemsize
        self.lock = threading.RLock()
        self.bytes_in_use = 0
        self.peak_bytes = 0
        self._reserved = 0
        self._reservations: list[str] = []
        self.clock_s = 0.0
        self.stats = RuntimeStats()
        self.trace = Trace()
        self.ops_run = 0
        self.op_counts: Counter = Counter()   # (aten op, "device" / "host") -> calls
        self._session = None   # (session trace, its clock minus ours) during a call a session records

    # ---- numerics --------------------------------------------------------------------

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor as the device holds it (a new tensor)."""
        if not t.is_floating_point():
            return t.clone()
        if self.round_to is not None:
            t = t.to(self.round_to)
        return t.to(self.compute_dtype, copy=True)

    def round(self, t: torch.Tensor) -> torch.Tensor:
        if self.round_to is None or not t.is_floating_point():
            return t
        return t.to(self.round_to).to(t.dtype)

    def storage_bytes(self, numel: int, dtype: torch.dtype) -> int:
        return numel * (self.float_bytes if dtype.is_floating_point else dtype.itemsize)

    # ---- memory ----------------------------------------------------------------------

    def allocate(self, nbytes: int, what: str) -> None:
        with self.lock:
            need = self.bytes_in_use + nbytes
            if need > self._reserved:
                grow = max(need - self._reserved, RESERVATION_CHUNK)
                grow = min(grow, max(need - self._reserved, self.spec.usable_dram_bytes - self._reserved))
                try:
                    allocation = device_memory.allocate(
                        f"rbln eager device ({what})", {self.settings.device: grow},
                        f"Free rbln tensors (del, or .cpu() and drop the device copy), or close runtimes on "
                        f"npu{self.settings.device}; this process holds {device_memory.format_gib(self.bytes_in_use)} "
                        "in eager tensors.", kind="activations",
                    )
                except device_memory.DeviceMemoryError as e:
                    raise device_memory.DeviceMemoryError(
                        f"out of device memory allocating {what} ({device_memory.format_gib(nbytes)}): {e}") from None
                self._reservations.append(allocation.id)
                self._reserved += grow
            self.bytes_in_use = need
            self.peak_bytes = max(self.peak_bytes, need)

    def release(self, nbytes: int) -> None:
        with self.lock:
            self.bytes_in_use -= nbytes
            if self.bytes_in_use == 0:  # nothing left: give the reservation back to the machine
                self.close()

    def close(self) -> None:
        with self.lock:
            for allocation_id in self._reservations:
                device_memory.release(allocation_id)
            self._reservations.clear()
            self._reserved = 0

    # ---- time ------------------------------------------------------------------------

    @contextmanager
    def call(self, name: str):
        """One call into the device from the host (an op): on the timeline of a recording
        `session.profile` too, if there is one. Calls made inside a call are part of it."""
        session = active_session()
        if session is None or self._session is not None:
            yield
            return
        with session.lock:
            session.begin_call()
            start = self.clock_s
            self._session = (session.trace, session.clock_s - start)
            try:
                yield
            finally:
                self._session = None
                session.end_call(name, self.clock_s - start)

    def _advance(self, kind: StepKind, name: str, cost: StepCost, **args) -> None:
        start = self.clock_s
        self.clock_s += self.stats.add_step(kind, cost)
        self.stats.total_s += cost.total_s
        targets = [(self.trace, 0.0)] if self.settings.activate_profiler else []
        if self._session is not None:
            targets.append(self._session)
        device = self.settings.device
        for trace, offset in targets:
            at = start + offset
            if kind == StepKind.KERNEL:
                trace.add(NEURAL_ENGINE, name, at, cost.compute_s, device, flops=cost.flops)
                trace.add(TASK_DMA, name, at, cost.dma_s, device, bytes=cost.bytes)
            elif kind == StepKind.HOST:
                trace.add(HOST, name, at, cost.total_s, None, flops=cost.flops, **args)
            else:
                trace.add(EXTERNAL_HDMA, name, at, cost.total_s, device, bytes=cost.bytes, direction=kind.value)

    def kernel(self, name: str, flops: float, vector_flops: float, nbytes: int, rows: int) -> None:
        """One op run as a kernel of its own (one tiny program: its launch and sync included)."""
        with self.lock:
            cost = self.cost_model.kernel(flops, vector_flops, nbytes, rows)
            cost = StepCost(cost.total_s + self.cost_model.run_overhead(), cost.compute_s, cost.dma_s,
                            flops=cost.flops, bytes=cost.bytes)
            self.ops_run += 1
            self.stats.runs += 1
            self._advance(StepKind.KERNEL, name, cost)

    def copy(self, name: str, nbytes: int, to_device: bool) -> None:
        with self.lock:
            self._advance(StepKind.H2D if to_device else StepKind.D2H, name, self.cost_model.hdma(nbytes))

    def host_op(self, name: str, flops: float, bytes_in: int, bytes_out: int) -> None:
        """An op the device does not run: its inputs come back, it runs on the host, its outputs go over."""
        with self.lock:
            if bytes_in:
                self.copy(f"{name} (inputs to host)", bytes_in, to_device=False)
            self._advance(StepKind.HOST, name, self.cost_model.host(flops, bytes_in + bytes_out), fallback=True)
            if bytes_out:
                self.copy(f"{name} (outputs to device)", bytes_out, to_device=True)

    def memory_summary(self) -> str:
        gib = device_memory.format_gib
        return (f"npu{self.settings.device} ({self.spec.name}) eager tensors: {gib(self.bytes_in_use)} in use, "
                f"peak {gib(self.peak_bytes)} of {gib(self.spec.usable_dram_bytes)}")
