"""The compiled decoder against the fp32 Hugging Face model it was compiled from.

- numerics="exact": greedy generate is token-identical to HF for a left-padded batch of
  prompts of different lengths (each row compared to HF on its own unpadded prompt), for
  Llama (GQA, llama3 rope scaling, tied embeddings), Qwen2 (q/k/v bias), Qwen3 (q_norm /
  k_norm, head_dim != hidden / heads) and Mistral (sliding window shorter than the prompts).
- device numerics (bf16, fp16): teacher-forced logits of the prefill and of every decode
  step are within a stated tolerance of HF fp32, and the top-1 token agrees wherever HF's
  top-1 margin is above a stated 16-bit noise threshold.
- Options that must not change results (exact mode): flash vs eager attention (also with a
  sliding window, and across a 4096-token KV partition), chunked vs unchunked prefill (and a
  last chunk shifted back at the end of the cache), each decode bucket.
"""

import pytest
import torch

from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)
from llm_fixtures import (
    MISTRAL_WINDOW,
    hf_generate,
    hf_logits,
    left_pad,
    make_hf_model,
    random_prompts,
    rbln_teacher_forced,
    save_source,
)
from optimum_npu import RBLNAutoModelForCausalLM

# numerics="exact" runs fp32 on the host, with the same ops as transformers in another order
# (paged KV gather, per-block softmax): logits differ by float32 rounding only, ~1e-6 x |logit| <= ~10.
EXACT_LOGITS_ATOL = 1e-4
# Two compiled variants in exact mode (flash vs eager, chunk sizes, buckets) do the same fp32 math
# up to summation order: the bound.
VARIANT_LOGITS_ATOL = 1e-5
# Device numerics, as a fraction of the largest |logit| of the row. bf16 keeps an 8-bit mantissa
# (2^-9 relative per rounding): the HF model itself run in bf16 is off by up to ~5% of max |logit|
# on these tiny models (measured), and so is the device (3-6%); 10% leaves 2x headroom.
BF16_LOGITS_RTOL = 0.10
# fp16 keeps 11 bits, 8x finer than bf16; measured <= 0.35% of max |logit|.
FP16_LOGITS_RTOL = 0.01
# The mean error is ~1/7 of the max error (measured): a mean above a quarter of the tolerance
# means a systematic error, not rounding.
MEAN_ERROR_FRACTION = 0.25
# Top-1 must agree where HF's margin (top1 - top2) is above this fraction of the tolerance: a flip
# there needs the top two logits to err in opposite directions by ~1/4 of the max tolerance each,
# 2x the typical (mean) 16-bit error.
TOP1_MARGIN_FRACTION = 0.5

DEVICE_RTOL = {"bfloat16": BF16_LOGITS_RTOL, "float16": FP16_LOGITS_RTOL}
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
NEW_TOKENS = 10
# 70 > prefill chunk (64): two chunks; 9 < Mistral's window, 23 and 70 > it.
PROMPT_LENGTHS = (70, 23, 9)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """family -> (HF checkpoint folder, fp32 HF model)."""
    return {family: save_source(tmp_path_factory.mktemp(family), family) for family in FAMILIES}


def compile_model(folder, cls=RBLNAutoModelForCausalLM, **options):
    options = {"rbln_batch_size": 3, "rbln_max_seq_len": 256, "rbln_prefill_chunk_size": 64, **options}
    return cls.from_pretrained(folder, export=True, **options)


def rbln_generate(model, prompts, **kwargs):
    """generate on a left-padded batch; the new tokens [batch, n] (and the output object if asked)."""
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    sequences = out.sequences if hasattr(out, "sequences") else out
    return sequences[:, ids.shape[1]:], out


def assert_close(actual, expected, atol, what):
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"{what}: max |difference| {err:.3g} > {atol}"


