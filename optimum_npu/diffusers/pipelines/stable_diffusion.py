"""Stable Diffusion (text-to-image, image-to-image) with the CLIP text encoder, UNet and VAE compiled.

    pipe = RBLNStableDiffusionPipeline.from_pretrained("sd-folder", export=True,
                                                       rbln_config={"height": 512, "width": 512})
    image = pipe("a photo of an astronaut riding a horse").images[0]
    print(pipe.generation_stats)

The UNet is called once per step on the latents of the prompt and of the negative prompt
concatenated (classifier-free guidance), so its compiled batch is twice the pipeline's batch
when guidance_scale > 1, unless `rbln_config={"unet": {"batch_size": ...}}` says otherwise.
A call must therefore keep guidance on (any guidance_scale > 1) or off (<= 1) as compiled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from ...modeling.encoders import RBLNCLIPTextModel, RBLNCLIPTextModelConfig
from ..configuration import RBLNDiffusionPipelineConfig, component
from .base import RBLNDiffusionPipelineMixin
from ..models.autoencoder_kl import RBLNAutoencoderKL, RBLNAutoencoderKLConfig
from ..models.unet_2d_condition import RBLNUNet2DConditionModel, RBLNUNet2DConditionModelConfig

# diffusers' StableDiffusionPipeline.__call__ default.
DEFAULT_GUIDANCE_SCALE = 7.5


@dataclass(frozen=True, kw_only=True)
class RBLNStableDiffusionPipelineConfig(RBLNDiffusionPipelineConfig):
    text_encoder: RBLNCLIPTextModelConfig | None = component(RBLNCLIPTextModelConfig)
    unet: RBLNUNet2DConditionModelConfig | None = component(RBLNUNet2DConditionModelConfig)
    vae: RBLNAutoencoderKLConfig | None = component(RBLNAutoencoderKLConfig)

    pipeline_name: ClassVar[str] = "RBLNStableDiffusionPipeline"
    uses_vae_encoder: ClassVar[bool] = False
    default_guidance_scale: ClassVar[float] = DEFAULT_GUIDANCE_SCALE   # the diffusers __call__'s default

    def _pipeline_defaults(self, models: Mapping[str, Any]) -> dict[str, Any]:
        # As the diffusers pipeline: the image is the UNet's sample size times the VAE's scale.
        side = models["unet"].config.sample_size * RBLNAutoencoderKL.scale_factor(models["vae"].config)
        return {"height": side, "width": side, "max_seq_len": models["tokenizer"].model_max_length,
                "guidance_scale": self.default_guidance_scale}

    def _component_options(self, models: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        return {
            "text_encoder": {"batch_size": self.batch_size, "max_seq_len": self.max_seq_len},
            "unet": {"batch_size": denoiser_batch(self), "max_seq_len": self.max_seq_len,
                     "sample_size": latent_size(self, models)},
            "vae": {"batch_size": self.batch_size, "sample_size": (self.height, self.width),
                    "uses_encoder": self.uses_vae_encoder},
        }


def latent_size(config: RBLNDiffusionPipelineConfig, models: Mapping[str, Any]) -> tuple[int, int]:
    """The latent (height, width) of the pipeline's image size, through its VAE's compression."""
    scale = RBLNAutoencoderKL.scale_factor(models["vae"].config)
    if config.height % scale or config.width % scale:
        raise ValueError(f"rbln_height / rbln_width must be multiples of {scale} (the VAE's scale factor); "
                         f"got {config.height} x {config.width}")
    return config.height // scale, config.width // scale


def denoiser_batch(config: RBLNDiffusionPipelineConfig) -> int:
    """The denoiser's batch: classifier-free guidance runs the prompt and the negative prompt in one call."""
    return config.batch_size * (2 if config.guidance_scale > 1 else 1)



@dataclass(frozen=True, kw_only=True)
class RBLNStableDiffusionImg2ImgPipelineConfig(RBLNStableDiffusionPipelineConfig):
    pipeline_name: ClassVar[str] = "RBLNStableDiffusionImg2ImgPipeline"
    uses_vae_encoder: ClassVar[bool] = True


