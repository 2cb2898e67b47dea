"""Shared helpers of the LLM tests (test_llm_parity.py, test_llm_api.py): tiny random
Hugging Face checkpoints of each decoder-only family, a tiny tokenizer, left padding,
and teacher-forced logits through the compiled model.

The models are tiny (hidden 64, 2 layers, 4 heads / 2 KV heads, vocab 256) so that a
compile takes about a second; `initializer_range=0.2` makes the random weights large
enough that greedy decoding does not collapse into repeating one token.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny tensors: with 2 OpenMP threads on a busy 2-core machine, every parallel op waits a
    scheduler slice for the other thread (softmax of 128 floats: ~8 ms instead of ~3 us).
    One thread is faster here and computes the same values for HF and the device alike.
    Used by importing it into a test module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VOCAB = 256
PAD = 0  # pad token id of every tiny model (and of the tiny tokenizer)

LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
}
MISTRAL_WINDOW = 16  # small, so that the test prompts are longer than the window and it matters

_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.2,
    # No eos: greedy runs the full max_new_tokens, so rows are comparable token by token.
    bos_token_id=1, eos_token_id=None, pad_token_id=PAD,
)

FAMILIES = {
    # GQA (4 heads / 2 KV heads), llama3 rope scaling, tied embeddings
    "llama": (LlamaConfig, LlamaForCausalLM, dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    # q/k/v projections with bias (Qwen2's default)
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    # per-head RMSNorm of Q and K (q_norm / k_norm), no q/k/v bias, head_dim 32 != hidden / heads
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32, tie_word_embeddings=False)),
    # sliding-window attention on every layer
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=MISTRAL_WINDOW, tie_word_embeddings=False)),
}


# Families whose configs name their sizes another way (or have no GQA): full kwargs, not merged with _COMMON.
_TOKENS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=None, pad_token_id=PAD)
ZOO = {
    # Llama's layer with fused qkv_proj / gate_up_proj, RoPE on half of each head
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(_COMMON, partial_rotary_factor=0.5, tie_word_embeddings=False)),
    # learned absolute positions, LayerNorm, GELU, Conv1D projections, tied head
    "gpt2": (GPT2Config, GPT2LMHeadModel, dict(_TOKENS, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=256,
                                                activation_function="gelu_new", initializer_range=0.2)),
    # learned positions from row 2, pre-LN, ReLU
    "opt": (OPTConfig, OPTForCausalLM, dict(_TOKENS, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=64,
                                            init_std=0.2)),
    # OPT-350m's shape: post-LN (norms after the residual add), embeddings projected in and out
    "opt_post_ln": (OPTConfig, OPTForCausalLM, dict(_TOKENS, hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, ffn_dim=128, max_position_embeddings=256,
                                                    word_embed_proj_dim=32, do_layer_norm_before=False,
                                                    init_std=0.2)),
    # sliding-window and global layers, scaled embedding, sandwich norms, attention and final-logit soft caps
    # (HF applies the attention cap in its eager attention only); untied: a tied random Gemma repeats one token
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, dict(
        _COMMON, head_dim=16, sliding_window=MISTRAL_WINDOW, query_pre_attn_scalar=16,
        attn_logit_softcapping=2.0, final_logit_softcapping=5.0, attn_implementation="eager",
        tie_word_embeddings=False)),
    # Gemma 2's layout with per-head Q/K norms, one RoPE per layer type (local base 10k, global 1M), no soft caps
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, dict(
        _COMMON, head_dim=32, sliding_window=MISTRAL_WINDOW, query_pre_attn_scalar=32,
        layer_types=["sliding_attention", "full_attention"], attn_implementation="eager",
        tie_word_embeddings=False)),
    # 4 experts, top-2 (renormalised), Mistral's window
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(
        _COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=MISTRAL_WINDOW, tie_word_embeddings=False)),
    # 4 experts, top-2 not renormalised, a dense first layer (mlp_only_layers), Q/K norms
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(
        _COMMON, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96, norm_topk_prob=False,
        mlp_only_layers=[0], tie_word_embeddings=False)),
}


def hf_config(family: str, **overrides):
    if family in ZOO:
        config_cls, _, kwargs = ZOO[family]
        return config_cls(**{**kwargs, **overrides})
    config_cls, _, extra = FAMILIES[family]
    return config_cls(**{**_COMMON, **extra, **overrides})


def make_hf_model(family: str, seed: int = 0, **overrides):
    """A random fp32 HF model of `family`, the same for the same seed whatever ran before."""
    _, model_cls, _ = ZOO[family] if family in ZOO else FAMILIES[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(hf_config(family, **overrides))
        if family in ("qwen3", "gemma3"):
            # q_norm / k_norm weights start at ones; random ones make a dropped or swapped norm weight visible.
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith(("q_norm.weight", "k_norm.weight")):
                        param.uniform_(0.5, 1.5)
    return model.float().eval()


SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3


def token_chars(vocab_size: int = VOCAB) -> list[str]:
    """One printable character per non-special token id: ASCII '!'..'~', then Latin-1 letters on."""
    count = vocab_size - len(SPECIAL_TOKENS)
    ascii_chars = [chr(c) for c in range(0x21, 0x7F)]
    return (ascii_chars + [chr(0xC0 + i) for i in range(max(0, count - len(ascii_chars)))])[:count]


def make_tokenizer(vocab_size: int = VOCAB):
    """A character-level tokenizer: token id 4 + i is the i-th character of `token_chars`.

    Text round-trips (so transformers' stop-string matching, which tokenizes a probe string,
    works) and each generated token is one visible character.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({char: len(SPECIAL_TOKENS) + i for i, char in enumerate(token_chars(vocab_size))})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


