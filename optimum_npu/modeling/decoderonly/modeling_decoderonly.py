"""`RBLNDecoderOnlyModelForCausalLM`: one implementation for every Llama-like family.

Compiles a prefill graph and one decode graph per batch bucket (`decoder_batch_{b}.rbln`),
all sharing weights and a device-resident paged KV cache (`compile_plan.DecoderPlan`); runs
them through a `runner.DecoderRunner`; generates through transformers' `GenerationMixin`
(`generation.py`: greedy, sampling, repetition penalty, stop strings, streamers). This file
wires config -> plan -> runtimes -> runner and checks a loaded folder.
"""

from __future__ import annotations

import re
import threading
from typing import ClassVar

from ...sim_device import Runtime
from ..base import GraphSpec, RBLNModel
from ..quantized_checkpoints import take_packed_linears, with_checkpoint_quantization
from .compile_plan import PREFILL, DecoderPlan, decoder_graph_name
from .configuration_decoderonly import RBLNDecoderOnlyModelForCausalLMConfig
from .generation import GenerationStats, RBLNDecoderOnlyGenerationMixin
from .kv_cache import BlockManager, KVCacheLayout, blocks_per_sequence, is_kv_cache
from .runner import DecoderRunner



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


def _check_adapter_slots(program, lora_config) -> None:
    """The stacked LoRA weights must hold one slot per adapter rbln_config.json lists, plus the base."""
    slots = sorted({spec.shape[0] for spec in program.weights if ".lora." in spec.name})
    if slots != [lora_config.num_slots]:
        raise ValueError(
            f"rbln_config.json says lora_config has {lora_config.num_slots - 1} adapter(s), so prefill.rbln should "
            f"stack {lora_config.num_slots} LoRA slots, but it stacks {slots or 'none'}: the folder's files do not "
            "belong together; recompile with export=True")


class RBLNDecoderOnlyModelBase(RBLNModel):
    """What every compiled decoder shares (the causal LM and the headless models of
    modeling_headless.py): the graphs of a `DecoderPlan`, their paged KV cache, the runner."""

    config_class: ClassVar[type] = RBLNDecoderOnlyModelForCausalLMConfig
    main_input_name = "input_ids"

    def __init__(self, hf_config, rbln_config, graphs, source_folder=None, generation_config=None):
        super().__init__(hf_config, rbln_config, graphs, source_folder, generation_config)
        self.kv_layout = KVCacheLayout.from_config(hf_config, rbln_config)
        self.block_manager = BlockManager.for_layout(self.kv_layout, num_slots=rbln_config.batch_size)
        self.runner = DecoderRunner(self._runtime, self.kv_layout, rbln_config, hf_config.vocab_size)
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
            layer = re.match(r"(?:model\.|transformer\.|model\.decoder\.)?(?:layers|h)\.(\d+)\.", key)
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
        take_packed_linears(hf_model)   # a compressed-tensors checkpoint: its packed projections, as they are
        return hf_model

    @classmethod
    def _resolve_config(cls, hf_model, config: RBLNDecoderOnlyModelForCausalLMConfig, source_folder=None):
        return DecoderPlan.for_model(hf_model, with_checkpoint_quantization(config, hf_model)).config

    @classmethod
    def _graph_specs(cls, hf_model, config: RBLNDecoderOnlyModelForCausalLMConfig) -> list[GraphSpec]:
        return DecoderPlan(hf_model.config, config).graph_specs(hf_model)

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
        max_blocks_per_seq = blocks_per_sequence(config.max_seq_len, config.kvcache_block_size)
        for name, artifact in graphs.items():
            batch = 1 if name == PREFILL else int(name.removeprefix("decoder_batch_"))
            # (what rbln_config.json says, tensor of the program, axis, the size that implies)
            facts = [
                (f"use_inputs_embeds={config.use_inputs_embeds}", first, 0, batch),
                (f"the graph {name} (decoder_batch_sizes={list(config.decoder_batch_sizes)})", first, 0, batch),
                (f"use_attention_mask={config.use_attention_mask}", "attention_mask",
                 None if config.use_attention_mask else "absent", None),
                (f"max_seq_len={config.max_seq_len} / kvcache_block_size={config.kvcache_block_size}", "block_tables",
                 1, max_blocks_per_seq),
                ("lora_config=" + ("None" if config.lora_config is None else f"{config.lora_config.num_slots - 1} "
                                   "adapter(s)"), "adapter_slots", "absent" if config.lora_config is None else 0, batch),
            ]
            if any(spec.name == "rope_cos" for spec in artifact.program.buffers):  # not with learned positions
                facts.append((f"max_seq_len={config.max_seq_len}", "rope_cos", 0, config.max_seq_len))
            if name == PREFILL:
                facts.append((f"prefill_chunk_size={config.prefill_chunk_size}", first, 1, config.prefill_chunk_size))
            if config.use_attention_mask:
                facts.append((f"max_seq_len={config.max_seq_len}", "attention_mask", 1, config.max_seq_len))
            caches = [s.name for s in artifact.program.buffers if is_kv_cache(s.name)]
            if not caches:
                raise ValueError(f"{name}.rbln has no KV cache buffers: it is not a decoder graph; recompile with export=True")
            for cache in caches:
                facts.append((f"kvcache_num_blocks={config.kvcache_num_blocks}", cache, 0, config.kvcache_num_blocks))
                if int(cache.rsplit("_", 1)[1]) in config.ring_layers:  # a ring of the window (cache_impl)
                    facts.append((f"sliding_window={config.sliding_window} / prefill_chunk_size="
                                  f"{config.prefill_chunk_size}", cache, 2, config.ring_len))
                else:
                    facts.append((f"kvcache_block_size={config.kvcache_block_size}", cache, 2, config.kvcache_block_size))
            _check_program_facts(name, artifact.program, facts)
            if name == PREFILL and config.lora_config is not None:   # the weights live in the prefill file
                _check_adapter_slots(artifact.program, config.lora_config)

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


class RBLNDecoderOnlyModelForCausalLM(RBLNDecoderOnlyGenerationMixin, RBLNDecoderOnlyModelBase):
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
        self.generation_stats = GenerationStats()
        self._stats_in_progress: GenerationStats | None = None
        # LoRA adapter slots: set_adapter()'s choice, and the running generate()'s (generation.py).
        self._adapter_choice: list[int] | int | None = None
        self._generation_adapters: list[int] | int | None = None
