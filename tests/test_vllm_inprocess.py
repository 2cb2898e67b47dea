"""vLLM's engine in the test's own process, so that the model runner and the compiled model's
runtimes can be read beside what vLLM reports: prefix caching, and the simulated device's view
(queue time, TTFT, TPOT, device busy time and utilisation in the Prometheus metrics).

One engine for the module (VLLM_ENABLE_V1_MULTIPROCESSING=0). It serves a tiny Llama compiled
with flash attention: max_seq_len 8192 in KV partitions of 4096 tokens, so a KV block is one
partition (4096 tokens) and vLLM's prefix cache can share the first block of two prompts (with
eager attention a block holds a whole sequence, so no block is ever shared: see README).
Tensor parallelism 2, batch 2, 256-token prefill chunks, exact numerics.
"""

from __future__ import annotations


import pytest

from llm_fixtures import _one_torch_thread, make_tokenizer, random_prompts, save_source  # noqa: F401
from vllm_helpers import engines_in_this_process, greedy_references, vllm

from vllm.sampling_params import SamplingParams  # noqa: E402  (after the importorskip in vllm_helpers)

BATCH, MAX_SEQ_LEN, PARTITION, CHUNK, BLOCKS = 2, 8192, 4096, 256, 8
NAME = "tiny-llama-flash"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from optimum_npu import RBLNAutoModelForCausalLM

    root = tmp_path_factory.mktemp("vllm_inprocess")
    source, hf_model = save_source(root / "source", "llama", seed=0, max_position_embeddings=MAX_SEQ_LEN)
    make_tokenizer(hf_model.config.vocab_size).save_pretrained(source)
    model = RBLNAutoModelForCausalLM.from_pretrained(
        str(source), export=True, rbln_batch_size=BATCH, rbln_max_seq_len=MAX_SEQ_LEN,
        rbln_kvcache_partition_len=PARTITION, rbln_prefill_chunk_size=CHUNK, rbln_kvcache_num_blocks=BLOCKS,
        rbln_tensor_parallel_size=2, rbln_numerics="exact",
    )
    folder = root / "compiled"
    model.save_pretrained(folder)
    with engines_in_this_process():
        llm = vllm.LLM(model=str(folder), max_num_seqs=BATCH, max_num_batched_tokens=CHUNK, seed=0,
                       served_model_name=NAME)
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        yield llm, runner, model, hf_model
        llm.llm_engine.engine_core.shutdown()


def _device_time_s(model) -> float:
    """The simulated device time of every run of the model's runtimes so far (their own stats)."""
    return sum(runtime.stats.total_s for runtime in model.runtimes.values())


def _runs(model, graph: str) -> int:
    return model.runtimes[graph].stats.runs


def test_block_size_is_the_flash_partition(served):
    llm, runner, *_ = served
    assert llm.llm_engine.vllm_config.cache_config.block_size == PARTITION == runner.steps.block_size
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching


def test_another_block_size_is_refused_naming_the_partition(served):
    from vllm.engine.arg_utils import EngineArgs

    llm, *_ = served
    folder = llm.llm_engine.vllm_config.model_config.model
    with pytest.raises(ValueError) as err:
        EngineArgs(model=folder, block_size=16).create_engine_config()
    assert "block_size=16" in str(err.value) and f"kvcache_block_size={PARTITION}" in str(err.value)


