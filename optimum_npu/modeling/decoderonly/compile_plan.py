"""What a decoder-only model compiles to: `DecoderPlan`.

From the Hugging Face config and a finalized `RBLNDecoderOnlyModelForCausalLMConfig`: the KV
pool's layout, the graphs (one prefill graph and one decode graph per batch bucket, sharing
weights, RoPE tables and the paged KV cache), a memory probe of one device (the prefill graph
compiled on the meta device, no host tensor created), and the pool sized from the memory the
weights leave. The model class compiles through it; the planner and the benchmarks use it
instead of the model's private hooks.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from ...compile import ProgramTooLargeError, compile_from_torch
from ...sim_device.memory import DeviceMemoryError
from ...sim_device.stats import format_bytes
from ...sim_device.specs import get_npu_spec
from ..base import GraphSpec
from ..quantization import quantize_layers
from .kv_cache import KVCacheLayout, is_kv_cache
from .layouts import layout_for
from .lora_layers import attach_lora
from .lora_weights import meta_stacked_weights, projection_shapes, resolve_adapters, stacked_weights
from .static_decoder import StaticDecoder, make_kv_caches, merge_layers

logger = logging.getLogger(__name__)

PREFILL = "prefill"
DEVICE_DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def rope_tables(hf_model, max_seq_len: int) -> dict:
    """The model's RoPE tables by kind (none for learned positions), from its family's layout."""
    return layout_for(hf_model.config).rope_tables(hf_model, max_seq_len)


def kv_cache_dtype(config) -> torch.dtype:
    """The KV cache's element type: the device's 16 bits, or float8 e4m3 with rbln_quantization
    kv_caches="fp8" (half the bytes: twice the blocks in the same memory)."""
    quantization = config.quantization_spec
    return torch.float8_e4m3fn if quantization and quantization.kv_caches == "fp8" else DEVICE_DTYPE[config.dtype]


def decoder_graph_name(batch: int) -> str:
    return f"decoder_batch_{batch}"


@dataclass(frozen=True)
class MemoryProbe:
    """One device's memory (the largest rank) in a compiled prefill program, with the KV cache apart."""

    weights_bytes: int
    cache_bytes: int           # as allocated (whole DRAM pages per cache tensor)
    block_bytes: int           # one KV block of every layer, K and V, on one device
    fixed_bytes: int           # everything but the KV cache: weights, other buffers, activations
    activations_bytes: int
    cache_tensors: int         # K and V of every layer: each holds an equal share of a block
    page_bytes: int            # the DRAM page each cache tensor is allocated in whole multiples of

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.cache_bytes

    def blocks_that_fit(self, usable_bytes: int) -> int:
        """The most blocks whose cache tensors, each in whole DRAM pages (`NPUSpec.resident_bytes`),
        fit beside the rest: the equal cache tensors may each take an equal share of the free bytes,
        rounded down to whole pages (a tensor under one page takes its exact bytes)."""
        share = (usable_bytes - self.fixed_bytes) // self.cache_tensors
        room = share if share < self.page_bytes else share // self.page_bytes * self.page_bytes
        return max(0, room // -(-self.block_bytes // self.cache_tensors))

    @classmethod
    def of(cls, program, num_blocks: int) -> MemoryProbe:
        plan = program.memory
        rank = max(range(plan.num_devices), key=plan.total_bytes)
        caches = [spec for spec in program.buffers if is_kv_cache(spec.name)]
        cache = sum(program.resident_bytes(spec, rank) for spec in caches)
        # The largest tensor's share for all of them: exact for a decoder's equal K / V caches, and safe otherwise.
        share = max(program.local_spec(spec, rank).nbytes for spec in caches) // num_blocks
        return cls(weights_bytes=plan.weights_bytes[rank], cache_bytes=cache, block_bytes=max(1, share * len(caches)),
                   fixed_bytes=plan.total_bytes(rank) - cache, activations_bytes=plan.activations_bytes[rank],
                   cache_tensors=len(caches), page_bytes=get_npu_spec(program.npu).dram_page_bytes)


def usable_bytes(config) -> int:
    """The device memory a model may take: its rbln_memory_budget of the NPU's usable DRAM."""
    usable = get_npu_spec(config.npu).usable_dram_bytes
    return usable if config.memory_budget is None else int(config.memory_budget * usable)


def blocks_within(config, probe: MemoryProbe) -> int:
    """optimum-rbln's rule: every slot at full length if that fits the tightest device (the probe's),
    else the most blocks that fit; ValueError naming the numbers when fewer than one per slot fit."""
    return config.resolve_num_blocks(probe.blocks_that_fit(usable_bytes(config)) * probe.block_bytes, probe.block_bytes)


class DecoderPlan:
    """The graphs and KV pool of a decoder for one finalized config."""

    def __init__(self, hf_config, config):
        if not config.is_resolved:
            raise ValueError("DecoderPlan needs a finalized config: call config.finalize(hf_config) first")
        self.hf_config = hf_config
        self.config = config
        self.layout = KVCacheLayout.from_config(hf_config, config)

    @classmethod
    def for_model(cls, hf_model, config) -> DecoderPlan:
        """Every option decided from the HF config; with flash attention and no block count given,
        the KV block pool sized from the device memory left after the weights. Checks that the
        weights, KV cache and RoPE tables fit a device before any of them exists on the host."""
        blocks_left_to_memory = config.kvcache_num_blocks is None
        config = config.finalize(hf_model.config)
        if config.lora_config is not None and not config.lora_config.is_resolved:  # reads the adapter folders
            config = dataclasses.replace(config, lora_config=resolve_adapters(config.lora_config, hf_model))
        plan = cls(hf_model.config, config)
        merge_layers(hf_model, copy_weights=False)  # refuses a model with parameters the decoder would not use
        if blocks_left_to_memory and (plan.config.attn_impl == "flash_attn" or plan.config.memory_budget is not None):
            plan = plan.size_pool(hf_model)
        probe = plan.probe(hf_model)  # DeviceMemoryError before any host KV cache / RoPE table exists
        if plan.config.memory_budget is not None and probe.total_bytes > usable_bytes(plan.config):
            raise DeviceMemoryError(
                f"The model needs {format_bytes(probe.total_bytes)} per device, more than rbln_memory_budget="
                f"{plan.config.memory_budget} of the device allows ({format_bytes(usable_bytes(plan.config))}): at most "
                f"{probe.blocks_that_fit(usable_bytes(plan.config))} KV blocks fit (rbln_kvcache_num_blocks="
                f"{plan.layout.num_blocks}); raise the budget or lower the block count")
        plan.report_pool()
        return plan

    def report_pool(self) -> None:
        """Say what the KV pool holds; a warning when the batch slots cannot all reach max_seq_len
        at once (they share the pool, and a request longer than it holds is refused)."""
        layout, batch = self.layout, self.config.batch_size
        if layout.full_length_sequences >= batch:
            logger.info("KV cache pool: %s", layout.describe())
            return
        logger.warning(
            "KV cache pool: %s, fewer than rbln_batch_size=%d sequences of max_seq_len: the slots share the "
            "pool, and generate() refuses up front a request it cannot hold. Every slot at full length needs "
            "rbln_kvcache_num_blocks=%d (and the device memory for them).",
            layout.describe(), batch, self.config.blocks_for_full_length)

    def with_num_blocks(self, num_blocks: int) -> DecoderPlan:
        return DecoderPlan(self.hf_config, dataclasses.replace(self.config, kvcache_num_blocks=num_blocks))

    def size_pool(self, hf_model) -> DecoderPlan:
        """Flash attention: as many KV blocks as the DRAM left after weights, other buffers and
        activations holds (up to every slot at full length), read from the memory plan of the
        prefill graph (a probe of one block per slot), as the real stack sizes its pool; within
        rbln_memory_budget of the device if given."""
        probe = self.with_num_blocks(self.config.batch_size).probe(hf_model)
        return self.with_num_blocks(blocks_within(self.config, probe))

    def graph_specs(self, hf_model) -> list[GraphSpec]:
        """The graphs to compile, holding the model's weights, zero KV caches and its RoPE tables."""
        kv_caches = make_kv_caches(self.layout, self.kv_dtype)
        rope = rope_tables(hf_model, self.config.max_seq_len)
        return self._graphs(hf_model, self._device_layers(hf_model), kv_caches, rope)

    @property
    def kv_dtype(self) -> torch.dtype:
        return kv_cache_dtype(self.config)

    def _device_layers(self, hf_model):
        """The model's parts in device form, the layers' projections packed when the weights are quantised."""
        parts = merge_layers(hf_model)
        quantization = self.config.quantization_spec
        if quantization is not None and quantization.quantizes_weights and any(hasattr(l, "moe") for l in parts.layers):
            raise ValueError("rbln_quantization of the weights does not reach a mixture of experts' expert weights "
                             "yet (they would stay 16-bit); compile this model without weight quantisation")
        quantize_layers(parts.layers, quantization, DEVICE_DTYPE[self.config.dtype])
        return parts

    def meta_graph_specs(self, hf_class) -> list[GraphSpec]:
        """The same graphs on the meta device (shapes only: they compile to sizes and costs, never
        run), built from `hf_class` (the transformers model class) and the HF config."""
        with torch.device("meta"):
            meta_model = hf_class(self.hf_config)
            caches = [tuple(torch.empty(self.layout.layer_shape(i), dtype=self.kv_dtype) for _ in "kv")
                      for i in range(self.layout.num_layers)]
            rope = layout_for(self.hf_config).rope_tables(meta_model, self.config.max_seq_len)  # meta tensors
            return self._graphs(meta_model, self._device_layers(meta_model), caches, rope)

    def _attach_adapters(self, hf_model, layers) -> None:
        """The compiled LoRA adapters beside the layers' matmuls (lora_layers.py); on the meta
        device (a probe, the planner) their shapes only, no adapter folder read."""
        lora = self.config.lora_config
        if lora is None:
            return
        on_meta = next(hf_model.parameters()).is_meta
        stacks = meta_stacked_weights(lora, hf_model) if on_meta else stacked_weights(lora, hf_model)
        attach_lora(layers, stacks, projection_shapes(hf_model))

    def _graphs(self, hf_model, layers, kv_caches, rope) -> list[GraphSpec]:
        self._attach_adapters(hf_model, layers.layers)
        config, max_blocks = self.config, self.layout.max_blocks_per_seq
        hidden = self.hf_config.hidden_size

        def inputs(batch: int, tokens: int, prefill: bool) -> list[tuple[str, tuple[int, ...], str]]:
            first = ("inputs_embeds", (batch, tokens, hidden), "float32") if config.use_inputs_embeds else (
                "input_ids", (batch, tokens), "int64")
            mask = [("attention_mask", (batch, config.max_seq_len), "int32")] if config.use_attention_mask else []
            position = [("query_position", (1,), "int64")] if prefill else []
            lora = [("adapter_slots", (batch,), "int32")] if config.lora_config is not None else []
            return [first, ("start_pos", (batch,), "int32"), ("block_tables", (batch, max_blocks), "int32"),
                    *position, *mask, *lora]

        def graph(name: str, phase: str, input_info) -> GraphSpec:
            module = StaticDecoder(hf_model, layers, kv_caches, rope, phase, config.attn_impl, config.kvcache_partition_len,
                                   config.use_inputs_embeds, config.use_attention_mask,
                                   use_lora=config.lora_config is not None, ring_layers=config.ring_layers)
            return GraphSpec(name, tuple(input_info), module)

        specs = [graph(PREFILL, PREFILL, inputs(1, config.prefill_chunk_size, prefill=True))]
        specs += [graph(decoder_graph_name(batch), "decode", inputs(batch, 1, prefill=False))
                  for batch in config.decoder_batch_sizes]
        return specs

    def probe(self, hf_model) -> MemoryProbe:
        """What one device needs, from the compiler's memory plan of the prefill graph compiled on
        the meta device (no host tensor is created, whatever the sizes). Raises DeviceMemoryError
        naming the options to change (and the smallest tensor-parallel size that fits) if the
        program does not fit."""
        config, layout = self.config, self.layout
        prefill = self.meta_graph_specs(type(hf_model))[0]
        try:
            program = compile_from_torch(prefill.module, input_info=list(prefill.input_info), npu=config.npu,
                                         dtype=config.dtype, numerics=config.numerics,
                                         tensor_parallel_size=config.tensor_parallel_size, cache=config.cache).program
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
            f"The model needs {format_bytes(probe.total_bytes)} per device at rbln_tensor_parallel_size="
            f"{config.tensor_parallel_size}: weights {format_bytes(probe.weights_bytes)}, KV cache "
            f"{format_bytes(probe.cache_bytes)} (rbln_kvcache_num_blocks={layout.num_blocks} blocks of "
            f"{format_bytes(probe.block_bytes)}), RoPE tables and other buffers {format_bytes(rope_bytes)} "
            f"(rbln_max_seq_len={config.max_seq_len}), activations {format_bytes(probe.activations_bytes)}; a "
            f"{config.npu} device has {format_bytes(spec.usable_dram_bytes)} usable. To fit: "
            + (f"split over rbln_tensor_parallel_size={tp} devices (the smallest that fits), or " if tp else "")
            + f"lower rbln_kvcache_num_blocks (at most {blocks_that_fit} fit), rbln_batch_size or rbln_max_seq_len, "
            "or target an npu with more memory."
        ) from None
