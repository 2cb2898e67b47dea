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


class _Arrivals:
    """The requests still to arrive: all known in advance (open loop), or sent by a closed loop's
    users, each its next request when its previous one completes."""

    def __init__(self, workload: Workload):
        self.workload = workload
        self._heap: list[tuple[float, int, Request]] = []   # (time, order, request)
        self._order = 0
        if workload.concurrency is None:
            for request in workload.requests:
                self._push(request)
            self.total = len(workload.requests)
        else:
            self.total = workload.total
            for _ in range(min(workload.concurrency, self.total)):
                self._push(Request(0.0, workload.input_len, workload.output_len))

    def _push(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.arrival_s, self._order, request))
        self._order += 1

    def until(self, now: float) -> list[Request]:
        """The requests arrived by `now`, in arrival order."""
        out = []
        while self._heap and self._heap[0][0] <= now:
            out.append(heapq.heappop(self._heap)[2])
        return out

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def completed(self, now: float) -> None:
        """A request completed at `now`: in a closed loop its user sends the next one."""
        if self.workload.concurrency is not None and self._order < self.total:
            self._push(Request(now, self.workload.input_len, self.workload.output_len))


def simulate(times: StepTimes, workload: Workload, buckets: list[int],
             host: HostOverhead = NO_HOST_OVERHEAD, prefill_with_decode: bool = False,
             token_budget: int | None = None, long_prefill_threshold: int | None = None) -> ServingResult:
    """Serve `workload` with decode `buckets` (the largest is the number of batch slots), the
    host doing `host`'s work before each device run.

    prefill_with_decode: False, a prefill chunk runs alone and the running sequences wait (the
    RBLN serving stack's scheduler); True, vLLM's own scheduler, as the NPU vLLM plugin
    (optimum_npu/vllm) runs it: see `_simulate_vllm`, with vLLM's `max_num_batched_tokens`
    (token_budget, default the chunk plus one token per slot) and `long_prefill_token_threshold`
    (default the chunk)."""
    buckets = sorted(set(buckets))
    if not buckets or buckets[0] < 1:
        raise ValueError(f"buckets must be positive batch sizes, got {buckets!r}")
    if prefill_with_decode:
        budget = times.chunk + buckets[-1] if token_budget is None else token_budget
        threshold = times.chunk if long_prefill_threshold is None else long_prefill_threshold
        for name, value in (("token_budget", budget), ("long_prefill_threshold", threshold)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "token_budget" else 0):
                raise ValueError(f"{name} must be a {'positive' if name == 'token_budget' else 'non-negative'} "
                                 f"int, got {value!r}")
        return _simulate_vllm(times, _Arrivals(workload), buckets, host, budget, threshold)
    if token_budget is not None or long_prefill_threshold is not None:
        raise ValueError("token_budget and long_prefill_threshold are vLLM's scheduler's: pass prefill_with_decode=True")
    slots = buckets[-1]
    now = 0.0
    arrivals = _Arrivals(workload)
    done: list[Request] = []
    waiting: list[Request] = []
    running: list[_Sequence] = []
    prefilling: _Sequence | None = None
    steps = chunks = 0
    while len(done) < arrivals.total:
        waiting += arrivals.until(now)
        if prefilling is None and waiting and len(running) < slots:
            prefilling = _Sequence(waiting.pop(0))
        if prefilling is not None:  # one prefill chunk; the running sequences wait
            end = min(prefilling.prefilled + times.chunk, prefilling.request.input_len)
            sampled = end == prefilling.request.input_len  # the last chunk's logits give the first token
            now += host.step_s + host.sequence_s * sampled + times.prefill_chunk_s(prefilling.prefilled + times.chunk)
            chunks += 1
            prefilling.prefilled = end
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
        elif arrivals.next_time() is not None:
            now = arrivals.next_time()
            continue
        _retire(running, done, arrivals, now)
    return ServingResult(done, now, steps, chunks)


def _retire(running: list[_Sequence], done: list[Request], arrivals: _Arrivals, now: float) -> None:
    """The sequences that have all their output tokens leave the batch at `now`."""
    for sequence in [s for s in running if s.generated >= s.request.output_len]:
        running.remove(sequence)
        sequence.request.finished_s = now
        done.append(sequence.request)
        arrivals.completed(now)


def _simulate_vllm(times: StepTimes, arrivals: _Arrivals, buckets: list[int], host: HostOverhead,
                   token_budget: int, long_prefill_threshold: int) -> ServingResult:
    """vLLM's V1 scheduler (vllm/v1/core/sched/scheduler.py, 0.32) over the compiled graphs.

    Each engine step has `token_budget` tokens. The running requests (in admission order) take
    theirs first: one for a decoding request, the rest of its prompt for a prefilling one, at
    most `long_prefill_threshold` (applied only when more than one request is running or
    waiting) and at most what is left. Then waiting requests are admitted, in arrival order,
    while tokens are left and a batch slot is free, each with the tokens left: a request can
    start its prompt with a few tokens. The NPU model runner then runs each scheduled prompt
    piece through the compiled prefill graph, one whole chunk per `chunk` tokens or part of it
    (positions start, start + chunk, ...: a 4-token piece costs a whole chunk), then one decode
    step of the decoding requests; the step's tokens are all sampled at its end."""
    slots = buckets[-1]
    chunk = times.chunk
    now = 0.0
    done: list[Request] = []
    waiting: list[Request] = []
    running: list[_Sequence] = []
    steps = chunks = 0
    while len(done) < arrivals.total:
        waiting += arrivals.until(now)
        if not running and not waiting:
            now = arrivals.next_time()
            continue
        budget = token_budget
        threshold = long_prefill_threshold if len(running) + len(waiting) > 1 else 0
        pieces: list[tuple[_Sequence, int]] = []   # (sequence, tokens) of the prompts scheduled
        decoding: list[_Sequence] = []
        for sequence in running:
            if budget <= 0:
                break
            left = sequence.request.input_len - sequence.prefilled
            if left == 0:
                decoding.append(sequence)
                budget -= 1
                continue
            n = min(threshold if 0 < threshold < left else left, budget)
            pieces.append((sequence, n))
            budget -= n
        while waiting and budget > 0 and len(running) < slots:
            sequence = _Sequence(waiting.pop(0))
            running.append(sequence)
            left = sequence.request.input_len
            n = min(threshold if 0 < threshold < left else left, budget)
            pieces.append((sequence, n))
            budget -= n
        device_s, sampled = 0.0, len(decoding)
        for sequence, n in pieces:
            for start in range(sequence.prefilled, sequence.prefilled + n, chunk):
                device_s += times.prefill_chunk_s(start + chunk)
                chunks += 1
            sequence.prefilled += n
            sampled += sequence.prefilled == sequence.request.input_len
        if decoding:
            device_s += _decode_step_s(times, buckets, decoding)
            steps += 1
        now += host.step_s + host.sequence_s * sampled + device_s
        for sequence in decoding:
            sequence.generated += 1
        for sequence, _ in pieces:
            if sequence.prefilled == sequence.request.input_len:  # the last piece's logits give the first token
                sequence.generated = 1
                sequence.request.first_token_s = now
        _retire(running, done, arrivals, now)
    return ServingResult(done, now, steps, chunks)
