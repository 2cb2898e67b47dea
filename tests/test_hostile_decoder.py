"""The compiled decoder against bad input and misuse (issue 6): each case gets a clear error
(or, for concurrency, the right tokens), never wrong tokens or a traceback from deep inside torch.

- a checkpoint of another architecture through a family class (Qwen3 weights through the
  Llama class, which would drop q_norm / k_norm) is refused; so is a model with a parameter
  the static decoder would not use;
- empty prompts, token ids outside the vocabulary or negative: ValueError naming the problem;
- two threads generating on one model get exactly the tokens of a sequential run;
- an absurd KV cache or max_seq_len is a DeviceMemoryError before any host tensor is allocated;
- an rbln_config.json that contradicts the .rbln programs (block counts, max_seq_len, chunk size,
  decode batch sizes, options) is refused at load.
"""

import json
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch

from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)
from llm_fixtures import VOCAB, hf_generate, left_pad, make_hf_model, random_prompts, save_source
from optimum_npu import (
    DeviceMemoryError,
    RBLNAutoModelForCausalLM,
    RBLNLlamaForCausalLM,
    RBLNQwen2ForCausalLM,
    RBLNQwen3ForCausalLM,
)
from optimum_npu.configuration import CONFIG_NAME
from optimum_npu.modeling.base import RBLNModel
from optimum_npu.modeling import base
from optimum_npu.modeling.decoderonly import compile_plan
from optimum_npu.modeling.decoderonly.configuration_decoderonly import RBLNLlamaForCausalLMConfig
from optimum_npu.sim_device import Artifact

OPTIONS = dict(rbln_batch_size=2, rbln_max_seq_len=64, rbln_prefill_chunk_size=64, rbln_numerics="exact")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(checkpoint folder, fp32 HF model) of a tiny Llama."""
    return save_source(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return save_source(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="module")
def model(llama):
    m = RBLNLlamaForCausalLM.from_pretrained(llama[0], export=True, **OPTIONS)
    yield m
    m.close()


def greedy(model, prompts, max_new_tokens=5):
    ids, mask = left_pad(prompts)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, ids.shape[1]:]


def assert_matches_hf(model, hf, prompts=None):
    """The model still generates HF's tokens and holds no KV blocks (a refused call left nothing behind)."""
    prompts = prompts or random_prompts((9, 14), seed=21)
    new = greedy(model, prompts)
    for row, prompt in enumerate(prompts):
        assert new[row].tolist() == hf_generate(hf, prompt, max_new_tokens=5, do_sample=False).tolist(), row
    assert model.block_manager.num_free_blocks == model.block_manager.num_blocks


# --------------------------------------------------------------------------- architecture


def test_qwen3_checkpoint_through_the_llama_class_is_refused(qwen3):
    """transformers would load it into LlamaForCausalLM with a warning, dropping q_norm / k_norm."""
    with pytest.raises(ValueError, match="q_norm|qwen3"):
        RBLNLlamaForCausalLM.from_pretrained(qwen3[0], export=True, **OPTIONS)
    with pytest.raises(ValueError, match="q_norm|qwen3"):
        RBLNQwen2ForCausalLM.from_pretrained(qwen3[0], export=True, **OPTIONS)


def test_llama_checkpoint_through_the_qwen2_class_is_refused(llama):
    """Qwen2 has q/k/v biases the Llama checkpoint lacks: they would be random."""
    with pytest.raises(ValueError, match="q_proj.bias|model_type"):
        RBLNQwen2ForCausalLM.from_pretrained(llama[0], export=True, **OPTIONS)


