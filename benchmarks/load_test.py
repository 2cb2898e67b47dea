"""Load test of `optimum-npu serve` (vLLM's OpenAI server on the simulated NPU), on 127.0.0.1.

    python benchmarks/load_test.py [--clients 8] [--requests 32] [--output-len 16] [--tp 1]

A tiny random Llama (`optimum_npu.testing.build_tiny_random_llama`) is compiled in exact
numerics (batch 4, decode buckets 1, 2, 4, max_seq_len 256, 64-token prefill chunks) and served
by `optimum-npu serve` in a child process. `--clients` threads, each with the official `openai`
client, stream `--requests` greedy completions of random prompts (16 to 160 tokens) between
them. While they run, one more client hangs up after its first chunk, and three bad requests
are sent (a prompt longer than the context, max_tokens=-1, an unknown model).

Checked (the exit status is 1 if any check fails):
- every request answered once: one response id per request, all different, none missing;
- every stream complete: `--output-len` tokens, then finish_reason "length";
- the streamed token ids (vLLM's return_token_ids) equal the compiled model's offline
  `generate()` and transformers' fp32 `generate()`, token for token;
- the bad requests get a 4xx with a message;
- afterwards no request is running and no KV block is in use (the hung-up stream freed its own);
- the server log has one simulated-timing line per request.

Printed: output tokens/s and TTFT / TPOT / end-to-end percentiles, on the wall clock (what the
clients saw, this host simulating the NPU) and on the simulated NPU (the server's per-request
log lines: arrival, queue time, TTFT and TPOT of each request; /metrics:
optimum_npu:device_busy_seconds_total). Every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BATCH, BUCKETS, MAX_SEQ_LEN, CHUNK = 4, (1, 2, 4), 256, 64
NAME = "tiny-llama"
START_TIMEOUT_S = 900
REQUEST_TIMEOUT_S = 600
LOG_LINE = re.compile(r"NPU request (\S+): simulated arrival at ([\d.]+) s, queue ([\d.]+) ms, TTFT ([\d.]+) ms, "
                      r"TPOT ([\d.]+) ms, (\d+) output")


@dataclass
class Result:
    index: int
    ids: set = field(default_factory=set)
    token_ids: list = field(default_factory=list)
    finish: list = field(default_factory=list)
    sent_s: float = 0.0
    first_s: float | None = None
    last_s: float | None = None
    error: str | None = None


def compile_folder(root: Path, tp: int):
    from transformers import LlamaForCausalLM

    from optimum_npu import RBLNAutoModelForCausalLM
    from optimum_npu.testing import build_tiny_random_llama

    source = build_tiny_random_llama(root / "source", max_position_embeddings=MAX_SEQ_LEN)
    model = RBLNAutoModelForCausalLM.from_pretrained(
        str(source), export=True, rbln_batch_size=BATCH, rbln_decoder_batch_sizes=list(BUCKETS),
        rbln_max_seq_len=MAX_SEQ_LEN, rbln_prefill_chunk_size=CHUNK, rbln_tensor_parallel_size=tp,
        rbln_numerics="exact")
    model.save_pretrained(root / "compiled")
    return root / "compiled", model, LlamaForCausalLM.from_pretrained(source).eval()


def references(model, hf_model, prompts: list[list[int]], output_len: int) -> list[list[int]]:
    """Greedy new tokens of each prompt from the compiled model's generate(), checked equal to transformers'."""
    import torch

    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=output_len, min_new_tokens=output_len,
                      do_sample=False)
        with torch.no_grad():
            ours = model.generate(ids, **kwargs)[0, len(prompt):].tolist()
            theirs = hf_model.generate(ids, **kwargs)[0, len(prompt):].tolist()
        if ours != theirs:
            raise SystemExit(f"the references disagree for a prompt of {len(prompt)} tokens: generate() {ours}, "
                             f"transformers {theirs}")
        out.append(ours)
    return out


def start_server(folder: Path, port: int, log_path: Path) -> subprocess.Popen:
    import requests

    command = [sys.executable, "-c", "from optimum_npu.cli import main; raise SystemExit(main())", "serve",
               str(folder), "--host", "127.0.0.1", "--port", str(port), "--served-model-name", NAME,
               "--max-num-seqs", str(BATCH), "--max-num-batched-tokens", str(CHUNK)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return process
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            stop_server(process)
            raise SystemExit(f"the server was not up after {START_TIMEOUT_S} s")
        time.sleep(2)


def stop_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)  # the wrapper, vLLM's API server and its engine process
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def metric(base: str, name: str) -> float:
    """The sum of a metric's series in /metrics."""
    import requests

    lines = requests.get(f"{base}/metrics", timeout=30).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith(name + "{") or line.startswith(name + " "))