# --------------------------------------------------------------------------- exact numerics


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_greedy_generate_is_token_identical_to_hf(sources, family):
    folder, hf = sources[family]
    prompts = random_prompts(PROMPT_LENGTHS, seed=1)
    model = compile_model(folder, rbln_numerics="exact")
    try:
        new, _ = rbln_generate(model, prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert model.generation_stats.prompt_tokens == list(PROMPT_LENGTHS)
        for row, prompt in enumerate(prompts):
            expected = hf_generate(hf, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert new[row].tolist() == expected.tolist(), f"{family} row {row} (prompt of {prompt.shape[0]})"
        # Not degenerate: the random model does not just repeat one token.
        assert len(set(new.flatten().tolist())) > NEW_TOKENS

        # The logits themselves, teacher forced along HF's tokens: fp32 rounding only.
        continuations = [hf_generate(hf, p, max_new_tokens=6, do_sample=False)[:-1] for p in prompts]
        for prompt, cont, logits in zip(prompts, continuations, rbln_teacher_forced(model, prompts, continuations)):
            expected = hf_logits(hf, torch.cat([prompt, cont]))[prompt.shape[0] - 1:]
            assert_close(logits, expected, EXACT_LOGITS_ATOL, f"{family} exact logits, prompt {prompt.shape[0]}")
    finally:
        model.close()


def test_mistral_window_matters_for_these_prompts(sources):
    """Guards the Mistral parity test: without the sliding window HF generates other tokens."""
    _, hf = sources["mistral"]
    unwindowed = make_hf_model("mistral", sliding_window=None)
    prompt = random_prompts(PROMPT_LENGTHS, seed=1)[0]
    assert prompt.shape[0] > MISTRAL_WINDOW
    windowed = hf_generate(hf, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    full = hf_generate(unwindowed, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert windowed.tolist() != full.tolist()


def test_qwen3_head_norms_matter_for_these_prompts(sources):
    """Guards the Qwen3 parity test: with q_norm / k_norm dropped, HF generates other tokens."""
    _, hf = sources["qwen3"]
    unnormed = make_hf_model("qwen3")
    for layer in unnormed.model.layers:
        layer.self_attn.q_norm = torch.nn.Identity()
        layer.self_attn.k_norm = torch.nn.Identity()
    prompt = random_prompts(PROMPT_LENGTHS, seed=1)[0]
    normed = hf_generate(hf, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    dropped = hf_generate(unnormed, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert normed.tolist() != dropped.tolist()


# --------------------------------------------------------------------------- device numerics


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_device_numerics_teacher_forced_logits_within_tolerance(sources, family, dtype):
    folder, hf = sources[family]
    model = compile_model(folder, rbln_batch_size=2, rbln_numerics="device", rbln_dtype=dtype)
    check_device_logits(model, hf, f"{family} {dtype}", DEVICE_RTOL[dtype])


def test_device_numerics_with_flash_attention(long_context_sources):
    """bf16 through the flash kernel (online softmax over KV partitions) is as close as eager."""
    folder, hf = long_context_sources["llama"]
    model = compile_model(folder, rbln_batch_size=2, rbln_max_seq_len=8192, rbln_kvcache_partition_len=4096,
                          rbln_numerics="device", rbln_dtype="bfloat16")
    check_device_logits(model, hf, "llama bf16 flash", BF16_LOGITS_RTOL)


def check_device_logits(model, hf, what, rtol, checked_steps=None):
    """Teacher-forced logits of `model` (closed afterwards) against fp32 HF, prefill and 11 decode steps
    (only those `checked_steps(sequence, first_step)` marks, a bool per step, if given)."""
    prompts = random_prompts((70, 23), seed=2)
    # HF's greedy tokens are fed back at every step, so both sides see the same sequence.
    continuations = [hf_generate(hf, p, max_new_tokens=12, do_sample=False)[:-1] for p in prompts]
    try:
        outputs = rbln_teacher_forced(model, prompts, continuations)
    finally:
        model.close()
    checked = 0
    for prompt, cont, logits in zip(prompts, continuations, outputs):
        row = f"{what}, prompt of {prompt.shape[0]}"
        expected = hf_logits(hf, torch.cat([prompt, cont]))[prompt.shape[0] - 1:]  # prefill + each decode step
        assert logits.shape == expected.shape == (cont.shape[0] + 1, hf.config.vocab_size)
        if checked_steps is not None:
            keep = checked_steps(torch.cat([prompt, cont]), prompt.shape[0] - 1)
            logits, expected = logits[keep], expected[keep]
        scale = expected.abs().amax(dim=-1, keepdim=True)
        error = (logits - expected).abs()
        worst = (error / scale).max().item()
        assert worst <= rtol, f"{row}: max error {worst:.3g} x max|logit| > {rtol}"
        mean = (error.mean(dim=-1, keepdim=True) / scale).max().item()
        assert mean <= MEAN_ERROR_FRACTION * rtol, f"{row}: mean error {mean:.3g} x max|logit|"
        top2 = expected.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > TOP1_MARGIN_FRACTION * rtol * scale[:, 0]
        agree = logits.argmax(-1) == expected.argmax(-1)
        assert agree[clear].all(), f"{row}: top-1 differs at steps {(clear & ~agree).nonzero().flatten().tolist()}"
        checked += int(clear.sum())
    assert checked >= 4, "too few steps with a clear top-1 margin: the top-1 check is vacuous"


# --------------------------------------------------------------------------- options that must not change results


@pytest.fixture(scope="module")
def long_context_sources(tmp_path_factory):
    """Llama and Mistral with max_position_embeddings 8192, as flash attention needs max_seq_len >= 8192."""
    return {family: save_source(tmp_path_factory.mktemp(f"{family}8k"), family, max_position_embeddings=8192)
            for family in ("llama", "mistral")}


def test_flash_attention_equals_eager(long_context_sources):
    folder, hf = long_context_sources["llama"]
    prompts = random_prompts((40, 23), seed=3)
    results = {}
    for impl, options in {"eager": {}, "flash": {"rbln_kvcache_partition_len": 4096}}.items():
        model = compile_model(folder, rbln_batch_size=2, rbln_max_seq_len=8192, rbln_numerics="exact", **options)
        try:
            assert model.rbln_config.attn_impl == {"eager": "eager", "flash": "flash_attn"}[impl]
            results[impl] = rbln_generate(model, prompts, max_new_tokens=5, do_sample=False,
                                          return_dict_in_generate=True, output_logits=True)
        finally:
            model.close()
    (eager_tokens, eager_out), (flash_tokens, flash_out) = results["eager"], results["flash"]
    assert flash_tokens.tolist() == eager_tokens.tolist()
    assert_close(torch.stack(flash_out.logits), torch.stack(eager_out.logits), VARIANT_LOGITS_ATOL, "flash vs eager")
    for row, prompt in enumerate(prompts):
        assert flash_tokens[row].tolist() == hf_generate(hf, prompt, max_new_tokens=5, do_sample=False).tolist()


def test_flash_attention_with_a_sliding_window(long_context_sources):
    folder, hf = long_context_sources["mistral"]
    prompts = random_prompts((40, 23), seed=3)  # both longer than the window
    model = compile_model(folder, rbln_batch_size=2, rbln_max_seq_len=8192, rbln_kvcache_partition_len=4096,
                          rbln_numerics="exact")
    try:
        new, _ = rbln_generate(model, prompts, max_new_tokens=5, do_sample=False)
    finally:
        model.close()
    for row, prompt in enumerate(prompts):
        assert new[row].tolist() == hf_generate(hf, prompt, max_new_tokens=5, do_sample=False).tolist(), row


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_flash_attention_across_a_partition_boundary(long_context_sources, family):
    """Prompts past the first 4096-token partition: one crosses it inside a prefill chunk
    (chunk 640: 3840..4480), the other during decode (4090 + 10 tokens). Mistral's window
    then spans two partitions."""
    folder, hf = long_context_sources[family]
    prompts = random_prompts((4150, 4090), seed=4)
    model = compile_model(folder, rbln_batch_size=2, rbln_max_seq_len=8192, rbln_prefill_chunk_size=640,
                          rbln_kvcache_partition_len=4096, rbln_numerics="exact")
    try:
        new, _ = rbln_generate(model, prompts, max_new_tokens=10, do_sample=False)
    finally:
        model.close()
    for row, prompt in enumerate(prompts):
        assert new[row].tolist() == hf_generate(hf, prompt, max_new_tokens=10, do_sample=False).tolist(), row


def test_chunked_prefill_equals_unchunked(sources):
    folder, hf = sources["llama"]
    prompts = random_prompts((150, 97), seed=5)  # 150 tokens: 3 chunks of 64, or one of 256
    results = {}
    for chunk in (64, 256):
        model = compile_model(folder, rbln_batch_size=2, rbln_prefill_chunk_size=chunk, rbln_numerics="exact")
        try:
            results[chunk] = rbln_generate(model, prompts, max_new_tokens=6, do_sample=False,
                                           return_dict_in_generate=True, output_logits=True)
        finally:
            model.close()
    (tokens_64, out_64), (tokens_256, out_256) = results[64], results[256]
    assert tokens_64.tolist() == tokens_256.tolist()
    assert_close(torch.stack(out_64.logits), torch.stack(out_256.logits), VARIANT_LOGITS_ATOL, "chunk 64 vs 256")
    for row, prompt in enumerate(prompts):
        assert tokens_64[row].tolist() == hf_generate(hf, prompt, max_new_tokens=6, do_sample=False).tolist()


def test_last_prefill_chunk_shifted_back_at_the_end_of_the_cache(sources):
    """chunk 192, max_seq_len 256: a 230-token prompt's second chunk would end at 384, past the cache,
    so it runs over positions 64..255 instead (recomputing 64..191)."""
    folder, hf = sources["llama"]
    prompts = random_prompts((230, 200), seed=7)
    model = compile_model(folder, rbln_batch_size=2, rbln_prefill_chunk_size=192, rbln_numerics="exact")
    try:
        new, _ = rbln_generate(model, prompts, max_new_tokens=10, do_sample=False)
    finally:
        model.close()
    for row, prompt in enumerate(prompts):
        assert new[row].tolist() == hf_generate(hf, prompt, max_new_tokens=10, do_sample=False).tolist(), row


def test_each_decode_bucket_gives_the_same_outputs(sources):
    """decoder_batch_sizes [4, 2, 1]: batches of 1, 2, 3 run in buckets 1, 2, 4 (3 = 4 with a padding row)."""
    folder, hf = sources["qwen2"]
    prompts = random_prompts((31, 12, 50), seed=6)
    expected = [hf_generate(hf, p, max_new_tokens=6, do_sample=False).tolist() for p in prompts]
    model = compile_model(folder, rbln_batch_size=4, rbln_decoder_batch_sizes=[4, 2, 1],
                          rbln_numerics="exact")
    try:
        assert sorted(name for name in model.runtimes) == ["decoder_batch_1", "decoder_batch_2", "decoder_batch_4",
                                                           "prefill"]
        first_row_logits = {}
        for batch, bucket in ((1, 1), (2, 2), (3, 4)):
            runs_before = {name: rt.stats.runs for name, rt in model.runtimes.items()}
            new, out = rbln_generate(model, prompts[:batch], max_new_tokens=6, do_sample=False,
                                     return_dict_in_generate=True, output_logits=True)
            assert model.generation_stats.decode_bucket == bucket
            ran = {name for name, rt in model.runtimes.items() if rt.stats.runs > runs_before[name]}
            assert ran == {"prefill", f"decoder_batch_{bucket}"}, (batch, ran)
            for row in range(batch):
                assert new[row].tolist() == expected[row], (batch, row)
            first_row_logits[batch] = torch.stack(out.logits)[:, 0]
    finally:
        model.close()
    for batch in (2, 3):
        assert_close(first_row_logits[batch], first_row_logits[1], VARIANT_LOGITS_ATOL, f"row 0, batch {batch} vs 1")


@pytest.mark.parametrize("attention", ["eager", "flash"])
def test_explicit_attention_mask_graphs_give_the_same_tokens(sources, long_context_sources, attention):
    """rbln_use_attention_mask: every graph takes attention_mask [batch, max_seq_len] (built on the
    host from positions); exact-mode tokens stay those of HF, including a padding row in the bucket."""
    if attention == "eager":
        folder, hf = sources["llama"]
        options = {}
    else:
        folder, hf = long_context_sources["llama"]
        options = dict(rbln_max_seq_len=8192, rbln_kvcache_partition_len=4096)
    prompts = random_prompts((70, 23, 9), seed=8)
    model = compile_model(folder, rbln_batch_size=4, rbln_use_attention_mask=True, rbln_numerics="exact", **options)
    try:
        for graph in model.graphs.values():
            names = [spec.name for spec in graph.program.inputs]
            assert names[-1] == "attention_mask", names
        new, _ = rbln_generate(model, prompts, max_new_tokens=8, do_sample=False)
        assert model.generation_stats.decode_bucket == 4  # 3 rows + 1 padding row
    finally:
        model.close()
    for row, prompt in enumerate(prompts):
        assert new[row].tolist() == hf_generate(hf, prompt, max_new_tokens=8, do_sample=False).tolist(), row
