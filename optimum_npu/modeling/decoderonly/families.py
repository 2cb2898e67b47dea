"""The decoder-only families: each is a mapping to its Hugging Face class, nothing more.

A new Llama-like family is three lines here plus its config class; the model code is
`RBLNDecoderOnlyModelForCausalLM` for all of them; `RBLNAutoModelForCausalLM` (modeling/auto.py)
picks one from a checkpoint's model_type.
"""

from __future__ import annotations

from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

from .configuration_decoderonly import (
    RBLNLlamaForCausalLMConfig,
    RBLNMistralForCausalLMConfig,
    RBLNQwen2ForCausalLMConfig,
    RBLNQwen3ForCausalLMConfig,
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


list_for_pipelines("MODEL_FOR_CAUSAL_LM_MAPPING",
                   [RBLNLlamaForCausalLM, RBLNQwen2ForCausalLM, RBLNQwen3ForCausalLM, RBLNMistralForCausalLM])