def test_checkpoint_missing_a_weight_is_refused(tmp_path):
    """transformers would initialise the missing lm_head at random (with a warning only)."""
    from safetensors.torch import load_file, save_file

    folder, _ = save_source(tmp_path / "no-head", "llama", tie_word_embeddings=False)
    weights = load_file(folder / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing.*lm_head.weight"):
        RBLNLlamaForCausalLM.from_pretrained(folder, export=True, **OPTIONS)


def test_qwen3_model_through_the_llama_class_is_refused():
    with pytest.raises(ValueError, match="Qwen3ForCausalLM|qwen3"):
        RBLNLlamaForCausalLM.from_model(make_hf_model("qwen3"), **OPTIONS)


def test_qwen3_through_the_auto_class_is_exact(qwen3):
    folder, hf = qwen3
    model = RBLNAutoModelForCausalLM.from_pretrained(folder, export=True, **OPTIONS)
    try:
        assert type(model) is RBLNQwen3ForCausalLM
        assert_matches_hf(model, hf)
    finally:
        model.close()


def test_a_parameter_the_decoder_does_not_use_is_refused(monkeypatch):
    """Belt and braces for future families: every HF parameter must reach the static decoder."""
    hf = make_hf_model("llama")
    hf.model.layers[1].self_attn.gate_scale = torch.nn.Parameter(torch.ones(4))
    compiled = []
    monkeypatch.setattr(base, "compile_from_torch", lambda *a, **k: compiled.append(1))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.gate_scale"):
        RBLNLlamaForCausalLM.from_model(hf, **OPTIONS)
    assert not compiled


# --------------------------------------------------------------------------- bad token ids


@pytest.mark.parametrize("bad_id, problem", [(VOCAB, "vocabulary"), (VOCAB + 1000, "vocabulary"), (-1, "vocabulary")])
def test_token_ids_outside_the_vocabulary(model, llama, bad_id, problem):
    ids = torch.tensor([[5, 6, bad_id, 7], [8, 9, 10, 11]])
    with pytest.raises(ValueError, match=f"{bad_id}.*{problem}"):
        model.generate(input_ids=ids, max_new_tokens=2)
    with pytest.raises(ValueError, match=f"{bad_id}.*{problem}"):
        model(input_ids=ids)
    # A decode step fed a bad id (a hand-written loop): refused too, before the device runs.
    out = model(input_ids=ids[1:])
    with pytest.raises(ValueError, match=f"{bad_id}.*{problem}"):
        model(input_ids=torch.tensor([[bad_id]]), rbln_positions=out.next_positions)
    model.block_manager.free(0)
    assert_matches_hf(model, llama[1])


@pytest.mark.parametrize("shape", [(1, 0), (0, 4)])
def test_empty_prompt(model, llama, shape):
    ids = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match="empty"):
        model.generate(input_ids=ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        model(input_ids=ids)
    assert_matches_hf(model, llama[1])


@pytest.mark.parametrize("ids, error, match", [
    (torch.tensor([5, 6, 7]), ValueError, "2-D"),
    ([[5, 6, 7]], ValueError, "2-D"),
    (torch.tensor([[5.0, 6.0]]), TypeError, "integer"),
])
def test_malformed_input_ids(model, ids, error, match):
    with pytest.raises(error, match=match):
        model.generate(input_ids=ids, max_new_tokens=2)


def test_attention_mask_of_another_shape(model, llama):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(input_ids=ids, attention_mask=torch.ones((1, 2), dtype=torch.long), max_new_tokens=2)
    assert_matches_hf(model, llama[1])


# --------------------------------------------------------------------------- concurrency


def test_two_threads_generating_on_one_model_get_the_sequential_tokens(model):
    prompts = {"a": random_prompts((17, 6), seed=31), "b": random_prompts((11,), seed=32)}
    sequential = {name: greedy(model, p, max_new_tokens=8).tolist() for name, p in prompts.items()}
    assert sequential["a"][0] != sequential["b"][0]  # different work, so a mix-up would show
    results = {name: [] for name in prompts}
    errors = []
    start = threading.Barrier(len(prompts))

    def worker(name):
        try:
            start.wait()
            for _ in range(3):
                results[name].append(greedy(model, prompts[name], max_new_tokens=8).tolist())
        except BaseException as e:  # noqa: BLE001  (reported below, in the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(name,)) for name in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a generate() thread did not finish"
    assert not errors, errors
    for name in prompts:
        assert results[name] == [sequential[name]] * 3, name
    assert model.block_manager.num_free_blocks == model.block_manager.num_blocks


# --------------------------------------------------------------------------- device capacity before host memory


@pytest.fixture
def no_host_allocation(monkeypatch):
    """Fails the test if the KV cache or RoPE tables are built (they would be allocated on the host)."""
    def refuse(*args, **kwargs):
        raise AssertionError("host tensors were allocated before the device capacity check")

    monkeypatch.setattr(compile_plan, "make_kv_caches", refuse)
    monkeypatch.setattr(compile_plan, "rope_tables", refuse)


def test_absurd_kv_block_count_is_a_device_memory_error(no_host_allocation):
    # 10^7 blocks of 2 layers x K,V x 2 heads x 64 positions x 16 dims x 2 bytes = 655 GB.
    with pytest.raises(DeviceMemoryError, match=r"rbln_kvcache_num_blocks=10000000.*at most \d+ fit"):
        RBLNLlamaForCausalLM.from_model(make_hf_model("llama"), **{**OPTIONS, "rbln_kvcache_num_blocks": 10**7})


def test_absurd_batch_is_a_device_memory_error(no_host_allocation):
    # Eager: one 32768-position block per slot, 4 MiB each; 8192 slots = 32 GiB.
    hf = make_hf_model("llama", max_position_embeddings=32768)
    with pytest.raises(DeviceMemoryError, match="rbln_batch_size"):
        RBLNLlamaForCausalLM.from_model(hf, rbln_batch_size=8192, rbln_max_seq_len=32768)


def test_absurd_max_seq_len_is_a_device_memory_error(no_host_allocation):
    # Flash attention with 2 blocks: the KV cache is small, but the RoPE tables of 2^30
    # positions (cos and sin, 16 dims, 2 bytes) are 64 GiB.
    hf = make_hf_model("llama", max_position_embeddings=2**30)
    with pytest.raises(DeviceMemoryError, match=r"rbln_max_seq_len=1073741824"):
        RBLNLlamaForCausalLM.from_model(hf, rbln_batch_size=1, rbln_max_seq_len=2**30,
                                        rbln_kvcache_partition_len=4096, rbln_kvcache_num_blocks=2)


# --------------------------------------------------------------------------- rbln_config.json vs the .rbln files


@pytest.fixture(scope="module")
def compiled_folder(llama, tmp_path_factory):
    """A saved model with two decode buckets (compile only, no runtimes)."""
    m = RBLNLlamaForCausalLM.from_pretrained(
        llama[0], export=True, rbln_batch_size=2, rbln_decoder_batch_sizes=[2, 1], rbln_max_seq_len=128,
        rbln_prefill_chunk_size=64, rbln_create_runtimes=False)
    return Path(m.save_pretrained(tmp_path_factory.mktemp("compiled") / "tiny-llama-rbln"))


def load_parts(folder):
    config = RBLNLlamaForCausalLMConfig.load(folder)
    return config, {name: Artifact.load(folder / f"{name}.rbln") for name in config.graphs}


# (compile option edited in rbln_config.json, its new value, text the error must contain)
CONTRADICTIONS = [
    ("kvcache_num_blocks", 3, "kvcache_num_blocks=3"),
    ("max_seq_len", 64, "max_seq_len=64"),                        # with kvcache_block_size 64 (eager rule)
    ("prefill_chunk_size", 128, "prefill_chunk_size=128"),
    ("decoder_batch_sizes", [2], "decoder_batch_sizes=[2]"),
    ("use_attention_mask", True, "use_attention_mask=True"),
    ("use_inputs_embeds", True, "use_inputs_embeds=True"),
]


def edited_copy(folder: Path, tmp_path: Path, option, value) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    data = json.loads((copy / CONFIG_NAME).read_text())
    data["compile_options"][option] = value
    if option == "max_seq_len":  # eager attention: the block is the whole sequence
        data["compile_options"]["kvcache_block_size"] = value
    (copy / CONFIG_NAME).write_text(json.dumps(data))
    return copy


def test_consistent_folder_passes_the_check(compiled_folder):
    RBLNLlamaForCausalLM._check_graphs_against_config(*load_parts(compiled_folder))


@pytest.mark.parametrize("option, value, said", CONTRADICTIONS)
def test_config_contradicting_the_programs_is_refused(compiled_folder, tmp_path, option, value, said):
    config, graphs = load_parts(edited_copy(compiled_folder, tmp_path, option, value))
    assert getattr(config, option) == (tuple(value) if isinstance(value, list) else value)
    with pytest.raises(ValueError, match=rf"rbln_config\.json says {re.escape(said)}.*(\.rbln|graphs)"):
        RBLNLlamaForCausalLM._check_graphs_against_config(config, graphs)


def test_a_prefill_program_of_another_compile_is_refused(compiled_folder, llama, tmp_path):
    """prefill.rbln from a compile with another KV block count, rbln_config.json left alone."""
    other = RBLNLlamaForCausalLM.from_pretrained(
        llama[0], export=True, rbln_batch_size=2, rbln_decoder_batch_sizes=[2, 1], rbln_max_seq_len=128,
        rbln_prefill_chunk_size=64, rbln_kvcache_num_blocks=4, rbln_create_runtimes=False)
    config, graphs = load_parts(compiled_folder)
    graphs["prefill"] = other.graphs["prefill"]
    with pytest.raises(ValueError, match=r"kvcache_num_blocks=2.*prefill\.rbln.*\[4, "):
        RBLNLlamaForCausalLM._check_graphs_against_config(config, graphs)


@pytest.mark.parametrize("option, value, said", CONTRADICTIONS[:2])
def test_loading_a_contradicting_folder_is_refused(compiled_folder, tmp_path, option, value, said):
    if not hasattr(RBLNModel, "_check_graphs_against_config"):
        pytest.skip("RBLNModel does not call _check_graphs_against_config at load on this branch yet")
    folder = edited_copy(compiled_folder, tmp_path, option, value)
    with pytest.raises(ValueError, match=re.escape(said)):
        RBLNLlamaForCausalLM.from_pretrained(folder)
