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
import socket
import subprocess
import sys
import time

import pytest

from llm_fixtures import random_prompts
from vllm_helpers import BATCH, MAX_SEQ_LEN, build_compiled_llama, greedy_references, vllm  # noqa: F401

openai = pytest.importorskip("openai")
requests = pytest.importorskip("requests")

START_TIMEOUT_S = 600  # engine start is about a minute on two idle cores; CI machines are busy
NAME = "tiny-llama"
NEW_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_server")
    folder, model, hf_model, tokenizer = build_compiled_llama(root)
    port = _free_port()
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


def test_metrics_and_simulated_timing(server):
    client, base, log_path, *_ = server
    client.completions.create(model=NAME, prompt=[7, 8, 9], max_tokens=4, temperature=0.0)
    metrics = requests.get(f"{base}/metrics", timeout=30).text
    assert "vllm:generation_tokens_total" in metrics
    deadline = time.monotonic() + 30  # the engine logs a request's line when it frees its state
    while "simulated TTFT" not in log_path.read_text() and time.monotonic() < deadline:
        client.completions.create(model=NAME, prompt=[7], max_tokens=1)
        time.sleep(1)
    log = log_path.read_text()
    assert "simulated TTFT" in log and "NPU device 0 (RBLN-CA25)" in log and "NPU device 1 (RBLN-CA25)" in log


def _metric(base: str, name: str) -> float:
    """The value of an unlabelled-or-single-series gauge / counter of /metrics (the sum of its series)."""
    lines = requests.get(f"{base}/metrics", timeout=30).text.splitlines()
    values = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{") or line.startswith(name + " ")]
    assert values, f"{name} not in /metrics"
    return sum(values)


def test_concurrent_streams_complete_and_a_disconnect_frees_its_blocks(server):
    """Twice the compiled batch of streaming clients at once: every stream complete and equal
    to its reference, none lost or duplicated; a client that hangs up mid-stream leaves no
    running request and no KV block in use."""
    from concurrent.futures import ThreadPoolExecutor

    client, base, *_ = server
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
