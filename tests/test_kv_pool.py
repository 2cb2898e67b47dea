"""The KV pool is said at compile time, and a request it cannot hold is refused before any work.

Flash attention lets the pool hold fewer blocks than every slot at max_seq_len needs (Llama-3-8B at
TP 1, max_seq_len 8192, partition 4096 fits one 4096-position block); here a tiny model with 2 blocks
of 4096 for 2 slots of 8192 positions: one sequence past 4096 takes both.
"""

from __future__ import annotations

import logging

import pytest

from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)
from llm_fixtures import hf_generate, left_pad, random_prompts, save_source
from optimum_npu import RBLNLlamaForCausalLM
from optimum_npu.modeling.decoderonly.kv_cache import KVCacheExhaustedError

FLASH = dict(rbln_batch_size=2, rbln_max_seq_len=8192, rbln_kvcache_partition_len=4096, rbln_prefill_chunk_size=1024,
             rbln_numerics="exact")
POOL_LOGGER = "optimum_npu.modeling.decoderonly.compile_plan"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_source(tmp_path_factory.mktemp("flash") / "tiny-llama-8k", "llama", max_position_embeddings=8192)


def test_a_short_pool_is_said_at_compile_and_a_request_it_cannot_hold_is_refused_up_front(source, caplog):
    with caplog.at_level(logging.INFO, logger=POOL_LOGGER):
        model = RBLNLlamaForCausalLM.from_pretrained(source[0], export=True, rbln_kvcache_num_blocks=2, **FLASH)
    try:
        warnings = [r.getMessage() for r in caplog.records if r.name == POOL_LOGGER and r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "2 blocks of 4096 positions = 8192 tokens, 1 sequence(s) of max_seq_len=8192" in warnings[0]
        assert "fewer than rbln_batch_size=2" in warnings[0] and "rbln_kvcache_num_blocks=4" in warnings[0]

        # Row 1 fits one block at prefill (4090 tokens) and would need a second at position 4096, while
        # row 0 holds the other: refused before the prefill, which used to run in full first.
        runs = model.runtimes["prefill"].stats.runs
        ids, mask = left_pad(random_prompts((10, 4090), seed=17))
        with pytest.raises(KVCacheExhaustedError, match=r"need \[1, 2\] blocks \(3 at once\).*2 blocks of 4096"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        assert model.runtimes["prefill"].stats.runs == runs
        assert model.block_manager.num_free_blocks == 2

        # What the pool holds still runs: the two rows within one block each.
        prompts = random_prompts((10, 12), seed=15)
        ids, mask = left_pad(prompts)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        for row, prompt in enumerate(prompts):
            expected = hf_generate(source[1], prompt, max_new_tokens=3, do_sample=False)
            assert out[row, ids.shape[1]:].tolist() == expected.tolist()
    finally:
        model.close()


def test_a_pool_for_every_slot_at_full_length_is_said_as_information(source, caplog):
    with caplog.at_level(logging.INFO, logger=POOL_LOGGER):
        model = RBLNLlamaForCausalLM.from_pretrained(source[0], export=True, rbln_create_runtimes=False, **FLASH)
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == POOL_LOGGER]
    # Sized from device memory (no rbln_kvcache_num_blocks): the tiny model's pool holds every slot.
    assert model.rbln_config.kvcache_num_blocks == 4
    assert said == [(logging.INFO, "KV cache pool: 4 blocks of 4096 positions = 16384 tokens, 2 sequence(s) of "
                                   "max_seq_len=8192 at once (2 block(s) each)")]
