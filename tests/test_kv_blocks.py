"""A compiled decoder folder as vLLM reads it (top-level keys of rbln_config.json), its KV pool sized
from a memory budget, and `optimum-npu kv-blocks` reading and resizing the pool without recompiling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)
from llm_fixtures import left_pad, random_prompts, save_source
from optimum_npu import RBLNLlamaForCausalLM
from optimum_npu.cli import main
from optimum_npu.configuration import CONFIG_NAME
from optimum_npu.sim_device.memory import DeviceMemoryError
from optimum_npu.sim_device.specs import get_npu_spec

FLASH = dict(rbln_batch_size=2, rbln_max_seq_len=8192, rbln_kvcache_partition_len=4096, rbln_prefill_chunk_size=1024,
             rbln_numerics="exact")
# One KV block of the tiny Llama: 2 layers x (K, V) x 2 KV heads x 4096 positions x head_dim 16 x 2 bytes.
BLOCK_BYTES = 2 * 2 * 2 * 4096 * 16 * 2


def budget_for(folder: Path, blocks: float) -> float:
    """The memory budget that leaves room for `blocks` KV blocks beside the rest of the compiled
    folder's prefill program (4 blocks): the device memory the program takes but its KV cache, then
    whole blocks. Each of the 4 cache tensors stays under a DRAM page (a block is 256 KiB of each, 8
    would make a page), so none is rounded up to pages."""
    prefill = RBLNLlamaForCausalLM.from_pretrained(folder, rbln_create_runtimes=False).graphs["prefill"].program
    spec = get_npu_spec("RBLN-CA25")
    assert 4 * (BLOCK_BYTES // 4) < spec.dram_page_bytes  # 4 blocks of one cache tensor: under a page
    rest = prefill.memory.total_bytes(0) - 4 * BLOCK_BYTES
    return (rest + blocks * BLOCK_BYTES) / spec.usable_dram_bytes


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_source(tmp_path_factory.mktemp("flash") / "tiny-llama-8k", "llama", max_position_embeddings=8192)


@pytest.fixture(scope="module")
def compiled(source, tmp_path_factory):
    """A flash-attention folder whose pool was sized from device memory: every slot at full length."""
    model = RBLNLlamaForCausalLM.from_pretrained(source[0], export=True, rbln_create_runtimes=False, **FLASH)
    return Path(model.save_pretrained(tmp_path_factory.mktemp("compiled") / "tiny-llama-rbln"))


def read_like_vllm_rbln(folder: Path) -> dict:
    """What a vllm-rbln-style platform plugin takes from a compiled folder: the flat top-level keys of
    rbln_config.json, mapped onto vLLM's engine settings (its contract, as the issue states it)."""
    config = json.loads((folder / CONFIG_NAME).read_text())
    for key in ("batch_size", "max_seq_len", "prefill_chunk_size", "kvcache_num_blocks", "dtype", "num_devices"):
        assert key in config, f"{key} is not a top-level key of {CONFIG_NAME}"
    block_size = config.get("kvcache_block_size") or config.get("kvcache_partition_len")
    assert isinstance(block_size, int)
    return dict(max_num_seqs=config["batch_size"], max_model_len=config["max_seq_len"],
                max_num_batched_tokens=config["prefill_chunk_size"], block_size=block_size,
                num_gpu_blocks=config["kvcache_num_blocks"], dtype=config["dtype"],
                tensor_parallel_size=config["num_devices"])


def test_a_vllm_rbln_style_reader_reads_our_folder(compiled):
    assert read_like_vllm_rbln(compiled) == dict(max_num_seqs=2, max_model_len=8192, max_num_batched_tokens=1024,
                                                 block_size=4096, num_gpu_blocks=4, dtype="bfloat16",
                                                 tensor_parallel_size=1)


def resized_copy(compiled: Path, tmp_path: Path, *args: str) -> Path:
    folder = tmp_path / "resized"
    shutil.copytree(compiled, folder)
    assert main(["kv-blocks", str(folder), *args]) == 0
    return folder


