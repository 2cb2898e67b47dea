"""vLLM serving a quantised folder (int4 weights, fp8 KV cache): its KV cache spec says fp8, and
its greedy tokens equal the compiled model's own generate() (exact numerics) and transformers'
fp32 model on the dequantised weights with an fp8-rounding cache."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from llm_fixtures import _one_torch_thread, make_tokenizer, random_prompts, save_source  # noqa: F401
from test_fp8_kv_cache import Fp8RoundingCache
from vllm_helpers import vllm

from vllm.sampling_params import SamplingParams  # noqa: E402  (after the importorskip in vllm_helpers)

QUANTIZATION = {"weights": "int4", "group_size": 32, "kv_caches": "fp8"}


@pytest.mark.heavy   # a vLLM engine start (~1 min on two cores)
def test_vllm_serves_an_int4_fp8_kv_folder_with_the_compiled_models_tokens(tmp_path, monkeypatch):
    from optimum_npu import RBLNAutoModelForCausalLM
    from optimum_npu.modeling.quantization import fake_quantize_

    source, hf_model = save_source(tmp_path / "source", "llama", seed=0)
    make_tokenizer(hf_model.config.vocab_size).save_pretrained(source)
    model = RBLNAutoModelForCausalLM.from_pretrained(
        str(source), export=True, rbln_batch_size=2, rbln_max_seq_len=128, rbln_prefill_chunk_size=64,
        rbln_numerics="exact", rbln_quantization=QUANTIZATION)
    model.save_pretrained(tmp_path / "compiled")
    prompts = [p.tolist() for p in random_prompts((20, 9), seed=3)]
    reference = fake_quantize_(copy.deepcopy(hf_model), QUANTIZATION, torch.bfloat16)
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        ours = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        with torch.no_grad():
            theirs = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                        past_key_values=Fp8RoundingCache(config=reference.config))
        assert ours[0, len(prompt):].tolist() == theirs[0, len(prompt):].tolist()
        expected.append(ours[0, len(prompt):].tolist())
    model.close()
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    vllm.envs.disable_envs_cache()
    try:
        llm = vllm.LLM(model=str(tmp_path / "compiled"), max_num_seqs=2, max_num_batched_tokens=64, seed=0)
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
        assert {spec.dtype for spec in runner.get_kv_cache_spec().values()} == {torch.float8_e4m3fn}
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        assert [list(o.outputs[0].token_ids) for o in outputs] == expected
        llm.llm_engine.engine_core.shutdown()
    finally:
        vllm.envs.disable_envs_cache()
