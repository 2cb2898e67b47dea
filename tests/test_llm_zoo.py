"""The decoder families beyond Llama's four, each against the fp32 Hugging Face model it was
compiled from (the tolerances are test_llm_parity.py's, stated there):

- numerics="exact": the auto class picks the family from the checkpoint's model_type; greedy
  generate on a left-padded batch is token-identical to HF (each row against HF on its own
  prompt), the teacher-forced logits within fp32 rounding; the folder saved and loaded back
  without compiling generates the same tokens (GPT-2 in the default tier, the rest heavy).
- device numerics (bf16, fp16; heavy tier): teacher-forced logits of the prefill and 11 decode
  steps within BF16_LOGITS_RTOL / FP16_LOGITS_RTOL of max |logit| of HF fp32, top-1 agreeing where
  HF's margin is clear.

Families: Phi-3 (fused qkv / gate_up, partial RoPE), GPT-2 (learned positions, LayerNorm, GELU,
Conv1D), OPT (positions from row 2; pre-LN, and OPT-350m's post-LN with projected embeddings),
Gemma 2 (sliding-window and global layers, scaled embedding, sandwich norms, attention-score and
final-logit soft caps), Gemma 3 text (per-head Q/K norms, a local and a global RoPE), Mixtral
and Qwen3-MoE (router, top-k experts; test_moe.py tests the kernel, its price and TP).
"""

import pytest
import torch

from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)
from llm_fixtures import hf_generate, hf_logits, make_hf_model, random_prompts, rbln_teacher_forced, save_source
from optimum_npu import RBLNAutoModelForCausalLM
from optimum_npu.modeling import base
from test_llm_parity import DEVICE_RTOL, EXACT_LOGITS_ATOL, assert_close, check_device_logits, compile_model, rbln_generate

# family -> the class RBLNAutoModelForCausalLM must pick from its model_type
ZOO_CLASSES = {
    "phi3": "RBLNPhi3ForCausalLM",
    "gpt2": "RBLNGPT2LMHeadModel",
    "opt": "RBLNOPTForCausalLM",
    "opt_post_ln": "RBLNOPTForCausalLM",
    "gemma2": "RBLNGemma2ForCausalLM",
    "gemma3": "RBLNGemma3ForCausalLM",
    "mixtral": "RBLNMixtralForCausalLM",
    "qwen3_moe": "RBLNQwen3MoeForCausalLM",
}
MOE_FAMILIES = ("mixtral", "qwen3_moe")
NEW_TOKENS = 8
PROMPT_LENGTHS = (70, 9)  # 70 > the prefill chunk (64): two chunks


@pytest.fixture(scope="module")
def zoo_sources(tmp_path_factory):
    return {family: save_source(tmp_path_factory.mktemp(family), family) for family in ZOO_CLASSES}


def check_exact_parity(model, hf, what: str) -> torch.Tensor:
    """Greedy tokens identical to HF row by row, teacher-forced logits within fp32 rounding; the tokens."""
    prompts = random_prompts(PROMPT_LENGTHS, seed=1)
    new, _ = rbln_generate(model, prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
    continuations = []
    for row, prompt in enumerate(prompts):
        expected = hf_generate(hf, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert new[row].tolist() == expected.tolist(), f"{what} row {row} (prompt of {prompt.shape[0]})"
        continuations.append(expected[:5])
    assert len(set(new.flatten().tolist())) > NEW_TOKENS // 2, "degenerate: the random model repeats one token"
    for prompt, cont, logits in zip(prompts, continuations, rbln_teacher_forced(model, prompts, continuations)):
        expected = hf_logits(hf, torch.cat([prompt, cont]))[prompt.shape[0] - 1:]
        assert_close(logits, expected, EXACT_LOGITS_ATOL, f"{what} exact logits, prompt {prompt.shape[0]}")
    return new


# OPT-350m's post-LN variant in the heavy tier (the default tier's time budget): OPT is covered by its pre-LN shape.
@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.heavy) if f == "opt_post_ln" else f
                                    for f in ZOO_CLASSES])
def test_exact_greedy_generate_is_token_identical_to_hf(zoo_sources, family):
    folder, hf = zoo_sources[family]
    model = compile_model(folder, rbln_batch_size=2, rbln_numerics="exact")  # the auto class, from model_type
    try:
        assert type(model).__name__ == ZOO_CLASSES[family]
        check_exact_parity(model, hf, family)
    finally:
        model.close()


