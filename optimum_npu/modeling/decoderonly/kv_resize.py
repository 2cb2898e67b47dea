"""The KV pool of a compiled decoder folder: what it holds, and a new block count without recompiling
(`optimum-npu kv-blocks FOLDER [--set N | --memory-budget F]`, optimum-rbln-cli's get / set of the count).

Each layer's KV cache is a zero-initialised device buffer [num_blocks, kv_heads, block_size, head_dim]
that the graphs share; the paged kernels take a whole cache and index it with the block tables, so
nothing else in a program depends on the count: a new one changes the cache buffers' shapes and the
memory plan's buffer bytes, nothing more (compiling with that count gives the same programs; the tests
check it). A program that reads its caches through any other op is refused: recompile it instead.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ...sim_device import Artifact
from ...sim_device.memory import DeviceMemoryError
from ...sim_device.stats import format_bytes
from ...sim_device.program import Program
from .compile_plan import PREFILL, MemoryProbe, blocks_within, usable_bytes
from .kv_cache import is_kv_cache

# The kernels that take a KV cache whole and index it by block table: their results do not depend on
# how many blocks the cache has.
BLOCK_COUNT_FREE_OPS = frozenset({"rbln.kv_cache_update.default", "rbln.paged_attention.default",
                                  "rbln.flash_attention.default", "rbln.local_kv_cache_update.default",
                                  "rbln.local_attention.default"})


def resize_program(program: Program, num_blocks: int, graph: str) -> Program:
    """`program` with KV caches of `num_blocks` blocks (ValueError if its steps do not allow it)."""
    for step in program.steps:
        if any(is_kv_cache(name) for name in step.inputs):
            other = next((op.target for op in step.ops if op.target not in BLOCK_COUNT_FREE_OPS), None)
            if other is not None:
                raise ValueError(
                    f"{graph}.rbln reads its KV cache in {other}, whose result may depend on the number of blocks: "
                    "the pool cannot be resized in place; compile again with export=True and rbln_kvcache_num_blocks")

    def resized(spec):
        return dataclasses.replace(spec, shape=(num_blocks, *spec.shape[1:])) if is_kv_cache(spec.name) else spec

    new = dataclasses.replace(program, buffers=[resized(s) for s in program.buffers],
                              values={name: resized(v) for name, v in program.values.items()})
    caches = [s for s in program.buffers if is_kv_cache(s.name)]
    buffers_bytes = [
        before + sum(new.resident_bytes(resized(s), rank) - program.resident_bytes(s, rank) for s in caches)
        for rank, before in enumerate(program.memory.buffers_bytes)
    ]
    return dataclasses.replace(new, memory=dataclasses.replace(program.memory, buffers_bytes=buffers_bytes))


def pool_summary(model) -> str:
    """What the pool of a compiled (loaded) decoder holds, and what a device has room for."""
    config, layout = model.rbln_config, model.kv_layout
    probe = MemoryProbe.of(model.graphs[PREFILL].program, layout.num_blocks)
    return (f"KV cache pool: {layout.describe()}\n"
            f"per device: {format_bytes(probe.block_bytes)} per block, {format_bytes(probe.cache_bytes)} for the pool, "
            f"{format_bytes(probe.fixed_bytes)} for weights and the rest; {probe.blocks_that_fit(usable_bytes(config))} "
            f"blocks fit a {config.npu} device"
            + (f" within rbln_memory_budget={config.memory_budget}" if config.memory_budget is not None else "")
            + f"; every slot at full length needs {config.blocks_for_full_length}")


def resize_folder(folder: str | Path, num_blocks: int | None = None, memory_budget: float | None = None):
    """Give the compiled decoder in `folder` a pool of `num_blocks` blocks, or as many as
    `memory_budget` of a device holds (optimum-rbln's rule, as at compile time), and save it in
    place (staged, the manifest written last). Returns the resized model, without runtimes."""
    from ..auto import RBLNAutoModelForCausalLM

    if (num_blocks is None) == (memory_budget is None):
        raise ValueError("give either the number of blocks or a memory budget")
    model = RBLNAutoModelForCausalLM.from_pretrained(folder, rbln_create_runtimes=False)  # checks the folder
    # The options as saved (runtime ones included, not this load's), with the new budget (checked).
    config = dataclasses.replace(type(model.rbln_config).load(folder), memory_budget=memory_budget)
    probe = MemoryProbe.of(model.graphs[PREFILL].program, config.kvcache_num_blocks)
    if num_blocks is None:
        num_blocks = blocks_within(config, probe)
    config = dataclasses.replace(config, kvcache_num_blocks=num_blocks)  # checks the count (>= one per slot)
    graphs = {name: Artifact(resize_program(graph.program, num_blocks, name), graph.tensors, graph.versions)
              for name, graph in model.graphs.items()}
    memory = graphs[PREFILL].program.memory
    needed = max(memory.total_bytes(rank) for rank in range(memory.num_devices))
    if needed > usable_bytes(config):
        raise DeviceMemoryError(
            f"{num_blocks} KV blocks need {format_bytes(needed)} per device with the weights, other buffers and "
            f"activations; a {config.npu} device has {format_bytes(usable_bytes(config))} usable: about "
            f"{probe.blocks_that_fit(usable_bytes(config))} blocks fit")
    type(model)._check_graphs_against_config(config, graphs, model.config)
    resized = type(model)(model.config, config, graphs, source_folder=Path(folder),
                          generation_config=model.generation_config)
    resized.save_pretrained(folder)
    return resized
