"""`optimum-npu serve COMPILED_FOLDER`: vLLM's OpenAI server through the NPU platform plugin, on 127.0.0.1.

One server for the module. The official `openai` client asks for completions, chat completions
(with the tokenizer's chat template) and streams; the greedy text must equal what the compiled
model's generate() and transformers give for the same prompt tokens (the character tokenizer
maps one token to one character). Also: /v1/models, /metrics, the per-request simulated timing
line in the server log, and a 400 with a message for a prompt longer than the context.
Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from llm_fixtures import random_prompts
from vllm_helpers import BATCH, MAX_SEQ_LEN, build_compiled_llama, free_port, greedy_references, vllm  # noqa: F401

openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")

START_TIMEOUT_S = 600  # engine start is about a minute on two idle cores; CI machines are busy
NAME = "tiny-llama"
NEW_TOKENS = 8



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_server")
    folder, model, hf_model, tokenizer = build_compiled_llama(root)
    port = free_port()
    log_path = root / "server.log"
    command = [sys.executable, "-c", "from optimum_npu.cli import main; raise SystemExit(main())", "serve",
               str(folder), "--host", "127.0.0.1", "--port", str(port), "--served-model-name", NAME,
               "--max-num-seqs", str(BATCH)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"vllm serve exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if requests.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not up after {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(2)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=120, max_retries=0)
        yield client, base, log_path, model, hf_model, tokenizer
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and the engine process it started
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _reference_text(server, prompt_ids: list[int]) -> str:
    _, _, _, model, hf_model, tokenizer = server
    ours, theirs = greedy_references(model, hf_model, prompt_ids, NEW_TOKENS)
    assert ours == theirs, "the references disagree"
    return tokenizer.decode(ours, skip_special_tokens=True)


def test_models_lists_the_folder(server):
    client = server[0]
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completion_and_stream_equal_generate(server):
    client = server[0]
    prompt = random_prompts([37], seed=3)[0].tolist()
    expected = _reference_text(server, prompt)
    done = client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0)
    assert done.choices[0].text == expected
    stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected


def test_chat_uses_the_chat_template(server):
    client, _, _, _, _, tokenizer = server
    messages = [{"role": "user", "content": "hello there"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = _reference_text(server, tokenizer(prompt, add_special_tokens=False)["input_ids"])
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=NEW_TOKENS, temperature=0.0)
    assert reply.choices[0].message.content == expected
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=NEW_TOKENS, temperature=0.0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_prompt_longer_than_the_context_is_a_400(server):
    client = server[0]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt=[5] * (MAX_SEQ_LEN + 1), max_tokens=1)
    assert str(MAX_SEQ_LEN) in str(err.value)


@pytest.mark.parametrize("kwargs, status", [
    (dict(model="no-such-model", prompt=[5, 6], max_tokens=1), 404),
    (dict(model=NAME, prompt=[5, 6], max_tokens=-1), 400),
    (dict(model=NAME, prompt=[5, 6], max_tokens=1, temperature=-1.0), 400),
])
def test_malformed_requests_are_4xx_with_a_message(server, kwargs, status):
    client = server[0]
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(**kwargs)
    assert err.value.status_code == status and str(err.value.message).strip()


def _metric(base: str, name: str, **labels: str) -> float:
    """The value of a gauge / counter of /metrics: the sum of its series that carry `labels`."""
    lines = requests.get(f"{base}/metrics", timeout=30).text.splitlines()
    values = [float(line.rsplit(" ", 1)[1]) for line in lines
              if (line.startswith(name + "{") or line.startswith(name + " "))
              and all(f'{key}="{value}"' in line for key, value in labels.items())]
    assert values, f"{name} {labels or ''} not in /metrics"
    return sum(values)


def _wait_for_metric(base: str, name: str, value: float) -> float:
    """vLLM frees a finished request's state (and the runner records its times) at the engine's
    next loop; wait for it, bounded."""
    deadline = time.monotonic() + 60
    while (got := _metric(base, name)) != value and time.monotonic() < deadline:
        time.sleep(0.5)
    return got


def test_metrics_and_simulated_timing(server):
    """One request alone on the idle server: its simulated TTFT and TPOT in /metrics equal the
    device time of the same calls (one 64-token prefill chunk, then 7 decode steps of batch 1)
    on the test's own copy of the compiled model, read from that model's runtimes' stats; its
    queue time is 0. Device memory per device equals what the engine process holds in the
    machine's device-memory registry (what `optimum-npu smi` reads)."""
    from optimum_npu.sim_device import memory as device_memory

    client, base, log_path, model, *_ = server
    ttft, tpot, queue = (f"optimum_npu:simulated_{w}_seconds" for w in
                         ("time_to_first_token", "time_per_output_token", "queue_time"))
    _wait_for_metric(base, "vllm:num_requests_running", 0)
    count = _metric(base, f"{ttft}_count")
    sums = {name: _metric(base, f"{name}_sum") for name in (ttft, tpot, queue)}
    prompt = random_prompts([37], seed=5)[0].tolist()
    client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0)
    assert _wait_for_metric(base, f"{ttft}_count", count + 1) == count + 1

    from optimum_npu.modeling.decoderonly.compile_plan import decoder_graph_name

    prefill, decode = model.runtimes["prefill"], model.runtimes[decoder_graph_name(model.runner.bucket_for(1))]
    runs = (prefill.stats.runs, decode.stats.runs)
    busy = (prefill.stats.total_s, decode.stats.total_s)
    ids = torch.tensor([prompt])
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)  # the same calls
    assert (prefill.stats.runs - runs[0], decode.stats.runs - runs[1]) == (1, NEW_TOKENS - 1)
    expected = {ttft: prefill.stats.total_s - busy[0], tpot: (decode.stats.total_s - busy[1]) / (NEW_TOKENS - 1),
                queue: 0.0}
    for name, value in expected.items():
        assert _metric(base, f"{name}_sum") - sums[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name

    engine_pids = {a.pid for a in device_memory.allocations()} - {os.getpid()}
    assert len(engine_pids) == 1, engine_pids  # the engine process (the test process holds the references)
    held = {}
    for allocation in device_memory.allocations():
        if allocation.pid in engine_pids:
            for device, nbytes in allocation.bytes_per_device.items():
                held[device] = held.get(device, 0) + nbytes
    assert sorted(held) == [0, 1]
    for device, nbytes in held.items():
        assert _metric(base, "optimum_npu:device_memory_used_bytes", device=str(device)) == nbytes
        assert 0 < _metric(base, "optimum_npu:device_utilization", device=str(device)) <= 1

    assert "vllm:generation_tokens_total" in requests.get(f"{base}/metrics", timeout=30).text
    log = log_path.read_text()
    assert "simulated arrival at" in log and "queue" in log and "TTFT" in log
    assert "NPU device 0 (RBLN-CA25)" in log and "NPU device 1 (RBLN-CA25)" in log


def test_concurrent_streams_complete_and_a_disconnect_frees_its_blocks(server):
    """Twice the compiled batch of streaming clients at once: every stream complete and equal
    to its reference, none lost or duplicated; a client that hangs up mid-stream leaves no
    running request and no KV block in use."""
    from concurrent.futures import ThreadPoolExecutor

    client, base, log_path, *_ = server
    prompts = [p.tolist() for p in random_prompts([9, 21, 33, 45, 57, 69, 81, 93], seed=4)]
    expected = [_reference_text(server, p) for p in prompts]

    def stream(prompt):
        chunks = client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0,
                                           stream=True)
        ids, text, finish = set(), "", None
        for chunk in chunks:
            ids.add(chunk.id)
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
        return ids, text, finish

    with ThreadPoolExecutor(max_workers=2 * BATCH) as pool:
        results = list(pool.map(stream, prompts, timeout=600))
    ids = [r[0] for r in results]
    assert all(len(i) == 1 for i in ids) and len(set().union(*ids)) == len(prompts)  # one id per request
    assert [r[1] for r in results] == expected
    assert [r[2] for r in results] == ["length"] * len(prompts)
    # One simulated-timing line per request in the server log (vLLM's request id is the response
    # id plus suffixes); the engine writes it when it frees the request, at its next loop.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        lines = [line for line in log_path.read_text().splitlines() if "NPU request" in line]
        counts = [sum(f"NPU request {next(iter(r[0]))}-" in line for line in lines) for r in results]
        if all(counts):
            break
        time.sleep(0.5)
    assert counts == [1] * len(prompts)

    hung_up = client.completions.create(model=NAME, prompt=prompts[0], max_tokens=MAX_SEQ_LEN - len(prompts[0]),
                                        temperature=0.0, stream=True)
    next(iter(hung_up))
    hung_up.close()
    deadline = time.monotonic() + 120
    while (_metric(base, "vllm:num_requests_running") or _metric(base, "vllm:kv_cache_usage_perc")) \
            and time.monotonic() < deadline:
        time.sleep(1)
    assert _metric(base, "vllm:num_requests_running") == 0
    assert _metric(base, "vllm:kv_cache_usage_perc") == 0
