"""diffusers pipelines and models on the simulated NPU: Stable Diffusion (1.x/2.x, XL, 3), ControlNet and the Cosmos world models.

Pipelines are diffusers' pipeline classes with compiled components (`pipelines/`); each
component is a compiled model, one file per model (`models/`); a pipeline's `rbln_config` holds
one sub-config per component (`configuration.py`).
"""

from ..quiet import dropping

# Importing diffusers' pipelines makes transformers resolve every image processor class, and without
# torchvision (which this project never installs) it warns for each that it falls back to the PIL
# one: a notice about a choice made on purpose, in every newcomer's first run. transformers warns
# once per class, so it stays quiet afterwards too.
with dropping("transformers.utils.import_utils", "requires torchvision (not installed); falling back"):
    from .configuration import RBLNDiffusionPipelineConfig
    from .models.autoencoder_kl import RBLNAutoencoderKL, RBLNAutoencoderKLConfig
    from .models.controlnet import RBLNControlNetModel, RBLNControlNetModelConfig
    from .models.autoencoder_kl_cosmos import RBLNAutoencoderKLCosmos, RBLNAutoencoderKLCosmosConfig
    from .models.transformer_sd3 import RBLNSD3Transformer2DModel, RBLNSD3Transformer2DModelConfig
    from .models.transformer_cosmos import RBLNCosmosTransformer3DModel, RBLNCosmosTransformer3DModelConfig
    from .models.unet_2d_condition import RBLNUNet2DConditionModel, RBLNUNet2DConditionModelConfig
    from .pipelines.controlnet import (
        RBLNStableDiffusionControlNetPipeline, RBLNStableDiffusionControlNetPipelineConfig,
        RBLNStableDiffusionXLControlNetPipeline, RBLNStableDiffusionXLControlNetPipelineConfig,
    )
    from .pipelines.cosmos_prompt_upsampler import RBLNCosmosPromptUpsampler
    from .pipelines.cosmos import (
        RBLNCosmosTextToWorldPipeline, RBLNCosmosTextToWorldPipelineConfig, RBLNCosmosVideoToWorldPipeline,
        RBLNCosmosVideoToWorldPipelineConfig,
    )
    from .pipelines.stable_diffusion import (
        RBLNStableDiffusionImg2ImgPipeline, RBLNStableDiffusionImg2ImgPipelineConfig, RBLNStableDiffusionPipeline,
        RBLNStableDiffusionPipelineConfig,
    )
    from .pipelines.stable_diffusion_3 import RBLNStableDiffusion3Pipeline, RBLNStableDiffusion3PipelineConfig
    from .pipelines.stable_diffusion_xl import RBLNStableDiffusionXLPipeline, RBLNStableDiffusionXLPipelineConfig

__all__ = [
    "RBLNAutoencoderKL", "RBLNAutoencoderKLConfig", "RBLNAutoencoderKLCosmos", "RBLNAutoencoderKLCosmosConfig",
    "RBLNCosmosTextToWorldPipeline", "RBLNCosmosTextToWorldPipelineConfig", "RBLNCosmosTransformer3DModel",
    "RBLNCosmosTransformer3DModelConfig", "RBLNCosmosVideoToWorldPipeline", "RBLNCosmosVideoToWorldPipelineConfig",
    "RBLNDiffusionPipelineConfig", "RBLNStableDiffusionImg2ImgPipeline", "RBLNStableDiffusionImg2ImgPipelineConfig",
    "RBLNStableDiffusionPipeline", "RBLNStableDiffusionPipelineConfig", "RBLNUNet2DConditionModel",
    "RBLNUNet2DConditionModelConfig", "RBLNStableDiffusionXLPipeline", "RBLNStableDiffusionXLPipelineConfig",
    "RBLNControlNetModel", "RBLNControlNetModelConfig", "RBLNStableDiffusionControlNetPipeline",
    "RBLNStableDiffusionControlNetPipelineConfig", "RBLNStableDiffusionXLControlNetPipeline",
    "RBLNStableDiffusionXLControlNetPipelineConfig", "RBLNSD3Transformer2DModel", "RBLNSD3Transformer2DModelConfig",
    "RBLNStableDiffusion3Pipeline", "RBLNStableDiffusion3PipelineConfig", "RBLNCosmosPromptUpsampler",
]
