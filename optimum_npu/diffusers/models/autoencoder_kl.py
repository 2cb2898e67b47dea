"""RBLNAutoencoderKL: the Stable Diffusion VAE as compiled graphs, "decoder" and (for
image-to-image) "encoder".

diffusers' pipelines call `vae.decode(latents, return_dict=False)[0]` and
`vae.encode(image).latent_dist.sample(generator)`: the graphs compute the VAE's `_decode` /
`_encode` (convolutions, attention), the host draws the Gaussian sample from the moments
with the pipeline's generator, as diffusers does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution

from ...configuration import RBLNModelConfig, check_bool
from ...modeling.base import GraphSpec
from ..configuration import check_size
from .modeling_diffusers import RBLNDiffusersModel


@dataclass(frozen=True, kw_only=True)
class RBLNAutoencoderKLConfig(RBLNModelConfig):
    sample_size: tuple[int, int] | None = None   # image (height, width) in pixels; None: the model's
    uses_encoder: bool = False                   # compile the encoder too (image-to-image)

    def _validate(self) -> None:
        super()._validate()
        self._set("sample_size", check_size("sample_size", self.sample_size, 2))
        check_bool("uses_encoder", self.uses_encoder)


class VAEEncoderGraph(torch.nn.Module):
    """`vae._encode`: image -> latent moments (or latents, for the Cosmos VAE)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        return self.vae._encode(x)


class VAEDecoderGraph(torch.nn.Module):
    """`vae._decode`: latents -> image / video."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae._decode(z).sample


class RBLNAutoencoderKL(RBLNDiffusersModel):
    hf_class = AutoencoderKL
    config_class = RBLNAutoencoderKLConfig
    main_input_name = "sample"
    stats_unit = "images"

    @classmethod
    def _resolve_config(cls, vae, config: RBLNAutoencoderKLConfig, source_folder=None):
        if config.sample_size is None:
            config = dataclasses.replace(config, sample_size=vae.config.sample_size)
        scale = cls.scale_factor(vae.config)
        if any(size % scale for size in config.sample_size):
            raise ValueError(f"rbln_sample_size {config.sample_size} must be a multiple of the VAE's scale factor {scale}")
        return config

    @staticmethod
    def scale_factor(vae_config) -> int:
        """Pixels per latent, per side (as diffusers' pipelines compute it)."""
        return 2 ** (len(vae_config.block_out_channels) - 1)

    @classmethod
    def _graph_inputs(cls, c, config: RBLNAutoencoderKLConfig) -> dict[str, tuple]:
        b, (height, width), scale = config.batch_size, config.sample_size, cls.scale_factor(c)
        inputs = {"decoder": (("z", (b, c.latent_channels, height // scale, width // scale), "float32"),)}
        if config.uses_encoder:
            inputs["encoder"] = (("x", (b, c.in_channels, height, width), "float32"),)
        return inputs

    @classmethod
    def _graph_specs(cls, vae, config: RBLNAutoencoderKLConfig) -> list[GraphSpec]:
        modules = {"decoder": VAEDecoderGraph, "encoder": VAEEncoderGraph}
        return [GraphSpec(name, inputs, modules[name](vae)) for name, inputs in cls._graph_inputs(vae.config, config).items()]

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        if "encoder" not in self.graphs:
            raise ValueError("This VAE was compiled without its encoder: compile it with rbln_uses_encoder=True "
                             "(image-to-image pipelines do)")
        (moments,) = self._run_graph("encoder", [x.float()])
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        (sample,) = self._run_graph("decoder", [z.float()])
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: torch.Generator | None = None):
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
