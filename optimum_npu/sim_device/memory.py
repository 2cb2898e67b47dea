"""Who holds the simulated devices' DRAM: the allocation registry.

The devices themselves are the machine's (`machine.py`). Device memory is shared between
processes like real device memory: every runtime that loads onto a device records its
allocation in a small JSON file under the state folder (`OPTIMUM_NPU_STATE_DIR`, default
~/.cache/optimum_npu/devices), so `optimum-npu smi` in another shell sees it and a second
process can run out of memory.

The folder is shared and may be the user's, so its files are untrusted input:
- a record names its process by pid *and* start time; a record whose process has exited, or
  whose pid now belongs to a later process, holds nothing and is removed by the next allocation;
- a malformed record is ignored and reported (a warning here, a line in `optimum-npu smi`);
  `optimum-npu smi --reset` removes those named as we name records, never other files;
- checking free memory and writing a record happen under one lock, waited for at most
  OPTIMUM_NPU_LOCK_TIMEOUT seconds (default 30); the error names the process holding it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import stat
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .files import pid_alive
from .machine import MAX_DEVICES, devices
from .stats import format_bytes

# The name callers outside sim_device import (vllm/, torch_backend/): the one byte formatter.
format_gib = format_bytes


class DeviceMemoryError(RuntimeError):
    """A program does not fit in the DRAM of the device(s) it is placed on."""


def state_dir() -> Path:
    path = Path(os.environ.get("OPTIMUM_NPU_STATE_DIR", Path.home() / ".cache" / "optimum_npu" / "devices"))
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot use {path} as the device registry folder (OPTIMUM_NPU_STATE_DIR): "
                               f"{e.strerror}") from None
    return path


# ---- processes ----------------------------------------------------------------------


def process_start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux); None where it cannot be read.

    Together with the pid it names a process for good: a pid is reused once its process has exited,
    a (pid, start time) pair is not. It is field 22 ("starttime") of /proc/<pid>/stat, see proc(5):
    https://man7.org/linux/man-pages/man5/proc_pid_stat.5.html
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            line = f.read(4096)
    except OSError:
        return None  # no /proc (macOS), or the process is gone
    # Field 2 is the command name in parentheses, which may itself hold spaces and ')'.
    fields = line[line.rfind(b")") + 2:].split()
    try:
        return int(fields[22 - 3])  # the fields after ')' start at field 3
    except (IndexError, ValueError):
        return None


def _is_zombie(pid: int) -> bool:
    """Whether `pid` was killed (or exited) but not yet reaped by its parent: it holds no memory any more,
    though `kill(pid, 0)` still finds it. Field 3 ("state") of /proc/<pid>/stat, see proc(5)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            line = f.read(4096)
    except OSError:
        return False
    return line[line.rfind(b")") + 2:][:1] in (b"Z", b"X")


def _process_state(pid: int, start_time: int | None) -> str:
    """'alive', 'exited' (a zombie too: killed, not yet reaped), 'pid reused' (the pid now belongs to a
    process started later) or 'pid 1 without start time' (init, which a runtime of ours is only if its
    record says so with a start time: every record since start times were recorded has one)."""
    if not pid_alive(pid) or _is_zombie(pid):
        return "exited"
    if pid == 1 and start_time is None and os.getpid() != 1:
        return "pid 1 without start time"
    if start_time is not None:
        now = process_start_time(pid)
        if now is not None and now != start_time:
            return "pid reused"
    return "alive"  # where the start time cannot be read, a live pid is taken at its word


# ---- the allocation records ---------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    """What one runtime holds: bytes per device index."""

    id: str
    pid: int
    owner: str                   # e.g. "Runtime(prefill.rbln)"
    bytes_per_device: dict[int, int]
    kind: str = "activations"    # "weights": weights / buffers, possibly shared by several runtimes
    start_time: int | None = None  # of process `pid` (see process_start_time); None if not known


@dataclass(frozen=True)
class MalformedRecord:
    """A file named like an allocation record that is not a valid one: ignored, and shown by smi."""

    path: Path
    reason: str
    # A regular file named exactly as `allocate` names its records: `smi --reset` may remove it.
    # Other `alloc-*.json` files in the user's folder were not written by us and are left alone.
    ours: bool


@dataclass(frozen=True)
class DeadAllocation:
    allocation: Allocation
    path: Path
    why: str                     # "exited" or "pid reused"


