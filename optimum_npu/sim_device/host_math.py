"""How the host computes the device's bf16 numerics: natively in bf16, or in fp32 on bf16 values.

Device numerics are a definition: 16-bit operands, fp32 accumulation, results rounded to 16
bits at kernel boundaries. The host may produce them two ways:

- ``native``: device tensors are bf16 on the host and every op runs torch's bf16 kernel (which
  accumulates in fp32 and rounds each op's result to bf16). Fast on CPUs with bf16 matmul
  instructions (AVX512-BF16, AMX), where oneDNN runs bf16 at or above fp32 speed.
- ``fp32``: device tensors are fp32 on the host holding bf16-exact values; ops compute in fp32
  and kernel outputs are rounded to bf16 at kernel boundaries (what the fp16 mode always does).
  On a CPU without bf16 instructions (AVX2) torch's bf16 matmuls convert on the fly: measured on
  an AVX2 EPYC, bf16 `F.linear` runs at ~19 GFLOP/s against 120-140 in fp32, and bf16 `a @ b`
  at 0.3. The price is host RAM: weights and buffers (KV cache) are held as fp32, twice their
  device size (device-memory accounting still counts them at 2 bytes).

The two agree to bf16 rounding, not bit for bit: accumulation order differs, and inside a fused
kernel the native route rounds every op's result where the fp32 route rounds only the kernel's
outputs. Within one route results are reproducible.

The route is chosen per CPU (`auto`: native where torch reports AVX512-BF16 or AMX, fp32
elsewhere), overridable with ``OPTIMUM_NPU_HOST_MATH=native|fp32|auto``; a program whose fp32
copy would take more than half the host RAM available stays native.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .program import DEVICE_DTYPES

if TYPE_CHECKING:
    from .program import Program

ENV = "OPTIMUM_NPU_HOST_MATH"
ROUTES = ("auto", "native", "fp32")


@dataclass(frozen=True)
class HostMath:
    """The route the host takes for bf16 device numerics, and why."""

    route: str            # "native" or "fp32"
    reason: str

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.route == "native" else torch.float32


def cpu_capability() -> str:
    """What the host CPU offers for this choice, e.g. 'AVX2, no AVX512-BF16 / AMX'."""
    capability = torch.backends.cpu.get_cpu_capability()
    fast = native_bf16_instructions()
    return f"{capability}, " + (", ".join(fast) if fast else "no AVX512-BF16 / AMX")


def native_bf16_instructions() -> list[str]:
    """The bf16 matmul instruction sets of this CPU that torch reports (private torch API: an
    older or newer torch without it counts as none)."""
    found = []
    for name, probe in (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported")):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                found.append(name)
        except RuntimeError:
            pass
    return found


def requested_route() -> str:
    """The value of OPTIMUM_NPU_HOST_MATH ('auto' when unset); ValueError for anything else."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in ROUTES:
        raise ValueError(f"{ENV} must be one of {', '.join(repr(r) for r in ROUTES)}; got {os.environ[ENV]!r}")
    return value


def available_ram_bytes() -> int:
    """Free host RAM now (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def choose(fp32_state_bytes: int = 0) -> HostMath:
    """The route for a program whose weights and buffers take `fp32_state_bytes` as fp32."""
    requested = requested_route()
    if requested == "native":
        return HostMath("native", f"{ENV}=native")
    if requested == "auto":
        fast = native_bf16_instructions()
        if fast:
            return HostMath("native", f"the CPU has {' / '.join(fast)}")
    why = f"{ENV}=fp32" if requested == "fp32" else "the CPU has no AVX512-BF16 / AMX"
    available = available_ram_bytes()
    if fp32_state_bytes and available and 2 * fp32_state_bytes > available:
        return HostMath("native", f"{why}, but fp32 copies of the weights ({fp32_state_bytes / 2**30:.1f} GiB) "
                                  f"would take over half the free host RAM ({available / 2**30:.1f} GiB)")
    return HostMath("fp32", why)


def for_program(program: Program) -> HostMath:
    """The host's route for the program's float math: for bf16 device numerics, `choose` given
    what the weights and buffers (every rank's shard of the split ones) take as fp32."""
    if program.numerics == "exact":
        return HostMath("fp32", "exact numerics compute in fp32")
    if program.device_dtype != "bfloat16":
        return HostMath("fp32", "fp16 device numerics compute in fp32 (fp16 matmuls are slow on CPUs)")
    fp32_bytes = 0
    for spec in program.weights + program.buffers:
        if spec.dtype in DEVICE_DTYPES:
            ranks = program.tensor_parallel_size if spec.name in program.tensor_shards else 1
            fp32_bytes += sum(4 * program.local_spec(spec, rank).numel for rank in range(ranks))
    return choose(fp32_bytes)


@dataclass(frozen=True)
class Numerics:
    """How the host emulates the device's float arithmetic."""

    compute_dtype: torch.dtype          # host dtype of device float tensors
    round_to: torch.dtype | None        # rounding applied at kernel boundaries

    @classmethod
    def for_program(cls, program: Program, bf16_route: str = "native") -> Numerics:
        """`bf16_route`: how the host computes bf16 device numerics (see `HostMath.route`)."""
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


def status() -> dict:
    """The CPU and the route a bf16 program loaded now would take (before any RAM check), as data."""
    try:
        chosen = choose()
        return {"cpu": cpu_capability(), "route": chosen.route, "reason": chosen.reason}
    except ValueError as error:
        return {"cpu": cpu_capability(), "route": None, "reason": str(error)}


def describe(data: dict | None = None) -> str:
    """One line for `optimum-npu smi` and the benchmarks: the CPU and the route bf16 programs take."""
    data = status() if data is None else data
    if data["route"] is None:
        return f"host CPU: {data['cpu']}; {data['reason']}"
    how = ("natively in bf16" if data["route"] == "native"
           else "in fp32 on bf16 values, rounded to bf16 at kernel boundaries")
    return f"host CPU: {data['cpu']}; bf16 device numerics computed {how} ({data['reason']})"
