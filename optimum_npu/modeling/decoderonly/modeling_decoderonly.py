"""`RBLNDecoderOnlyModelForCausalLM`: one implementation for every Llama-like family.

Compiles a prefill graph and one decode graph per batch bucket (`decoder_batch_{b}.rbln`),
all sharing weights and a device-resident paged KV cache; generates through transformers'
`GenerationMixin` (greedy, sampling, repetition penalty, stop strings, streamers).

During a `generate`, row b of the batch owns KV slot b. Prefill runs each prompt alone,
chunk by chunk (left padding stripped); decode runs all rows together in the smallest
compiled bucket that holds them, padding rows marked with start_pos = -1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import GenerationMixin
from transformers.utils import ModelOutput

from ...compile import ProgramTooLargeError, compile_from_torch
from ...sim_device import Runtime
from ...sim_device.memory import DeviceMemoryError, format_gib
from ...sim_device.runtime import DeviceMemoryUsage
from ...sim_device.specs import get_npu_spec
from ..base import GraphSpec, RBLNModel
from .block_manager import BlockManager
from .configuration_decoderonly import RBLNDecoderOnlyModelForCausalLMConfig
from .static_decoder import KVCacheLayout, StaticDecoder, make_kv_caches, merge_layers, rope_tables

PREFILL = "prefill"
DEVICE_DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def decoder_graph_name(batch: int) -> str:
    return f"decoder_batch_{batch}"


@dataclass
class RBLNCausalLMOutput(ModelOutput):
    logits: torch.Tensor | None = None
    next_positions: list[int] | None = None


@dataclass(frozen=True)
class MemoryProbe:
    """One device's memory (the largest rank) in a compiled prefill program, with the KV cache apart."""

    weights_bytes: int
    cache_bytes: int           # as allocated (whole DRAM pages per cache tensor)
    block_bytes: int           # one KV block of every layer, K and V, on one device
    fixed_bytes: int           # everything but the KV cache: weights, other buffers, activations
    activations_bytes: int
    page_slack_bytes: int      # at most what rounding the cache tensors up to whole pages adds

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.cache_bytes

    def blocks_that_fit(self, usable_bytes: int) -> int:
        return max(0, (usable_bytes - self.fixed_bytes - self.page_slack_bytes) // self.block_bytes)

    @classmethod
    def of(cls, program, num_blocks: int) -> MemoryProbe:
        plan = program.memory
        rank = max(range(plan.num_devices), key=plan.total_bytes)
        caches = [spec for spec in program.buffers if spec.name.startswith(("k_cache_", "v_cache_"))]
        cache = sum(program.resident_bytes(spec, rank) for spec in caches)
        exact = sum(program.local_spec(spec, rank).nbytes for spec in caches)
        return cls(weights_bytes=plan.weights_bytes[rank], cache_bytes=cache, block_bytes=max(1, exact // num_blocks),
                   fixed_bytes=plan.total_bytes(rank) - cache, activations_bytes=plan.activations_bytes[rank],
                   page_slack_bytes=len(caches) * get_npu_spec(program.npu).dram_page_bytes)


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
        memory = ", ".join(f"npu{m.device} {format_gib(m.total_bytes)}" for m in self.memory)
        return (
            f"batch {self.batch_size}, prompts {self.prompt_tokens} tokens, {self.new_tokens} new tokens per row "
            f"(decode bucket {self.decode_bucket})\n"
            f"TTFT {self.ttft_s * 1e3:.3f} ms | TPOT {self.tpot_s * 1e3:.3f} ms | "
            f"{self.tokens_per_s:.1f} output tokens/s (simulated) | device memory: {memory}"
        )


def _check_program_facts(graph: str, program, facts) -> None:
    """Each fact (what rbln_config.json says, tensor, axis, size) must hold in `program`'s inputs or
    buffers; axis None: the tensor exists, "absent": it does not."""
    shapes = {s.name: tuple(s.shape) for s in [*program.inputs, *program.buffers]}
    for said, tensor, axis, size in facts:
        shape = shapes.get(tensor)
        if axis == "absent":
            ok, wanted = shape is None, "no input"
        elif axis is None:
            ok, wanted = shape is not None, "an input"
        else:
            ok, wanted = shape is not None and len(shape) > axis and shape[axis] == size, f"size {size} on axis {axis} of"
        if not ok:
            has = "none" if shape is None else f"shape {list(shape)}"
            raise ValueError(
                f"rbln_config.json says {said}, so {graph}.rbln should have {wanted} {tensor}, but it has {has}: "
                "the folder's files do not belong together; recompile with export=True"
            )


class RBLNDecoderOnlyModelForCausalLM(RBLNModel, GenerationMixin):
    """A compiled decoder-only LM; `generate()` as in transformers.

    Thread safety: one model has one KV cache and one block manager, so calls on it are
    serialised by a lock: two threads calling `generate()` (or `forward()`) on the same model
    run one after the other, each getting the tokens it would get alone. For parallel
    generation, load one model per thread, or pass the prompts as one batch. A hand-written
    loop of `forward()` steps holds the lock one step at a time only: do not interleave
    such loops from several threads.
    """

    config_class: ClassVar[type] = RBLNDecoderOnlyModelForCausalLMConfig
    main_input_name = "input_ids"
    _is_stateful = False
    _supports_cache_class = False

    def __init__(self, hf_config, rbln_config, graphs, source_folder=None, generation_config=None):
        super().__init__(hf_config, rbln_config, graphs, source_folder, generation_config)
        c = rbln_config
        self.block_manager = BlockManager(
            num_blocks=c.kvcache_num_blocks, block_size=c.kvcache_block_size,
            max_blocks_per_seq=c.max_seq_len // c.kvcache_block_size, num_slots=c.batch_size,
        )
        self.generation_stats = GenerationStats()
        self._stats_in_progress: GenerationStats | None = None
        # Reentrant: generate() holds it while transformers calls forward() on the same thread.
        self._lock = threading.RLock()

    # ---- compiling --------------------------------------------------------------------

    @classmethod
    def _load_hf_model(cls, model_id, hf_kwargs: dict, config):
        """The HF model, refused if the checkpoint's weights do not match its architecture.

        transformers loads e.g. a Qwen3 checkpoint into LlamaForCausalLM with only a warning,
        dropping q_norm / k_norm (or a BERT one, with random weights): wrong tokens, no error.
        The weights of layers a user override left out (num_hidden_layers=1) may be dropped.
        """
        cls._check_before_loading(model_id, hf_kwargs)
        hf_model, info = cls.hf_class.from_pretrained(model_id, output_loading_info=True, **hf_kwargs)
        layers_kept = hf_model.config.num_hidden_layers

        def unexpected(key: str) -> bool:
            layer = re.match(r"(?:model\.)?layers\.(\d+)\.", key)
            return layer is None or int(layer[1]) < layers_kept

        mismatched = [entry[0] if isinstance(entry, (list, tuple)) else entry for entry in info.get("mismatched_keys", [])]
        problems = {
            "weights the model would drop": sorted(filter(unexpected, info.get("unexpected_keys", []))),
            "weights missing from the checkpoint (they would be random)": sorted(info.get("missing_keys", [])),
            "weights of another shape": sorted(mismatched),
        }
        found = "; ".join(f"{what}: {', '.join(keys[:6])}" + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
                          for what, keys in problems.items() if keys)
        if found:
            model_type = getattr(hf_model.config, "model_type", None)
            raise ValueError(
                f"{model_id} (model_type {model_type!r}) is not a {cls.hf_class.__name__} checkpoint: {found}. "
                "Load it with the RBLN class of its family, or RBLNAutoModelForCausalLM."
            )
        return hf_model

    @classmethod
    def _resolve_config(cls, hf_model, config: RBLNDecoderOnlyModelForCausalLMConfig, source_folder=None):
        """Every option decided from the HF config; with flash attention and no block count given,
        the KV block pool sized from the device memory left after the weights. Checks that the
        weights, KV cache and RoPE tables fit a device before any of them exists on the host."""
        hf_config = hf_model.config
        blocks_left_to_memory = config.kvcache_num_blocks is None
        config = config.finalize(hf_config)
        layout = cls._kv_layout(hf_config, config)
        merge_layers(hf_model, copy_weights=False)  # refuses a model with parameters the decoder would not use
        usable = get_npu_spec(config.npu).usable_dram_bytes
        if blocks_left_to_memory and config.attn_impl == "flash_attn":
            # Flash attention: as many KV blocks as the DRAM left after weights, other buffers and
            # activations holds, read from the memory plan of the prefill graph (a probe of one block
            # per slot), as the real stack sizes its pool.
            probe = cls._memory_probe(hf_model, config, dataclasses.replace(layout, num_blocks=config.batch_size))
            num_blocks = config.resolve_num_blocks(probe.blocks_that_fit(usable) * probe.block_bytes, probe.block_bytes)
            config = dataclasses.replace(config, kvcache_num_blocks=num_blocks)
            layout = dataclasses.replace(layout, num_blocks=num_blocks)
        cls._memory_probe(hf_model, config, layout)  # DeviceMemoryError before any host KV cache / RoPE table exists
        return config

    @staticmethod
    def _kv_layout(hf_config, config) -> KVCacheLayout:
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        return KVCacheLayout(
            hf_config.num_hidden_layers, config.kvcache_num_blocks, hf_config.num_key_value_heads,
            config.kvcache_block_size, head_dim,
        )

    @classmethod
    def _graph_specs(cls, hf_model, config: RBLNDecoderOnlyModelForCausalLMConfig) -> list[GraphSpec]:
        """The prefill graph and one decode graph per batch bucket, sharing weights and KV caches."""
        kv_caches = make_kv_caches(cls._kv_layout(hf_model.config, config), DEVICE_DTYPE[config.dtype])
        rope = rope_tables(hf_model, config.max_seq_len)
        return cls._decoder_graphs(hf_model, config, merge_layers(hf_model), kv_caches, rope)

    @classmethod
    def _decoder_graphs(cls, hf_model, config, layers, kv_caches, rope) -> list[GraphSpec]:
        max_blocks = config.max_seq_len // config.kvcache_block_size
        hidden = hf_model.config.hidden_size

        def inputs(batch: int, tokens: int, prefill: bool) -> list[tuple[str, tuple[int, ...], str]]:
            first = ("inputs_embeds", (batch, tokens, hidden), "float32") if config.use_inputs_embeds else (
                "input_ids", (batch, tokens), "int64")
            mask = [("attention_mask", (batch, config.max_seq_len), "int32")] if config.use_attention_mask else []
            position = [("query_position", (1,), "int64")] if prefill else []
            return [first, ("start_pos", (batch,), "int32"), ("block_tables", (batch, max_blocks), "int32"),
                    *position, *mask]

        def graph(name: str, phase: str, input_info) -> GraphSpec:
            module = StaticDecoder(hf_model, layers, kv_caches, rope, phase, config.attn_impl, config.kvcache_partition_len,
                                   config.use_inputs_embeds, config.use_attention_mask)
            return GraphSpec(name, tuple(input_info), module)

        specs = [graph(PREFILL, PREFILL, inputs(1, config.prefill_chunk_size, prefill=True))]
        specs += [graph(decoder_graph_name(batch), "decode", inputs(batch, 1, prefill=False)) for batch in config.decoder_batch_sizes]
        return specs

    @classmethod
    def _memory_probe(cls, hf_model, config, layout: KVCacheLayout) -> MemoryProbe:
        """What one device needs for `layout`, from the compiler's memory plan of the prefill graph
        compiled on the meta device (no host tensor is created, whatever the sizes). Raises
        DeviceMemoryError naming the options to change (and the smallest tensor-parallel size
        that fits) if the program does not fit."""
        with torch.device("meta"):
            meta_model = type(hf_model)(hf_model.config)
            caches = [tuple(torch.empty(layout.block_shape, dtype=DEVICE_DTYPE[config.dtype]) for _ in "kv")
                      for _ in range(layout.num_layers)]
            rope = tuple(torch.empty(config.max_seq_len, layout.head_dim) for _ in ("cos", "sin"))
            prefill = cls._decoder_graphs(meta_model, config, merge_layers(meta_model), caches, rope)[0]
        try:
            program = compile_from_torch(prefill.module, input_info=list(prefill.input_info), npu=config.npu,
                                         dtype=config.dtype, numerics=config.numerics,
                                         tensor_parallel_size=config.tensor_parallel_size).program
            too_large = None
        except ProgramTooLargeError as error:
            program, too_large = error.program, error
        probe = MemoryProbe.of(program, layout.num_blocks)
        if too_large is None:
            return probe
        spec = get_npu_spec(config.npu)
        rope_bytes = probe.fixed_bytes - probe.weights_bytes - probe.activations_bytes
        blocks_that_fit = probe.blocks_that_fit(spec.usable_dram_bytes)
        tp = too_large.smallest_tensor_parallel_size
        raise DeviceMemoryError(
            f"The model needs {format_gib(probe.total_bytes)} per device at rbln_tensor_parallel_size="
            f"{config.tensor_parallel_size}: weights {format_gib(probe.weights_bytes)}, KV cache "
            f"{format_gib(probe.cache_bytes)} (rbln_kvcache_num_blocks={layout.num_blocks} blocks of "
            f"{format_gib(probe.block_bytes)}), RoPE tables and other buffers {format_gib(rope_bytes)} "
            f"(rbln_max_seq_len={config.max_seq_len}), activations {format_gib(probe.activations_bytes)}; a "
            f"{config.npu} device has {format_gib(spec.usable_dram_bytes)} usable. To fit: "
            + (f"split over rbln_tensor_parallel_size={tp} devices (the smallest that fits), or " if tp else "")
            + f"lower rbln_kvcache_num_blocks (at most {blocks_that_fit} fit), rbln_batch_size or rbln_max_seq_len, "
            "or target an npu with more memory."
        ) from None

    # ---- loading ----------------------------------------------------------------------

    @classmethod
    def _check_graphs_against_config(cls, config, graphs: dict, hf_config=None) -> None:
        """Refuse a folder whose rbln_config.json contradicts its .rbln programs (an edited or
        mixed-up folder): the host side (block tables, prefill chunks, decode buckets) would drive
        the graphs with shapes they were not compiled for."""
        super()._check_graphs_against_config(config, graphs, hf_config)
        expected = sorted([PREFILL, *(decoder_graph_name(b) for b in config.decoder_batch_sizes)])
        if sorted(graphs) != expected:
            raise ValueError(
                f"rbln_config.json says decoder_batch_sizes={list(config.decoder_batch_sizes)}, so the graphs "
                f"{expected}, but the folder has {sorted(graphs)}; recompile with export=True"
            )
        first = "inputs_embeds" if config.use_inputs_embeds else "input_ids"
        for name, artifact in graphs.items():
            batch = 1 if name == PREFILL else int(name.removeprefix("decoder_batch_"))
            # (what rbln_config.json says, tensor of the program, axis, the size that implies)
            facts = [
                (f"use_inputs_embeds={config.use_inputs_embeds}", first, 0, batch),
                (f"the graph {name} (decoder_batch_sizes={list(config.decoder_batch_sizes)})", first, 0, batch),
                (f"use_attention_mask={config.use_attention_mask}", "attention_mask",
                 None if config.use_attention_mask else "absent", None),
                (f"max_seq_len={config.max_seq_len} / kvcache_block_size={config.kvcache_block_size}", "block_tables",
                 1, config.max_seq_len // config.kvcache_block_size),
                (f"max_seq_len={config.max_seq_len}", "rope_cos", 0, config.max_seq_len),
            ]
            if name == PREFILL:
                facts.append((f"prefill_chunk_size={config.prefill_chunk_size}", first, 1, config.prefill_chunk_size))
            if config.use_attention_mask:
                facts.append((f"max_seq_len={config.max_seq_len}", "attention_mask", 1, config.max_seq_len))
            caches = [s.name for s in artifact.program.buffers if s.name.startswith(("k_cache_", "v_cache_"))]
            if not caches:
                raise ValueError(f"{name}.rbln has no KV cache buffers: it is not a decoder graph; recompile with export=True")
            for cache in caches:
                facts.append((f"kvcache_num_blocks={config.kvcache_num_blocks}", cache, 0, config.kvcache_num_blocks))
                facts.append((f"kvcache_block_size={config.kvcache_block_size}", cache, 2, config.kvcache_block_size))
            _check_program_facts(name, artifact.program, facts)

    def _external_tensors(self, graph_name: str) -> tuple[str, ...]:
        if graph_name == PREFILL:
            return ()
        prefill = self.graphs[PREFILL].program
        return tuple(s.name for s in prefill.weights + prefill.buffers if s.name not in prefill.zero_init)

    def _create_runtimes(self) -> dict[str, Runtime]:
        c = self.rbln_config
        prefill = Runtime(self.graphs[PREFILL], device=c.device, activate_profiler=c.activate_profiler,
                          name=f"{type(self).__name__}.{PREFILL}")
        runtimes = {PREFILL: prefill}
        for name in self.graphs:
            if name != PREFILL:
                runtimes[name] = Runtime(self.graphs[name], activate_profiler=c.activate_profiler,
                                         share_state_with=prefill, name=f"{type(self).__name__}.{name}")
        return runtimes

    # ---- running ----------------------------------------------------------------------

    def _bucket_for(self, batch: int) -> int:
        fitting = [b for b in self.rbln_config.decoder_batch_sizes if b >= batch]
        if not fitting:
            raise ValueError(
                f"batch of {batch} sequences is larger than the compiled decode batch sizes "
                f"{sorted(self.rbln_config.decoder_batch_sizes)} (rbln_batch_size={self.rbln_config.batch_size}); "
                "recompile with a larger rbln_batch_size"
            )
        return min(fitting)

    def _prefill_one(self, slot: int, tokens: torch.Tensor, embeds: torch.Tensor | None) -> torch.Tensor:
        """Run one prompt through the prefill graph, chunk by chunk; logits of its last token."""
        c = self.rbln_config
        chunk, length = c.prefill_chunk_size, tokens.shape[0] if embeds is None else embeds.shape[0]
        # The last chunk is shifted back if it would run past the cache (its first tokens are
        # recomputed, writing the same K/V again), so every write stays inside the sequence.
        starts = [min(s, c.max_seq_len - chunk) for s in range(0, length, chunk)]
        self.block_manager.allocate(slot, starts[-1] + chunk)
        table = self.block_manager.block_tables([slot])
        runtime = self._runtime(PREFILL)
        for start in starts:
            piece = (tokens if embeds is None else embeds)[start : start + chunk]
            valid = piece.shape[0]
            padded = torch.zeros((chunk, *piece.shape[1:]), dtype=piece.dtype)
            padded[:valid] = piece
            extra = [self._visible_keys([start + valid])] if c.use_attention_mask else []
            logits = runtime.run(padded[None], torch.tensor([start], dtype=torch.int32), table,
                                 torch.tensor([valid - 1], dtype=torch.int64), *extra)
        return logits

    def _decode(self, last_tokens: torch.Tensor, positions: list[int]) -> torch.Tensor:
        batch = last_tokens.shape[0]
        bucket = self._bucket_for(batch)
        for slot, position in enumerate(positions):
            self.block_manager.allocate(slot, position + 1)
        ids = torch.zeros((bucket, *last_tokens.shape[1:]), dtype=last_tokens.dtype)
        ids[:batch] = last_tokens
        start = torch.full((bucket,), -1, dtype=torch.int32)
        start[:batch] = torch.tensor(positions, dtype=torch.int32)
        tables = torch.zeros((bucket, self.block_manager.max_blocks_per_seq), dtype=torch.int32)
        tables[:batch] = self.block_manager.block_tables(list(range(batch)))
        extra = []
        if self.rbln_config.use_attention_mask:
            extra = [self._visible_keys([p + 1 for p in positions] + [0] * (bucket - batch))]
        return self._runtime(decoder_graph_name(bucket)).run(ids, start, tables, *extra)[:batch]

    def _visible_keys(self, lengths: list[int]) -> torch.Tensor:
        """The attention_mask input: row b sees key positions 0 .. lengths[b]-1."""
        positions = torch.arange(self.rbln_config.max_seq_len)
        return (positions[None, :] < torch.tensor(lengths)[:, None]).to(torch.int32)

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
        clock_before = self._clock()
        if self.rbln_config.use_inputs_embeds:
            step_input = self._embed(input_ids[:, -1:])
        else:
            step_input = input_ids[:, -1:]
        logits = self._decode(step_input, rbln_positions)
        if stats is not None:
            stats.decode_s += self._clock() - clock_before
            stats.decode_steps += 1
            stats.new_tokens += 1
        return RBLNCausalLMOutput(logits=logits, next_positions=[p + 1 for p in rbln_positions])

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
        for slot in range(c.batch_size):
            self.block_manager.free(slot)
        clock_before = self._clock()
        logits, positions = [], []
        for row in range(rows):
            keep = attention_mask[row].bool() if attention_mask is not None else slice(None)
            tokens = input_ids[row][keep] if input_ids is not None and input_ids.shape[1] else None
            if inputs_embeds is not None:
                embeds = inputs_embeds[row][keep].float()
            elif c.use_inputs_embeds:
                embeds = self._embed(tokens[None])[0]
            else:
                embeds = None
            length = (tokens if embeds is None else embeds).shape[0]
            if length == 0:
                raise ValueError(f"prompt {row} is empty (its attention_mask is all zeros)")
            if length > c.max_seq_len:
                raise ValueError(f"prompt {row} has {length} tokens, more than rbln_max_seq_len={c.max_seq_len}")
            logits.append(self._prefill_one(row, tokens, embeds))
            positions.append(length)
        if stats is not None:
            stats.prefill_s += self._clock() - clock_before
            stats.prompt_tokens = positions
            stats.new_tokens += 1
        return RBLNCausalLMOutput(logits=torch.cat(logits), next_positions=positions)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Host-side embedding lookup, for models compiled with rbln_use_inputs_embeds."""
        weight = self._embedding_weight
        return torch.nn.functional.embedding(input_ids, weight.float())

    @property
    def _embedding_weight(self) -> torch.Tensor:
        prefill = self.runtimes.get(PREFILL) if self.runtimes else None
        if prefill is None or "embed_tokens.weight" not in prefill._state:
            raise ValueError("this model has no host embedding table; pass inputs_embeds to generate()")
        return prefill._state["embed_tokens.weight"]

    def _clock(self) -> float:
        return self.runtimes[PREFILL].timeline.clock_s if self.runtimes else 0.0

    # ---- transformers GenerationMixin hooks ---------------------------------------------

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

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """transformers' `generate`, on the simulated NPU. Beam search is not supported."""
        config = generation_config or self.generation_config
        num_beams = kwargs.get("num_beams", getattr(config, "num_beams", 1) if config is not None else 1)
        if num_beams and num_beams > 1:
            raise ValueError("beam search (num_beams > 1) is not supported on the NPU decoder; use greedy or sampling")
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        self._check_inputs(ids, kwargs.get("attention_mask"), kwargs.get("inputs_embeds"))
        self._check_generation_length(ids, kwargs.get("attention_mask"), kwargs.get("inputs_embeds"), config, kwargs)
        rows = (ids if ids is not None else kwargs["inputs_embeds"]).shape[0]
        stats = GenerationStats(batch_size=rows, decode_bucket=self._bucket_for(rows))
        with self._lock:  # the KV cache, the block manager and the stats belong to one generation at a time
            self._stats_in_progress = stats
            try:
                return super().generate(inputs=inputs, generation_config=generation_config, **kwargs)
            finally:
                self._stats_in_progress = None
                for slot in range(self.rbln_config.batch_size):
                    self.block_manager.free(slot)
                stats.memory = self.device_memory()
                self.generation_stats = stats

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

    def _check_generation_length(self, ids, mask, embeds, config, kwargs) -> None:
        """Refuse up front a generation that would run past max_seq_len, before any device work."""
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

