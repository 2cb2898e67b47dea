"""RBLNControlNetModel: a ControlNet (Stable Diffusion or SDXL) as one compiled graph.

The graph takes what the UNet takes (latents, timestep, text embeddings, SDXL's added
conditions: `unet_2d_condition.conditioning_inputs`), the control image in pixels and one scale
per residual, and returns the residuals the UNet adds to its down-block outputs and its mid
block (a UNet compiled with `rbln_uses_controlnet=True` takes them). diffusers' ControlNet
scales its residuals by `conditioning_scale` (guess mode: by a log-spaced ramp times it); the
scale changes per step in a pipeline (`control_guidance_start` / `_end` zero it outside that
range), so the host computes each residual's scale as diffusers does and the graph multiplies.

The class is also a diffusers `ControlNetModel` for `isinstance` (the ControlNet pipelines check
it at every step), without its layers: `WithoutDiffusersLayers`.
"""

from __future__ import annotations

import torch
from diffusers import ControlNetModel
from diffusers.models.controlnets.controlnet import ControlNetOutput

from ...modeling.base import GraphSpec
from .modeling_diffusers import RBLNDiffusersModel, WithoutDiffusersLayers, reject_unsupported
from .unet_2d_condition import (
    TEXT_TIME, DenoiserConditioningConfig, added_conditions, conditioning_inputs, down_residual_shapes,
    resolve_conditioning,
)


class RBLNControlNetModelConfig(DenoiserConditioningConfig):
    """Options of RBLNControlNetModel: those of the UNet it conditions (sample size, text length, SDXL's
    text_embeds_size); the control image is the latents' size times the conditioning embedding's downsampling."""


def control_image_scale(c) -> int:
    """Pixels of the control image per latent, per side: its embedding downsamples by 2 per block after the first."""
    return 2 ** (len(c.conditioning_embedding_out_channels) - 1)


class _ControlNetGraph(torch.nn.Module):
    def __init__(self, controlnet: ControlNetModel):
        super().__init__()
        self.controlnet = controlnet
        self.added = controlnet.config.addition_embed_type == TEXT_TIME

    def forward(self, sample, timestep, encoder_hidden_states, *rest):
        kwargs = {}
        if self.added:
            text_embeds, time_ids, *rest = rest
            kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        controlnet_cond, scales = rest
        # At scale 1.0 diffusers' own scaling multiplies by one (exact); the per-residual scales follow.
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                                    return_dict=False, **kwargs)
        scales = scales[:, :, None, None, None]   # [rows, residual] -> one per row, broadcast over each residual
        return tuple(residual * scales[:, i] for i, residual in enumerate(down)) + (mid * scales[:, len(down)],)


class RBLNControlNetModel(RBLNDiffusersModel, WithoutDiffusersLayers, ControlNetModel):
    hf_class = ControlNetModel
    config_class = RBLNControlNetModelConfig
    main_input_name = "sample"
    stats_unit = "latents"

    @classmethod
    def _resolve_config(cls, controlnet, config: RBLNControlNetModelConfig, source_folder=None):
        if controlnet.config.global_pool_conditions:
            raise ValueError(f"{cls.__name__}: ControlNets with global_pool_conditions=True (their residuals pooled "
                             "to one value per channel) are not supported")
        return resolve_conditioning(cls.__name__, controlnet.config, config)

    @classmethod
    def _graph_inputs(cls, c, config: RBLNControlNetModelConfig) -> dict[str, tuple]:
        b, scale = config.batch_size, control_image_scale(c)
        image = (b, c.conditioning_channels, *(side * scale for side in config.sample_size))
        residuals = len(down_residual_shapes(c, b, config.sample_size))
        return {cls.graph_name: conditioning_inputs(c, config) + (("controlnet_cond", image, "float32"),
                                                                  ("conditioning_scales", (b, residuals), "float32"))}

    @classmethod
    def _graph_specs(cls, controlnet, config: RBLNControlNetModelConfig) -> list[GraphSpec]:
        return [GraphSpec(cls.graph_name, cls._graph_inputs(controlnet.config, config)[cls.graph_name],
                          _ControlNetGraph(controlnet))]

    def _residual_scales(self, rows: int, conditioning_scale: float, guess_mode: bool) -> torch.Tensor:
        """[rows, residuals]: the scale of each residual, as diffusers' ControlNet computes it (guess mode: 0.1 to
        1.0 log-spaced, times the conditioning scale), the same for every row."""
        count = len(down_residual_shapes(self.config, 1, self.rbln_config.sample_size))
        if guess_mode:
            scales = torch.logspace(-1, 0, count) * conditioning_scale
        else:
            scales = torch.full((count,), float(conditioning_scale))
        return scales.expand(rows, count).contiguous()

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: float = 1.0, class_labels=None, timestep_cond=None,
                attention_mask=None, added_cond_kwargs=None, cross_attention_kwargs=None, guess_mode: bool = False,
                return_dict: bool = True):
        name = type(self).__name__
        reject_unsupported(name, class_labels=class_labels, timestep_cond=timestep_cond, attention_mask=attention_mask,
                           cross_attention_kwargs=cross_attention_kwargs)
        rows = sample.shape[0]
        timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(rows)
        inputs = [sample.float(), timestep.contiguous(), encoder_hidden_states.float()]
        inputs += added_conditions(name, self.config, added_cond_kwargs)
        inputs += [controlnet_cond.float(), self._residual_scales(rows, conditioning_scale, guess_mode)]
        *down, mid = self._run_graph(self.graph_name, inputs)
        if not return_dict:
            return tuple(down), mid
        return ControlNetOutput(down_block_res_samples=tuple(down), mid_block_res_sample=mid)