def save_source(folder: Path, family: str = "llama", tokenizer: bool = False, seed: int = 0, **overrides):
    """Write a HF checkpoint folder (config, weights, generation config[, tokenizer]); returns (folder, model)."""
    model = make_hf_model(family, seed=seed, **overrides)
    model.save_pretrained(folder)
    if tokenizer:
        make_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return Path(folder), model


def random_prompts(lengths, seed: int = 0, vocab: int = VOCAB) -> list[torch.Tensor]:
    """Prompts of the given lengths, token ids in [4, vocab) (no pad / bos / unk)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g) for n in lengths]


def left_pad(prompts: list[torch.Tensor], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a batch of 1-D prompts, left padded."""
    width = max(p.shape[0] for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[0]:] = p
        mask[row, width - p.shape[0]:] = 1
    return ids, mask


def hf_generate(hf_model, prompt: torch.Tensor, **kwargs) -> torch.Tensor:
    """HF generate on one unpadded prompt: the new tokens only (1-D)."""
    with torch.no_grad():
        out = hf_model.generate(input_ids=prompt[None], attention_mask=torch.ones_like(prompt)[None], **kwargs)
    return out[0, prompt.shape[0]:]


def hf_logits(hf_model, sequence: torch.Tensor) -> torch.Tensor:
    """fp32 HF logits [len, vocab] of one unpadded sequence (position i predicts token i + 1)."""
    with torch.no_grad():
        return hf_model(input_ids=sequence[None]).logits[0].float()


def rbln_teacher_forced(model, prompts: list[torch.Tensor], continuations: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of the compiled model for each row, teacher forced through `model.forward`.

    Prefill of the (left-padded) batch, then one decode step per continuation token, feeding
    the given tokens instead of the model's own. Row r gets logits [len(continuation) + 1, vocab]:
    row 0 predicts continuation[0] (from the prefill), row i + 1 predicts continuation[i + 1].
    """
    steps = continuations[0].shape[0]
    assert all(c.shape[0] == steps for c in continuations)
    ids, mask = left_pad(prompts)
    try:
        out = model.forward(input_ids=ids, attention_mask=mask)
        logits, positions = [out.logits[:, -1].float()], out.next_positions
        for i in range(steps):
            step_ids = torch.stack([c[i] for c in continuations])[:, None]
            out = model.forward(input_ids=step_ids, rbln_positions=positions)
            logits.append(out.logits[:, -1].float())
            positions = out.next_positions
    finally:
        for slot in range(model.rbln_config.batch_size):
            model.block_manager.free(slot)
    stacked = torch.stack(logits, dim=1)  # [batch, steps + 1, vocab]
    return [stacked[r] for r in range(len(prompts))]


# Two LoRA adapters of the tiny models, with different ranks and targets, one rsLoRA:
# (lora_int_id, lora_name, target modules, r, other PEFT options).
LORA_ADAPTERS = ((1, "attn", ["q_proj", "v_proj", "down_proj"], 4, {}),
                 (2, "mlp", ["k_proj", "o_proj", "gate_proj", "up_proj"], 8, {"use_rslora": True}))


def save_lora_adapters(root: Path, family: str) -> dict[int, Path]:
    """LORA_ADAPTERS built by PEFT for `family` under root: {lora_int_id: folder}."""
    return {i: save_lora_adapter(root / name, family, targets, r, seed=i, **extra)
            for i, name, targets, r, extra in LORA_ADAPTERS}


def lora_config_of(adapters: dict[int, Path]):
    """The RBLNLoRAConfig compiling LORA_ADAPTERS from their folders."""
    from optimum_npu import RBLNLoRAAdapterConfig, RBLNLoRAConfig

    return RBLNLoRAConfig(adapters=[RBLNLoRAAdapterConfig(i, name, str(adapters[i])) for i, name, *_ in LORA_ADAPTERS])


def save_lora_adapter(folder: Path, family: str, targets: list[str], r: int, seed: int, **lora_options) -> Path:
    """A PEFT LoRA adapter folder for `make_hf_model(family)`, built with PEFT itself (its own
    adapter_config.json and adapter_model.safetensors). PEFT starts lora_B at zero (no effect);
    both factors are drawn at random here, large enough to change greedy tokens."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(make_hf_model(family), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                                  **lora_options))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    peft_model.save_pretrained(folder)
    return Path(folder)


def peft_merged_model(family: str, adapter: Path | None):
    """The fp32 HF model with the adapter merged into its weights by PEFT (None: the base model)."""
    from peft import PeftModel

    model = make_hf_model(family)
    if adapter is None:
        return model
    # torch_device: PEFT otherwise loads onto torch.accelerator's device, which is the eager `rbln`
    # device once a test has registered it (torch_backend), and safetensors cannot load there.
    return PeftModel.from_pretrained(model, str(adapter), torch_device="cpu").merge_and_unload().eval()