def test_kv_blocks_resizes_a_folder_as_compiling_with_that_count_would(source, compiled, tmp_path, capsys):
    assert main(["kv-blocks", str(compiled)]) == 0
    assert "4 blocks of 4096 positions = 16384 tokens, 2 sequence(s) of max_seq_len=8192" in capsys.readouterr().out

    folder = resized_copy(compiled, tmp_path, "--set", "3")
    assert "3 blocks of 4096 positions = 12288 tokens, 1 sequence(s)" in capsys.readouterr().out
    assert read_like_vllm_rbln(folder)["num_gpu_blocks"] == 3
    direct = RBLNLlamaForCausalLM.from_pretrained(source[0], export=True, rbln_create_runtimes=False,
                                                  rbln_kvcache_num_blocks=3, **FLASH).save_pretrained(tmp_path / "direct")
    direct = RBLNLlamaForCausalLM.from_pretrained(direct, rbln_create_runtimes=False)
    resized = RBLNLlamaForCausalLM.from_pretrained(folder, rbln_create_runtimes=False)
    assert resized.rbln_config == direct.rbln_config
    for name, graph in direct.graphs.items():
        assert resized.graphs[name].program == graph.program, name

    # Loads and generates the same tokens as the folder it came from.
    prompts = random_prompts((10, 12), seed=41)
    ids, mask = left_pad(prompts)
    outputs = []
    for path in (compiled, folder):
        model = RBLNLlamaForCausalLM.from_pretrained(path)
        try:
            outputs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False))
            assert model.block_manager.num_blocks == (3 if path == folder else 4)
        finally:
            model.close()
    assert outputs[0].tolist() == outputs[1].tolist()


def test_kv_blocks_memory_budget_and_its_refusals(compiled, tmp_path, capsys):
    # A budget with room for 3 whole blocks and a half (fewer than the 4 of every slot at full length).
    budget = budget_for(compiled, 3.5)
    folder = resized_copy(compiled, tmp_path, "--memory-budget", repr(budget))
    assert read_like_vllm_rbln(folder)["num_gpu_blocks"] == 3
    assert f"within rbln_memory_budget={budget}" in capsys.readouterr().out
    # The whole device: back to every slot at full length.
    assert main(["kv-blocks", str(folder), "--memory-budget", "1.0"]) == 0
    assert read_like_vllm_rbln(folder)["num_gpu_blocks"] == 4
    capsys.readouterr()

    before = (folder / CONFIG_NAME).read_bytes()
    assert main(["kv-blocks", str(folder), "--memory-budget", repr(budget_for(compiled, 1.5))]) == 2
    err = capsys.readouterr().err
    assert "hold 1 block(s)" in err and "rbln_batch_size=2 needs at least one block per slot" in err
    assert main(["kv-blocks", str(folder), "--set", "1"]) == 2
    assert "rbln_kvcache_num_blocks=1 is less than rbln_batch_size=2" in capsys.readouterr().err
    assert main(["kv-blocks", str(folder), "--memory-budget", "1.5"]) == 2
    assert "rbln_memory_budget must be a fraction of the device memory in (0, 1]" in capsys.readouterr().err
    assert main(["kv-blocks", str(folder), "--set", "100000"]) == 2
    assert "100000 KV blocks need" in capsys.readouterr().err
    assert (folder / CONFIG_NAME).read_bytes() == before  # nothing written by a refusal
    assert main(["kv-blocks", str(tmp_path / "nothing")]) == 2
    assert "not a compiled model folder" in capsys.readouterr().err


def test_the_pool_sized_from_a_compile_time_memory_budget(source, compiled):
    model = RBLNLlamaForCausalLM.from_pretrained(source[0], export=True, rbln_create_runtimes=False,
                                                 rbln_memory_budget=budget_for(compiled, 2.5), **FLASH)
    assert model.rbln_config.kvcache_num_blocks == 2
    with pytest.raises(ValueError, match=r"hold 1 block\(s\) of 1048576 bytes, but rbln_batch_size=2 needs"):
        RBLNLlamaForCausalLM.from_pretrained(source[0], export=True, rbln_create_runtimes=False,
                                             rbln_memory_budget=budget_for(compiled, 1.5), **FLASH)
    # A count given with a budget it does not fit (16 blocks: 4 MiB per cache tensor).
    with pytest.raises(DeviceMemoryError, match="more than rbln_memory_budget"):
        RBLNLlamaForCausalLM.from_pretrained(source[0], export=True, rbln_create_runtimes=False,
                                             rbln_kvcache_num_blocks=16, rbln_memory_budget=budget_for(compiled, 2.5),
                                             **FLASH)
