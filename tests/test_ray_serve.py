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

import time
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
def compiled(tmp_path_factory):
    return build_compiled_llama(tmp_path_factory.mktemp("ray_serve"))


def test_rbln_devices_names_the_model_devices(monkeypatch):
    from optimum_npu.vllm.devices import assigned_devices

    monkeypatch.setenv("RBLN_DEVICES", "2,3")
    assert assigned_devices(2) == (2, 3)
    monkeypatch.setenv("RBLN_DEVICES", "")
    assert assigned_devices(2) is None
    for bad in ("2", "2,2", "a,b", "2,-3"):
        monkeypatch.setenv("RBLN_DEVICES", bad)
        with pytest.raises(ValueError, match="RBLN_DEVICES"):
            assigned_devices(2)


def test_bad_application_options_are_refused_by_name(compiled):
    from optimum_npu.cli import main
    from optimum_npu.ray_serve.app import build_app

    folder = str(compiled[0])
    with pytest.raises(ValueError, match="replicas"):
        build_app(folder, replicas=0)
    with pytest.raises(ValueError, match="round-robin, least-loaded, prefix-aware"):
        build_app(folder, router="random")
    with pytest.raises(ValueError, match="--port"):
        build_app(folder, vllm_args=["--port", "9000"])
    assert main(["serve", folder, "--replicas", "0"]) == 2
    assert main(["serve", folder, "--replicas", "2", "--router", "random"]) == 2
    # `serve run optimum_npu.ray_serve.app:app_builder key=value ...` hands the pairs as strings.
    from optimum_npu.ray_serve.app import app_builder

    assert app_builder({"folder": folder, "replicas": "2", "router": "prefix-aware",
                        "vllm_args": "--max-num-seqs 4"}) is not None
    with pytest.raises(ValueError, match="replicas"):
        app_builder({"folder": folder, "replicas": "two"})
    with pytest.raises(ValueError, match="unknown argument"):
        app_builder({"folder": folder, "replica": "2"})


def test_a_replica_whose_model_does_not_fit_fails_with_the_memory_message(compiled, monkeypatch):
    """What a replica raises when its engine does not start because its devices lack the memory
    (here another process's runtime holds them): the simulator's memory message, not vLLM's
    "Engine core initialization failed"."""
    from optimum_npu.ray_serve.engine import explain_start_failure
    from optimum_npu.sim_device.memory import DeviceMemoryError, allocate, devices, release

    monkeypatch.setenv("RBLN_DEVICES", "2,3")
    usable = devices()[2].spec.usable_dram_bytes
    filler = allocate("Runtime(filler.rbln)", {2: usable - 1024, 3: usable - 1024}, kind="weights")
    try:
        with pytest.raises(DeviceMemoryError, match=r"cannot load .* needs .* free .*filler"):
            explain_start_failure(str(compiled[0]))
    finally:
        release(filler.id)
    explain_start_failure(str(compiled[0]))  # it fits: nothing to explain, nothing raised


@pytest.fixture(scope="module")
def endpoint(compiled):
    from optimum_npu.ray_serve.app import build_app
    from optimum_npu.ray_serve.launch import check_devices, deploy

    folder, model, hf_model, tokenizer = compiled
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, resources={"RBLN": 4}, _node_ip_address="127.0.0.1",
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
        done = client.completions.create(model=NAME, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0)
        return done.choices[0].text

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
    report = handle.simulated_timings.remote().result(timeout_s=120)
    timings = report["timings"]
    assert report["replica"] and timings and all(t["ttft_s"] > 0 and t["output_tokens"] >= 1 for t in timings)


def _engine_replica_actors() -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::optimum-npu#NPUEngine#")]


@pytest.mark.heavy  # a replica restart is another engine start (about a minute and a half here)
def test_a_killed_replica_costs_only_its_in_flight_requests(endpoint):
    """Two long streams, one per replica (round-robin); the replica of one is killed mid-stream:
    that stream ends with an error the openai client raises, the other completes as generate()
    says; Ray starts a new replica, and then requests succeed again on both."""
    import threading

    from optimum_npu.ray_serve.launch import APP_NAME

    client = endpoint[0]
    prompts = [p.tolist() for p in random_prompts([11, 13], seed=6)]
    long_tokens = 100  # the context is 128
    outcomes: dict[int, object] = {}
    first_chunk = [threading.Event(), threading.Event()]

    def stream(i):
        try:
            text = ""
            for chunk in client.completions.create(model=NAME, prompt=prompts[i], max_tokens=long_tokens,
                                                   temperature=0.0, stream=True, extra_body={"ignore_eos": True}):
                first_chunk[i].set()
                text += "".join(c.text for c in chunk.choices)
            outcomes[i] = text
        except openai.APIError as err:
            outcomes[i] = err
        finally:
            first_chunk[i].set()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    assert all(e.wait(timeout=300) for e in first_chunk), "the streams did not start"
    victim = _engine_replica_actors()[0]
    both_in_flight = not outcomes
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a stream hangs after its replica was killed"
    errors = [o for o in outcomes.values() if isinstance(o, Exception)]
    texts = [(i, o) for i, o in outcomes.items() if isinstance(o, str)]
    # Round-robin put one stream on each replica: the killed one's stream fails, unless it had
    # already finished when the replica was killed.
    assert len(errors) == 1 if both_in_flight else len(errors) <= 1
    assert all("failed" in str(e) for e in errors)
    for i, text in texts:
        model, hf_model, tokenizer = endpoint[1:]
        ours, theirs = greedy_references(model, hf_model, prompts[i], long_tokens)
        # ignore_eos: vLLM would stop at the tokenizer's end-of-sequence token, generate() at the
        # config's, and the tiny model's config names none.
        assert text == tokenizer.decode(ours, skip_special_tokens=True) and ours == theirs

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        app = serve.status().applications[APP_NAME]
        replicas = app.deployments["NPUEngine"].replica_states
        replaced = victim not in _engine_replica_actors()
        if str(app.status).endswith("RUNNING") and replicas.get("RUNNING", 0) == 2 and replaced:
            break
        time.sleep(3)
    else:
        pytest.fail("the killed replica was not replaced in time")
    expected = _reference_text(endpoint, prompts[0])
    for _ in range(2):  # round-robin: both replicas, the new one included
        done = client.completions.create(model=NAME, prompt=prompts[0], max_tokens=NEW_TOKENS, temperature=0.0)
        assert done.choices[0].text == expected


def test_a_failed_deployment_is_summarised_by_the_exception_it_ends_with():
    """Serve's message for a replica that failed to start holds the replica's whole traceback;
    the launcher keeps its first line and the exception (measured: a replica whose devices another
    runtime filled failed the deployment after 3 attempts, 148 s, with the DeviceMemoryError)."""
    from optimum_npu.ray_serve.launch import _summary

    message = ("The deployment failed to start 3 times in a row. Error:\nTraceback (most recent call last):\n"
               '  File "replica.py", line 1, in initialize\n    raise\n'
               "optimum_npu.sim_device.memory.DeviceMemoryError: needs 1 GiB on npu0, 0 free\n")
    assert _summary(message) == ("The deployment failed to start 3 times in a row. Error: "
                                 "optimum_npu.sim_device.memory.DeviceMemoryError: needs 1 GiB on npu0, 0 free")
    assert _summary("Replica is unhealthy.") == "Replica is unhealthy."
