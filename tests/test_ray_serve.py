"""Two vLLM engine replicas on their own simulated device groups behind one OpenAI endpoint, on Ray Serve.

One local Ray instance for the module (loopback only, 4 logical CPUs, the simulated machine's 4
devices declared as `RBLN` resources, no dashboard), shut down at the end. The application
(optimum_npu/ray_serve) serves the tiny Llama compiled with tensor parallelism 2, so each
replica asks for 2 RBLN devices and Ray hands the two replicas disjoint groups. Round-robin
routing sends consecutive requests to both replicas; the greedy text through the endpoint must
equal the compiled model's generate() and transformers' (the character tokenizer maps one token
to one character). Every wait is bounded.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from llm_fixtures import random_prompts
from vllm_helpers import BATCH, build_compiled_llama, free_port, greedy_references, vllm  # noqa: F401

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (make setup installs it)")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

NAME = "tiny-llama"
NEW_TOKENS = 8
START_TIMEOUT_S = 900  # two engines start one after the other on two busy cores



@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    from optimum_npu.ray_serve.app import build_app
    from optimum_npu.ray_serve.launch import check_devices, deploy

    folder, model, hf_model, tokenizer = build_compiled_llama(tmp_path_factory.mktemp("ray_serve"))
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, resources={"RBLN": 4}, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        check_devices(2, 2)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(build_app(str(folder), replicas=2, router="round-robin",
                         vllm_args=["--served-model-name", NAME, "--max-num-seqs", str(BATCH)]),
               timeout_s=START_TIMEOUT_S)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=300, max_retries=0)
        yield client, model, hf_model, tokenizer
    finally:
        serve.shutdown()
        ray.shutdown()


def _reference_text(endpoint, prompt_ids: list[int]) -> str:
    _, model, hf_model, tokenizer = endpoint
    ours, theirs = greedy_references(model, hf_model, prompt_ids, NEW_TOKENS)
    assert ours == theirs, "the references disagree"
    return tokenizer.decode(ours, skip_special_tokens=True)


def test_each_replica_holds_its_own_device_group(endpoint):
    """The compiled weights of each engine sit on the devices Ray assigned it (RBLN_DEVICES):
    two processes, two disjoint device pairs, all four devices in use (this process's own
    reference model is left out)."""
    import os

    from optimum_npu.sim_device.memory import allocations

    groups = {}
    for a in allocations():
        if a.kind == "weights" and a.pid != os.getpid():
            groups.setdefault(a.pid, set()).update(d for d, n in a.bytes_per_device.items() if n)
    assert sorted(sorted(g) for g in groups.values()) == [[0, 1], [2, 3]]


def test_one_endpoint_answers_the_openai_client_with_generates_tokens(endpoint):
    client = endpoint[0]
    assert [m.id for m in client.models.list().data] == [NAME]
    prompts = [p.tolist() for p in random_prompts([9, 30, 47, 70], seed=5)]
    expected = [_reference_text(endpoint, p) for p in prompts]

    def complete(prompt):
        return client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0).choices[0].text

    def stream(prompt):
        chunks = client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0,
                                           stream=True)
        return "".join(c.choices[0].text for c in chunks if c.choices)

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(complete, prompts, timeout=600)) == expected
        assert list(pool.map(stream, prompts, timeout=600)) == expected


def test_chat_through_the_endpoint(endpoint):
    client, _, _, tokenizer = endpoint
    messages = [{"role": "user", "content": "hello there"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = _reference_text(endpoint, tokenizer(prompt, add_special_tokens=False)["input_ids"])
    for _ in range(2):  # round-robin: once on each replica
        reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=NEW_TOKENS, temperature=0.0)
        assert reply.choices[0].message.content == expected


def test_a_bad_request_gets_vllms_4xx_through_the_endpoint(endpoint):
    client = endpoint[0]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt=[5] * 200, max_tokens=1)
    assert "128" in str(err.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt=[5], max_tokens=1)


def test_each_replica_reports_its_simulated_timing(endpoint):
    handle = serve.get_deployment_handle("NPUEngine", app_name="optimum-npu")
    timings = handle.simulated_timings.remote().result(timeout_s=120)
    assert timings and all(t["ttft_s"] > 0 and t["output_tokens"] >= 1 for t in timings)