def stream_one(client, index: int, prompt: list[int], output_len: int) -> Result:
    result = Result(index, sent_s=time.monotonic())
    try:
        stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=output_len, temperature=0.0,
                                           stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
        for chunk in stream:
            result.ids.add(chunk.id)
            for choice in chunk.choices:
                new = list(getattr(choice, "token_ids", None) or [])
                if new:
                    now = time.monotonic()
                    result.first_s = result.first_s or now
                    result.last_s = now
                    result.token_ids.extend(new)
                if choice.finish_reason:
                    result.finish.append(choice.finish_reason)
    except Exception as err:  # reported as a failed check, with the others
        result.error = f"{type(err).__name__}: {err}"
    return result


def bad_requests(client, openai) -> list[str]:
    """Each bad request must get a 4xx with a message; returns the failures."""
    failures = []
    cases = {
        "a prompt longer than the context": dict(model=NAME, prompt=[5] * (MAX_SEQ_LEN + 1), max_tokens=1),
        "max_tokens=-1": dict(model=NAME, prompt=[5, 6], max_tokens=-1),
        "an unknown model": dict(model="no-such-model", prompt=[5, 6], max_tokens=1),
    }
    for what, kwargs in cases.items():
        try:
            client.completions.create(**kwargs)
            failures.append(f"{what}: answered, not refused")
        except openai.APIStatusError as err:
            if not (400 <= err.status_code < 500 and str(err.message).strip()):
                failures.append(f"{what}: status {err.status_code}, message {err.message!r}")
    return failures


def hang_up(client, prompt: list[int]) -> None:
    """A client that reads one chunk of a long stream and disconnects."""
    stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_SEQ_LEN - len(prompt),
                                       temperature=0.0, stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()


