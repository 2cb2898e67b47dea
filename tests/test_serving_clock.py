"""The simulated serving clock of the vLLM runner (optimum_npu/vllm/serving_clock.py), on hand-set
clocks: device time counts while steps run, wall time while the engine is idle, and arrivals
map onto it (values worked by hand in the comments)."""

from __future__ import annotations

import pytest

from optimum_npu.vllm.serving_clock import ServingClock


class Clocks:
    def __init__(self):
        self.device = 5.0   # the devices' clock need not start at 0
        self.wall = 1000.0


def test_busy_idle_and_arrivals():
    c = Clocks()
    clock = ServingClock(lambda: c.device, lambda: c.wall)
    # Idle 2 s of wall time; request A arrives at wall 1002, the step starts at wall 1003 (host work).
    c.wall = 1003.0
    assert clock.begin_step(continuing=False, arrivals_wall=[1002.0]) == pytest.approx(2.0)  # idle until A arrived
    assert clock.simulated_time_of(1002.0) == pytest.approx(2.0)                             # queue 0
    c.device += 0.5   # the step's device work: 0.5 s
    c.wall = 1013.0   # the simulator took 10 s of wall time for it
    assert clock.end_step() == pytest.approx(2.5)
    # Busy: the next step continues A; request B arrived at wall 1008 (during step 1, half-way
    # through its wall span) and C at wall 1014 (between the steps: the device would not wait).
    c.wall = 1015.0
    assert clock.begin_step(continuing=True, arrivals_wall=[1008.0, 1014.0]) == pytest.approx(2.5)
    assert clock.simulated_time_of(1008.0) == pytest.approx(2.0 + 0.5 * 0.5)
    assert clock.simulated_time_of(1014.0) == pytest.approx(2.5)
    c.device += 0.25
    c.wall = 1020.0
    assert clock.end_step() == pytest.approx(2.75)
    assert clock.busy_s() == pytest.approx(0.75)
    # Idle again: D arrives 4 s after the last step ended; its step starts then.
    c.wall = 1030.0
    assert clock.begin_step(continuing=False, arrivals_wall=[1024.0]) == pytest.approx(6.75)
    assert clock.simulated_time_of(1024.0) == pytest.approx(6.75)
    # An instant between the two earlier steps (busy gap) maps to the end of the first.
    assert clock.simulated_time_of(1013.5) == pytest.approx(2.5)
    # An instant in the idle gap before step 3 maps to wall time since step 2 ended.
    assert clock.simulated_time_of(1022.0) == pytest.approx(4.75)
    c.device += 1.0
    assert clock.end_step() == pytest.approx(7.75)
    assert clock.idle_s == pytest.approx(6.0) and clock.now() == pytest.approx(7.75)


def test_steps_must_pair():
    c = Clocks()
    clock = ServingClock(lambda: c.device, lambda: c.wall)
    with pytest.raises(RuntimeError, match="without begin_step"):
        clock.end_step()
    clock.begin_step(continuing=False, arrivals_wall=[])
    with pytest.raises(RuntimeError, match="twice"):
        clock.begin_step(continuing=False, arrivals_wall=[])
