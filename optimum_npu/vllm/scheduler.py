"""vLLM's scheduler, passing each new request's arrival time to the NPU model runner.

The runner prices a request's queue time on the simulated clock (serving_clock.py), which needs
when the request arrived; vLLM's `NewRequestData` does not carry it. Scheduling is vLLM's own,
unchanged.
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler

ARRIVALS = "npu_arrival_times"  # the SchedulerOutput attribute: {request id: wall-clock arrival (time.time())}


class NPUScheduler(Scheduler):
    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        setattr(output, ARRIVALS, {new.req_id: self.requests[new.req_id].arrival_time
                                   for new in output.scheduled_new_reqs})
        return output