# GPT-2 in the default tier: its graphs have no RoPE tables, which the load checks of a folder must allow.
@pytest.mark.parametrize("family", [f if f == "gpt2" else pytest.param(f, marks=pytest.mark.heavy) for f in ZOO_CLASSES])
def test_saved_folder_loads_without_compiling(zoo_sources, family, tmp_path, monkeypatch):
    folder, _ = zoo_sources[family]
    prompts = random_prompts(PROMPT_LENGTHS, seed=1)
    model = compile_model(folder, rbln_batch_size=2, rbln_numerics="exact")
    try:
        tokens, _ = rbln_generate(model, prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
        model.save_pretrained(tmp_path / "compiled")
    finally:
        model.close()

    def refuse(*args, **kwargs):
        raise AssertionError("compile_from_torch was called while loading a compiled folder")

    monkeypatch.setattr(base, "compile_from_torch", refuse)
    loaded = RBLNAutoModelForCausalLM.from_pretrained(tmp_path / "compiled")
    try:
        assert type(loaded).__name__ == ZOO_CLASSES[family]
        again, _ = rbln_generate(loaded, prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(again, tokens)
    finally:
        loaded.close()


def test_partial_rope_and_positions_matter(zoo_sources):
    """Guards the parity tests: Phi-3 with RoPE over whole heads, and GPT-2 / OPT with their position
    tables zeroed, generate other tokens (so the tests see those features)."""
    prompt = random_prompts(PROMPT_LENGTHS, seed=1)[0]
    for family in ("phi3", "gpt2", "opt"):
        _, hf = zoo_sources[family]
        expected = hf_generate(hf, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        if family == "phi3":
            broken = make_hf_model(family, partial_rotary_factor=1.0)
            broken.load_state_dict(hf.state_dict())
        else:
            broken = make_hf_model(family)
            table = broken.transformer.wpe if family == "gpt2" else broken.model.decoder.embed_positions
            with torch.no_grad():
                table.weight.zero_()
        assert hf_generate(broken, prompt, max_new_tokens=NEW_TOKENS, do_sample=False).tolist() != expected.tolist(), family


def test_gemma_features_matter(zoo_sources):
    """Guards the Gemma parity tests: without the attention soft cap (Gemma 2), the sliding window
    (both), or with Gemma 3's local RoPE replaced by the global one, HF generates other tokens;
    without the final-logit cap (monotonic: the same tokens) the logits differ far beyond the
    exact tolerance."""
    prompt = random_prompts(PROMPT_LENGTHS, seed=1)[0]
    _, gemma2 = zoo_sources["gemma2"]
    uncapped = make_hf_model("gemma2", final_logit_softcapping=None)
    uncapped.load_state_dict(gemma2.state_dict())
    assert (hf_logits(uncapped, prompt) - hf_logits(gemma2, prompt)).abs().max() > 100 * EXACT_LOGITS_ATOL
    changes = {
        "gemma2": [dict(attn_logit_softcapping=None), dict(sliding_window=256)],
        "gemma3": [dict(sliding_window=256), dict(rope_parameters={
            kind: {"rope_type": "default", "rope_theta": 1_000_000.0} for kind in ("sliding_attention", "full_attention")
        })],
    }
    for family, overrides in changes.items():
        _, hf = zoo_sources[family]
        expected = hf_generate(hf, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        for override in overrides:
            changed = make_hf_model(family, **override)
            changed.load_state_dict(hf.state_dict())
            tokens = hf_generate(changed, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert tokens.tolist() != expected.tolist(), (family, override)


@pytest.mark.heavy
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", list(ZOO_CLASSES))
def test_device_numerics_teacher_forced_logits_within_tolerance(zoo_sources, family, dtype):
    folder, hf = zoo_sources[family]
    model = compile_model(folder, rbln_batch_size=2, rbln_numerics="device", rbln_dtype=dtype)
    check_device_logits(model, hf, f"{family} {dtype}", DEVICE_RTOL[dtype],
                        checked_steps=routing_clear_steps(hf) if family in MOE_FAMILIES else None)


# Routing is discrete: where a token's k-th and (k+1)-th experts are nearly tied, 16-bit rounding may
# pick the other one, a jump no rounding tolerance describes (transformers' own bf16 run of the tiny
# Mixtral jumps by 0.2 x max|logit| at a step whose margin is 0.004; the device's flips, measured, sit
# at margins 0.007 and below). The MoE families' logits are checked at the steps whose token routes
# with a margin of at least this much (top-k probabilities, fp32 transformers, every MoE layer).
ROUTING_MARGIN = 0.01


def routing_clear_steps(hf):
    """checked_steps for check_device_logits: the steps whose query token's routing margin (the k-th
    minus the (k+1)-th expert probability, in every MoE layer of fp32 `hf`) is at least ROUTING_MARGIN."""
    def clear(sequence, first_step):
        margins, hooks = [], []

        def record(module, inputs, output):
            probs = torch.softmax(output[0].float(), dim=-1)
            top = probs.topk(module.top_k + 1, dim=-1).values
            margins.append(top[:, -2] - top[:, -1])

        for layer in hf.model.layers:
            if hasattr(layer.mlp, "experts"):
                hooks.append(layer.mlp.gate.register_forward_hook(record))
        try:
            with torch.no_grad():
                hf(input_ids=sequence[None])
        finally:
            for hook in hooks:
                hook.remove()
        return torch.stack(margins).min(dim=0).values[first_step:] >= ROUTING_MARGIN

    return clear


# --------------------------------------------------------------------------- the sliding-window (ring) cache

RING_CASES = {"mistral": "sliding_window", "gemma3": "hybrid"}  # every layer windowed / some


@pytest.fixture(scope="module")
def ring_sources(tmp_path_factory):
    return {family: save_source(tmp_path_factory.mktemp(f"{family}_ring"), family) for family in RING_CASES}


# Gemma 3's hybrid (ring and full-cache layers) in the default tier, Mistral's all-ring in the heavy one.
@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.heavy) if f == "mistral" else f
                                    for f in RING_CASES])
def test_ring_cache_is_token_identical_and_window_sized(ring_sources, family, tmp_path):
    """cache_impl sliding_window / hybrid: the windowed layers keep a ring of window + chunk - 1
    positions per sequence (the others the full paged cache); prompts of 150 and 23 tokens (three
    chunks, the ring wrapping several times) generate transformers' tokens, also after a reload."""
    folder, hf = ring_sources[family]
    window, chunk = hf.config.sliding_window, 64
    model = compile_model(folder, rbln_batch_size=2, rbln_numerics="exact", rbln_cache_impl=RING_CASES[family])
    prompts = random_prompts((150, 23), seed=6)
    try:
        config = model.rbln_config
        assert (config.cache_impl, config.sliding_window) == (RING_CASES[family], window)
        windowed = [i for i, kind in enumerate(getattr(hf.config, "layer_types", None) or [])
                    if kind == "sliding_attention"] or list(range(hf.config.num_hidden_layers))
        assert list(config.sliding_window_layers) == windowed
        shapes = {s.name: tuple(s.shape) for s in model.graphs["prefill"].program.buffers}
        for layer in range(hf.config.num_hidden_layers):
            positions = window + chunk - 1 if layer in windowed else 256
            assert shapes[f"k_cache_{layer}"][2] == shapes[f"v_cache_{layer}"][2] == positions, layer
        tokens, _ = rbln_generate(model, prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
        for row, prompt in enumerate(prompts):
            assert tokens[row].tolist() == hf_generate(hf, prompt, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
        model.save_pretrained(tmp_path / "compiled")
    finally:
        model.close()
    loaded = RBLNAutoModelForCausalLM.from_pretrained(tmp_path / "compiled")
    try:
        assert loaded.rbln_config.cache_impl == RING_CASES[family]
        again, _ = rbln_generate(loaded, prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(again, tokens)
    finally:
        loaded.close()


@pytest.mark.parametrize(("family", "options", "message"), [
    ("llama", dict(rbln_cache_impl="hybrid"), "has no sliding-window layers; use 'static'"),
    ("gemma3", dict(rbln_cache_impl="sliding_window"), "only layers \\[0\\] of 2 have a window; use 'hybrid'"),
    ("mistral", dict(rbln_cache_impl="hybrid"), "every layer has a window; use 'sliding_window'"),
    ("mistral", dict(rbln_cache_impl="sliding_window", rbln_sliding_window=8), "the model's window is 16"),
    ("gemma3", dict(rbln_cache_impl="hybrid", rbln_sliding_window_layers=[1]), "windowed layers are \\[0\\]"),
    ("mistral", dict(rbln_sliding_window=16), "with cache_impl='static' they are the model's own"),
    ("mistral", dict(rbln_cache_impl="sliding_window", rbln_use_attention_mask=True), "needs rbln_cache_impl='static'"),
    ("mistral", dict(rbln_cache_impl="ring"), "cache_impl"),
])
def test_ring_cache_options_are_checked_against_the_model(family, options, message):
    with pytest.raises(ValueError, match=message):
        RBLNAutoModelForCausalLM.from_model(make_hf_model(family), rbln_batch_size=1, rbln_max_seq_len=256,
                                            rbln_prefill_chunk_size=64, rbln_create_runtimes=False, **options)


@pytest.mark.heavy
def test_ring_cache_and_soft_caps_split_by_heads_at_tp2(ring_sources):
    """Gemma 2 with its hybrid ring cache and soft caps at tensor_parallel_size=2: the ring buffers split
    by KV heads like the paged ones, greedy tokens still transformers'."""
    hf = make_hf_model("gemma2")
    model = RBLNAutoModelForCausalLM.from_model(hf, rbln_batch_size=2, rbln_max_seq_len=256, rbln_prefill_chunk_size=64,
                                                rbln_numerics="exact", rbln_tensor_parallel_size=2,
                                                rbln_cache_impl="hybrid")
    try:
        shards = model.graphs["decoder_batch_2"].program.tensor_shards
        assert shards["k_cache_0"].dim == 1 and shards["k_cache_1"].dim == 1  # the ring (layer 0) and the paged cache
        prompts = random_prompts((150, 23), seed=6)
        tokens, _ = rbln_generate(model, prompts, max_new_tokens=NEW_TOKENS, do_sample=False)
        for row, prompt in enumerate(prompts):
            assert tokens[row].tolist() == hf_generate(hf, prompt, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
    finally:
        model.close()


def test_a_bidirectional_gemma_is_refused():
    """EmbeddingGemma-style configs attend to later tokens: the causal NPU decoder refuses them."""
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):
        RBLNAutoModelForCausalLM.from_model(make_hf_model("gemma3", use_bidirectional_attention=True),
                                            rbln_batch_size=1, rbln_max_seq_len=256, rbln_prefill_chunk_size=64,
                                            rbln_create_runtimes=False)
