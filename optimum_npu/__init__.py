"""optimum-npu: Hugging Face models on a simulated Rebellions-class NPU."""

import importlib

__version__ = "0.1.0"

# Public name -> module that defines it. Imported on first use so that `import optimum_npu`
# stays cheap (no transformers / diffusers import until a model class is touched).
_EXPORTS = {
    "compile_from_torch": "optimum_npu.compile",
    "plan": "optimum_npu.planning.planner",
    "pipeline": "optimum_npu.pipelines",
    "CompiledModel": "optimum_npu.compile",
    "Runtime": "optimum_npu.sim_device",
    "RuntimeStats": "optimum_npu.sim_device",
    "DeviceMemoryError": "optimum_npu.sim_device",
    "ArtifactError": "optimum_npu.sim_device",
    "devices": "optimum_npu.sim_device",
    "profile": "optimum_npu.sim_device.session",
    "RBLNModel": "optimum_npu.modeling.base",
    "RBLNModelConfig": "optimum_npu.configuration",
    "GraphSpec": "optimum_npu.modeling.base",
    "InferenceStats": "optimum_npu.modeling.base",
    "RBLNTextEncoderModel": "optimum_npu.modeling.encoders",
    "RBLNBertModel": "optimum_npu.modeling.encoders",
    "RBLNCLIPTextModel": "optimum_npu.modeling.encoders",
    "RBLNCLIPTextModelWithProjection": "optimum_npu.modeling.encoders",
    "RBLNT5EncoderModel": "optimum_npu.modeling.encoders",
    "RBLNTextEncoderConfig": "optimum_npu.modeling.encoders",
    "RBLNBertModelConfig": "optimum_npu.modeling.encoders",
    "RBLNCLIPTextModelConfig": "optimum_npu.modeling.encoders",
    "RBLNCLIPTextModelWithProjectionConfig": "optimum_npu.modeling.encoders",
    "RBLNT5EncoderModelConfig": "optimum_npu.modeling.encoders",
    "RBLNModelForSeq2SeqLM": "optimum_npu.modeling.seq2seq.modeling_seq2seq",
    "RBLNT5ForConditionalGeneration": "optimum_npu.modeling.seq2seq.families",
    "RBLNBartForConditionalGeneration": "optimum_npu.modeling.seq2seq.families",
    "RBLNModelForSeq2SeqLMConfig": "optimum_npu.modeling.seq2seq.configuration_seq2seq",
    "RBLNT5ForConditionalGenerationConfig": "optimum_npu.modeling.seq2seq.configuration_seq2seq",
    "RBLNBartForConditionalGenerationConfig": "optimum_npu.modeling.seq2seq.configuration_seq2seq",
    "RBLNWhisperForConditionalGeneration": "optimum_npu.modeling.seq2seq.whisper",
    "RBLNWhisperForConditionalGenerationConfig": "optimum_npu.modeling.seq2seq.configuration_seq2seq",
    "RBLNAutoModel": "optimum_npu.modeling.auto",
    "RBLNAutoModelForCausalLM": "optimum_npu.modeling.auto",
    "RBLNAutoModelForImageClassification": "optimum_npu.modeling.auto",
    "RBLNAutoModelForTextEncoding": "optimum_npu.modeling.auto",
    "RBLNAutoModelForSeq2SeqLM": "optimum_npu.modeling.auto",
    "RBLNAutoModelForSpeechSeq2Seq": "optimum_npu.modeling.auto",
    "RBLNModelForImageClassification": "optimum_npu.modeling.image_classification",
    "RBLNModelForImageClassificationConfig": "optimum_npu.modeling.image_classification",
    "RBLNResNetForImageClassification": "optimum_npu.modeling.image_classification",
    "RBLNConvNextForImageClassification": "optimum_npu.modeling.image_classification",
    "RBLNViTForImageClassification": "optimum_npu.modeling.image_classification",
    "RBLNMobileNetV2ForImageClassification": "optimum_npu.modeling.image_classification",
    "RBLNConvNextV2ForImageClassification": "optimum_npu.modeling.image_classification",
    "RBLNRegNetForImageClassification": "optimum_npu.modeling.image_classification",
    "RBLNMobileNetV1ForImageClassification": "optimum_npu.modeling.image_classification",
    "RBLNDeiTForImageClassification": "optimum_npu.modeling.image_classification",
    "RBLNDinov2ForImageClassification": "optimum_npu.modeling.image_classification",
    "RBLNSwinForImageClassification": "optimum_npu.modeling.image_classification",
    "RBLNDecoderOnlyModelForCausalLM": "optimum_npu.modeling.decoderonly.families",
    "RBLNLlamaForCausalLM": "optimum_npu.modeling.decoderonly.families",
    "RBLNQwen2ForCausalLM": "optimum_npu.modeling.decoderonly.families",
    "RBLNQwen3ForCausalLM": "optimum_npu.modeling.decoderonly.families",
    "RBLNMistralForCausalLM": "optimum_npu.modeling.decoderonly.families",
    "RBLNDecoderOnlyModelForCausalLMConfig": "optimum_npu.modeling.decoderonly.configuration_decoderonly",
    "RBLNLlamaForCausalLMConfig": "optimum_npu.modeling.decoderonly.configuration_decoderonly",
    "RBLNQwen2ForCausalLMConfig": "optimum_npu.modeling.decoderonly.configuration_decoderonly",
    "RBLNQwen3ForCausalLMConfig": "optimum_npu.modeling.decoderonly.configuration_decoderonly",
    "RBLNMistralForCausalLMConfig": "optimum_npu.modeling.decoderonly.configuration_decoderonly",
    "RBLNLlavaForConditionalGeneration": "optimum_npu.modeling.llava",
    "RBLNLlavaForConditionalGenerationConfig": "optimum_npu.modeling.llava",
    "RBLNLlavaVisionTowerConfig": "optimum_npu.modeling.llava",
    "RBLNAutoModelForImageTextToText": "optimum_npu.modeling.auto",
    "RBLNLoRAConfig": "optimum_npu.modeling.decoderonly.lora",
    "RBLNLoRAAdapterConfig": "optimum_npu.modeling.decoderonly.lora",
    # The Cosmos guardrail and its sub-models.
    "RBLNStableDiffusionPipeline": "optimum_npu.diffusers",
    "RBLNStableDiffusionImg2ImgPipeline": "optimum_npu.diffusers",
    "RBLNCosmosTextToWorldPipeline": "optimum_npu.diffusers",
    "RBLNCosmosVideoToWorldPipeline": "optimum_npu.diffusers",
    "RBLNStableDiffusionPipelineConfig": "optimum_npu.diffusers",
    "RBLNStableDiffusionImg2ImgPipelineConfig": "optimum_npu.diffusers",
    "RBLNCosmosTextToWorldPipelineConfig": "optimum_npu.diffusers",
    "RBLNCosmosVideoToWorldPipelineConfig": "optimum_npu.diffusers",
    "RBLNDiffusionPipelineConfig": "optimum_npu.diffusers",
    "RBLNUNet2DConditionModel": "optimum_npu.diffusers",
    "RBLNUNet2DConditionModelConfig": "optimum_npu.diffusers",
    "RBLNAutoencoderKL": "optimum_npu.diffusers",
    "RBLNAutoencoderKLConfig": "optimum_npu.diffusers",
    "RBLNCosmosTransformer3DModel": "optimum_npu.diffusers",
    "RBLNCosmosTransformer3DModelConfig": "optimum_npu.diffusers",
    "RBLNAutoencoderKLCosmos": "optimum_npu.diffusers",
    "RBLNAutoencoderKLCosmosConfig": "optimum_npu.diffusers",
    "RBLNStableDiffusionXLPipeline": "optimum_npu.diffusers",
    "RBLNStableDiffusionXLPipelineConfig": "optimum_npu.diffusers",
    "RBLNStableDiffusionControlNetPipeline": "optimum_npu.diffusers",
    "RBLNStableDiffusionControlNetPipelineConfig": "optimum_npu.diffusers",
    "RBLNStableDiffusionXLControlNetPipeline": "optimum_npu.diffusers",
    "RBLNStableDiffusionXLControlNetPipelineConfig": "optimum_npu.diffusers",
    "RBLNControlNetModel": "optimum_npu.diffusers",
    "RBLNControlNetModelConfig": "optimum_npu.diffusers",
    "RBLNStableDiffusion3Pipeline": "optimum_npu.diffusers",
    "RBLNStableDiffusion3PipelineConfig": "optimum_npu.diffusers",
    "RBLNSD3Transformer2DModel": "optimum_npu.diffusers",
    "RBLNSD3Transformer2DModelConfig": "optimum_npu.diffusers",
    "RBLNCosmosSafetyChecker": "optimum_npu.cosmos_guardrail",
    "RBLNCosmosSafetyCheckerConfig": "optimum_npu.cosmos_guardrail",
    "RBLNLlamaGuard3": "optimum_npu.cosmos_guardrail",
    "RBLNQwen3Guard": "optimum_npu.cosmos_guardrail",
    "RBLNRetinaFace": "optimum_npu.cosmos_guardrail",
    "RBLNRetinaFaceConfig": "optimum_npu.cosmos_guardrail",
    "RBLNSiglipVisionModel": "optimum_npu.cosmos_guardrail",
    "RBLNSiglipVisionModelConfig": "optimum_npu.cosmos_guardrail",
    "RBLNVideoSafetyModel": "optimum_npu.cosmos_guardrail",
    "RBLNVideoSafetyModelConfig": "optimum_npu.cosmos_guardrail",
}