@dataclass
class RegistryScan:
    """Every file of the state folder that looks like ours, sorted out (nothing is deleted)."""

    live: list[Allocation] = field(default_factory=list)
    dead: list[DeadAllocation] = field(default_factory=list)
    malformed: list[MalformedRecord] = field(default_factory=list)
    stale_tmp: list[Path] = field(default_factory=list)  # half-written records of exited processes


RECORD_NAME = re.compile(r"alloc-(?P<id>(?P<pid>[1-9]\d{0,9})-[0-9a-f]{8})\.json")
TMP_NAME = re.compile(r"alloc-(?P<pid>[1-9]\d{0,9})-[0-9a-f]{8}\.tmp")
ALLOCATION_KINDS = ("activations", "weights")
# Bounds of an honest record: far above any machine's devices and DRAM, below anything absurd.
MAX_RECORD_CHARS = 64 * 1024
MAX_PID = 2**31 - 1
MAX_DEVICE_INDEX = MAX_DEVICES - 1
MAX_RECORD_BYTES = 2**50     # 1 PiB on one device
MAX_OWNER_CHARS = 256
_RECORD_KEYS = {"id", "pid", "owner", "bytes", "kind", "start_time"}


def _is_int(value, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high  # not bool, not float


def _read_untrusted(path: Path) -> bytes:
    """A record file's bytes, read without trusting it: no symlinks, no FIFOs, bounded size."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = os.read(fd, MAX_RECORD_CHARS + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_RECORD_CHARS:
        raise ValueError(f"larger than {MAX_RECORD_CHARS} bytes")
    return data


def parse_record(path: Path) -> Allocation:
    """The allocation a record file describes; ValueError saying what is wrong with it.

    Records are untrusted input (any process, any user sharing the folder may write one):
    an allowlist of keys, each with its type and range.
    """
    try:
        raw = _read_untrusted(path)
    except OSError as e:
        raise ValueError("a symbolic link" if e.errno == errno.ELOOP else f"unreadable: {e.strerror}") from None
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ValueError("not JSON: nested too deeply") from None
    except ValueError as e:  # JSON, UTF-8, integers of too many digits
        raise ValueError(f"not JSON: {(str(e).splitlines() or [''])[0][:100]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    missing = sorted({"id", "pid", "owner", "bytes"} - data.keys())
    unknown = sorted(repr(k[:40]) for k in data.keys() - _RECORD_KEYS)
    if missing or unknown:
        raise ValueError("; ".join(filter(None, [missing and f"missing {', '.join(missing)}",
                                                 unknown and f"unknown key(s) {', '.join(unknown)}"])))
    pid, owner, kind, start_time = data["pid"], data["owner"], data.get("kind", "activations"), data.get("start_time")
    if not _is_int(pid, 1, MAX_PID):
        raise ValueError(f"pid must be a positive int, got {str(pid)[:40]!r}")
    if not (isinstance(data["id"], str) and RECORD_NAME.fullmatch(f"alloc-{data['id']}.json")
            and data["id"].startswith(f"{pid}-")):
        raise ValueError(f"id must be '<pid>-<8 hex digits>', got {str(data['id'])[:40]!r}")
    if path.name != f"alloc-{data['id']}.json":
        raise ValueError(f"its id {data['id']!r} does not match its file name")
    if not (isinstance(owner, str) and 0 < len(owner) <= MAX_OWNER_CHARS and owner.isprintable()):
        raise ValueError(f"owner must be printable text of at most {MAX_OWNER_CHARS} characters")
    if kind not in ALLOCATION_KINDS:
        raise ValueError(f"kind must be one of {', '.join(ALLOCATION_KINDS)}, got {str(kind)[:40]!r}")
    if start_time is not None and not _is_int(start_time, 0, 2**63 - 1):
        raise ValueError(f"start_time must be a non-negative int, got {str(start_time)[:40]!r}")
    nbytes = data["bytes"]
    if not isinstance(nbytes, dict) or not nbytes or len(nbytes) > MAX_DEVICE_INDEX + 1:
        raise ValueError("bytes must be an object {device index: bytes} with at least one device")
    bytes_per_device = {}
    for key, value in nbytes.items():
        if not (re.fullmatch(r"0|[1-9]\d{0,3}", key) and int(key) <= MAX_DEVICE_INDEX):
            raise ValueError(f"device index must be an int from 0 to {MAX_DEVICE_INDEX}, got {key[:40]!r}")
        if not _is_int(value, 0, MAX_RECORD_BYTES):
            raise ValueError(f"bytes on device {key} must be an int from 0 to 2**50, got {str(value)[:40]!r}")
        bytes_per_device[int(key)] = value
    return Allocation(data["id"], pid, owner, bytes_per_device, kind, start_time)


def scan_registry() -> RegistryScan:
    """Read every record of the state folder and sort them out; deletes nothing."""
    scan = RegistryScan()
    folder = state_dir()
    for path in sorted(folder.glob("alloc-*.json")):
        try:
            allocation = parse_record(path)
        except ValueError as e:
            if path.exists() or path.is_symlink():  # else it was released while we read it
                ours = RECORD_NAME.fullmatch(path.name) is not None and path.is_file() and not path.is_symlink()
                scan.malformed.append(MalformedRecord(path, str(e), ours))
            continue
        why = _process_state(allocation.pid, allocation.start_time)
        if why == "alive":
            scan.live.append(allocation)
        else:
            scan.dead.append(DeadAllocation(allocation, path, why))
    for path in sorted(folder.glob("alloc-*.tmp")):
        match = TMP_NAME.fullmatch(path.name)
        if match and path.is_file() and not path.is_symlink() and not pid_alive(int(match["pid"])):
            scan.stale_tmp.append(path)
    return scan


def describe_malformed(records: list[MalformedRecord]) -> str:
    return "; ".join(f"{r.path.name} ({r.reason})" for r in records)


def allocations() -> list[Allocation]:
    """The live allocations of every process on this machine.

    Records of processes that have exited (or whose pid now names another process) are ours
    and are removed; malformed records are skipped (see `scan_registry`, `smi`).
    """
    scan = scan_registry()
    for dead in scan.dead:
        dead.path.unlink(missing_ok=True)
    return scan.live


def used_bytes(device_index: int) -> int:
    return sum(a.bytes_per_device.get(device_index, 0) for a in allocations())


# ---- the machine-wide lock ----------------------------------------------------------

LOCK_FILE = "optimum-npu.lock"
LOCK_TIMEOUT_ENV = "OPTIMUM_NPU_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 30.0  # seconds; allocating takes milliseconds, so a holder this slow is stuck


class HostMemoryError(MemoryError):
    """The host could not allocate what the simulation needs (the device memory fits; this process's limit does not)."""


@contextmanager
def host_memory(what: str):
    """Turn the host allocator's failure while doing `what` (torch: a RuntimeError "can't allocate memory";
    Python: MemoryError) into a HostMemoryError saying what ran out and what to do; other errors pass."""
    try:
        yield
    except HostMemoryError:
        raise
    except (MemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "can't allocate memory" not in str(err):
            raise
        asked = re.search(r"allocate (\d+) bytes", str(err))
        size = f" ({format_bytes(int(asked.group(1)))} more asked)" if asked else ""
        raise HostMemoryError(
            f"the host ran out of memory {what}{size}: the simulated device fits this configuration, but this "
            "process's memory limit (ulimit -v, a container or cgroup limit) is below what the simulation holds on "
            "the host; raise the limit, or use a smaller configuration (batch, sequence length, model).") from None


class RegistryLockTimeout(TimeoutError):
    """Another process has held the device registry's lock for longer than the timeout."""


def lock_timeout() -> float:
    """Seconds to wait for the registry lock: OPTIMUM_NPU_LOCK_TIMEOUT, default 30 ('inf': no limit)."""
    text = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_LOCK_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:  # also refuses nan
        raise ValueError(f"{LOCK_TIMEOUT_ENV}={text!r}: must be a number of seconds >= 0, or 'inf' to wait forever")
    return seconds


def _lock_holder(path: Path) -> str:
    """Who holds the lock, from what the holder wrote into the lock file (untrusted, like records)."""
    try:
        holder = json.loads(_read_untrusted(path))
        pid, purpose, since = holder["pid"], holder["purpose"], holder["since"]
    except (OSError, ValueError, RecursionError, TypeError, KeyError):
        return "a process that did not say who it is"
    if not (_is_int(pid, 1, MAX_PID) and isinstance(purpose, str) and type(since) in (int, float)):
        return "a process that did not say who it is"
    purpose = "".join(c if c.isprintable() else "?" for c in purpose[:MAX_OWNER_CHARS])
    return f"pid {pid} ({purpose}), for {max(0.0, time.time() - since):.0f} s"


@contextmanager
def _machine_lock(purpose: str):
    """Hold the registry's lock while checking free memory and writing a record.

    flock(2) has no timeout, so it is polled; the holder writes its pid and purpose into the
    lock file, so that a process that gives up can name it. The kernel releases the lock of a
    process that dies, so only a live, stuck holder can make others time out.
    """
    timeout = lock_timeout()
    path = state_dir() / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        deadline, pause = time.monotonic() + timeout, 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RegistryLockTimeout(
                        f"Waited {timeout:g} s for the device registry lock {path}, held by {_lock_holder(path)}. "
                        f"If that process is stuck, stop it; or set {LOCK_TIMEOUT_ENV} to wait longer."
                    ) from None
                time.sleep(min(pause, left))
                pause = min(2 * pause, 0.2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "purpose": purpose, "since": time.time()}).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ---- allocating, releasing, resetting -----------------------------------------------


def _warn_malformed(scan: RegistryScan) -> None:
    if scan.malformed:
        warnings.warn(
            f"ignored {len(scan.malformed)} malformed device-memory record(s) in {state_dir()}: "
            f"{describe_malformed(scan.malformed)}. `optimum-npu smi` lists them; `optimum-npu smi --reset` "
            "removes those named as optimum-npu names its records.",
            RuntimeWarning,
            stacklevel=3,
        )


def allocate(owner: str, bytes_per_device: dict[int, int], advice: str = "", kind: str = "activations") -> Allocation:
    """Reserve DRAM on devices, or raise DeviceMemoryError saying what is missing and what to do."""
    if kind not in ALLOCATION_KINDS:
        raise ValueError(f"kind must be one of {', '.join(ALLOCATION_KINDS)}, got {kind!r}")
    all_devices = devices()
    # The record must pass our own parser: a runtime's name may hold any character of a file name.
    owner = "".join(c if c.isprintable() else "?" for c in owner)[:MAX_OWNER_CHARS] or "?"
    with _machine_lock(f"allocating {owner}"):
        scan = scan_registry()
        _warn_malformed(scan)
        for dead in scan.dead:
            dead.path.unlink(missing_ok=True)
        for index, need in bytes_per_device.items():
            if not 0 <= index < len(all_devices):
                raise ValueError(f"device {index} does not exist: this machine has npu0..npu{len(all_devices) - 1}")
            device = all_devices[index]
            in_use = sum(a.bytes_per_device.get(index, 0) for a in scan.live)
            free = device.spec.usable_dram_bytes - in_use
            if need > free:
                holders = ", ".join(
                    f"{a.owner} (pid {a.pid}, {format_bytes(a.bytes_per_device[index])})"
                    for a in scan.live
                    if index in a.bytes_per_device
                )
                raise DeviceMemoryError(
                    f"{owner} needs {format_bytes(need)} on {device.name} ({device.spec.name}), which has "
                    f"{format_bytes(device.spec.usable_dram_bytes)} usable and {format_bytes(free)} free"
                    + (f" ({format_bytes(in_use)} held by {holders})" if in_use else "")
                    + ". "
                    + (advice or "Release other runtimes on this device or pick another device.")
                )
        pid = os.getpid()
        allocation = Allocation(f"{pid}-{uuid.uuid4().hex[:8]}", pid, owner, dict(bytes_per_device), kind,
                                process_start_time(pid))
        path = state_dir() / f"alloc-{allocation.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"id": allocation.id, "pid": pid, "owner": owner, "bytes": bytes_per_device, "kind": kind,
                        "start_time": allocation.start_time})
        )
        os.replace(tmp, path)
    return allocation


def release(allocation_id: str) -> None:
    if RECORD_NAME.fullmatch(f"alloc-{allocation_id}.json"):  # only ever a record of ours
        (state_dir() / f"alloc-{allocation_id}.json").unlink(missing_ok=True)


def reset_registry(dry_run: bool = False) -> RegistryScan:
    """Remove what no live process holds: records of exited processes, malformed records named as
    ours, our half-written records. Records of live processes and files we did not write stay.
    Returns the scan it acted on (with `dry_run`, what it would remove)."""
    with _machine_lock("optimum-npu smi --reset"):
        scan = scan_registry()
        if not dry_run:
            for path in [d.path for d in scan.dead] + [m.path for m in scan.malformed if m.ours] + scan.stale_tmp:
                path.unlink(missing_ok=True)
    return scan
