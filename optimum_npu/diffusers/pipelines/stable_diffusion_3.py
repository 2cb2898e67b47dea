"""Stable Diffusion 3 (text-to-image) with its three text encoders, the MMDiT transformer and the VAE compiled.

    pipe = RBLNStableDiffusion3Pipeline.from_pretrained("sd3-folder", export=True,
                                                        rbln_config={"height": 1024, "width": 1024})
    image = pipe("a photo of an astronaut riding a horse").images[0]

The mapping onto the shared machinery: two CLIP text encoders with projection (returning every
layer's hidden states: diffusers takes the penultimate, and their pooled projections make the
pooled text embedding), the T5 encoder at the pipeline's `max_seq_len` (diffusers' call argument
`max_sequence_length`, 256 by default), the transformer at the CLIP length plus the T5 length, its
batch doubled by classifier-free guidance as Stable Diffusion's UNet's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from diffusers import StableDiffusion3Pipeline

from ...modeling.encoders import (
    RBLNCLIPTextModelWithProjection, RBLNCLIPTextModelWithProjectionConfig, RBLNT5EncoderModel, RBLNT5EncoderModelConfig,
)
from ..configuration import RBLNDiffusionPipelineConfig, component
from ..models.autoencoder_kl import RBLNAutoencoderKL, RBLNAutoencoderKLConfig
from ..models.transformer_sd3 import RBLNSD3Transformer2DModel, RBLNSD3Transformer2DModelConfig
from .stable_diffusion import RBLNStableDiffusionPipelineMixin, denoiser_batch, latent_size

# diffusers' StableDiffusion3Pipeline.__call__ defaults.
SD3_DEFAULTS = {"max_seq_len": 256, "guidance_scale": 7.0}


@dataclass(frozen=True, kw_only=True)
class RBLNStableDiffusion3PipelineConfig(RBLNDiffusionPipelineConfig):
    text_encoder: RBLNCLIPTextModelWithProjectionConfig | None = component(RBLNCLIPTextModelWithProjectionConfig)
    text_encoder_2: RBLNCLIPTextModelWithProjectionConfig | None = component(RBLNCLIPTextModelWithProjectionConfig)
    text_encoder_3: RBLNT5EncoderModelConfig | None = component(RBLNT5EncoderModelConfig)
    transformer: RBLNSD3Transformer2DModelConfig | None = component(RBLNSD3Transformer2DModelConfig)
    vae: RBLNAutoencoderKLConfig | None = component(RBLNAutoencoderKLConfig)

    pipeline_name: ClassVar[str] = "RBLNStableDiffusion3Pipeline"

    def _pipeline_defaults(self, models: Mapping[str, Any]) -> dict[str, Any]:
        # As the diffusers pipeline: the image is the transformer's sample size times the VAE's scale.
        side = models["transformer"].config.sample_size * RBLNAutoencoderKL.scale_factor(models["vae"].config)
        return {"height": side, "width": side, **SD3_DEFAULTS}

    def _component_options(self, models: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        clip_length = models["tokenizer"].model_max_length
        clip = {"batch_size": self.batch_size, "max_seq_len": clip_length, "output_hidden_states": True}
        return {
            "text_encoder": clip, "text_encoder_2": dict(clip),
            "text_encoder_3": {"batch_size": self.batch_size, "max_seq_len": self.max_seq_len},
            "transformer": {"batch_size": denoiser_batch(self), "max_seq_len": clip_length + self.max_seq_len,
                            "sample_size": latent_size(self, models)},
            "vae": {"batch_size": self.batch_size, "sample_size": (self.height, self.width)},
        }


class RBLNStableDiffusion3PipelineMixin(RBLNStableDiffusionPipelineMixin):
    """Stable Diffusion's checks (guidance on or off as compiled, the image size) on SD3's components; a
    call's `max_sequence_length` must be the T5 length compiled."""

    rbln_classes = {"text_encoder": RBLNCLIPTextModelWithProjection, "text_encoder_2": RBLNCLIPTextModelWithProjection,
                    "text_encoder_3": RBLNT5EncoderModel, "transformer": RBLNSD3Transformer2DModel,
                    "vae": RBLNAutoencoderKL}
    denoiser = "transformer"

    def __call__(self, *args, **kwargs):
        length = self._call_arguments(args, kwargs)["max_sequence_length"]
        if length != self.rbln_config.max_seq_len:
            raise ValueError(f"max_sequence_length={length}: this pipeline's T5 encoder and transformer were compiled "
                             f"for {self.rbln_config.max_seq_len} T5 tokens (shapes are static). Call it with "
                             f"max_sequence_length={self.rbln_config.max_seq_len}, or recompile (export=True) with "
                             f"rbln_max_seq_len={length}.")
        return super().__call__(*args, **kwargs)

    def _default_size(self, arguments: dict[str, Any]) -> tuple[int, int]:
        side = self.default_sample_size * self.vae_scale_factor
        return side, side


class RBLNStableDiffusion3Pipeline(RBLNStableDiffusion3PipelineMixin, StableDiffusion3Pipeline):
    """diffusers' StableDiffusion3Pipeline with the three text encoders, the transformer and the VAE compiled."""

    config_class = RBLNStableDiffusion3PipelineConfig