def percentiles(values: list[float], scale: float = 1e3) -> str:
    ordered = sorted(values)
    pick = [ordered[min(len(ordered) - 1, max(0, -(-q * len(ordered) // 100) - 1))] * scale for q in (50, 90, 99)]
    return f"p50 {pick[0]:9.3f}  p90 {pick[1]:9.3f}  p99 {pick[2]:9.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()
    for name in ("clients", "requests", "output_len", "tp"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if 160 + args.output_len > MAX_SEQ_LEN:
        parser.error(f"--output-len must be at most {MAX_SEQ_LEN - 160} (prompts go up to 160 tokens)")
    import openai

    rng = random.Random(0)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(16, 160))] for _ in range(args.requests)]
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder, model, hf_model = compile_folder(root, args.tp)
        expected = references(model, hf_model, prompts, args.output_len)
        del model, hf_model  # the server loads its own copy
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log_path = root / "server.log"
        server = start_server(folder, port, log_path)
        base = f"http://127.0.0.1:{port}"
        try:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)
            # One request first: the simulated clock's idle time since the engine started (the
            # server's start-up) ends with it, and is not counted in the run's elapsed time.
            client.completions.create(model=NAME, prompt=[5, 6, 7], max_tokens=2, temperature=0.0)
            busy0 = metric(base, "optimum_npu:device_busy_seconds_total")
            work: queue.Queue = queue.Queue()
            for index in range(args.requests):
                work.put(index)
            results: list[Result] = []
            lock = threading.Lock()

            def worker():
                while True:
                    try:
                        index = work.get_nowait()
                    except queue.Empty:
                        return
                    result = stream_one(client, index, prompts[index], args.output_len)
                    with lock:
                        results.append(result)

            start = time.monotonic()
            threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.clients)]
            for thread in threads:
                thread.start()
            hang_up(client, prompts[0])
            failures += bad_requests(client, openai)
            for thread in threads:
                thread.join(timeout=REQUEST_TIMEOUT_S)
            wall_s = time.monotonic() - start
            if any(thread.is_alive() for thread in threads):
                failures.append(f"clients still waiting after {REQUEST_TIMEOUT_S} s")

            # Settled: the hung-up stream is aborted and its blocks freed (bounded wait).
            deadline = time.monotonic() + 120
            while (metric(base, "vllm:num_requests_running") or metric(base, "vllm:kv_cache_usage_perc")) \
                    and time.monotonic() < deadline:
                time.sleep(1)
            for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
                if metric(base, name):
                    failures.append(f"{name} = {metric(base, name)} after the load, not 0")
            sim_busy = metric(base, "optimum_npu:device_busy_seconds_total") - busy0
            time.sleep(2)  # the engine logs each request when it frees its state, at its next loop
            log = log_path.read_text()
        finally:
            stop_server(server)

    results.sort(key=lambda r: r.index)
    if sorted(r.index for r in results) != list(range(args.requests)):
        failures.append(f"{args.requests - len(results)} request(s) lost")
    all_ids = [i for r in results for i in r.ids]
    if any(len(r.ids) != 1 for r in results) or len(set(all_ids)) != len(all_ids):
        failures.append("a response id missing, repeated or shared between requests")
    for r in results:
        if r.error:
            failures.append(f"request {r.index}: {r.error}")
        elif r.finish != ["length"] or len(r.token_ids) != args.output_len:
            failures.append(f"request {r.index}: incomplete stream ({len(r.token_ids)} tokens, finish {r.finish})")
        elif r.token_ids != expected[r.index]:
            failures.append(f"request {r.index}: tokens {r.token_ids} differ from generate()'s {expected[r.index]}")
    simulated = {}
    for line in LOG_LINE.finditer(log):
        arrival, queue_ms, ttft_ms, tpot_ms, n = (float(line.group(k)) for k in range(2, 7))
        # [queue, TTFT, TPOT, arrival, last token] in seconds on the simulated clock
        simulated.setdefault(line.group(1), []).append(
            [queue_ms / 1e3, ttft_ms / 1e3, tpot_ms / 1e3, arrival, arrival + (ttft_ms + tpot_ms * (n - 1)) / 1e3])
    per_request = {}
    for r in results:
        for response_id in r.ids:
            lines = [v for request_id, values in simulated.items() if request_id.startswith(response_id + "-")
                     for v in values]
            if len(lines) != 1:
                failures.append(f"request {r.index}: {len(lines)} simulated-timing log lines, not 1")
            else:
                per_request[r.index] = lines[0]

    done = [r for r in results if r.first_s is not None and not r.error]
    tokens = sum(len(r.token_ids) for r in done)
    print(f"{args.requests} streaming requests from {args.clients} clients, prompts 16-160 tokens, "
          f"{args.output_len} output tokens each; TP {args.tp}, batch {BATCH}, chunk {CHUNK}, exact numerics")
    print(f"wall (this host simulating the NPU): {tokens / wall_s:10.1f} output tokens/s over {wall_s:.1f} s")
    if done:
        print(f"  TTFT ms  {percentiles([r.first_s - r.sent_s for r in done])}")
        print(f"  TPOT ms  {percentiles([(r.last_s - r.first_s) / max(1, len(r.token_ids) - 1) for r in done])}")
        print(f"  e2e  ms  {percentiles([r.last_s - r.sent_s for r in done])}")
    if per_request:
        values = list(per_request.values())
        # From the first arrival to the last token, on the simulated clock (the idle time before
        # the load, while this script reads /metrics, is not the load's).
        span = max(v[4] for v in values) - min(v[3] for v in values)
        busy = sim_busy / args.tp  # the counter has one series per device; the TP devices run together
        print(f"simulated NPU: {tokens / span:10.1f} output tokens/s over {span * 1e3:.3f} ms, "
              f"each device busy {busy * 1e3:.3f} ms ({busy / span:.1%}; the hung-up stream included)")
        print(f"  queue ms {percentiles([v[0] for v in values])}")
        print(f"  TTFT ms  {percentiles([v[1] for v in values])}")
        print(f"  TPOT ms  {percentiles([v[2] for v in values])}")
    print(f"checks: {args.requests} requests answered once each, complete, equal to generate() and transformers; "
          "a hung-up stream freed; 3 bad requests refused with 4xx" if not failures else "FAILED:")
    for failure in failures:
        print(f"  {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
