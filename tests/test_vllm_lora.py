"""vLLM on a folder compiled with LoRA adapters: LoRARequest.lora_int_id selects the compiled
adapter, per request, several adapters in one batch (heavy: an engine start takes a minute).

The tiny Llama with the two PEFT adapters of llm_fixtures.LORA_ADAPTERS, batch 4, max_seq_len
128, chunk 64, exact numerics; the engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
so that an error raised for a request reaches the caller. Greedy tokens of each request equal
PEFT's merged model for its adapter (transformers fp32), the base model for none.
"""

from __future__ import annotations

import pytest
import torch

from llm_fixtures import _one_torch_thread, lora_config_of, peft_merged_model, random_prompts  # noqa: F401
from llm_fixtures import make_tokenizer, save_lora_adapters, save_source
from vllm_helpers import engines_in_this_process, vllm

from vllm.lora.request import LoRARequest  # noqa: E402  (after the importorskip in vllm_helpers)
from vllm.sampling_params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.heavy
BATCH, MAX_SEQ_LEN, CHUNK, NEW_TOKENS = 4, 128, 64, 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from optimum_npu import RBLNAutoModelForCausalLM

    root = tmp_path_factory.mktemp("vllm_lora")
    source, hf_model = save_source(root / "source", "llama", seed=0)
    make_tokenizer(hf_model.config.vocab_size).save_pretrained(source)
    adapters = save_lora_adapters(root, "llama")
    options = dict(rbln_batch_size=BATCH, rbln_max_seq_len=MAX_SEQ_LEN, rbln_prefill_chunk_size=CHUNK,
                   rbln_numerics="exact", rbln_create_runtimes=False)
    folder, plain = root / "compiled", root / "plain"
    RBLNAutoModelForCausalLM.from_pretrained(str(source), export=True, rbln_lora_config=lora_config_of(adapters),
                                             **options).save_pretrained(folder)
    RBLNAutoModelForCausalLM.from_pretrained(str(source), export=True, **options).save_pretrained(plain)
    with engines_in_this_process():
        llm = vllm.LLM(model=str(folder), enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=BATCH,
                       max_num_batched_tokens=CHUNK, seed=0)
        yield llm, adapters, plain
        llm.llm_engine.engine_core.shutdown()


def test_each_request_runs_its_compiled_adapter(served):
    llm, adapters, _ = served
    prompts = [p.tolist() for p in random_prompts([70, 23, 9, 40, 15], seed=3)]
    chosen = [None, 1, 2, 1, 2]   # five requests for a batch of 4: adapters mixed within decode steps
    requests = [None if i is None else LoRARequest(f"adapter-{i}", i, str(adapters[i])) for i in chosen]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
                           lora_request=requests)
    references = {i: peft_merged_model("llama", None if i is None else adapters[i]) for i in (None, 1, 2)}
    for prompt, adapter, output in zip(prompts, chosen, outputs):
        ids = torch.tensor([prompt])
        expected = references[adapter].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                                do_sample=False)[0, len(prompt):].tolist()
        assert list(output.outputs[0].token_ids) == expected, f"adapter {adapter}, prompt of {len(prompt)} tokens"


def test_a_request_for_an_adapter_not_compiled_in_is_refused(served):
    llm, adapters, _ = served
    with pytest.raises(ValueError, match=r"lora_int_id 3, but the folder .* compiled with the LoRA adapters "
                                         r"1 \(attn\), 2 \(mlp\)"):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=2),
                     lora_request=LoRARequest("other", 3, str(adapters[1])))


def test_add_lora_checks_the_compiled_adapters(served):
    llm, adapters, _ = served
    assert llm.llm_engine.list_loras() == {1, 2}
    assert llm.llm_engine.add_lora(LoRARequest("attn", 1, str(adapters[1])))
    with pytest.raises(Exception, match="give --lora-modules in the order of their compiled ids"):
        llm.llm_engine.add_lora(LoRARequest("mlp", 1, str(adapters[2])))


def test_enable_lora_on_a_folder_without_adapters_is_refused(served):
    from vllm.engine.arg_utils import EngineArgs

    _, _, plain = served
    with pytest.raises(ValueError, match="enable_lora=True, but the folder .* has no LoRA adapters compiled in"):
        EngineArgs(model=str(plain), enable_lora=True).create_engine_config()
