"""The simulated machine's devices and their DRAM.

Which NPUs the machine has is configuration: `OPTIMUM_NPU_SYSTEM` lists cards, e.g.
"RBLN-CA25" (one ATOM-Max card = 4 devices, the default), "RBLN-CA25x8" (an ATOM-Max
server: 8 cards, 32 devices, 16 per NUMA node) or "RBLN-CA12x2,RBLN-CR03".

Device memory is shared between processes like real device memory: every runtime that
loads onto a device records its allocation in a small JSON file under the state folder
(`OPTIMUM_NPU_STATE_DIR`, default ~/.cache/optimum_npu/devices), so `optimum-npu smi` in
another shell sees it and a second process can run out of memory. Records of processes
that have exited are ignored.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .specs import NPUSpec, get_npu_spec

GiB = 1024**3


@dataclass(frozen=True)
class Device:
    index: int           # global device number, as rbln-smi numbers them
    spec: NPUSpec
    card: int
    numa_node: int

    @property
    def name(self) -> str:
        return f"npu{self.index}"


class DeviceMemoryError(RuntimeError):
    """A program does not fit in the DRAM of the device(s) it is placed on."""


def _system_description() -> str:
    return os.environ.get("OPTIMUM_NPU_SYSTEM", "RBLN-CA25")


def devices() -> list[Device]:
    """Every simulated device of this machine, in index order."""
    cards: list[NPUSpec] = []
    for item in _system_description().split(","):
        match = re.fullmatch(r"\s*([A-Za-z0-9-]+?)(?:x(\d+))?\s*", item)
        if not match:
            raise ValueError(
                f"OPTIMUM_NPU_SYSTEM={_system_description()!r}: each item must be NAME or NAMExCOUNT, e.g. 'RBLN-CA25x2'"
            )
        cards += [get_npu_spec(match.group(1))] * int(match.group(2) or 1)
    out = []
    for card_index, spec in enumerate(cards):
        # A server splits its cards between two NUMA nodes (ATOM-Max server: 16 devices per node).
        numa = 0 if len(cards) < 2 else card_index * 2 // len(cards)
        for _ in range(spec.devices_per_card):
            out.append(Device(index=len(out), spec=spec, card=card_index, numa_node=numa))
    return out


def state_dir() -> Path:
    path = Path(os.environ.get("OPTIMUM_NPU_STATE_DIR", Path.home() / ".cache" / "optimum_npu" / "devices"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Allocation:
    """What one runtime holds: bytes per device index."""

    id: str
    pid: int
    owner: str                   # e.g. "Runtime(prefill.rbln)"
    bytes_per_device: dict[int, int]
    kind: str = "activations"    # "weights": weights / buffers, possibly shared by several runtimes


def allocations() -> list[Allocation]:
    """The live allocations of every process on this machine."""
    out = []
    for path in sorted(state_dir().glob("alloc-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # being written or removed right now
        if not _pid_alive(data["pid"]):
            path.unlink(missing_ok=True)
            continue
        out.append(Allocation(data["id"], data["pid"], data["owner"], {int(k): v for k, v in data["bytes"].items()},
                              data.get("kind", "activations")))
    return out


def used_bytes(device_index: int) -> int:
    return sum(a.bytes_per_device.get(device_index, 0) for a in allocations())


@contextmanager
def _machine_lock():
    with open(state_dir() / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def format_gib(nbytes: float) -> str:
    """Bytes in the largest binary unit that keeps them readable (GiB for model-sized figures)."""
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= size / 100 or unit == "KiB" and nbytes >= 1024:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} B"


def allocate(owner: str, bytes_per_device: dict[int, int], advice: str = "", kind: str = "activations") -> Allocation:
    """Reserve DRAM on devices, or raise DeviceMemoryError saying what is missing and what to do."""
    all_devices = devices()
    with _machine_lock():
        for index, need in bytes_per_device.items():
            device = all_devices[index]
            in_use = used_bytes(index)
            free = device.spec.usable_dram_bytes - in_use
            if need > free:
                holders = ", ".join(
                    f"{a.owner} (pid {a.pid}, {format_gib(a.bytes_per_device[index])})"
                    for a in allocations()
                    if index in a.bytes_per_device
                )
                raise DeviceMemoryError(
                    f"{owner} needs {format_gib(need)} on {device.name} ({device.spec.name}), which has "
                    f"{format_gib(device.spec.usable_dram_bytes)} usable and {format_gib(free)} free"
                    + (f" ({format_gib(in_use)} held by {holders})" if in_use else "")
                    + ". "
                    + (advice or "Release other runtimes on this device or pick another device.")
                )
        allocation = Allocation(f"{os.getpid()}-{uuid.uuid4().hex[:8]}", os.getpid(), owner, dict(bytes_per_device), kind)
        path = state_dir() / f"alloc-{allocation.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"id": allocation.id, "pid": allocation.pid, "owner": owner, "bytes": bytes_per_device,
                        "kind": kind})
        )
        os.replace(tmp, path)
    return allocation


def release(allocation_id: str) -> None:
    (state_dir() / f"alloc-{allocation_id}.json").unlink(missing_ok=True)
