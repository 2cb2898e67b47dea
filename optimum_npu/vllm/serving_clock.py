"""Simulated serving time: what the NPU would take, on one clock that also counts its idle time.

The simulated devices' own clock (`DecoderRunner.clock_s`) advances only while a compiled graph
runs: it is the devices' busy time. A server is also idle at times (no request to run), and a
request waits in vLLM's queue while others run. `ServingClock` keeps the simulated time of the
engine: while the engine has work, it advances by the device time of each step only (the host's
work between steps, slower here than on a real serving host, is not counted); while the engine
has nothing to run, it advances with the host's wall clock, until the next request arrives.

Arrivals are wall-clock times (vLLM stamps each request with `time.time()` when the server
receives it); `simulated_time_of` maps one onto the simulated clock through the steps it has
seen: inside a step, linearly over the step's wall span; between two steps of a busy engine, to
the end of the first (the device would have started the next one at once); in an idle gap,
wall time since the last step ended, up to the next step's start.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

STEPS_KEPT = 4096  # arrivals older than this many steps are placed at the oldest step kept


@dataclass(frozen=True)
class _Step:
    wall_start: float
    wall_end: float
    sim_start: float
    sim_end: float


class ServingClock:
    def __init__(self, device_clock_s: Callable[[], float], wall_s: Callable[[], float] = time.time):
        """device_clock_s: the devices' busy clock (seconds); wall_s: the clock arrivals are stamped with."""
        self._device = device_clock_s
        self._wall = wall_s
        self._device_origin = device_clock_s()
        self.idle_s = 0.0                     # simulated seconds with nothing to run
        self._last_wall_end = wall_s()        # the engine is idle from its start
        self._last_sim_end = 0.0
        self._steps: deque[_Step] = deque(maxlen=STEPS_KEPT)
        self._step_start: tuple[float, float] | None = None   # (wall, sim) of the step running

    def now(self) -> float:
        """Simulated seconds since the engine started: device busy time plus idle time."""
        return self.busy_s() + self.idle_s

    def busy_s(self) -> float:
        """Seconds the devices have been running compiled graphs since the engine started."""
        return self._device() - self._device_origin

    def begin_step(self, continuing: bool, arrivals_wall: list[float]) -> float:
        """A step starts; returns its simulated start.

        continuing: the step runs a request that was already running (the engine was busy);
        arrivals_wall: wall arrival times of the requests this step schedules for the first time.
        Otherwise the engine was idle since the last step ended, until the first of these arrived."""
        if self._step_start is not None:
            raise RuntimeError("begin_step() called twice without end_step()")
        wall = self._wall()
        if not continuing:
            first = min([*arrivals_wall, wall])
            self.idle_s += max(0.0, first - self._last_wall_end)
        start = self.now()
        self._step_start = (wall, start)
        return start

    def end_step(self) -> float:
        """The step's device work is done; returns its simulated end."""
        if self._step_start is None:
            raise RuntimeError("end_step() without begin_step()")
        (wall_start, sim_start), wall_end, sim_end = self._step_start, self._wall(), self.now()
        self._steps.append(_Step(wall_start, wall_end, sim_start, sim_end))
        self._last_wall_end, self._last_sim_end = wall_end, sim_end
        self._step_start = None
        return sim_end

    def simulated_time_of(self, wall: float) -> float:
        """The simulated time of a wall-clock instant up to the start of the step running now
        (an arrival: the request was waiting by then)."""
        if self._step_start is None:
            raise RuntimeError("simulated_time_of() maps instants before a running step; call begin_step() first")
        wall_now, sim_now = self._step_start
        if wall >= self._last_wall_end:  # after the last step: an idle gap or a busy host gap
            return min(sim_now, self._last_sim_end + (wall - self._last_wall_end))
        steps = self._steps
        i = bisect.bisect_right([s.wall_start for s in steps], wall) - 1
        if i < 0:
            return steps[0].sim_start if steps else 0.0
        step = steps[i]
        if wall <= step.wall_end:  # inside step i
            span = step.wall_end - step.wall_start
            fraction = (wall - step.wall_start) / span if span > 0 else 1.0
            return step.sim_start + fraction * (step.sim_end - step.sim_start)
        following = steps[i + 1].sim_start  # between step i and the next (there is one: wall < last end)
        return min(following, step.sim_end + (wall - step.wall_end))
