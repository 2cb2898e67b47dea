"""`with optimum_npu.profile("trace.json"):` one Perfetto timeline of everything the process runs
on the simulated machine, host and devices, on one clock.

The clock is simulated time, the one both sides can share: the host's Python runs for the wall time
it takes *outside* the simulator, and each call into a device (a `Runtime` run, an eager op) lasts
the simulated time its steps are priced at, the host waiting for it (calls are synchronous). So a
call made at session time T puts its device slices at T + their offset in the run, and the host's
code before it appears as a "Python" span from the end of the previous call to T. The wall time
the simulator itself spends emulating a device (the host computing the op in device numerics) is
not on the timeline: a real device would spend the priced time instead.

User spans (`session.span("tokenize")`) mark host work by name. The devices' tracks are those of
`profiler.py` (External HDMA, Task DMA, Neural Engine Clusters, Device Sync), one process per
device, the host's spans on the Host track.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager

from .profiler import HOST, Trace

PYTHON = "Python"

_active: Session | None = None
_active_lock = threading.Lock()


class Session:
    """One profiling session: its trace and clock. Thread-safe; calls are serialised on the clock."""

    def __init__(self) -> None:
        self.trace = Trace()
        self.clock_s = 0.0
        self._last_wall = time.perf_counter()
        self.lock = threading.RLock()
        self.device_calls = 0

    def now(self) -> float:
        """The session time now: the clock plus the host time since the last device call ended."""
        with self.lock:
            return self.clock_s + (time.perf_counter() - self._last_wall)

    def begin_call(self) -> float:
        """A device call starts: the host's Python since the last call becomes a span; returns the
        call's start time (hold `lock` from here to `end_call`)."""
        start = self.now()
        if start > self.clock_s:
            self.trace.add(HOST, PYTHON, self.clock_s, start - self.clock_s, None)
        self.clock_s = start
        return start

    def end_call(self, name: str, duration_s: float) -> None:
        """The call that began at the clock took `duration_s` simulated seconds, the host waiting."""
        if duration_s > 0:
            self.trace.add(HOST, name, self.clock_s, duration_s, None, waiting_for_device=True)
        self.clock_s += duration_s
        self.device_calls += 1
        self._last_wall = time.perf_counter()  # the emulation's own wall time is not host time

    @contextmanager
    def span(self, name: str):
        """A named span of host work on the Host track (it may contain device calls)."""
        start = self.now()
        try:
            yield
        finally:
            end = self.now()
            with self.lock:
                self.trace.add(HOST, name, start, end - start, None)

    def save(self, path: str | os.PathLike) -> str:
        with self.lock:
            end = self.now()
            if end > self.clock_s:  # the host's code after the last device call
                self.trace.add(HOST, PYTHON, self.clock_s, end - self.clock_s, None)
            return self.trace.save(path)


def active_session() -> Session | None:
    return _active


@contextmanager
def profile(path: str | os.PathLike = "trace.json"):
    """Record one timeline of the host and every simulated device while the block runs, written to
    `path` (Chrome trace JSON; open it in Perfetto) when it ends. Yields the `Session` (its `span`
    marks host work). One session at a time per process."""
    global _active
    session = Session()
    with _active_lock:
        if _active is not None:
            raise RuntimeError("a profile session is already recording in this process; nest spans with "
                               "session.span(name) instead of a second profile()")
        _active = session
    try:
        yield session
    finally:
        with _active_lock:
            _active = None
        session.save(path)
