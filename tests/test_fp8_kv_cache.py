"""An fp8 KV cache (`rbln_quantization={"kv_caches": "fp8"}`, issue 20 part 3).

- the kernels: K / V written into a float8 e4m3 cache are torch's cast of them; paged and flash
  attention over it equal the same kernels over a 16-bit cache holding those rounded values;
- exact numerics against transformers' fp32 model whose cache rounds K and V to float8 e4m3 as
  they are stored (a DynamicCache subclass: the emulation the issue asks for, in transformers);
- memory: half the KV bytes, so a pool sized from memory holds twice the blocks; the attention
  step reads half the KV bytes.
"""

import pytest
import torch
from transformers import DynamicCache

from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)
from llm_fixtures import hf_config, hf_generate, random_prompts, rbln_teacher_forced, save_source
from optimum_npu import RBLNAutoModelForCausalLM
from optimum_npu.planning.meta import compile_decoder_on_meta

FP8 = torch.float8_e4m3fn
EXACT_LOGITS_ATOL = 1e-4   # test_llm_parity's bound: fp32 on both sides, other summation orders


class Fp8RoundingCache(DynamicCache):
    """transformers' cache, storing K and V rounded to float8 e4m3 (what an fp8 KV cache holds)."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        def rounded(t):
            return t.to(FP8).to(t.dtype)

        return super().update(rounded(key_states), rounded(value_states), layer_idx, *args, **kwargs)


@pytest.mark.parametrize("flash", [False, True])
def test_kernels_read_an_fp8_cache_as_its_rounded_values(flash):
    g = torch.Generator().manual_seed(0)
    blocks, heads, block, dim = 4, 2, 8, 16
    k, v = (torch.randn(2, heads, 10, dim, generator=g) * 3 for _ in "kv")
    tables = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    start = torch.tensor([0, 0], dtype=torch.int32)
    caches = {}
    for dtype in (FP8, torch.float32):
        k_cache, v_cache = (torch.zeros(blocks, heads, block, dim, dtype=dtype) for _ in "kv")
        written_k, written_v = (k, v) if dtype == FP8 else (k.to(FP8).float(), v.to(FP8).float())
        torch.ops.rbln.kv_cache_update(k_cache, v_cache, written_k, written_v, tables, start)
        caches[dtype] = k_cache, v_cache
    assert torch.equal(caches[FP8][0].float(), caches[torch.float32][0])   # written = torch's cast
    assert torch.equal(caches[FP8][1].float(), caches[torch.float32][1])
    q = torch.randn(2, 4, 1, dim, generator=g)
    decode_start = torch.tensor([9, 9], dtype=torch.int32)
    outs = []
    for k_cache, v_cache in caches.values():
        if flash:
            outs.append(torch.ops.rbln.flash_attention(q, k_cache, v_cache, tables, decode_start, 0.25, 0, block))
        else:
            outs.append(torch.ops.rbln.paged_attention(q, k_cache, v_cache, tables, decode_start, 0.25, 0))
    assert torch.equal(outs[0], outs[1])


def test_exact_numerics_equal_transformers_with_an_fp8_rounding_cache(tmp_path):
    folder, hf = save_source(tmp_path / "llama", "llama")
    model = RBLNAutoModelForCausalLM.from_pretrained(
        folder, export=True, rbln_batch_size=2, rbln_max_seq_len=256, rbln_prefill_chunk_size=64,
        rbln_numerics="exact", rbln_quantization={"kv_caches": "fp8"}, rbln_cache=False)
    prompts = random_prompts((70, 9), seed=1)    # 70: two prefill chunks, the second reads the first's fp8 KV
    try:
        assert {spec.dtype for spec in model.graphs["prefill"].program.buffers if "cache" in spec.name} == {
            "float8_e4m3fn"}
        continuations = [hf_generate(hf, p, max_new_tokens=5, do_sample=False)[:-1] for p in prompts]
        for prompt, cont, logits in zip(prompts, continuations, rbln_teacher_forced(model, prompts, continuations)):
            sequence = torch.cat([prompt, cont])[None]
            with torch.no_grad():
                expected = hf(input_ids=sequence, past_key_values=Fp8RoundingCache(config=hf.config)).logits[0]
                plain = hf(input_ids=sequence).logits[0]
            expected, plain = expected[prompt.shape[0] - 1:], plain[prompt.shape[0] - 1:]
            assert (logits - expected).abs().max() <= EXACT_LOGITS_ATOL
            assert (plain - expected).abs().max() > 1e-3   # the rounding is visible at this bound
    finally:
        model.close()


def test_fp8_cache_halves_the_kv_bytes_and_doubles_the_pool():
    config = hf_config("llama", hidden_size=1024, intermediate_size=2048, num_attention_heads=8,
                       num_key_value_heads=8, num_hidden_layers=1, max_position_embeddings=16384)
    # flash attention sizes the pool from memory: a budget small enough that it binds
    options = dict(rbln_max_seq_len=16384, rbln_kvcache_partition_len=4096, rbln_batch_size=32,
                   rbln_prefill_chunk_size=128, rbln_memory_budget=0.05)
    plans = {kv: compile_decoder_on_meta(config, rbln_quantization=None if kv == "fp16" else {"kv_caches": kv},
                                         **options) for kv in ("fp16", "fp8")}
    blocks = {kv: plan[0].kvcache_num_blocks for kv, plan in plans.items()}
    assert blocks["fp16"] < 32 * 4 and blocks["fp8"] in (2 * blocks["fp16"], 2 * blocks["fp16"] + 1)
    caches = {kv: [s for s in plan[1]["prefill"].program.buffers if "cache" in s.name] for kv, plan in plans.items()}
    per_block = {kv: sum(s.nbytes for s in specs) / blocks[kv] for kv, specs in caches.items()}
    assert per_block["fp8"] * 2 == per_block["fp16"] == 2 * 4096 * 8 * 128 * 2   # K and V, 1 layer, 8 heads of 128
    # the decode step's attention reads half the KV bytes at the same context
    attention = {kv: max(plan[1]["decoder_batch_32"].program.steps, key=lambda s: s.dynamic_cost * s.bytes_read)
                 for kv, plan in plans.items()}
    kv_bytes = 32 * 16384 * 8 * 128 * 2 * 2    # every slot at full length, K and V, 2 bytes each
    assert attention["fp16"].bytes_read - attention["fp8"].bytes_read == kv_bytes // 2
