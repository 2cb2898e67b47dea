"""RBLNCosmosTransformer3DModel: the Cosmos world-model denoiser as one compiled graph.

diffusers' `CosmosTransformer3DModel.forward` starts by resizing the pixel-sized padding mask
to the latent size with torchvision and concatenating it (and, for video-to-world, the
condition mask) to the latents as extra channels, then computes the rotary position table.
Here both run on the host: the mask with `F.interpolate(mode="nearest")` (what torchvision's
NEAREST tensor resize computes), the table with diffusers' own `CosmosRotaryPosEmbed` (it has no
weights; `fps` only scales its temporal positions), so `fps` is a call-time argument as in
diffusers and one compile serves every frame rate. The graph is diffusers' own forward on the
concatenated input, taking the table as two inputs without a batch dimension: the same model
built with `concat_padding_mask=False` and the extra channel counted in `in_channels`, sharing
the weights, its `rope` answering with the table given.

`rbln_fps` (a compile-time option before) is deprecated: accepted with a FutureWarning and
ignored, as optimum-rbln does.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import CosmosTransformer3DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_cosmos import CosmosRotaryPosEmbed

from ...configuration import RBLNModelConfig, check_bool, check_int
from ...modeling.base import GraphSpec
from ..configuration import check_size
from .modeling_diffusers import RBLNDiffusersModel, reject_unsupported

FPS_DEPRECATION = ("rbln_fps is deprecated and ignored: fps only scales the temporal rotary positions, which are "
                   "computed on the host at each call; pass fps= when calling the transformer or the pipeline")


@dataclass(frozen=True, kw_only=True)
class RBLNCosmosTransformer3DModelConfig(RBLNModelConfig):
    sample_size: tuple[int, int, int] | None = None  # latent (frames, height, width)
    max_seq_len: int | None = None                   # text tokens of encoder_hidden_states
    fps: int | None = None                           # deprecated (a call-time argument): accepted, ignored
    uses_condition_mask: bool = False                # video-to-world: a condition-mask channel is an input

    def _validate(self) -> None:
        super()._validate()
        self._set("sample_size", check_size("sample_size", self.sample_size, 3))
        check_int("max_seq_len", self.max_seq_len, allow_none=True)
        check_int("fps", self.fps, allow_none=True)
        if self.fps is not None:
            warnings.warn(FPS_DEPRECATION, FutureWarning, stacklevel=2)
            self._set("fps", None)
        check_bool("uses_condition_mask", self.uses_condition_mask)


class _RoPEInputs(torch.nn.Module):
    """In place of the transformer's `rope` in the graph: the (cos, sin) table the graph was given."""

    def __init__(self):
        super().__init__()
        self.table: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, hidden_states, fps=None):
        return self.table


class _TransformerGraph(torch.nn.Module):
    def __init__(self, transformer: CosmosTransformer3DModel):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, timestep, encoder_hidden_states, rope_cos, rope_sin):
        self.transformer.rope.table = (rope_cos, rope_sin)
        try:
            return self.transformer(hidden_states, timestep, encoder_hidden_states, return_dict=False)[0]
        finally:
            self.transformer.rope.table = None


def _graph_twin(transformer: CosmosTransformer3DModel) -> CosmosTransformer3DModel:
    """The same transformer (same weights) taking the padding-mask channel as an ordinary input channel,
    its rotary table an input of the graph."""
    # Public keys only: diffusers' from_config resets the keys listed in `_use_default_values` to defaults.
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    if config["concat_padding_mask"]:
        config.update(in_channels=config["in_channels"] + 1, concat_padding_mask=False)
    with torch.device("meta"):
        twin = CosmosTransformer3DModel.from_config(config)
    twin.load_state_dict(transformer.state_dict(), assign=True, strict=True)
    twin.rope = _RoPEInputs()
    return twin.eval()


def rope_table_shape(c, sample_size: tuple[int, int, int]) -> tuple[int, int]:
    """(latent tokens, head dim): the shape of each of the rotary table's cos and sin."""
    tokens = 1
    for size, patch in zip(sample_size, c.patch_size):
        tokens *= size // patch
    return tokens, c.attention_head_dim


class RBLNCosmosTransformer3DModel(RBLNDiffusersModel):
    hf_class = CosmosTransformer3DModel
    config_class = RBLNCosmosTransformer3DModelConfig
    main_input_name = "hidden_states"
    stats_unit = "latents"

    @classmethod
    def _resolve_config(cls, transformer, config: RBLNCosmosTransformer3DModelConfig, source_folder=None):
        missing = [name for name in ("sample_size", "max_seq_len") if getattr(config, name) is None]
        if missing:
            raise ValueError(f"{cls.__name__} needs {', '.join('rbln_' + m for m in missing)} (the latent size and "
                             "the text length it is compiled for)")
        c = transformer.config
        if c.img_context_dim_in or c.controlnet_block_every_n or c.use_crossattn_projection:
            raise ValueError(f"{cls.__name__} compiles Cosmos-Predict1 transformers (no image context, controlnet "
                             "or cross-attention projection)")
        patch = c.patch_size
        if any(size % p for size, p in zip(config.sample_size, patch)):
            raise ValueError(f"rbln_sample_size {config.sample_size} must be a multiple of the patch size {patch}")
        return config

    @classmethod
    def _graph_inputs(cls, c, config: RBLNCosmosTransformer3DModelConfig) -> dict[str, tuple]:
        b, table = config.batch_size, rope_table_shape(c, config.sample_size)
        channels = c.in_channels + (1 if c.concat_padding_mask else 0)
        return {cls.graph_name: (
            ("hidden_states", (b, channels, *config.sample_size), "float32"), ("timestep", (b,), "float32"),
            ("encoder_hidden_states", (b, config.max_seq_len, c.text_embed_dim), "float32"),
            ("rope_cos", table, "float32"), ("rope_sin", table, "float32"))}

    @classmethod
    def _graph_specs(cls, transformer, config: RBLNCosmosTransformer3DModelConfig) -> list[GraphSpec]:
        inputs = cls._graph_inputs(transformer.config, config)[cls.graph_name]
        return [GraphSpec(cls.graph_name, inputs, _TransformerGraph(_graph_twin(transformer)))]

    def _rope_table(self, hidden_states: torch.Tensor, fps: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' rotary table for these latents at `fps` (None: images), computed on the host."""
        c = self.config   # the module has no weights: built from the config as the transformer builds its own
        rope = CosmosRotaryPosEmbed(hidden_size=c.attention_head_dim, max_size=c.max_size, patch_size=c.patch_size,
                                    rope_scale=c.rope_scale)
        cos, sin = rope(hidden_states, fps=fps)
        return cos.contiguous(), sin.contiguous()

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
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0):
            raise ValueError(f"fps must be a positive number (frames per second of the video); got {fps!r}")
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
        (out,) = self._run_graph(self.graph_name, [x, timestep.contiguous(), encoder_hidden_states.float()],
                                 shared=self._rope_table(x, fps))
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
