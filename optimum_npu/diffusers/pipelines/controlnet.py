"""ControlNet pipelines (Stable Diffusion and SDXL, text-to-image) with the ControlNet compiled beside
the text encoder(s), UNet and VAE.

    controlnet = ControlNetModel.from_pretrained("controlnet-folder")          # diffusers' own model
    pipe = RBLNStableDiffusionControlNetPipeline.from_pretrained(
        "sd-folder", controlnet=controlnet, export=True, rbln_config={"height": 512, "width": 512})
    image = pipe("a red cube", image=control_image).images[0]

A ControlNet pipeline is its Stable Diffusion / SDXL pipeline plus one compiled component: the
ControlNet takes the UNet's inputs and the control image and returns residuals, which the UNet
(compiled with `rbln_uses_controlnet=True`) adds to its down and mid blocks. The ControlNet runs
at the UNet's batch (classifier-free guidance doubles both); in guess mode diffusers runs it on
the conditional half only, which the compiled graph takes padded. At export, `controlnet=` takes
a diffusers `ControlNetModel` to compile (as diffusers takes it beside an SD folder) when the
folder has none. Without height / width a call generates at the control image's size, as diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from diffusers import StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline

from ..configuration import component
from ..models.controlnet import RBLNControlNetModel, RBLNControlNetModelConfig
from .stable_diffusion import RBLNStableDiffusionPipelineConfig, RBLNStableDiffusionPipelineMixin
from .stable_diffusion_xl import RBLNStableDiffusionXLPipelineConfig, RBLNStableDiffusionXLPipelineMixin


def controlnet_component_options(options: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The pipeline's component options (`options`) with the ControlNet's: the UNet's inputs (batch, latent
    size, text length, SDXL's added text embedding), and the UNet taking its residuals."""
    unet = options["unet"]
    controlnet = {key: value for key, value in unet.items() if key in RBLNControlNetModelConfig.option_names()}
    return {**options, "unet": {**unet, "uses_controlnet": True}, "controlnet": controlnet}


@dataclass(frozen=True, kw_only=True)
class RBLNStableDiffusionControlNetPipelineConfig(RBLNStableDiffusionPipelineConfig):
    controlnet: RBLNControlNetModelConfig | None = component(RBLNControlNetModelConfig)

    pipeline_name: ClassVar[str] = "RBLNStableDiffusionControlNetPipeline"

    def _component_options(self, models: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        return controlnet_component_options(super()._component_options(models))


@dataclass(frozen=True, kw_only=True)
class RBLNStableDiffusionXLControlNetPipelineConfig(RBLNStableDiffusionXLPipelineConfig):
    controlnet: RBLNControlNetModelConfig | None = component(RBLNControlNetModelConfig)

    pipeline_name: ClassVar[str] = "RBLNStableDiffusionXLControlNetPipeline"

    def _component_options(self, models: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        return controlnet_component_options(super()._component_options(models))


class RBLNControlNetPipelineMixin:
    """What a ControlNet pipeline adds to its family's mixin: the compiled ControlNet, and the image size a
    call without height / width generates (the control image's)."""

    def _default_size(self, arguments: dict[str, Any]) -> tuple[int, int]:
        image = arguments.get("image")
        if image is None:
            return super()._default_size(arguments)
        return self.control_image_processor.get_default_height_width(image[0] if isinstance(image, list) else image)


class RBLNStableDiffusionControlNetPipeline(RBLNControlNetPipelineMixin, RBLNStableDiffusionPipelineMixin,
                                            StableDiffusionControlNetPipeline):
    """diffusers' StableDiffusionControlNetPipeline with the text encoder, UNet, ControlNet and VAE compiled."""

    config_class = RBLNStableDiffusionControlNetPipelineConfig
    rbln_classes = {**RBLNStableDiffusionPipelineMixin.rbln_classes, "controlnet": RBLNControlNetModel}


class RBLNStableDiffusionXLControlNetPipeline(RBLNControlNetPipelineMixin, RBLNStableDiffusionXLPipelineMixin,
                                              StableDiffusionXLControlNetPipeline):
    """diffusers' StableDiffusionXLControlNetPipeline with both text encoders, the UNet, ControlNet and VAE compiled."""

    config_class = RBLNStableDiffusionXLControlNetPipelineConfig
    rbln_classes = {**RBLNStableDiffusionXLPipelineMixin.rbln_classes, "controlnet": RBLNControlNetModel}
