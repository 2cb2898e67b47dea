"""The decoder-only families: each is a mapping to its Hugging Face class, nothing more.

A new family is three lines here plus its config class (and, if it names its modules other than
Llama does, a layout in layouts.py); the model code is `RBLNDecoderOnlyModelForCausalLM` for all
of them; `RBLNAutoModelForCausalLM` (modeling/auto.py) picks one from a checkpoint's model_type.
"""

from __future__ import annotations

from transformers import (
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    MistralForCausalLM,
    MixtralForCausalLM,
    OPTForCausalLM,
    Phi3ForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
    Qwen3MoeForCausalLM,
)

from .configuration_decoderonly import (
    RBLNGemma2ForCausalLMConfig,
    RBLNGemma3ForCausalLMConfig,
    RBLNGPT2LMHeadModelConfig,
    RBLNLlamaForCausalLMConfig,
    RBLNMistralForCausalLMConfig,
    RBLNMixtralForCausalLMConfig,
    RBLNOPTForCausalLMConfig,
    RBLNPhi3ForCausalLMConfig,
    RBLNQwen2ForCausalLMConfig,
    RBLNQwen3ForCausalLMConfig,
    RBLNQwen3MoeForCausalLMConfig,
)
from ..transformers_pipelines import list_for_pipelines
from .modeling_decoderonly import RBLNDecoderOnlyModelForCausalLM


class RBLNLlamaForCausalLM(RBLNDecoderOnlyModelForCausalLM):
    hf_class = LlamaForCausalLM
    config_class = RBLNLlamaForCausalLMConfig


class RBLNQwen2ForCausalLM(RBLNDecoderOnlyModelForCausalLM):
    hf_class = Qwen2ForCausalLM
    config_class = RBLNQwen2ForCausalLMConfig


class RBLNQwen3ForCausalLM(RBLNDecoderOnlyModelForCausalLM):
    """Qwen3: Qwen2's layout without q/k/v bias, plus an RMSNorm over each head of Q and K
    (q_norm / k_norm, applied before RoPE), which the shared decoder layer runs."""

    hf_class = Qwen3ForCausalLM
    config_class = RBLNQwen3ForCausalLMConfig


class RBLNMistralForCausalLM(RBLNDecoderOnlyModelForCausalLM):
    hf_class = MistralForCausalLM
    config_class = RBLNMistralForCausalLMConfig


class RBLNPhi3ForCausalLM(RBLNDecoderOnlyModelForCausalLM):
    """Phi-3: Llama's layer with Q/K/V and gate/up fused in the checkpoint already (taken as they are),
    RoPE over the first partial_rotary_factor of each head."""

    hf_class = Phi3ForCausalLM
    config_class = RBLNPhi3ForCausalLMConfig


class RBLNGPT2LMHeadModel(RBLNDecoderOnlyModelForCausalLM):
    """GPT-2: learned absolute positions, LayerNorm, GELU MLP, Conv1D projections (layouts.GPT2Layout)."""

    hf_class = GPT2LMHeadModel
    config_class = RBLNGPT2LMHeadModelConfig


class RBLNOPTForCausalLM(RBLNDecoderOnlyModelForCausalLM):
    """OPT: learned absolute positions (offset 2), LayerNorm before each block (after, for OPT-350m), ReLU
    MLP, optional input / output projections (layouts.OPTLayout)."""

    hf_class = OPTForCausalLM
    config_class = RBLNOPTForCausalLMConfig


class RBLNGemma2ForCausalLM(RBLNDecoderOnlyModelForCausalLM):
    """Gemma 2: sliding-window and global layers alternating (config.layer_types), the embedding scaled
    by sqrt(hidden), RMSNorms around attention and MLP, attention scores and final logits soft-capped."""

    hf_class = Gemma2ForCausalLM
    config_class = RBLNGemma2ForCausalLMConfig


class RBLNGemma3ForCausalLM(RBLNDecoderOnlyModelForCausalLM):
    """Gemma 3's text decoder: Gemma 2's layout with per-head Q/K norms, no soft caps by default, and one
    RoPE per layer type (a local base frequency for the sliding-window layers)."""

    hf_class = Gemma3ForCausalLM
    config_class = RBLNGemma3ForCausalLMConfig


class RBLNMixtralForCausalLM(RBLNDecoderOnlyModelForCausalLM):
    """Mixtral: Mistral's attention, a mixture of experts in place of the MLP (router, top-k, renormalised
    weights) run as one device kernel priced by the experts the tokens pick; split by experts under TP."""

    hf_class = MixtralForCausalLM
    config_class = RBLNMixtralForCausalLMConfig


class RBLNQwen3MoeForCausalLM(RBLNDecoderOnlyModelForCausalLM):
    """Qwen3-MoE: Qwen3's attention, experts in the sparse layers (norm_topk_prob says whether the
    top-k weights are renormalised), Qwen3's gated MLP in the dense ones (mlp_only_layers)."""

    hf_class = Qwen3MoeForCausalLM
    config_class = RBLNQwen3MoeForCausalLMConfig


list_for_pipelines("MODEL_FOR_CAUSAL_LM_MAPPING",
                   [RBLNLlamaForCausalLM, RBLNQwen2ForCausalLM, RBLNQwen3ForCausalLM, RBLNMistralForCausalLM,
                    RBLNPhi3ForCausalLM, RBLNGPT2LMHeadModel, RBLNOPTForCausalLM, RBLNGemma2ForCausalLM,
                    RBLNGemma3ForCausalLM, RBLNMixtralForCausalLM, RBLNQwen3MoeForCausalLM])