# HF model_type -> the RBLN model classes that compile checkpoints of it, the default one first. A
# static table, as transformers' auto mappings are: which class serves a checkpoint (RBLNAuto*, a
# generic class, the "use RBLN..." advice of a refused export) never depends on which modules the
# process happened to import before. Each name resolves through _EXPORTS; tests/test_registry.py
# checks the table against the classes themselves.
MODEL_TYPES = {
    "llama": ("RBLNLlamaForCausalLM",),
    "qwen2": ("RBLNQwen2ForCausalLM",),
    "qwen3": ("RBLNQwen3ForCausalLM",),
    "mistral": ("RBLNMistralForCausalLM",),
    "bert": ("RBLNBertModel",),
    "clip_text_model": ("RBLNCLIPTextModel", "RBLNCLIPTextModelWithProjection"),
    "t5": ("RBLNT5EncoderModel", "RBLNT5ForConditionalGeneration"),
    "bart": ("RBLNBartForConditionalGeneration",),
    "whisper": ("RBLNWhisperForConditionalGeneration",),
    "resnet": ("RBLNResNetForImageClassification",),
    "convnext": ("RBLNConvNextForImageClassification",),
    "convnextv2": ("RBLNConvNextV2ForImageClassification",),
    "vit": ("RBLNViTForImageClassification",),
    "deit": ("RBLNDeiTForImageClassification",),
    "dinov2": ("RBLNDinov2ForImageClassification",),
    "swin": ("RBLNSwinForImageClassification",),
    "regnet": ("RBLNRegNetForImageClassification",),
    "mobilenet_v1": ("RBLNMobileNetV1ForImageClassification",),
    "mobilenet_v2": ("RBLNMobileNetV2ForImageClassification",),
    "siglip_vision_model": ("RBLNSiglipVisionModel",),
    "cosmos_retinaface": ("RBLNRetinaFace",),
    "cosmos_video_safety": ("RBLNVideoSafetyModel",),
    "llava": ("RBLNLlavaForConditionalGeneration",),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'optimum_npu' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
