"""`RBLNModelForSeq2SeqLM`: one implementation for every encoder-decoder family.

Compiles two graphs into one folder (`encoder.rbln`, `decoder.rbln`, see `graphs.py`) sharing
weights and the cross-attention cache; runs them; generates through transformers'
`GenerationMixin` (greedy, sampling, processors, stop criteria; beam search refused):

- `get_encoder()` is what `generate()` calls first: the encoder graph on the whole batch,
  filling the cross-attention cache on the device.
- The first `forward()` step feeds the decoder prefix (the start token, Whisper's forced
  task tokens) one token at a time; each later step one token per row, at its position.

`model(input_ids, attention_mask=..., decoder_input_ids=...)` is transformers' forward too
(encoder, then every decoder position): logits of every decoder position.

A family (`families.py`) says where its parts are: `_encoder_part`, `_decoder_parts` and the
encoder's inputs (`_encoder_input_info`); this file does the rest.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from ...compile import ProgramTooLargeError
from ...configuration import OPTION_PREFIX
from ...sim_device import Runtime
from ...sim_device.memory import DeviceMemoryError
from ...sim_device.specs import get_npu_spec
from ...sim_device.stats import format_bytes
from ..base import GraphSpec, RBLNModel
from ..encoders import check_token_ids
from ..decoderonly.compile_plan import DEVICE_DTYPE
from ..decoderonly.generation import DeviceCacheGenerationMixin, GenerationStats, refuse_beam_search
from ..decoderonly.kv_cache import KVCacheLayout
from .configuration_seq2seq import RBLNModelForSeq2SeqLMConfig
from .graphs import DecoderGraph, EncoderGraph, make_caches

ENCODER, DECODER = "encoder", "decoder"


@dataclass
class RBLNSeq2SeqLMOutput(Seq2SeqLMOutput):
    next_positions: list[int] | None = None   # where each row's next decoder token goes


@dataclass(frozen=True)
class Seq2SeqShape:
    """The sizes both graphs and both caches follow, from the HF config."""

    num_layers: int
    num_heads: int
    head_dim: int

    def self_cache(self, config) -> KVCacheLayout:
        """One block of dec_max_seq_len positions per batch slot (block b is slot b)."""
        return KVCacheLayout(num_layers=self.num_layers, num_blocks=config.batch_size, num_kv_heads=self.num_heads,
                             block_size=config.dec_max_seq_len, head_dim=self.head_dim,
                             max_seq_len=config.dec_max_seq_len)

    def cross_cache(self, config) -> KVCacheLayout:
        return KVCacheLayout(num_layers=self.num_layers, num_blocks=config.batch_size, num_kv_heads=self.num_heads,
                             block_size=config.enc_max_seq_len, head_dim=self.head_dim,
                             max_seq_len=config.enc_max_seq_len)


class _Encoder:
    """What `model.get_encoder()` returns: transformers' generate() calls it with the encoder inputs."""

    def __init__(self, model: RBLNModelForSeq2SeqLM):
        self.model = model
        self.main_input_name = model.main_input_name

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, input_features=None, **kwargs) -> BaseModelOutput:
        inputs = input_features if self.model.main_input_name == "input_features" else input_ids
        return self.model._encode(inputs, attention_mask)


