"""vLLM's offline engine (`vllm.LLM`) on a compiled folder, through the NPU platform plugin.

One engine for the module (starting one takes about a minute on two cores). It serves the tiny
Llama compiled with tensor parallelism 2, batch 4, max_seq_len 128, chunk 64, in exact numerics.
vLLM schedules with a token budget of 64 per step, so prompts are prefilled in chunks across
steps, interleaved with other requests' decode steps, with more requests than the compiled
batch waiting their turn. Checked:

- greedy tokens equal to the compiled model's own generate() and to transformers' fp32
  generate(), for prompts from 5 tokens to the end of the context;
- per-request sampling parameters in one batch (stop strings, max_tokens, seeded sampling)
  leave the greedy requests' tokens unchanged;
- structured output (a choice) through vLLM's grammar masks;
- at engine start, what the folder cannot honour (max_model_len, block_size, max_num_seqs,
  vLLM tensor parallelism) is refused naming both values, and a folder that is not compiled
  is refused with the command that compiles it.
"""

from __future__ import annotations

import pytest
import torch

from llm_fixtures import random_prompts
from vllm_helpers import BATCH, CHUNK, MAX_SEQ_LEN, build_compiled_llama, greedy_references, vllm

from vllm.engine.arg_utils import EngineArgs  # noqa: E402  (after the importorskip in vllm_helpers)
from vllm.sampling_params import SamplingParams, StructuredOutputsParams  # noqa: E402

NEW_TOKENS = 8


def _run_a_multithreaded_torch_op():
    """What a user's script does before building an LLM (and the test suite before this module): torch ops
    on several threads start torch's OpenMP thread pool, which an engine process forked from here would
    inherit broken (it hangs in its first parallel op). The platform has vLLM spawn its processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.ones(256, 256) @ torch.ones(256, 256)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder, model, hf_model, tokenizer = build_compiled_llama(tmp_path_factory.mktemp("vllm_engine"))
    _run_a_multithreaded_torch_op()
    llm = vllm.LLM(model=str(folder), max_num_seqs=BATCH, max_num_batched_tokens=CHUNK, seed=0)
    yield llm, folder, model, hf_model, tokenizer
    llm.llm_engine.engine_core.shutdown()


def test_the_plugin_is_vllms_platform():
    from vllm.platforms import current_platform

    from optimum_npu.vllm.platform import NPUPlatform

    assert isinstance(current_platform, NPUPlatform)


def test_greedy_tokens_equal_generate_and_transformers(served):
    llm, _, model, hf_model, _ = served
    # Six requests for a batch of 4; lengths across chunk boundaries and up to the context's end.
    lengths = [5, 63, 70, 100, 111, MAX_SEQ_LEN - NEW_TOKENS]
    prompts = [p.tolist() for p in random_prompts(lengths, seed=1)]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    for prompt, output in zip(prompts, outputs):
        ours, theirs = greedy_references(model, hf_model, prompt, NEW_TOKENS)
        got = list(output.outputs[0].token_ids)
        assert got == ours, f"prompt of {len(prompt)} tokens: vLLM {got}, generate() {ours}"
        assert got == theirs, f"prompt of {len(prompt)} tokens: vLLM {got}, transformers {theirs}"


def test_per_request_sampling_parameters(served):
    llm, _, model, hf_model, tokenizer = served
    prompts = [p.tolist() for p in random_prompts([12, 40, 25, 33], seed=2)]
    references = [greedy_references(model, hf_model, p, NEW_TOKENS)[1] for p in prompts]
    stop = tokenizer.decode(references[1][3:5])  # two characters the greedy text reaches after 3
    params = [
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, stop=[stop]),
        SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=7, max_tokens=NEW_TOKENS, ignore_eos=True),
    ]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    assert list(outputs[0].outputs[0].token_ids) == references[0]
    expected_text = tokenizer.decode(references[1])
    assert outputs[1].outputs[0].text == expected_text[: expected_text.index(stop)]
    assert outputs[1].outputs[0].finish_reason == "stop"
    assert list(outputs[2].outputs[0].token_ids) == references[2][:3]
    sampled = list(outputs[3].outputs[0].token_ids)
    assert len(sampled) == NEW_TOKENS and all(0 <= t < model.config.vocab_size for t in sampled)


def test_structured_output_choice(served):
    llm, *_ = served
    choices = ["yes", "no"]
    params = SamplingParams(temperature=0.0, max_tokens=6, structured_outputs=StructuredOutputsParams(choice=choices))
    outputs = llm.generate(["Is it?", "Or not"], params)
    assert [o.outputs[0].text in choices for o in outputs] == [True, True], [o.outputs[0].text for o in outputs]


def _config_error(folder, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        EngineArgs(model=str(folder), **kwargs).create_engine_config()
    return str(err.value)


def test_engine_start_refuses_what_the_folder_cannot_honour(served):
    _, folder, *_ = served
    message = _config_error(folder, max_model_len=2 * MAX_SEQ_LEN)
    assert f"max_model_len={2 * MAX_SEQ_LEN}" in message and f"max_seq_len={MAX_SEQ_LEN}" in message
    message = _config_error(folder, block_size=16)
    assert "block_size=16" in message and f"kvcache_block_size={MAX_SEQ_LEN}" in message
    message = _config_error(folder, max_num_seqs=BATCH + 1)
    assert f"max_num_seqs={BATCH + 1}" in message and f"batch_size={BATCH}" in message


def test_engine_start_refuses_a_folder_that_is_not_compiled(served, tmp_path):
    _, folder, *_ = served
    source = folder.parent / "source"
    message = _config_error(source)
    assert "no rbln_config.json" in message and "export=True" in message and str(source) in message


def test_prefill_windows_stay_inside_the_owned_blocks():
    from optimum_npu.vllm.decoder_steps import prefill_windows

    assert prefill_windows(0, 130, 64, 256) == [0, 64, 128]
    assert prefill_windows(61, 130, 64, 256) == [61, 125]          # where vLLM's token budget split the prompt
    assert prefill_windows(100, 128, 64, 128) == [64]              # moved back: the chunk ends at the last block's end
    assert prefill_windows(30, 128, 64, 128) == [30, 64]
    with pytest.raises(ValueError, match="outside the owned positions"):
        prefill_windows(100, 130, 64, 128)
