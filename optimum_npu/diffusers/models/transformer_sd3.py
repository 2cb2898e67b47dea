"""RBLNSD3Transformer2DModel: Stable Diffusion 3's MMDiT denoiser as one compiled graph.

The graph is diffusers' own forward on (latents, text embeddings, pooled text embedding,
timestep) at the compiled batch: the text embeddings are the two CLIP encoders' penultimate
hidden states (padded to the T5 width) followed by the T5 encoder's, so their length is the
CLIP tokenizer's plus the T5 text length the pipeline is compiled for. Skip-layer guidance
(`skip_layers`) would need a second graph per layer set and is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from ...configuration import OPTION_PREFIX, RBLNModelConfig, check_int
from ...modeling.base import GraphSpec
from ..configuration import check_size
from .modeling_diffusers import RBLNDiffusersModel, reject_unsupported


@dataclass(frozen=True, kw_only=True)
class RBLNSD3Transformer2DModelConfig(RBLNModelConfig):
    sample_size: tuple[int, int] | None = None   # latent (height, width); None: the model's sample_size
    max_seq_len: int | None = None               # text tokens of encoder_hidden_states (CLIP's + T5's)

    def _validate(self) -> None:
        super()._validate()
        self._set("sample_size", check_size("sample_size", self.sample_size, 2))
        check_int("max_seq_len", self.max_seq_len, allow_none=True)


class _TransformerGraph(torch.nn.Module):
    def __init__(self, transformer: SD3Transformer2DModel):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.transformer(hidden_states, encoder_hidden_states, pooled_projections, timestep,
                                return_dict=False)[0]


class RBLNSD3Transformer2DModel(RBLNDiffusersModel):
    hf_class = SD3Transformer2DModel
    config_class = RBLNSD3Transformer2DModelConfig
    main_input_name = "hidden_states"
    stats_unit = "latents"

    @classmethod
    def _resolve_config(cls, transformer, config: RBLNSD3Transformer2DModelConfig, source_folder=None):
        if config.max_seq_len is None:
            raise ValueError(f"{OPTION_PREFIX}max_seq_len (the text length of encoder_hidden_states: the CLIP "
                             f"tokenizer's plus the T5 one's) must be set for an {cls.__name__}")
        if config.sample_size is None:
            config = dataclasses.replace(config, sample_size=(transformer.config.sample_size,) * 2)
        patch = transformer.config.patch_size
        if any(size % patch for size in config.sample_size):
            raise ValueError(f"{OPTION_PREFIX}sample_size {config.sample_size} must be a multiple of the patch size "
                             f"{patch}")
        return config

    @classmethod
    def _graph_inputs(cls, c, config: RBLNSD3Transformer2DModelConfig) -> dict[str, tuple]:
        b = config.batch_size
        return {cls.graph_name: (
            ("hidden_states", (b, c.in_channels, *config.sample_size), "float32"),
            ("encoder_hidden_states", (b, config.max_seq_len, c.joint_attention_dim), "float32"),
            ("pooled_projections", (b, c.pooled_projection_dim), "float32"), ("timestep", (b,), "float32"))}

    @classmethod
    def _graph_specs(cls, transformer, config: RBLNSD3Transformer2DModelConfig) -> list[GraphSpec]:
        inputs = cls._graph_inputs(transformer.config, config)[cls.graph_name]
        return [GraphSpec(cls.graph_name, inputs, _TransformerGraph(transformer))]

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                pooled_projections: torch.Tensor = None, timestep=None, block_controlnet_hidden_states=None,
                joint_attention_kwargs=None, return_dict: bool = True, skip_layers=None):
        reject_unsupported(type(self).__name__, block_controlnet_hidden_states=block_controlnet_hidden_states,
                           joint_attention_kwargs=joint_attention_kwargs, skip_layers=skip_layers)
        if encoder_hidden_states.shape[1] != self.rbln_config.max_seq_len:
            raise ValueError(
                f"encoder_hidden_states has {encoder_hidden_states.shape[1]} tokens, the transformer was compiled for "
                f"rbln_max_seq_len={self.rbln_config.max_seq_len} (the CLIP tokenizer's length plus the T5 one's): call "
                "the pipeline with the max_sequence_length it was compiled for")
        rows = hidden_states.shape[0]
        timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(rows)
        (out,) = self._run_graph(self.graph_name, [hidden_states.float(), encoder_hidden_states.float(),
                                                   pooled_projections.float(), timestep.contiguous()])
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