class RBLNModelForSeq2SeqLM(DeviceCacheGenerationMixin, RBLNModel):
    """A compiled encoder-decoder model; `generate()` and `forward()` as in transformers.

    One model has one pair of caches: calls are serialised by a lock (as the decoder-only models)."""

    config_class: ClassVar[type] = RBLNModelForSeq2SeqLMConfig
    main_input_name = "input_ids"
    stats_unit = "sequences"
    _is_stateful = False
    _supports_cache_class = False

    def __init__(self, hf_config, rbln_config, graphs, source_folder=None, generation_config=None):
        super().__init__(hf_config, rbln_config, graphs, source_folder, generation_config)
        self.generation_stats = GenerationStats()
        self._stats_in_progress: GenerationStats | None = None
        self._encoder_mask: torch.Tensor | None = None   # the mask of the batch in the cross cache
        self._encoded: torch.Tensor | None = None        # the last hidden state _encode returned for it
        self._lock = threading.RLock()

    # ---- to be provided by a family -------------------------------------------------------

    @classmethod
    def _shape(cls, hf_config) -> Seq2SeqShape:
        raise NotImplementedError

    @classmethod
    def _position_limits(cls, hf_config) -> tuple[int | None, int | None]:
        """The encoder's and decoder's position limits (None: the model has none)."""
        raise NotImplementedError

    @classmethod
    def _encoder_input_info(cls, hf_config, config) -> list[tuple[str, tuple[int, ...], str]]:
        shape = (config.batch_size, config.enc_max_seq_len)
        return [("input_ids", shape, "int64"), ("attention_mask", shape, "int64")]

    @classmethod
    def _graph_modules(cls, hf_model, config) -> tuple[EncoderGraph, DecoderGraph]:
        raise NotImplementedError

    # ---- compiling ------------------------------------------------------------------------

    @classmethod
    def _resolve_config(cls, hf_model, config, source_folder=None):
        enc, dec = cls._position_limits(hf_model.config)
        return config.resolve(enc, dec, type(hf_model).__name__)

    @classmethod
    def _caches(cls, hf_config, config) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Zero (self, cross) caches: each graph registers the ones it touches under these names."""
        shape, dtype = cls._shape(hf_config), DEVICE_DTYPE[config.dtype]
        return make_caches(shape.self_cache(config), dtype, "self"), make_caches(shape.cross_cache(config), dtype, "cross")

    @classmethod
    def _decoder_input_info(cls, config) -> list[tuple[str, tuple[int, ...], str]]:
        batch = config.batch_size
        return [("decoder_input_ids", (batch, 1), "int64"), ("positions", (batch,), "int32"),
                ("encoder_attention_mask", (batch, config.enc_max_seq_len), "int64")]

    @classmethod
    def _compile(cls, hf_model, rbln_config, source_folder=None):
        """The base's compile, checked to fit one device (both programs together: the decoder shares the
        encoder's weights and cross cache), else a DeviceMemoryError naming the options that size them;
        weights and caches are checked before the caches are created on the host."""
        resolved = cls._resolve_config(hf_model, rbln_config, source_folder)
        # Before any cache exists on the host: the weights and both caches alone (16-bit) must fit.
        shape = cls._shape(hf_model.config)
        cache_elements = sum(layout.num_layers * 2 * math.prod(layout.block_shape)
                             for layout in (shape.self_cache(resolved), shape.cross_cache(resolved)))
        at_least = 2 * (cache_elements + sum(p.numel() for p in hf_model.parameters()))
        if at_least > get_npu_spec(resolved.npu).usable_dram_bytes:
            raise DeviceMemoryError(cls._too_large_message(resolved, at_least))
        try:
            config, graphs = super()._compile(hf_model, rbln_config, source_folder)
        except ProgramTooLargeError as error:   # one program alone is too large; its advice would be TP
            raise DeviceMemoryError(cls._too_large_message(resolved, error.program.memory.total_bytes(0))) from None
        need = device_bytes(graphs[ENCODER].program, graphs[DECODER].program)
        if need > get_npu_spec(config.npu).usable_dram_bytes:
            raise DeviceMemoryError(cls._too_large_message(config, need))
        return config, graphs

    @classmethod
    def _too_large_message(cls, config, need: int) -> str:
        usable = get_npu_spec(config.npu).usable_dram_bytes
        return (f"{cls.__name__} needs at least {format_bytes(need)} of one device (the encoder and decoder "
                f"programs: weights, the self-attention cache of rbln_batch_size={config.batch_size} x "
                f"rbln_dec_max_seq_len={config.dec_max_seq_len} positions, the cross-attention cache of "
                f"rbln_enc_max_seq_len={config.enc_max_seq_len} positions, activations); a {config.npu} device has "
                f"{format_bytes(usable)} usable. To fit: lower rbln_batch_size, rbln_dec_max_seq_len or "
                "rbln_enc_max_seq_len, or target an npu with more memory (an encoder-decoder model runs on one "
                "device: tensor parallelism is not supported for it).")

    @classmethod
    def _graph_specs(cls, hf_model, config) -> list[GraphSpec]:
        encoder, decoder = cls._graph_modules(hf_model, config)
        check_every_parameter_used(hf_model, (encoder, decoder))
        return [GraphSpec(ENCODER, tuple(cls._encoder_input_info(hf_model.config, config)), encoder),
                GraphSpec(DECODER, tuple(cls._decoder_input_info(config)), decoder)]

    # ---- loading --------------------------------------------------------------------------

    @classmethod
    def _check_graphs_against_config(cls, config, graphs, hf_config=None) -> None:
        """Refuse a folder whose rbln_config.json contradicts its programs (edited or mixed up)."""
        super()._check_graphs_against_config(config, graphs, hf_config)
        if sorted(graphs) != [DECODER, ENCODER]:
            raise ValueError(f"an encoder-decoder folder holds the graphs {[ENCODER, DECODER]}, this one "
                             f"{sorted(graphs)}; recompile with export=True")
        if hf_config is None:
            return
        expected = {ENCODER: [tuple(i) for i in cls._encoder_input_info(hf_config, config)],
                    DECODER: [tuple(i) for i in cls._decoder_input_info(config)]}
        shape = cls._shape(hf_config)
        caches = {ENCODER: {"cross": shape.cross_cache(config)},
                  DECODER: {"cross": shape.cross_cache(config), "self": shape.self_cache(config)}}
        for name, artifact in graphs.items():
            program = artifact.program
            actual = [(s.name, tuple(s.shape), s.dtype) for s in program.inputs]
            buffers = {s.name: tuple(s.shape) for s in program.buffers}
            wanted = {f"{prefix}_{kv}_{i}": layout.block_shape for prefix, layout in caches[name].items()
                      for i in range(layout.num_layers) for kv in "kv"}
            if actual != expected[name] or any(buffers.get(n) != s for n, s in wanted.items()):
                raise ValueError(
                    f"rbln_config.json (batch_size={config.batch_size}, enc_max_seq_len={config.enc_max_seq_len}, "
                    f"dec_max_seq_len={config.dec_max_seq_len}) implies other inputs or caches than {name}.rbln "
                    "holds: the folder's files do not belong together; recompile with export=True")

    def _external_tensors(self, graph_name: str) -> tuple[str, ...]:
        """The decoder's tensors the encoder file already stores (a shared embedding): written once."""
        if graph_name != DECODER:
            return ()
        encoder = self.graphs[ENCODER].program
        stored = {s.name for s in encoder.weights + encoder.buffers if s.name not in encoder.zero_init}
        decoder = self.graphs[DECODER].program
        return tuple(s.name for s in decoder.weights + decoder.buffers if s.name in stored)

    def _create_runtimes(self) -> dict[str, Runtime]:
        c = self.rbln_config
        encoder = Runtime(self.graphs[ENCODER], device=c.device, activate_profiler=c.activate_profiler,
                          name=f"{type(self).__name__}.{ENCODER}")
        decoder = Runtime(self.graphs[DECODER], activate_profiler=c.activate_profiler, share_state_with=encoder,
                          name=f"{type(self).__name__}.{DECODER}")
        return {ENCODER: encoder, DECODER: decoder}

    # ---- running the graphs ---------------------------------------------------------------

    @property
    def _clock_s(self) -> float:
        return self._runtime(ENCODER).timeline.clock_s

    def _check_rows(self, rows: int) -> None:
        if rows > self.rbln_config.batch_size:
            raise ValueError(f"batch of {rows} sequences is larger than the compiled rbln_batch_size="
                             f"{self.rbln_config.batch_size}; recompile with a larger rbln_batch_size or split the batch")

    def _encoder_inputs(self, inputs: torch.Tensor, attention_mask) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The encoder graph's inputs for a batch of token ids (padded to the compiled length and batch),
        and the mask [rows, enc_max_seq_len] of the real positions. A family with other inputs overrides."""
        c = self.rbln_config
        length = check_token_ids(inputs, c.enc_max_seq_len, "enc_max_seq_len", self.config.vocab_size)
        rows = inputs.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(inputs)
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (rows, length):
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask must have the shape of input_ids {(rows, length)}; got {got}")
        if not attention_mask.bool().any(dim=1).all():
            raise ValueError("a row of attention_mask is all zeros: every input needs at least one token")
        ids = torch.full((rows, c.enc_max_seq_len), self.config.pad_token_id or 0, dtype=torch.int64)
        mask = torch.zeros((rows, c.enc_max_seq_len), dtype=torch.int64)
        ids[:, :length], mask[:, :length] = inputs.long(), attention_mask.long()
        return [ids, mask], mask

    def _encode(self, inputs, attention_mask=None) -> BaseModelOutput:
        """Run the encoder graph on a batch: fills the cross-attention cache (slot b = row b)."""
        with self._lock:
            graph_inputs, mask = self._encoder_inputs(inputs, attention_mask)
            rows = mask.shape[0]
            self._check_rows(rows)
            batch = self.rbln_config.batch_size
            # The compiled batch at once: rows past the batch are copies of the last (never read).
            padded = [torch.cat([t, t[-1:].expand(batch - rows, *t.shape[1:])]) for t in graph_inputs]
            clock = self._clock_s
            out = self._runtime(ENCODER).run(*padded)
            hidden = out[0] if isinstance(out, tuple) else out
            if self._stats_in_progress is not None:
                self._stats_in_progress.prefill_s += self._clock_s - clock
                self._stats_in_progress.prompt_tokens = mask.sum(-1).tolist()
            self._encoder_mask = mask
            length = inputs.shape[1] if self.main_input_name == "input_ids" else hidden.shape[1]
            self._encoded = hidden[:rows, :length]
            return BaseModelOutput(last_hidden_state=self._encoded)

    def _decode_step(self, tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """One decoder run: tokens [rows] at `positions` -> fp32 logits [rows, vocab]."""
        c = self.rbln_config
        rows = tokens.shape[0]
        if self._encoder_mask is None or self._encoder_mask.shape[0] != rows:
            raise ValueError("the decoder attends to the encoder's output of the same batch: run the encoder first "
                             "(generate() and forward(input_ids, ...) do)")
        if any(not 0 <= p < c.dec_max_seq_len for p in positions):
            raise ValueError(f"decoder positions {positions} must be in 0..{c.dec_max_seq_len - 1} "
                             f"(rbln_dec_max_seq_len={c.dec_max_seq_len})")
        batch = c.batch_size
        ids = torch.zeros((batch, 1), dtype=torch.int64)
        ids[:rows, 0] = tokens
        start = torch.full((batch,), -1, dtype=torch.int32)   # padding rows write no cache
        start[:rows] = torch.tensor(positions, dtype=torch.int32)
        mask = torch.ones((batch, c.enc_max_seq_len), dtype=torch.int64)
        mask[:rows] = self._encoder_mask
        out = self._runtime(DECODER).run(ids, start, mask)
        return (out[0] if isinstance(out, tuple) else out)[:rows, -1]

    def _decode_tokens(self, decoder_input_ids: torch.Tensor, first_position: int) -> torch.Tensor:
        """Every token of decoder_input_ids [rows, n], from `first_position` on: logits [rows, n, vocab]."""
        vocab = self.config.vocab_size
        ids = decoder_input_ids
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.shape[1] == 0:
            raise ValueError(f"decoder_input_ids must be an integer tensor [batch, tokens] with at least one token; "
                             f"got {tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        if ((ids < 0) | (ids >= vocab)).any():
            raise ValueError(f"decoder_input_ids holds token ids outside this model's vocabulary [0, {vocab})")
        if first_position + ids.shape[1] > self.rbln_config.dec_max_seq_len:
            raise ValueError(f"{first_position + ids.shape[1]} decoder tokens are more than rbln_dec_max_seq_len="
                             f"{self.rbln_config.dec_max_seq_len}")
        steps = [self._decode_step(ids[:, t], [first_position + t] * ids.shape[0]) for t in range(ids.shape[1])]
        return torch.stack(steps, dim=1)

    # ---- transformers' forward and generate ----------------------------------------------

    def get_encoder(self):
        return _Encoder(self)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, encoder_outputs=None,
                rbln_positions=None, decoder_attention_mask=None, input_features=None, return_dict=None, **kwargs):
        """transformers' forward: with the encoder inputs, the encoder then every decoder position (logits
        [batch, n, vocab]); in generate(), one step (encoder_outputs given: the cross cache is filled)."""
        unused = {k for k, v in kwargs.items() if v is not None and k not in
                  ("use_cache", "output_attentions", "output_hidden_states", "cache_position", "past_key_values")}
        if unused or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            raise TypeError(f"{type(self).__name__}.forward() does not take {sorted(unused) or ['output_attentions']}")
        if decoder_attention_mask is not None and not bool(decoder_attention_mask.bool().all()):
            raise ValueError("decoder_attention_mask with padding is not supported: every decoder row has the "
                             "same length here (the decoder prefix of generate() has)")
        if decoder_input_ids is None:
            raise ValueError("forward() needs decoder_input_ids (generate() makes them)")
        with self._lock:
            stats, clock = self._stats_in_progress, self._clock_s
            if encoder_outputs is None:
                inputs = input_features if self.main_input_name == "input_features" else input_ids
                if inputs is None:
                    raise ValueError(f"forward() needs {self.main_input_name} (or encoder_outputs from generate())")
                encoder_outputs = self._encode(inputs, attention_mask)
            elif self._encoded is None or encoder_outputs[0] is not self._encoded:
                raise ValueError(
                    "encoder_outputs must be what this model's encoder returned last (model.get_encoder()(...), "
                    "as generate() calls it): the decoder reads the cross-attention cache the encoder filled on the "
                    "device, not the tensor passed. Pass the encoder inputs instead (and num_return_sequences=1: "
                    "expanded encoder outputs are not supported)")
            self._check_rows(decoder_input_ids.shape[0])
            if rbln_positions is None:   # the whole prefix, from position 0
                logits = self._decode_tokens(decoder_input_ids, 0)
                positions = [decoder_input_ids.shape[1]] * decoder_input_ids.shape[0]
                if stats is not None:
                    stats.prefill_s += self._clock_s - clock
                    stats.new_tokens += 1
            else:
                logits = self._decode_step(decoder_input_ids[:, -1], rbln_positions)[:, None]
                positions = [p + 1 for p in rbln_positions]
                if stats is not None:
                    stats.decode_s += self._clock_s - clock
                    stats.decode_steps += 1
                    stats.new_tokens += 1
        output = RBLNSeq2SeqLMOutput(logits=logits, encoder_last_hidden_state=encoder_outputs.last_hidden_state,
                                     next_positions=positions)
        return output if return_dict is not False else output.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, encoder_outputs=None, attention_mask=None,
                                      rbln_positions=None, **kwargs):
        return {"decoder_input_ids": input_ids, "encoder_outputs": encoder_outputs, "attention_mask": attention_mask,
                "rbln_positions": rbln_positions}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=True, **kwargs):
        model_kwargs["rbln_positions"] = outputs.next_positions
        return model_kwargs

    def _validate_model_kwargs(self, model_kwargs):
        known = {"input_ids", "attention_mask", "input_features", "decoder_input_ids", "decoder_attention_mask",
                 "encoder_outputs", "use_cache", "rbln_positions", "output_attentions", "output_hidden_states",
                 "return_dict"}
        unknown = {k for k, v in model_kwargs.items() if k not in known and v is not None}
        if unknown:
            raise ValueError(f"generate() got arguments this model does not use: {sorted(unknown)}")

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """transformers' `generate`, on the simulated NPU. Beam search is not supported."""
        config = generation_config or self.generation_config
        refuse_beam_search(config, kwargs)
        self._check_generation_length(config, kwargs)
        with self._lock:
            stats = GenerationStats(decode_bucket=self.rbln_config.batch_size)
            self._stats_in_progress = stats
            try:
                out = super().generate(inputs=inputs, generation_config=generation_config, **kwargs)
            finally:
                self._stats_in_progress = None
                stats.batch_size = len(stats.prompt_tokens)
                stats.memory = self.device_memory()
                self.generation_stats = stats
            return out

    def _check_generation_length(self, config, kwargs: dict[str, Any]) -> None:
        """Refuse up front a generation whose decoder would run past dec_max_seq_len."""
        limit = self.rbln_config.dec_max_seq_len
        max_new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None) if config is not None else None)
        prefix = kwargs.get("decoder_input_ids")
        prefix_len = prefix.shape[1] if isinstance(prefix, torch.Tensor) else 1
        if max_new is not None:
            needed = prefix_len + max_new - 1   # the last token is generated, never fed back
        else:
            needed = kwargs.get("max_length", getattr(config, "max_length", 20) if config is not None else 20) - 1
        if needed > limit:
            raise ValueError(f"this generation feeds the decoder {needed} tokens (prefix {prefix_len} + "
                             f"max_new_tokens / max_length), more than {OPTION_PREFIX}dec_max_seq_len={limit}; lower "
                             f"max_new_tokens or recompile with a larger {OPTION_PREFIX}dec_max_seq_len")


def device_bytes(encoder, decoder) -> int:
    """Device memory of both programs on one device: tensors of one name (the shared embedding, the
    cross-attention cache) once, each program's activations apart (each runtime has its own)."""
    held = {s.name for s in encoder.weights + encoder.buffers}
    shared = sum(decoder.resident_bytes(s, 0) for s in decoder.weights + decoder.buffers if s.name in held)
    return encoder.memory.total_bytes(0) + decoder.memory.total_bytes(0) - shared


def check_every_parameter_used(hf_model: torch.nn.Module, graphs: tuple[torch.nn.Module, ...]) -> None:
    """ValueError if the HF model has a parameter no graph holds: a family mapping that missed a module
    would otherwise compile without it and give wrong tokens."""
    used = {id(p) for graph in graphs for p in graph.parameters()}
    unused = [name for name, p in hf_model.named_parameters() if id(p) not in used]
    if unused:
        shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        raise ValueError(f"{type(hf_model).__name__} has parameters the NPU encoder-decoder would not use: {shown}. "
                         "Its architecture is not the layout this family compiles; compiling it would drop these "
                         "weights and give wrong tokens.")