class RBLNStableDiffusionPipelineMixin(RBLNDiffusionPipelineMixin):
    """What the Stable Diffusion pipelines add: a call keeps classifier-free guidance as compiled."""

    rbln_classes = {"text_encoder": RBLNCLIPTextModel, "unet": RBLNUNet2DConditionModel, "vae": RBLNAutoencoderKL}
    denoiser = "unet"

    @classmethod
    def _config_for_pipe(cls, pipeline):
        """Text-to-image and image-to-image run the same compiled components; image-to-image also
        encodes its input image, so it needs a VAE compiled with its encoder."""
        config = getattr(pipeline, "rbln_config", None)
        if not isinstance(config, RBLNStableDiffusionPipelineConfig):
            return config
        if config.component_classes() != cls.config_class.component_classes():
            return None   # another family's components (SD / SDXL / ControlNet): from_pipe refuses it
        if isinstance(config, cls.config_class):
            return config
        if cls.config_class.uses_vae_encoder and "encoder" not in pipeline.vae.graphs:
            raise ValueError(
                f"{cls.__name__}.from_pipe(): image-to-image encodes its input image with the VAE encoder, which "
                f"this {type(pipeline).__name__} was compiled without. Compile the text-to-image pipeline with "
                "rbln_config={'vae': {'uses_encoder': True}} (it then carries the encoder for from_pipe), or "
                f"compile {cls.__name__}.from_pretrained(..., export=True).")
        return cls.config_class(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init})

    def __call__(self, *args, **kwargs):
        arguments = self._call_arguments(args, kwargs)
        self._check_guidance(arguments["guidance_scale"])
        if "height" in arguments:   # text-to-image; image-to-image takes the size of its image
            self._check_size(arguments["height"], arguments["width"], self._default_size(arguments))
        return super().__call__(*args, **kwargs)

    def _default_size(self, arguments: dict[str, Any]) -> tuple[int, int]:
        """(height, width) diffusers generates when the call gives none: the UNet's sample size in pixels."""
        side = self.unet.config.sample_size * self.vae_scale_factor
        return side, side

    def _check_size(self, height: int | None, width: int | None, default: tuple[int, int]) -> None:
        """ValueError in the caller's terms (pixels) if the image size differs from the compiled one,
        before the UNet refuses its latents' shape."""
        height, width = height or default[0], width or default[1]
        compiled = (self.rbln_config.height, self.rbln_config.width)
        if (height, width) != compiled:
            raise ValueError(
                f"height={height}, width={width}: this pipeline was compiled for {compiled[0]}x{compiled[1]} images "
                f"(shapes are static). Call it with height={compiled[0]}, width={compiled[1]}, or recompile "
                f"(export=True) with rbln_config={{'height': {height}, 'width': {width}}}.")

    def _check_guidance(self, guidance_scale: float) -> None:
        """ValueError if `guidance_scale` turns classifier-free guidance on or off against the compiled
        pipeline: the UNet batch doubles with it (a UNet compiled with it would run half padding, one
        compiled without it twice per step)."""
        compiled = self.rbln_config.guidance_scale
        if (guidance_scale > 1) == (compiled > 1):
            return
        state = lambda scale: "on (> 1)" if scale > 1 else "off (<= 1)"  # noqa: E731
        raise ValueError(
            f"guidance_scale={guidance_scale} turns classifier-free guidance {state(guidance_scale)}, but this "
            f"pipeline was compiled with rbln_guidance_scale={compiled}, guidance {state(compiled)}: its {self.denoiser} "
            f"takes {getattr(self, self.denoiser).rbln_config.batch_size} latent row(s) per call. Call it with a guidance_scale "
            f"{'> 1' if compiled > 1 else '<= 1'}, or recompile (export=True) with rbln_guidance_scale={guidance_scale}.")


class RBLNStableDiffusionPipeline(RBLNStableDiffusionPipelineMixin, StableDiffusionPipeline):
    """diffusers' StableDiffusionPipeline with the text encoder, UNet and VAE compiled."""

    config_class = RBLNStableDiffusionPipelineConfig


class RBLNStableDiffusionImg2ImgPipeline(RBLNStableDiffusionPipelineMixin, StableDiffusionImg2ImgPipeline):
    """diffusers' StableDiffusionImg2ImgPipeline with the text encoder, UNet and VAE (encoder too) compiled."""

    config_class = RBLNStableDiffusionImg2ImgPipelineConfig
