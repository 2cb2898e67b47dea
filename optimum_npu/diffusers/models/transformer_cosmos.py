"""RBLNCosmosTransformer3DModel: the Cosmos world-model denoiser as one compiled graph.

diffusers' `CosmosTransformer3DModel.forward` starts by resizing the pixel-sized padding mask
to the latent size with torchvision and concatenating it (and, for video-to-world, the
condition mask) to the latents as extra channels. Here that first step runs on the host with
`F.interpolate(mode="nearest")` (what torchvision's NEAREST tensor resize computes), and the
graph is diffusers' own forward on the concatenated input: the same model built with
`concat_padding_mask=False` and the extra channel counted in `in_channels`, sharing the weights.
`fps` scales the RoPE frequencies, so it is a compile-time option.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import CosmosTransformer3DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ...configuration import RBLNModelConfig, check_bool, check_int
from ...modeling.base import GraphSpec
from ..configuration import check_size
from .modeling_diffusers import RBLNDiffusersModel, reject_unsupported


@dataclass(frozen=True, kw_only=True)
class RBLNCosmosTransformer3DModelConfig(RBLNModelConfig):
    sample_size: tuple[int, int, int] | None = None  # latent (frames, height, width)
    max_seq_len: int | None = None                   # text tokens of encoder_hidden_states
    fps: int | None = None                           # frames per second the RoPE is computed for
    uses_condition_mask: bool = False                # video-to-world: a condition-mask channel is an input

    def _validate(self) -> None:
        super()._validate()
        self._set("sample_size", check_size("sample_size", self.sample_size, 3))
        check_int("max_seq_len", self.max_seq_len, allow_none=True)
        check_int("fps", self.fps, allow_none=True)
        check_bool("uses_condition_mask", self.uses_condition_mask)


class _TransformerGraph(torch.nn.Module):
    def __init__(self, transformer: CosmosTransformer3DModel, fps: int):
        super().__init__()
        self.transformer = transformer
        self.fps = fps

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        return self.transformer(hidden_states, timestep, encoder_hidden_states, fps=self.fps, return_dict=False)[0]


def _with_mask_channels(transformer: CosmosTransformer3DModel) -> CosmosTransformer3DModel:
    """The same transformer (same weights) taking the padding-mask channel as an ordinary input channel."""
    # Public keys only: diffusers' from_config resets the keys listed in `_use_default_values` to defaults.
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    if not config["concat_padding_mask"]:
        return transformer
    config.update(in_channels=config["in_channels"] + 1, concat_padding_mask=False)
    with torch.device("meta"):
        twin = CosmosTransformer3DModel.from_config(config)
    twin.load_state_dict(transformer.state_dict(), assign=True, strict=True)
    return twin.eval()


class RBLNCosmosTransformer3DModel(RBLNDiffusersModel):
    hf_class = CosmosTransformer3DModel
    config_class = RBLNCosmosTransformer3DModelConfig
    main_input_name = "hidden_states"
    stats_unit = "latents"

    @classmethod
    def _resolve_config(cls, transformer, config: RBLNCosmosTransformer3DModelConfig, source_folder=None):
        missing = [name for name in ("sample_size", "max_seq_len", "fps") if getattr(config, name) is None]
        if missing:
            raise ValueError(f"{cls.__name__} needs {', '.join('rbln_' + m for m in missing)} (the latent size, the "
                             "text length and the video fps it is compiled for)")
        c = transformer.config
        if c.img_context_dim_in or c.controlnet_block_every_n or c.use_crossattn_projection:
            raise ValueError(f"{cls.__name__} compiles Cosmos-Predict1 transformers (no image context, controlnet "
                             "or cross-attention projection)")
        patch = c.patch_size
        if any(size % p for size, p in zip(config.sample_size, patch)):
            raise ValueError(f"rbln_sample_size {config.sample_size} must be a multiple of the patch size {patch}")
        return config

    @classmethod
    def _graph_specs(cls, transformer, config: RBLNCosmosTransformer3DModelConfig) -> list[GraphSpec]:
        c, b = transformer.config, config.batch_size
        channels = c.in_channels + (1 if c.concat_padding_mask else 0)
        inputs = (("hidden_states", (b, channels, *config.sample_size), "float32"), ("timestep", (b,), "float32"),
                  ("encoder_hidden_states", (b, config.max_seq_len, c.text_embed_dim), "float32"))
        return [GraphSpec(cls.graph_name, inputs, _TransformerGraph(_with_mask_channels(transformer), config.fps))]

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the pipeline passes (in_channels counts the condition mask)."""
        return self.config.in_channels - (1 if self.rbln_config.uses_condition_mask else 0)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                block_controlnet_hidden_states=None, attention_mask=None, fps: int | None = None,
                condition_mask: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                return_dict: bool = True):
        reject_unsupported(type(self).__name__, block_controlnet_hidden_states=block_controlnet_hidden_states,
                           attention_mask=attention_mask)
        if fps != self.rbln_config.fps:
            raise ValueError(f"fps={fps}, but this transformer was compiled for rbln_fps={self.rbln_config.fps} (the "
                             "RoPE depends on it): pass fps=" f"{self.rbln_config.fps} or recompile")
        if (condition_mask is not None) != self.rbln_config.uses_condition_mask:
            raise ValueError("condition_mask is given but the transformer was compiled without it (or the reverse): "
                             "video-to-world pipelines compile it with rbln_uses_condition_mask=True")
        if encoder_hidden_states.shape[1] != self.rbln_config.max_seq_len:
            raise ValueError(f"encoder_hidden_states has {encoder_hidden_states.shape[1]} tokens, the transformer was "
                             f"compiled for rbln_max_seq_len={self.rbln_config.max_seq_len}: call the pipeline with "
                             f"max_sequence_length={self.rbln_config.max_seq_len}")
        rows, _, frames, height, width = hidden_states.shape
        # The host part of diffusers' forward (step 1): mask channels concatenated to the latents.
        channels = [hidden_states] + ([condition_mask] if condition_mask is not None else [])
        if self.config.concat_padding_mask:
            if padding_mask is None:
                raise ValueError("padding_mask is required: this Cosmos transformer concatenates it to its input")
            resized = F.interpolate(padding_mask.float(), size=(height, width), mode="nearest")
            channels.append(resized.unsqueeze(2).repeat(rows, 1, frames, 1, 1))
        x = torch.cat([c.float() for c in channels], dim=1)
        timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(rows)
        (out,) = self._run_graph(self.graph_name, [x, timestep.contiguous(), encoder_hidden_states.float()])
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
