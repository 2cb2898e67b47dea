"""Stable Diffusion XL (text-to-image) with both CLIP text encoders, the UNet and the VAE compiled.

    pipe = RBLNStableDiffusionXLPipeline.from_pretrained("sdxl-folder", export=True,
                                                         rbln_config={"height": 1024, "width": 1024})
    image = pipe("a photo of an astronaut riding a horse").images[0]

What SDXL adds to Stable Diffusion is data for the shared machinery: a second text encoder
(`CLIPTextModelWithProjection`, whose pooled projection is the UNet's added text embedding),
both encoders compiled returning every layer's hidden states (diffusers' `encode_prompt` takes the
penultimate layer's), and a UNet compiled with the added text / time-id inputs
(`rbln_text_embeds_size`: the second encoder's projection width). Classifier-free guidance
doubles the UNet batch as for Stable Diffusion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from diffusers import StableDiffusionXLPipeline

from ...modeling.encoders import RBLNCLIPTextModelWithProjection, RBLNCLIPTextModelWithProjectionConfig
from ..configuration import component
from .stable_diffusion import RBLNStableDiffusionPipelineConfig, RBLNStableDiffusionPipelineMixin

# diffusers' StableDiffusionXLPipeline.__call__ default.
SDXL_GUIDANCE_SCALE = 5.0


def sdxl_component_options(options: dict[str, dict[str, Any]], models: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Stable Diffusion's component options (`options`) made SDXL's: both text encoders return every layer's
    hidden states, the second at the text encoder's batch and length, and the UNet takes the pooled
    projection of the second as its added text embedding."""
    text = {**options["text_encoder"], "output_hidden_states": True}
    unet = {**options["unet"], "text_embeds_size": models["text_encoder_2"].config.projection_dim}
    return {**options, "text_encoder": text, "text_encoder_2": dict(text), "unet": unet}


@dataclass(frozen=True, kw_only=True)
class RBLNStableDiffusionXLPipelineConfig(RBLNStableDiffusionPipelineConfig):
    text_encoder_2: RBLNCLIPTextModelWithProjectionConfig | None = component(RBLNCLIPTextModelWithProjectionConfig)

    pipeline_name: ClassVar[str] = "RBLNStableDiffusionXLPipeline"
    default_guidance_scale: ClassVar[float] = SDXL_GUIDANCE_SCALE

    def _component_options(self, models: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        return sdxl_component_options(super()._component_options(models), models)


class RBLNStableDiffusionXLPipelineMixin(RBLNStableDiffusionPipelineMixin):
    """The SDXL pipelines: Stable Diffusion's compiled components and checks, and the second text encoder."""

    rbln_classes = {**RBLNStableDiffusionPipelineMixin.rbln_classes, "text_encoder_2": RBLNCLIPTextModelWithProjection}


class RBLNStableDiffusionXLPipeline(RBLNStableDiffusionXLPipelineMixin, StableDiffusionXLPipeline):
    """diffusers' StableDiffusionXLPipeline with both text encoders, the UNet and the VAE compiled."""

    config_class = RBLNStableDiffusionXLPipelineConfig