def test_shared_prefix_reuses_the_cached_block_with_equal_tokens(served):
    """Two prompts sharing their first 4096 tokens (one KV block), one after the other: the second
    is served from the cached block (vLLM counts 4096 cached tokens; the device runs one prefill
    chunk for its 30 new tokens, not 17 for all 4126), and both give generate()'s and
    transformers' greedy tokens."""
    llm, runner, model, hf_model = served
    engine_model = runner.steps.model
    prefix = random_prompts([PARTITION], seed=11)[0].tolist()
    suffixes = [p.tolist() for p in random_prompts([30, 30], seed=12)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs, prefill_runs = [], []
    for suffix in suffixes:
        before = _runs(engine_model, "prefill")
        outputs.append(llm.generate([{"prompt_token_ids": prefix + suffix}], params, use_tqdm=False)[0])
        prefill_runs.append(_runs(engine_model, "prefill") - before)
    assert [o.num_cached_tokens for o in outputs] == [0, PARTITION]
    assert prefill_runs == [-(-(PARTITION + 30) // CHUNK), 1]
    for suffix, output in zip(suffixes, outputs):
        ours, theirs = greedy_references(model, hf_model, prefix + suffix, 6)
        assert list(output.outputs[0].token_ids) == ours == theirs


def _sample(name: str, labels: dict) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_simulated_times_against_the_runtimes_stats(served):
    """Two requests sent together to an idle engine, stepped one engine step at a time. Each
    step's device time is read from the compiled model's runtimes' own stats; from those and
    the steps at which each request got its tokens, by hand: A (256 prompt tokens, the whole
    step budget) runs alone in step 1, so B waits that step: B's queue time is step 1, its TTFT
    steps 1 and 2; A's TTFT step 1; each TPOT the mean of the steps after its first token. The
    runner's timings and the Prometheus histograms must give these, and the devices' busy-time
    counters the sum of the steps."""
    llm, runner, *_ = served
    engine_model = runner.steps.model
    engine = llm.llm_engine
    tokens = 4
    prompts = {"A": random_prompts([CHUNK], seed=21)[0].tolist(), "B": random_prompts([30], seed=22)[0].tolist()}
    engine.step()  # vLLM frees the requests finished last step (the runner logs their times) at the next step
    model_labels = {"model_name": NAME}
    device_labels = [{"model_name": NAME, "device": str(m.device), "npu": m.npu} for m in engine_model.device_memory()]
    assert len(device_labels) == 2
    metric = {what: f"optimum_npu:simulated_{what}_seconds_sum" for what in
              ("queue_time", "time_to_first_token", "time_per_output_token")}
    before = {name: _sample(name, model_labels) for name in metric.values()}
    busy_before = [_sample("optimum_npu:device_busy_seconds_total", labels) for labels in device_labels]
    device_before = _device_time_s(engine_model)

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=False)
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    step_s, got = [], {r: [] for r in prompts}   # device time of each step; steps that gave each request a token
    for _ in range(4 * tokens):  # bounded: 2 requests of 4 tokens
        start = _device_time_s(engine_model)
        outputs = engine.step()
        step_s.append(_device_time_s(engine_model) - start)
        for output in outputs:
            request = output.request_id.split("-")[0] if output.request_id not in prompts else output.request_id
            while len(got[request]) < len(output.outputs[0].token_ids):
                got[request].append(len(step_s) - 1)
        if not engine.has_unfinished_requests():
            break
    assert got["A"][0] == 0 and got["B"][0] == 1, f"steps of each token: {got}"  # A's prompt took step 1's budget

    def until(step):  # simulated time at the end of `step` (steps ran back to back from time 0)
        return sum(step_s[: step + 1])

    expected = {}
    for request, steps in got.items():
        queue = until(steps[0] - 1) if steps[0] else 0.0   # each prompt is prefilled in the step of its first token
        expected[request] = (queue, until(steps[0]), (until(steps[-1]) - until(steps[0])) / (tokens - 1))

    engine.step()  # frees A and B: the runner logs their times
    timings = {rid.split("-")[0]: t for rid, t in runner.finished_timings.items()}
    for request, (queue, ttft, tpot) in expected.items():
        t = timings[request]
        assert (t.queue_s, t.ttft_s, t.tpot_s) == pytest.approx((queue, ttft, tpot), rel=1e-6, abs=1e-12), request
    for index, name in enumerate(metric.values()):
        got_sum = _sample(name, model_labels) - before[name]
        assert got_sum == pytest.approx(sum(e[index] for e in expected.values()), rel=1e-6, abs=1e-12), name

    busy = [_sample("optimum_npu:device_busy_seconds_total", labels) - b
            for labels, b in zip(device_labels, busy_before)]
    assert busy[0] == busy[1] == pytest.approx(_device_time_s(engine_model) - device_before, rel=1e-6)
    elapsed = _sample("optimum_npu:simulated_elapsed_seconds_total", model_labels)
    total_busy = _sample("optimum_npu:device_busy_seconds_total", device_labels[0])
    assert total_busy <= elapsed
    assert _sample("optimum_npu:device_utilization", device_labels[0]) == pytest.approx(total_busy / elapsed, rel=1e-9)
