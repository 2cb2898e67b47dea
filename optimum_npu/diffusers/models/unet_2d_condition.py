"""RBLNUNet2DConditionModel: the Stable Diffusion / SDXL denoiser as one compiled graph.

The graph takes (sample, timestep, encoder_hidden_states) at the compiled batch, then what the
UNet's config and options add: SDXL's added conditions (`added_cond_kwargs`: the pooled text
embedding and the time ids, for a UNet with `addition_embed_type="text_time"`) and, with
`rbln_uses_controlnet=True`, a ControlNet's residuals (one per down-block output, and the mid
block's). diffusers' pipeline calls `unet(latents, t, encoder_hidden_states=..., ...)` with a
scalar `t`, broadcast here.

The conditioning inputs are shared with the ControlNet (`models/controlnet.py`), which takes the
same ones and returns the residuals this UNet takes: `DenoiserConditioningConfig`,
`conditioning_inputs` and `down_residual_shapes` below are what both compile against.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from ...configuration import OPTION_PREFIX, RBLNModelConfig, check_bool, check_int
from ...modeling.base import GraphSpec
from ..configuration import check_size
from .modeling_diffusers import RBLNDiffusersModel, reject_unsupported

# The added embedding SDXL's UNet and ControlNet take (diffusers' `addition_embed_type`).
TEXT_TIME = "text_time"


@dataclass(frozen=True, kw_only=True)
class DenoiserConditioningConfig(RBLNModelConfig):
    """Options of a model that denoises latents conditioned on text (the UNet, the ControlNet)."""

    sample_size: tuple[int, int] | None = None   # latent (height, width); None: the model's sample_size
    max_seq_len: int | None = None               # text tokens of encoder_hidden_states
    text_embeds_size: int | None = None          # SDXL: width of the pooled text embedding (added_cond_kwargs)

    def _validate(self) -> None:
        super()._validate()
        self._set("sample_size", check_size("sample_size", self.sample_size, 2))
        check_int("max_seq_len", self.max_seq_len, allow_none=True)
        check_int("text_embeds_size", self.text_embeds_size, allow_none=True)


@dataclass(frozen=True, kw_only=True)
class RBLNUNet2DConditionModelConfig(DenoiserConditioningConfig):
    uses_controlnet: bool = False                # the graph also takes a ControlNet's residuals

    def _validate(self) -> None:
        super()._validate()
        check_bool("uses_controlnet", self.uses_controlnet)


def resolve_conditioning(model_name: str, c, config: DenoiserConditioningConfig) -> DenoiserConditioningConfig:
    """`config` with the sample size filled in, checked against the model's config `c` (a UNet's or a
    ControlNet's: SD 1.x/2.x, or SDXL's added text/time embedding)."""
    if c.get("time_cond_proj_dim") is not None or c.class_embed_type is not None:   # a ControlNet has no time_cond
        raise ValueError(f"{model_name} compiles Stable Diffusion and SDXL models (no class or timestep-condition "
                         "embeddings)")
    if c.addition_embed_type not in (None, TEXT_TIME):
        raise ValueError(f"{model_name}: addition_embed_type {c.addition_embed_type!r} is not supported; "
                         f"supported: None (Stable Diffusion 1.x/2.x) and {TEXT_TIME!r} (SDXL)")
    if config.max_seq_len is None:
        raise ValueError(f"{OPTION_PREFIX}max_seq_len (the text length of encoder_hidden_states) must be set for "
                         f"a {model_name}")
    if config.sample_size is None:
        config = dataclasses.replace(config, sample_size=c.sample_size)
    if c.addition_embed_type == TEXT_TIME:
        if config.text_embeds_size is None:
            raise ValueError(f"{OPTION_PREFIX}text_embeds_size must be set for an SDXL {model_name} (the width of "
                             "the pooled text embedding: the second text encoder's projection_dim; SDXL pipelines "
                             "set it)")
        time_ids = c.projection_class_embeddings_input_dim - config.text_embeds_size
        if time_ids <= 0 or time_ids % c.addition_time_embed_dim:
            raise ValueError(f"{OPTION_PREFIX}text_embeds_size={config.text_embeds_size} does not fit the model's "
                             f"added embedding ({c.projection_class_embeddings_input_dim} inputs = text_embeds_size + "
                             f"{c.addition_time_embed_dim} per time id)")
    elif config.text_embeds_size is not None:
        raise ValueError(f"{OPTION_PREFIX}text_embeds_size is for SDXL models (addition_embed_type={TEXT_TIME!r}); "
                         "this one takes no added text embedding")
    return config


def conditioning_inputs(c, config: DenoiserConditioningConfig) -> tuple:
    """The (name, shape, dtype) inputs of a text-conditioned denoiser: latents, timestep, text
    embeddings, and for SDXL the pooled text embedding and the time ids."""
    b = config.batch_size
    inputs = (("sample", (b, c.in_channels, *config.sample_size), "float32"), ("timestep", (b,), "float32"),
              ("encoder_hidden_states", (b, config.max_seq_len, c.cross_attention_dim), "float32"))
    if c.addition_embed_type == TEXT_TIME:
        time_ids = (c.projection_class_embeddings_input_dim - config.text_embeds_size) // c.addition_time_embed_dim
        inputs += (("text_embeds", (b, config.text_embeds_size), "float32"), ("time_ids", (b, time_ids), "float32"))
    return inputs


def down_residual_shapes(c, batch: int, sample_size: tuple[int, int]) -> list[tuple[int, ...]]:
    """Shapes of the residuals a ControlNet adds to the UNet's down-block outputs (the input
    convolution's, each resnet's, each downsampler's), then the mid block's; `c` is the config of
    either model (they share the down path), `sample_size` the latent (height, width)."""
    height, width = sample_size
    channels = c.block_out_channels
    layers = c.layers_per_block if isinstance(c.layers_per_block, (list, tuple)) else [c.layers_per_block] * len(channels)
    shapes = [(batch, channels[0], height, width)]
    for i, (block_channels, count) in enumerate(zip(channels, layers)):
        shapes += [(batch, block_channels, height, width)] * count
        if i < len(channels) - 1:   # a stride-2 convolution with padding 1
            height, width = (height + 1) // 2, (width + 1) // 2
            shapes.append((batch, block_channels, height, width))
    return shapes + [(batch, channels[-1], height, width)]


def added_conditions(model_name: str, c, added_cond_kwargs) -> list[torch.Tensor]:
    """The graph inputs of `added_cond_kwargs` (SDXL: text_embeds, time_ids), or [] for a model without."""
    if c.addition_embed_type != TEXT_TIME:
        reject_unsupported(model_name, added_cond_kwargs=added_cond_kwargs)
        return []
    missing = [k for k in ("text_embeds", "time_ids") if k not in (added_cond_kwargs or {})]
    if missing:
        raise ValueError(f"{model_name} (SDXL) needs added_cond_kwargs with {missing}")
    return [added_cond_kwargs["text_embeds"].float(), added_cond_kwargs["time_ids"].float()]


def added_embedding(c) -> SimpleNamespace | None:
    """What SDXL pipelines read of the UNet's added embedding: `add_embedding.linear_1.in_features`
    (checked against the text encoder's projection_dim and the time ids they build)."""
    if c.addition_embed_type != TEXT_TIME:
        return None
    return SimpleNamespace(linear_1=SimpleNamespace(in_features=c.projection_class_embeddings_input_dim))


class _UNetGraph(torch.nn.Module):
    def __init__(self, unet: UNet2DConditionModel, added: bool, residuals: int):
        super().__init__()
        self.unet = unet
        self.added = added
        self.residuals = residuals

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        kwargs = {}
        if self.added:
            text_embeds, time_ids, *extra = extra
            kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        if self.residuals:
            *down, mid = extra
            kwargs.update(down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **kwargs)[0]


class RBLNUNet2DConditionModel(RBLNDiffusersModel):
    hf_class = UNet2DConditionModel
    config_class = RBLNUNet2DConditionModelConfig
    main_input_name = "sample"
    stats_unit = "latents"

    @classmethod
    def _resolve_config(cls, unet, config: RBLNUNet2DConditionModelConfig, source_folder=None):
        return resolve_conditioning(cls.__name__, unet.config, config)

    @classmethod
    def _graph_inputs(cls, c, config: RBLNUNet2DConditionModelConfig) -> dict[str, tuple]:
        inputs = conditioning_inputs(c, config)
        if config.uses_controlnet:
            shapes = down_residual_shapes(c, config.batch_size, config.sample_size)
            inputs += tuple((f"down_block_residual_{i}", shape, "float32") for i, shape in enumerate(shapes[:-1]))
            inputs += (("mid_block_residual", shapes[-1], "float32"),)
        return {cls.graph_name: inputs}

    @classmethod
    def _graph_specs(cls, unet, config: RBLNUNet2DConditionModelConfig) -> list[GraphSpec]:
        c = unet.config
        residuals = len(down_residual_shapes(c, 1, config.sample_size)) if config.uses_controlnet else 0
        module = _UNetGraph(unet, c.addition_embed_type == TEXT_TIME, residuals)
        return [GraphSpec(cls.graph_name, cls._graph_inputs(c, config)[cls.graph_name], module)]

    @property
    def add_embedding(self) -> SimpleNamespace | None:
        return added_embedding(self.config)

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, class_labels=None,
                timestep_cond=None, attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict: bool = True):
        name = type(self).__name__
        reject_unsupported(name, class_labels=class_labels, timestep_cond=timestep_cond, attention_mask=attention_mask,
                           cross_attention_kwargs=cross_attention_kwargs,
                           down_intrablock_additional_residuals=down_intrablock_additional_residuals,
                           encoder_attention_mask=encoder_attention_mask)
        residuals = []
        if (down_block_additional_residuals is not None) != self.rbln_config.uses_controlnet:
            raise ValueError(f"{name}: ControlNet residuals are given but the UNet was compiled without them, or the "
                             "reverse (ControlNet pipelines compile it with rbln_uses_controlnet=True)")
        if down_block_additional_residuals is not None:
            residuals = [r.float() for r in (*down_block_additional_residuals, mid_block_additional_residual)]
        rows = sample.shape[0]
        timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(rows)
        inputs = [sample.float(), timestep.contiguous(), encoder_hidden_states.float()]
        (out,) = self._run_graph(self.graph_name,
                                 inputs + added_conditions(name, self.config, added_cond_kwargs) + residuals)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)
