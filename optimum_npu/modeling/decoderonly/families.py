"""The decoder-only families: each is a mapping to its Hugging Face class, nothing more.

A new Llama-like family is three lines here plus its config class; the model code is
`RBLNDecoderOnlyModelForCausalLM` for all of them.
"""

from __future__ import annotations

from transformers import AutoConfig, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

from ...configuration import RBLNModelConfig
from ..base import MODEL_REGISTRY, _resolve_folder, hub_kwargs_of, is_compiled_folder
from .configuration_decoderonly import (
    RBLNDecoderOnlyModelForCausalLMConfig,
    RBLNLlamaForCausalLMConfig,
    RBLNMistralForCausalLMConfig,
    RBLNQwen2ForCausalLMConfig,
    RBLNQwen3ForCausalLMConfig,
)
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


# HF `model_type` -> the RBLN class serving it.
CAUSAL_LM_BY_MODEL_TYPE: dict[str, type[RBLNDecoderOnlyModelForCausalLM]] = {
    "llama": RBLNLlamaForCausalLM,
    "qwen2": RBLNQwen2ForCausalLM,
    "qwen3": RBLNQwen3ForCausalLM,
    "mistral": RBLNMistralForCausalLM,
}


class RBLNAutoModelForCausalLM:
    """Picks the RBLN class: from `rbln_config.json` for a compiled folder, else from the HF config."""

    @classmethod
    def class_for(cls, model_id, export: bool = False, **hub_kwargs) -> type[RBLNDecoderOnlyModelForCausalLM]:
        if not export:
            folder = _resolve_folder(model_id, hub_kwargs)
            if is_compiled_folder(folder):
                name = RBLNModelConfig.load(folder).cls_name
                if name not in MODEL_REGISTRY or not issubclass(MODEL_REGISTRY[name], RBLNDecoderOnlyModelForCausalLM):
                    raise ValueError(f"{folder} was compiled for {name!r}, which is not a causal LM class")
                return MODEL_REGISTRY[name]
        model_type = AutoConfig.from_pretrained(model_id, **hub_kwargs).model_type
        if model_type not in CAUSAL_LM_BY_MODEL_TYPE:
            raise ValueError(
                f"model_type {model_type!r} is not supported yet; supported: {', '.join(sorted(CAUSAL_LM_BY_MODEL_TYPE))}"
            )
        return CAUSAL_LM_BY_MODEL_TYPE[model_type]

    @classmethod
    def from_pretrained(cls, model_id, export: bool = False, **kwargs):
        hub_kwargs = hub_kwargs_of(kwargs)
        return cls.class_for(model_id, export, **hub_kwargs).from_pretrained(model_id, export=export, **kwargs)

    @classmethod
    def from_model(cls, hf_model, **kwargs):
        model_type = hf_model.config.model_type
        if model_type not in CAUSAL_LM_BY_MODEL_TYPE:
            raise ValueError(f"model_type {model_type!r} is not supported yet")
        return CAUSAL_LM_BY_MODEL_TYPE[model_type].from_model(hf_model, **kwargs)

