"""RBLNUNet2DConditionModel: the Stable Diffusion denoiser as one compiled graph.

The graph takes (sample, timestep, encoder_hidden_states) at the compiled batch; diffusers'
pipeline calls `unet(latents, t, encoder_hidden_states=...)` with a scalar `t`, broadcast here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from ...configuration import RBLNModelConfig, check_int
from ...modeling.base import GraphSpec
from ..configuration import check_size
from .modeling_diffusers import RBLNDiffusersModel, reject_unsupported


@dataclass(frozen=True, kw_only=True)
class RBLNUNet2DConditionModelConfig(RBLNModelConfig):
    sample_size: tuple[int, int] | None = None   # latent (height, width); None: the model's sample_size
    max_seq_len: int | None = None               # text tokens of encoder_hidden_states

    def _validate(self) -> None:
        super()._validate()
        self._set("sample_size", check_size("sample_size", self.sample_size, 2))
        check_int("max_seq_len", self.max_seq_len, allow_none=True)


class _UNetGraph(torch.nn.Module):
    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class RBLNUNet2DConditionModel(RBLNDiffusersModel):
    hf_class = UNet2DConditionModel
    config_class = RBLNUNet2DConditionModelConfig
    main_input_name = "sample"
    stats_unit = "latents"

    @classmethod
    def _resolve_config(cls, unet, config: RBLNUNet2DConditionModelConfig, source_folder=None):
        c = unet.config
        if c.addition_embed_type is not None or c.time_cond_proj_dim is not None or c.class_embed_type is not None:
            raise ValueError("RBLNUNet2DConditionModel compiles Stable Diffusion 1.x/2.x UNets (no added, class or "
                             "timestep-condition embeddings)")
        if config.max_seq_len is None:
            raise ValueError("rbln_max_seq_len (the text length of encoder_hidden_states) must be set for a UNet")
        if config.sample_size is None:
            config = dataclasses.replace(config, sample_size=c.sample_size)
        return config

    @classmethod
    def _graph_inputs(cls, c, config: RBLNUNet2DConditionModelConfig) -> dict[str, tuple]:
        b = config.batch_size
        return {cls.graph_name: (("sample", (b, c.in_channels, *config.sample_size), "float32"),
                                 ("timestep", (b,), "float32"),
                                 ("encoder_hidden_states", (b, config.max_seq_len, c.cross_attention_dim), "float32"))}

    @classmethod
    def _graph_specs(cls, unet, config: RBLNUNet2DConditionModelConfig) -> list[GraphSpec]:
        return [GraphSpec(cls.graph_name, cls._graph_inputs(unet.config, config)[cls.graph_name], _UNetGraph(unet))]

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, class_labels=None,
                timestep_cond=None, attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict: bool = True):
        reject_unsupported(type(self).__name__, class_labels=class_labels, timestep_cond=timestep_cond,
                           attention_mask=attention_mask, cross_attention_kwargs=cross_attention_kwargs,
                           added_cond_kwargs=added_cond_kwargs,
                           down_block_additional_residuals=down_block_additional_residuals,
                           mid_block_additional_residual=mid_block_additional_residual,
                           down_intrablock_additional_residuals=down_intrablock_additional_residuals,
                           encoder_attention_mask=encoder_attention_mask)
        rows = sample.shape[0]
        timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(rows)
        (out,) = self._run_graph(self.graph_name, [sample.float(), timestep.contiguous(), encoder_hidden_states.float()])
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)
