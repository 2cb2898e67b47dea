"""Text encoders as single-graph models: BERT (sentence embeddings), CLIP text, T5 encoder.

One implementation, `RBLNTextEncoderModel`; a family is its HF class and which fields of the
HF output it returns. The graph takes `input_ids` and `attention_mask` of
[rbln_batch_size, rbln_max_seq_len]; a shorter input is padded on the right (padding masked
out, so real tokens see what they would see unpadded) and the outputs sliced back to its
length. Outputs are the HF output classes, so code written for the HF model (a diffusers
pipeline's `encode_prompt`, sentence-transformers style mean pooling) runs unchanged:

    encoder = RBLNT5EncoderModel.from_pretrained("t5-folder", export=True, rbln_max_seq_len=512)
    embeds = encoder(input_ids, attention_mask=mask).last_hidden_state
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import BertModel, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPTextModelOutput

from ..configuration import OPTION_PREFIX, RBLNModelConfig, check_bool, check_int
from .base import GraphSpec, RBLNModel


@dataclass(frozen=True, kw_only=True)
class RBLNTextEncoderConfig(RBLNModelConfig):
    """Options of a compiled text encoder (plus the base npu / dtype / batch_size / ...)."""

    max_seq_len: int | None = None        # None: the model's max_position_embeddings (T5 has none: set it)
    output_hidden_states: bool = False    # the graph also returns every layer's hidden states

    def _validate(self) -> None:
        super()._validate()
        check_int("max_seq_len", self.max_seq_len, allow_none=True)
        check_bool("output_hidden_states", self.output_hidden_states)


class RBLNBertModelConfig(RBLNTextEncoderConfig):
    """Options of RBLNBertModel."""


class RBLNCLIPTextModelConfig(RBLNTextEncoderConfig):
    """Options of RBLNCLIPTextModel."""


class RBLNCLIPTextModelWithProjectionConfig(RBLNTextEncoderConfig):
    """Options of RBLNCLIPTextModelWithProjection."""


class RBLNT5EncoderModelConfig(RBLNTextEncoderConfig):
    """Options of RBLNT5EncoderModel."""


FINAL_NORM_GRAPH = "final_layer_norm"


def check_token_ids(input_ids, max_len: int, option: str, vocab: int) -> int:
    """The length of `input_ids`, after checking it is a batch of token ids a graph compiled for `max_len`
    tokens (the option `rbln_<option>`) and a vocabulary of `vocab` can take."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        got = f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor [batch, tokens]; got {got}")
    rows, length = input_ids.shape
    if rows == 0 or length == 0:
        raise ValueError(f"input_ids is empty (shape {(rows, length)})")
    if length > max_len:
        raise ValueError(
            f"input_ids has {length} tokens, more than {OPTION_PREFIX}{option}={max_len} the model was compiled for; "
            f"truncate the input (tokenizer max_length) or recompile with a larger {OPTION_PREFIX}{option}"
        )
    if ((input_ids < 0) | (input_ids >= vocab)).any():
        raise ValueError(f"input_ids holds token ids outside this model's vocabulary [0, {vocab})")
    return length


class _EncoderGraph(torch.nn.Module):
    """The exported graph: the HF encoder on (input_ids, attention_mask, *extra inputs),
    returning the chosen output fields, then each layer's hidden states if asked."""

    def __init__(self, model: torch.nn.Module, fields: tuple[str, ...], extra_inputs: tuple[str, ...],
                 hidden_states: bool):
        super().__init__()
        self.model = model
        self.fields = fields
        self.extra_inputs = extra_inputs
        self.hidden_states = hidden_states

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *extra: torch.Tensor):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **dict(zip(self.extra_inputs, extra)),
                         output_hidden_states=self.hidden_states, return_dict=True)
        return tuple(out[name] for name in self.fields) + (tuple(out.hidden_states) if self.hidden_states else ())


