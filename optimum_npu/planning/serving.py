"""Serving-level estimate: a discrete-event simulation of continuous batching.

Requests arrive, wait for a batch slot, have their prompt prefilled chunk by chunk, then
decode one token per step together with every other running sequence, in the smallest
compiled decode bucket that holds them all, until their output is complete. As on the RBLN
serving stack (vllm-rbln: prefill and decode are separate compiled graphs that run one at a
time), a prefill chunk stalls decoding: while a new request is being prefilled, the running
ones wait. Times come from the compiled programs' own pricing (`StepTimes`), so latency
percentiles come from simulated schedules, not from a formula. Between two device runs the host
does the serving stack's work (`HostOverhead`: scheduling, input preparation, sampling,
detokenisation); the device waits for it, as in a synchronous engine loop.

    times = StepTimes.from_graphs(graphs, chunk=128)
    result = simulate(times, closed_loop(concurrency=16, requests=256, input_len=2048, output_len=2048),
                      buckets=[1, 4, 16])
    print(result)
"""

from __future__ import annotations

import bisect
import heapq
import math
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class StepTimes:
    """Simulated seconds of one prefill chunk ending at `context` positions, and of one decode step
    of bucket `bucket` whose sequences hold `context` positions on average (attention's work is
    linear in the total KV positions a step reads, so the mean context prices it exactly)."""

    chunk: int
    prefill_chunk_s: Callable[[int], float]
    decode_step_s: Callable[[int, int], float]

    @classmethod
    def from_graphs(cls, graphs: dict, chunk: int, max_seq_len: int, grid: int = 256) -> StepTimes:
        """Tabulate `CompiledModel.estimate` of the prefill and each decode graph every `grid`
        positions up to `max_seq_len`, interpolating in between (each estimate prices every
        step of the program, so the table is built once)."""
        points = sorted({*range(grid, max_seq_len + 1, grid), chunk, max_seq_len})
        if len(points) < 2:  # chunk == max_seq_len < grid: a second point to interpolate from
            points = [1, *points]

        def table(graph) -> Callable[[int], float]:
            values = [graph.estimate(kv_len=p).total_s for p in points]
            return lambda kv: _interpolate(points, values, kv)

        prefill = table(graphs["prefill"])
        decode = {int(name.removeprefix("decoder_batch_")): table(g) for name, g in graphs.items()
                  if name.startswith("decoder_batch_")}
        return cls(chunk, prefill, lambda bucket, kv: decode[bucket](kv))


@dataclass(frozen=True)
class HostOverhead:
    """Host seconds the serving engine spends between two device runs: `step_s` for every run
    (scheduling, building the inputs and block tables, submitting the run) and `sequence_s` for
    each sequence that gets a token (sampling from its logits, detokenising, stop checks)."""

    step_s: float = 0.0
    sequence_s: float = 0.0

    def __post_init__(self):
        for name in ("step_s", "sequence_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")


NO_HOST_OVERHEAD = HostOverhead()

# The RBLN serving stack (vllm-rbln) runs vLLM's engine loop synchronously around the device: the
# host schedules, prepares inputs, then samples every sequence's token from logits copied back to
# the host, between two device runs. Estimates (no public per-step figure for this stack; see
# docs/performance-model.md, "Host work between steps"): 1 ms per engine step (vLLM's scheduler
# and input preparation are Python; vLLM's v0.6.0 release post measured them as the larger part of
# a decode step of Llama-3-8B on an H100 before that release's overlap work), and per sequence a
# sampling pass over its vocabulary of fp32 logits at one host core's streaming rate (the cost
# model's `host_bandwidth`) plus 20 us of detokenising and stop checks.
SERVING_STEP_S = 1e-3
SERVING_SEQUENCE_FIXED_S = 20e-6


def serving_host_overhead(vocab_size: int, host_bandwidth: float) -> HostOverhead:
    """The serving stack's host work per step (estimates above) for a model of `vocab_size` tokens."""
    return HostOverhead(SERVING_STEP_S, vocab_size * 4 / host_bandwidth + SERVING_SEQUENCE_FIXED_S)


