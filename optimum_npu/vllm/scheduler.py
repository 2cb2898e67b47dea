"""vLLM's scheduler, passing each new request's arrival time to the NPU model runner.

The runner prices a request's queue time on the simulated clock (serving_clock.py), which needs
when the request arrived; vLLM's `NewRequestData` does not carry it. Scheduling is vLLM's own,
unchanged. A request whose LoRARequest names an adapter the folder was not compiled with is
refused as it arrives, before any device work (adapters are fixed at compile time).
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler

from .folder import CompiledDecoder, check_adapter

ARRIVALS = "npu_arrival_times"  # the SchedulerOutput attribute: {request id: wall-clock arrival (time.time())}


class NPUScheduler(Scheduler):
    def add_request(self, request) -> None:
        if request.lora_request is not None:
            check_adapter(self._compiled(), request.lora_request)
        super().add_request(request)

    def _compiled(self):
        if getattr(self, "_compiled_folder", None) is None:   # read once, at the first LoRA request
            self._compiled_folder = CompiledDecoder.read(self.vllm_config.model_config.model)
        return self._compiled_folder

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        setattr(output, ARRIVALS, {new.req_id: self.requests[new.req_id].arrival_time
                                   for new in output.scheduled_new_reqs})
        return output