class RBLNTextEncoderModel(RBLNModel):
    """A compiled text encoder; `forward(input_ids, attention_mask=None, ...)` as the HF model's."""

    config_class: ClassVar[type] = RBLNTextEncoderConfig
    output_class: ClassVar[type] = BaseModelOutput
    # Fields of the HF output the graph returns, in order; "last_hidden_state" must be one.
    output_fields: ClassVar[tuple[str, ...]] = ("last_hidden_state",)
    # Further token-aligned int inputs of the HF forward (zeros when not given), e.g. BERT's segments.
    extra_inputs: ClassVar[tuple[str, ...]] = ()
    # The name of the HF submodule that callers apply to a chosen layer's hidden states (CLIP's
    # final_layer_norm); compiled too, as FINAL_NORM_GRAPH, with rbln_output_hidden_states.
    final_norm: ClassVar[str | None] = None
    stats_unit = "sequences"

    # ---- compiling --------------------------------------------------------------------

    @classmethod
    def _resolve_config(cls, hf_model, config: RBLNTextEncoderConfig, source_folder=None) -> RBLNTextEncoderConfig:
        limit = getattr(hf_model.config, "max_position_embeddings", None)
        if config.max_seq_len is None:
            if limit is None:
                raise ValueError(
                    f"{OPTION_PREFIX}max_seq_len is not set and {type(hf_model).__name__} has no "
                    f"max_position_embeddings to take it from; set it (e.g. {OPTION_PREFIX}max_seq_len=512)."
                )
            return dataclasses.replace(config, max_seq_len=limit)
        if limit is not None and config.max_seq_len > limit:
            raise ValueError(
                f"{OPTION_PREFIX}max_seq_len={config.max_seq_len} is above the model's max_position_embeddings={limit}."
            )
        return config

    @classmethod
    def _input_info(cls, hf_config, config: RBLNTextEncoderConfig):
        shape = (config.batch_size, config.max_seq_len)
        return [(name, shape, "int64") for name in ("input_ids", "attention_mask", *cls.extra_inputs)]

    @classmethod
    def _export_module(cls, hf_model, config: RBLNTextEncoderConfig) -> torch.nn.Module:
        return _EncoderGraph(hf_model, cls.output_fields, cls.extra_inputs, config.output_hidden_states)

    @classmethod
    def _graph_specs(cls, hf_model, config: RBLNTextEncoderConfig) -> list[GraphSpec]:
        specs = super()._graph_specs(hf_model, config)
        if config.output_hidden_states and cls.final_norm is not None:
            # A pipeline's clip_skip puts an earlier layer's hidden states through the final norm
            # itself (diffusers' encode_prompt), so the norm is a graph of its own.
            shape = (config.batch_size, config.max_seq_len, hf_model.config.hidden_size)
            # Where it sits depends on the class and the transformers version (CLIPTextModel holds
            # it directly in transformers 5, under text_model before).
            norm = next(module for name, module in hf_model.named_modules() if name.split(".")[-1] == cls.final_norm)
            specs.append(GraphSpec(FINAL_NORM_GRAPH, (("hidden_states", shape, "float32"),), norm))
        return specs

    @classmethod
    def _check_graphs_against_config(cls, config, graphs, hf_config=None) -> None:
        super()._check_graphs_against_config(config, graphs, hf_config)
        names = {cls.graph_name} | ({FINAL_NORM_GRAPH} if config.output_hidden_states and cls.final_norm else set())
        if set(graphs) != names:
            raise ValueError(f"the folder holds the graphs {sorted(graphs)}, but its options imply {sorted(names)}; "
                             "compile the model again (export=True)")
        if hf_config is not None and FINAL_NORM_GRAPH in names:
            shape = (config.batch_size, config.max_seq_len, hf_config.hidden_size)
            if tuple(graphs[FINAL_NORM_GRAPH].program.inputs[0].shape) != shape:
                raise ValueError(f"{FINAL_NORM_GRAPH}.rbln does not take hidden states of {shape}, as the options "
                                 "imply; compile the model again (export=True)")

    # ---- running ----------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None, **kwargs):
        extra = [kwargs.pop(name, None) for name in self.extra_inputs]
        unused = {k: v for k, v in kwargs.items() if v is not None and k != "output_attentions"}
        if unused or kwargs.get("output_attentions"):
            raise TypeError(f"{type(self).__name__}.forward() does not take {sorted(unused) or ['output_attentions']}")
        c = self.rbln_config
        if output_hidden_states and not c.output_hidden_states:
            raise ValueError(
                "output_hidden_states=True needs a model compiled with rbln_output_hidden_states=True "
                "(the graph must return every layer's hidden states; in a diffusers pipeline, for clip_skip: "
                "rbln_config={'text_encoder': {'output_hidden_states': True}})"
            )
        length = self._check_ids(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pad_id = getattr(self.config, "pad_token_id", None) or 0
        shape = tuple(input_ids.shape)
        inputs = [self._pad("input_ids", input_ids, pad_id, shape), self._pad("attention_mask", attention_mask, 0, shape)]
        inputs += [self._pad(name, torch.zeros_like(input_ids) if value is None else value, 0, shape)
                   for name, value in zip(self.extra_inputs, extra)]
        outputs = self._run_graph(self.graph_name, inputs)
        outputs = [o[:, :length] if o.dim() == 3 else o for o in outputs]  # [batch, seq, hidden] back to the input length
        fields = dict(zip(self.output_fields, outputs))
        if c.output_hidden_states and output_hidden_states:
            fields["hidden_states"] = tuple(outputs[len(self.output_fields):])
        result = self.output_class(**fields)
        return result if return_dict is not False else result.to_tuple()

    def modules(self):
        """Itself, as a torch module's `modules()` would list it: diffusers' pipelines walk a text encoder's
        modules for offloading hooks to find where its inputs go (`get_module_execution_device`)."""
        return iter((self,))

    def _run_final_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The model's final norm (`final_norm`) on hidden states [batch, tokens, hidden]."""
        if FINAL_NORM_GRAPH not in self.graphs:
            raise ValueError(
                f"{type(self).__name__}: applying {self.final_norm} to a chosen layer's hidden states (as a "
                "pipeline's clip_skip does) needs a model compiled with rbln_output_hidden_states=True (in a "
                "diffusers pipeline: rbln_config={'text_encoder': {'output_hidden_states': True}})"
            )
        rows, length, width = hidden_states.shape
        padded = hidden_states.new_zeros(rows, self.rbln_config.max_seq_len, width, dtype=torch.float32)
        padded[:, :length] = hidden_states
        (out,) = self._run_graph(FINAL_NORM_GRAPH, [padded])
        return out[:, :length]

    def _check_ids(self, input_ids) -> int:
        """The length of `input_ids`, after checking it is a batch of token ids the model can take."""
        return check_token_ids(input_ids, self.rbln_config.max_seq_len, "max_seq_len", self.config.vocab_size)

    def _pad(self, name: str, tensor, value: int, shape: tuple[int, int]) -> torch.Tensor:
        """`tensor` (of `shape`, that of input_ids) padded on the right with `value` to rbln_max_seq_len, as int64."""
        rows, length = shape
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (rows, length):
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a tensor of the shape of input_ids {(rows, length)}; got {got}")
        padded = torch.full((rows, self.rbln_config.max_seq_len), value, dtype=torch.int64)
        padded[:, :length] = tensor.to(torch.int64)
        return padded


class _CLIPTextModelPart:
    """`encoder.text_model.final_layer_norm(hidden)`, which diffusers' encode_prompt calls for
    clip_skip on a CLIP text model, run on the device."""

    def __init__(self, encoder: RBLNTextEncoderModel):
        self.final_layer_norm = encoder._run_final_norm


class RBLNBertModel(RBLNTextEncoderModel):
    """BERT for sentence embeddings (mean pooling over last_hidden_state is left to the user)."""

    hf_class = BertModel
    config_class = RBLNBertModelConfig
    output_class = BaseModelOutputWithPooling
    output_fields = ("last_hidden_state", "pooler_output")
    extra_inputs = ("token_type_ids",)


class RBLNCLIPTextModel(RBLNTextEncoderModel):
    hf_class = CLIPTextModel
    config_class = RBLNCLIPTextModelConfig
    output_class = BaseModelOutputWithPooling
    output_fields = ("last_hidden_state", "pooler_output")
    final_norm = "final_layer_norm"
    text_model = property(_CLIPTextModelPart)


class RBLNCLIPTextModelWithProjection(RBLNTextEncoderModel):
    hf_class = CLIPTextModelWithProjection
    config_class = RBLNCLIPTextModelWithProjectionConfig
    output_class = CLIPTextModelOutput
    output_fields = ("text_embeds", "last_hidden_state")
    final_norm = "final_layer_norm"
    text_model = property(_CLIPTextModelPart)


class RBLNT5EncoderModel(RBLNTextEncoderModel):
    hf_class = T5EncoderModel
    config_class = RBLNT5EncoderModelConfig
