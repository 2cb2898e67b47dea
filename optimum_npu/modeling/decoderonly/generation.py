"""transformers' `generate()` on a compiled decoder: the GenerationMixin hooks, the step each
`forward()` runs, and the simulated figures of the last generation (`GenerationStats`).

During a `generate`, row b of the batch owns KV slot b of the model's `BlockManager`. Prefill
runs each prompt alone, chunk by chunk (left padding stripped); decode runs all rows together
in the smallest compiled bucket that holds them. Both go through the model's `DecoderRunner`,
the same one a serving engine drives.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from transformers import GenerationMixin
from transformers.utils import ModelOutput

from ...sim_device.stats import DeviceMemoryUsage, memory_summary
from .kv_cache import KVCacheExhaustedError


@dataclass
class RBLNCausalLMOutput(ModelOutput):
    logits: torch.Tensor | None = None
    next_positions: list[int] | None = None


@dataclass
class GenerationStats:
    """Simulated device performance of the last `generate` call."""

    batch_size: int = 0
    prompt_tokens: list[int] = field(default_factory=list)
    new_tokens: int = 0                  # tokens generated per row (decode steps + the prefill token)
    decode_bucket: int = 0
    prefill_s: float = 0.0               # all prompts, one after another
    decode_s: float = 0.0
    decode_steps: int = 0
    memory: list[DeviceMemoryUsage] = field(default_factory=list)

    @property
    def ttft_s(self) -> float:
        """Time to first token: the prefill of the whole batch."""
        return self.prefill_s

    @property
    def tpot_s(self) -> float:
        """Time per output token after the first: one decode step."""
        return self.decode_s / self.decode_steps if self.decode_steps else 0.0

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        """Output tokens of all rows per simulated second."""
        return self.batch_size * self.new_tokens / self.total_s if self.total_s else 0.0

    def __str__(self) -> str:
        memory = memory_summary(self.memory)
        return (
            f"batch {self.batch_size}, prompts {self.prompt_tokens} tokens, {self.new_tokens} new tokens per row "
            f"(decode bucket {self.decode_bucket})\n"
            f"TTFT {self.ttft_s * 1e3:.3f} ms | TPOT {self.tpot_s * 1e3:.3f} ms | "
            f"{self.tokens_per_s:.1f} output tokens/s (simulated) | device memory: {memory}"
        )


def refuse_beam_search(generation_config, kwargs: dict) -> None:
    """ValueError for a generate() call asking for beam search, which the compiled decoders do not run."""
    config = generation_config
    num_beams = kwargs.get("num_beams", getattr(config, "num_beams", 1) if config is not None else 1)
    if num_beams and num_beams > 1:
        raise ValueError("beam search (num_beams > 1) is not supported on the NPU decoder; use greedy or sampling "
                         "(num_beams=1; in a transformers pipeline: generate_kwargs={'num_beams': 1})")


class DeviceCacheGenerationMixin(GenerationMixin):
    """transformers' GenerationMixin for a compiled model whose caches live on the device: no HF cache
    object, no logits_to_keep, no eager model to tune. Shared by the decoder-only and encoder-decoder models."""

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def _prepare_cache_for_generation(self, *args, **kwargs) -> None:
        """The KV cache lives on the device; there is no HF cache object to prepare."""

    def _supports_logits_to_keep(self) -> bool:
        return False

    @contextlib.contextmanager
    def _optimize_model_for_decode(self):
        """The compiled graphs are what runs; there is no eager model to tune for decode."""
        yield


class RBLNDecoderOnlyGenerationMixin(DeviceCacheGenerationMixin):
    """What transformers' `generate()` needs from a compiled decoder. The model provides
    `runner` (a DecoderRunner), `block_manager`, `rbln_config`, `config`, `_lock`,
    `_stats_in_progress`, `generation_stats` and `device_memory()`."""

    # ---- one step ----------------------------------------------------------------------

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, rbln_positions=None, **kwargs):
        """One generation step: prefill of every prompt (rbln_positions None) or one decode step."""
        input_ids = self._check_inputs(input_ids, attention_mask, inputs_embeds)
        with self._lock:
            return self._step(input_ids, attention_mask, inputs_embeds, rbln_positions)

    def _step(self, input_ids, attention_mask, inputs_embeds, rbln_positions):
        stats = self._stats_in_progress
        if rbln_positions is None:
            return self._prefill_batch(input_ids, attention_mask, inputs_embeds, stats)
        if any(p >= self.rbln_config.max_seq_len for p in rbln_positions):
            raise ValueError(f"generation reached rbln_max_seq_len={self.rbln_config.max_seq_len}")
        clock_before = self.runner.clock_s
        rows = list(range(len(rbln_positions)))
        self.runner.bucket_for(len(rows))  # a batch no decode graph holds is refused before any block moves
        for slot, position in zip(rows, rbln_positions):
            self.block_manager.allocate(slot, position + 1)
        logits = self.runner.decode(input_ids[:, -1], torch.tensor(rbln_positions), self.block_manager.block_tables(rows),
                                    adapter_slots=self._adapter_slots(len(rows)))
        if stats is not None:
            stats.decode_s += self.runner.clock_s - clock_before
            stats.decode_steps += 1
            stats.new_tokens += 1
        return RBLNCausalLMOutput(logits=logits[:, None], next_positions=[p + 1 for p in rbln_positions])

    def _prefill_batch(self, input_ids, attention_mask, inputs_embeds, stats):
        c = self.rbln_config
        rows = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
        if rows > c.batch_size:
            raise ValueError(
                f"batch of {rows} sequences is larger than the compiled rbln_batch_size={c.batch_size}; "
                "recompile with a larger rbln_batch_size or split the batch"
            )
        if inputs_embeds is not None and not c.use_inputs_embeds:
            raise ValueError("inputs_embeds needs a model compiled with rbln_use_inputs_embeds=True")
        self.block_manager.free_all()
        clock_before = self.runner.clock_s
        adapter_slots = self._adapter_slots(rows)
        logits, positions = [], []
        for row in range(rows):
            keep = attention_mask[row].bool() if attention_mask is not None else slice(None)
            tokens = input_ids[row][keep] if input_ids is not None and input_ids.shape[1] else None
            embeds = inputs_embeds[row][keep].float() if inputs_embeds is not None else None
            length = (tokens if embeds is None else embeds).shape[0]
            if length == 0:
                raise ValueError(f"prompt {row} is empty (its attention_mask is all zeros)")
            if length > c.max_seq_len:
                raise ValueError(f"prompt {row} has {length} tokens, more than rbln_max_seq_len={c.max_seq_len}")
            # The blocks the padded chunks write, so that the padding writes land in this row's own blocks.
            self.block_manager.allocate(row, self.runner.prefill_starts(0, length)[-1] + c.prefill_chunk_size)
            table = torch.tensor(self.block_manager.block_table(row), dtype=torch.int32)
            logits.append(self.runner.prefill(tokens, table, 0, embeds, adapter_slot=adapter_slots[row]))
            positions.append(length)
        if stats is not None:
            stats.prefill_s += self.runner.clock_s - clock_before
            stats.prompt_tokens = positions
            stats.new_tokens += 1
        return RBLNCausalLMOutput(logits=torch.stack(logits)[:, None], next_positions=positions)

    # ---- transformers GenerationMixin hooks ---------------------------------------------

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, inputs_embeds=None,
                                      rbln_positions=None, **kwargs):
        if rbln_positions is None:
            return {"input_ids": input_ids, "attention_mask": attention_mask, "inputs_embeds": inputs_embeds}
        return {"input_ids": input_ids[:, -1:], "rbln_positions": rbln_positions}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, **kwargs):
        model_kwargs["rbln_positions"] = outputs.next_positions
        model_kwargs.pop("inputs_embeds", None)
        mask = model_kwargs.get("attention_mask")
        if mask is not None:
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        return model_kwargs

    def _validate_model_kwargs(self, model_kwargs):
        unknown = set(model_kwargs) - {"input_ids", "attention_mask", "inputs_embeds", "use_cache", "rbln_positions",
                                       "output_attentions", "output_hidden_states", "return_dict"}
        unknown = {k for k in unknown if model_kwargs[k] is not None}
        if unknown:
            raise ValueError(f"generate() got arguments this model does not use: {sorted(unknown)}")

    # ---- LoRA adapters (compiled in with rbln_lora_config) ----------------------------------

    def set_adapter(self, adapter) -> None:
        """The LoRA adapter(s) later `generate()` / `forward()` calls use when not given
        `lora_int_id`: a lora_int_id or lora_name for every row, a list of them (one per row), or
        None (the base model)."""
        self._adapter_choice = None if adapter is None else self._slots_of(adapter)

    def _slots_of(self, adapter) -> list[int] | int:
        """lora_int_id / lora_name (or a list / 1-D tensor of them, one per row) -> compiled slot(s)."""
        lora = self.rbln_config.lora_config
        if lora is None:
            raise ValueError("lora_int_id needs a model compiled with LoRA adapters (rbln_lora_config); this one "
                             "runs the base model only")
        if isinstance(adapter, torch.Tensor):
            if adapter.dim() > 1 or adapter.is_floating_point():
                raise ValueError(f"lora_int_id must be an int, a name or a 1-D list of them; got a tensor "
                                 f"{adapter.dtype} {list(adapter.shape)}")
            adapter = adapter.tolist()
        if isinstance(adapter, (list, tuple)):
            return [lora.slot_of(a) for a in adapter]
        return lora.slot_of(adapter)

    def _adapter_slots(self, rows: int) -> list[int]:
        """Each row's adapter slot: this generate()'s lora_int_id, else set_adapter's, else the base."""
        choice = self._generation_adapters if self._generation_adapters is not None else self._adapter_choice
        if choice is None:
            return [0] * rows
        if isinstance(choice, int):
            return [choice] * rows
        if len(choice) < rows:
            raise ValueError(f"lora_int_id names {len(choice)} adapter(s) for a batch of {rows} rows; give one "
                             "per row, or a single one for all")
        return list(choice[:rows])

    def generate(self, inputs=None, generation_config=None, *, lora_int_id=None, **kwargs):
        """transformers' `generate`, on the simulated NPU. Beam search is not supported.

        lora_int_id: with LoRA adapters compiled in, the adapter of every row (a lora_int_id or
        lora_name; 0 / "base": none) or a list of them, one per row (default: `set_adapter`'s)."""
        adapters = None if lora_int_id is None else self._slots_of(lora_int_id)
        config = generation_config or self.generation_config
        refuse_beam_search(config, kwargs)
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        self._check_inputs(ids, kwargs.get("attention_mask"), kwargs.get("inputs_embeds"))
        lengths, max_new = self._check_generation_length(ids, kwargs.get("attention_mask"), kwargs.get("inputs_embeds"),
                                                         config, kwargs)
        stats = GenerationStats(batch_size=len(lengths), decode_bucket=self.runner.bucket_for(len(lengths)))
        self._check_kv_pool(lengths, max_new)
        with self._lock:  # the KV cache, the block manager and the stats belong to one generation at a time
            self._stats_in_progress = stats
            self._generation_adapters = adapters
            try:
                self._adapter_slots(len(lengths))   # one adapter per row, checked before any device work
                return super().generate(inputs=inputs, generation_config=generation_config, **kwargs)
            finally:
                self._stats_in_progress = None
                self._generation_adapters = None
                self.block_manager.free_all()
                stats.memory = self.device_memory()
                self.generation_stats = stats

    # ---- input checks -------------------------------------------------------------------

    def _check_inputs(self, input_ids, attention_mask, inputs_embeds) -> torch.Tensor | None:
        """Refuse malformed inputs up front, naming the problem (instead of an IndexError deep in
        the embedding lookup). Returns input_ids as int64, the graphs' input type."""
        if input_ids is None and inputs_embeds is None:
            raise ValueError("generate() / forward() needs input_ids (or inputs_embeds)")
        if inputs_embeds is not None:
            hidden = self.config.hidden_size
            if not (isinstance(inputs_embeds, torch.Tensor) and inputs_embeds.is_floating_point()
                    and inputs_embeds.dim() == 3 and inputs_embeds.shape[-1] == hidden):
                got = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds)
                raise ValueError(f"inputs_embeds must be a float tensor [batch, tokens, {hidden}]; got {got}")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
                got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
                raise ValueError(f"input_ids must be a 2-D tensor [batch, tokens]; got {got}")
            if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
                raise TypeError(f"input_ids must hold integer token ids; got dtype {input_ids.dtype}")
            vocab = self.config.vocab_size
            outside = input_ids[(input_ids < 0) | (input_ids >= vocab)]
            if outside.numel():
                raise ValueError(
                    f"input_ids holds token id {int(outside[0])}, outside this model's vocabulary [0, {vocab}) "
                    f"({outside.numel()} such id(s)); check the tokenizer matches the model"
                )
            input_ids = input_ids.long()
        prompt = inputs_embeds if inputs_embeds is not None else input_ids
        if prompt.shape[0] == 0 or prompt.shape[1] == 0:
            raise ValueError(f"the prompt is empty (shape {tuple(prompt.shape)}): give at least one token per row")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(prompt.shape[:2]):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, the prompt {tuple(prompt.shape[:2])}; "
                "they must match"
            )
        return input_ids

    def _check_generation_length(self, ids, mask, embeds, config, kwargs) -> tuple[list[int], int]:
        """Refuse up front a generation that would run past max_seq_len, before any device work.
        Returns the prompt length of each row and max_new_tokens."""
        source = ids if ids is not None else embeds
        if source is None:
            raise ValueError("generate() needs input_ids (or inputs_embeds)")
        lengths = mask.sum(-1).tolist() if mask is not None else [source.shape[1]] * source.shape[0]
        longest = int(max(lengths))
        max_new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None) if config is not None else None)
        if max_new is None:
            max_length = kwargs.get("max_length", getattr(config, "max_length", 20) if config is not None else 20)
            max_new = max_length - source.shape[1]
        limit = self.rbln_config.max_seq_len
        if longest > limit:
            raise ValueError(f"a prompt has {longest} tokens, more than rbln_max_seq_len={limit}")
        if longest + max_new > limit:
            raise ValueError(
                f"a prompt of {longest} tokens plus max_new_tokens={max_new} needs {longest + max_new} positions, "
                f"more than rbln_max_seq_len={limit}; lower max_new_tokens or recompile with a larger rbln_max_seq_len"
            )
        return [int(n) for n in lengths], max_new

    def _check_kv_pool(self, lengths: list[int], max_new: int) -> None:
        """Refuse up front, before any device work, a batch whose rows cannot all hold their KV
        blocks at once (the pool may hold fewer sequences of max_seq_len than the batch has slots)."""
        layout, chunk = self.runner.layout, self.runner.prefill_chunk_size
        # Prefill writes whole chunks; decode then writes positions up to length + max_new - 2.
        # (An empty row is refused by its prefill, with its own message.)
        needed = [layout.blocks_for(max(self.runner.prefill_starts(0, max(n, 1))[-1] + chunk, n + max_new - 1))
                  for n in lengths]
        if sum(needed) > layout.num_blocks:
            raise KVCacheExhaustedError(
                f"KV cache too small for this request: prompts of {lengths} tokens plus max_new_tokens={max_new} "
                f"need {needed} blocks ({sum(needed)} at once), but the pool holds {layout.describe()}. Lower "
                "max_new_tokens or the batch, or recompile with more rbln_kvcache_num_blocks (device memory "
                "allowing)."
            )
