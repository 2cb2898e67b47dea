"""RBLNAutoencoderKLCosmos: the Cosmos video tokenizer (causal 3D VAE) as compiled graphs,
"decoder" and (for video-to-world) "encoder".

The encoder's posterior is deterministic in Cosmos (`IdentityDistribution`): the graph output is
the latent itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKLCosmos
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, IdentityDistribution

from ...configuration import RBLNModelConfig, check_bool
from ...modeling.base import GraphSpec
from ..configuration import check_size
from .autoencoder_kl import VAEDecoderGraph, VAEEncoderGraph
from .modeling_diffusers import RBLNDiffusersModel


@dataclass(frozen=True, kw_only=True)
class RBLNAutoencoderKLCosmosConfig(RBLNModelConfig):
    sample_size: tuple[int, int, int] | None = None  # video (frames, height, width) in pixels
    uses_encoder: bool = False                       # compile the encoder too (video-to-world)

    def _validate(self) -> None:
        super()._validate()
        self._set("sample_size", check_size("sample_size", self.sample_size, 3))
        check_bool("uses_encoder", self.uses_encoder)


def latent_size(vae_config, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(frames, height, width) of the latents of a video, as diffusers' Cosmos pipelines compute them."""
    temporal, spatial = vae_config.temporal_compression_ratio, vae_config.spatial_compression_ratio
    return (frames - 1) // temporal + 1, height // spatial, width // spatial


class RBLNAutoencoderKLCosmos(RBLNDiffusersModel):
    hf_class = AutoencoderKLCosmos
    config_class = RBLNAutoencoderKLCosmosConfig
    main_input_name = "sample"
    stats_unit = "videos"

    @classmethod
    def _resolve_config(cls, vae, config: RBLNAutoencoderKLCosmosConfig, source_folder=None):
        if config.sample_size is None:
            raise ValueError(f"{cls.__name__} needs rbln_sample_size=(frames, height, width) of the video")
        frames, height, width = config.sample_size
        c = vae.config
        if (frames - 1) % c.temporal_compression_ratio or height % c.spatial_compression_ratio or (
                width % c.spatial_compression_ratio):
            raise ValueError(
                f"rbln_sample_size {config.sample_size}: frames - 1 must be a multiple of {c.temporal_compression_ratio} "
                f"and height / width multiples of {c.spatial_compression_ratio} (the VAE's compression)")
        return config

    @classmethod
    def _graph_specs(cls, vae, config: RBLNAutoencoderKLCosmosConfig) -> list[GraphSpec]:
        c, b = vae.config, config.batch_size
        latents = latent_size(c, *config.sample_size)
        specs = [GraphSpec("decoder", (("z", (b, c.latent_channels, *latents), "float32"),), VAEDecoderGraph(vae))]
        if config.uses_encoder:
            specs.append(GraphSpec("encoder", (("x", (b, c.in_channels, *config.sample_size), "float32"),),
                                   VAEEncoderGraph(vae)))
        return specs

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        if "encoder" not in self.graphs:
            raise ValueError("This VAE was compiled without its encoder: compile it with rbln_uses_encoder=True "
                             "(video-to-world pipelines do)")
        (latents,) = self._run_graph("encoder", [x.float()])
        posterior = IdentityDistribution(latents)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        (video,) = self._run_graph("decoder", [z.float()])
        return DecoderOutput(sample=video) if return_dict else (video,)