def _interpolate(xs: list[int], ys: list[float], x: float) -> float:
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass
class Request:
    arrival_s: float
    input_len: int
    output_len: int
    # filled by the simulation
    first_token_s: float = math.nan
    finished_s: float = math.nan

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first."""
        return (self.finished_s - self.first_token_s) / max(1, self.output_len - 1)


@dataclass
class Workload:
    """Requests to serve: `requests` known in advance (open loop), or a closed loop of
    `concurrency` users, each sending its next request when the previous one completes."""

    requests: list[Request] = field(default_factory=list)
    concurrency: int | None = None
    input_len: int = 0
    output_len: int = 0
    total: int = 0


def closed_loop(concurrency: int, requests: int, input_len: int, output_len: int) -> Workload:
    for name, value in (("concurrency", concurrency), ("requests", requests), ("input_len", input_len),
                        ("output_len", output_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return Workload(concurrency=concurrency, input_len=input_len, output_len=output_len, total=requests)


def open_loop(arrivals_s: list[float], input_len: int, output_len: int) -> Workload:
    return Workload(requests=[Request(t, input_len, output_len) for t in sorted(arrivals_s)])


@dataclass
class ServingResult:
    requests: list[Request]
    makespan_s: float
    decode_steps: int
    prefill_chunks: int

    @property
    def output_tokens_per_s(self) -> float:
        return sum(r.output_len for r in self.requests) / self.makespan_s

    def percentile(self, what: str, q: float) -> float:
        values = sorted(getattr(r, what) for r in self.requests)
        index = min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))
        return values[index]

    def __str__(self) -> str:
        p = self.percentile
        return (f"{len(self.requests)} requests in {self.makespan_s:.2f} s: {self.output_tokens_per_s:.1f} output "
                f"tokens/s; TTFT p50 {p('ttft_s', 50) * 1e3:.1f} / p90 {p('ttft_s', 90) * 1e3:.1f} / p99 "
                f"{p('ttft_s', 99) * 1e3:.1f} ms; TPOT p50 {p('tpot_s', 50) * 1e3:.2f} / p90 "
                f"{p('tpot_s', 90) * 1e3:.2f} / p99 {p('tpot_s', 99) * 1e3:.2f} ms")


@dataclass
class _Sequence:
    request: Request
    prefilled: int = 0          # prompt tokens already in the KV cache
    generated: int = 0          # output tokens produced


def _decode_step_s(times: StepTimes, buckets: list[int], running: list[_Sequence]) -> float:
    """One decode step of `running` in the smallest bucket that holds them, at their mean context."""
    bucket = buckets[bisect.bisect_left(buckets, len(running))]
    context = sum(s.request.input_len + s.generated for s in running) / len(running)
    return times.decode_step_s(bucket, math.ceil(context))


def simulate(times: StepTimes, workload: Workload, buckets: list[int],
             host: HostOverhead = NO_HOST_OVERHEAD, prefill_with_decode: bool = False) -> ServingResult:
    """Serve `workload` with decode `buckets` (the largest is the number of batch slots), the
    host doing `host`'s work before each device run.

    prefill_with_decode: False, a prefill chunk runs alone and the running sequences wait (the
    RBLN serving stack's scheduler); True, each engine step runs a prompt chunk and then one
    decode step of the sequences already running (vLLM's own scheduler, as the NPU vLLM plugin
    uses it: optimum_npu/vllm)."""
    buckets = sorted(set(buckets))
    if not buckets or buckets[0] < 1:
        raise ValueError(f"buckets must be positive batch sizes, got {buckets!r}")
    slots = buckets[-1]
    now = 0.0
    arrivals: list[tuple[float, int, Request]] = []   # heap of (time, order, request)
    order = 0
    done: list[Request] = []
    if workload.concurrency is None:
        for request in workload.requests:
            heapq.heappush(arrivals, (request.arrival_s, order, request))
            order += 1
        total = len(workload.requests)
    else:
        total = workload.total
        for _ in range(min(workload.concurrency, total)):
            heapq.heappush(arrivals, (0.0, order, Request(0.0, workload.input_len, workload.output_len)))
            order += 1
    waiting: list[Request] = []
    running: list[_Sequence] = []
    prefilling: _Sequence | None = None
    steps = chunks = 0
    while len(done) < total:
        while arrivals and arrivals[0][0] <= now:
            waiting.append(heapq.heappop(arrivals)[2])
        if prefilling is None and waiting and len(running) < slots:
            prefilling = _Sequence(waiting.pop(0))
        if prefilling is not None:  # one prefill chunk; decode waits unless prefill_with_decode
            end = min(prefilling.prefilled + times.chunk, prefilling.request.input_len)
            sampled = end == prefilling.request.input_len  # the last chunk's logits give the first token
            now += host.step_s + host.sequence_s * sampled + times.prefill_chunk_s(prefilling.prefilled + times.chunk)
            chunks += 1
            prefilling.prefilled = end
            if prefill_with_decode and running:  # the same engine step, after the chunk (graphs run one at a time)
                now += host.sequence_s * len(running) + _decode_step_s(times, buckets, running)
                steps += 1
                for sequence in running:
                    sequence.generated += 1
            if sampled:
                prefilling.generated = 1
                prefilling.request.first_token_s = now
                running.append(prefilling)
                prefilling = None
        elif running:
            now += host.step_s + host.sequence_s * len(running) + _decode_step_s(times, buckets, running)
            steps += 1
            for sequence in running:
                sequence.generated += 1
        elif arrivals:
            now = arrivals[0][0]
            continue
        finished = [s for s in running if s.generated >= s.request.output_len]
        for sequence in finished:
            running.remove(sequence)
            sequence.request.finished_s = now
            done.append(sequence.request)
            if workload.concurrency is not None and order < total:  # the user sends its next request
                heapq.heappush(arrivals, (now, order, Request(now, workload.input_len, workload.output_len)))
                order += 1
    return ServingResult(done, now, steps, chunks)
