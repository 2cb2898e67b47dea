"""Compile a decoder-only model from its Hugging Face config alone, on the meta device.

No weight is ever created on the host: the programs hold shapes, a memory plan and costs
(what the planner and the calibration need), and cannot run. Seconds and little host memory
even for a 70B model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..compile import CompiledModel


def load_hf_config(model: Any):
    """A transformers config from a config object, a Hub id, a folder or a `config.json` path."""
    from pathlib import Path

    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, PretrainedConfig

    from ..modeling.hf_files import RemoteCodeError, auto_class_from_pretrained

    if isinstance(model, PretrainedConfig):
        return model
    if not isinstance(model, (str, Path)):
        raise TypeError(f"model must be a Hub id, a folder, a config.json path or a transformers config; got {model!r}")
    path = Path(model)
    if path.is_file():
        if path.name != "config.json":
            raise ValueError(f"{model} is a file but not a config.json")
        path = path.parent
    try:
        if not path.exists():  # a Hub id: its config.json alone, from the cache or the Hub
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(str(model), "config.json")).parent
        return auto_class_from_pretrained(AutoConfig, path)
    except RemoteCodeError:
        raise
    except (OSError, ValueError, StrictDataclassError) as error:  # the last: a field of the wrong type
        raise ValueError(f"cannot read a model config from {model!r}: {str(error).splitlines()[0]}") from None


class CompileCache:
    """Graphs compiled once for many `compile_decoder_on_meta` calls (a planner's sweep).

    torch.export is most of a compilation's time, and its result depends only on the traced
    module and the graph's inputs: not on the target (NPU, tensor-parallel size, numerics), and
    not on the options that reach a graph through its inputs alone (batch sizes, prefill chunk:
    a decode graph is the same whatever the chunk). So a graph is exported once per model and
    module-shaping options, and compiled once per target on top of that."""

    # Options whose only effect on a graph is its target, or its input_info (part of the key).
    NOT_TRACED = frozenset({"npu", "tensor_parallel_size", "numerics", "batch_size", "decoder_batch_sizes",
                            "prefill_chunk_size"})

    def __init__(self):
        self._exports: dict[tuple, Any] = {}
        self._compiled: dict[tuple, CompiledModel] = {}

    def compile(self, hf_config, config, spec) -> CompiledModel:
        from ..compile.compiler import compile_exported, export

        traced = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in self.NOT_TRACED}
        key = (hf_config.to_json_string(use_diff=False), repr(sorted(traced.items())), spec.name, spec.input_info)
        if key not in self._exports:
            self._exports[key] = export(spec.module, input_info=list(spec.input_info))
        target = (key, config.npu, config.tensor_parallel_size, config.dtype, config.numerics)
        if target not in self._compiled:
            self._compiled[target] = compile_exported(self._exports[key], npu=config.npu, dtype=config.dtype,
                                                      numerics=config.numerics,
                                                      tensor_parallel_size=config.tensor_parallel_size)
        return self._compiled[target]


def compile_decoder_on_meta(hf_config, check_memory: bool = True, cache: CompileCache | None = None,
                            **rbln_options) -> tuple[Any, dict[str, CompiledModel]]:
    """(final RBLN config, compiled graphs by name) of the decoder-only family of `hf_config`,
    compiled with `rbln_*` options as `from_pretrained(export=True, rbln_...)` takes them.
    Raises DeviceMemoryError (naming what to change) if the model does not fit the device;
    `check_memory=False` skips that check (and its probe compilation): the planner sizes
    memory itself, and passes a `cache` shared by its calls (the graphs it returns are shared too)."""
    from ..modeling.auto import RBLNAutoModelForCausalLM
    from ..modeling.decoderonly.compile_plan import DecoderPlan

    cls = RBLNAutoModelForCausalLM.class_for_config(hf_config)
    config, unknown = cls.config_class.from_kwargs(rbln_options)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}: options are rbln_* keyword arguments")
    with torch.device("meta"):
        hf_model = cls.hf_class(hf_config)
        plan = DecoderPlan.for_model(hf_model, config) if check_memory else DecoderPlan(hf_config, config.finalize(hf_config))
        specs = plan.graph_specs(hf_model)
    cache = CompileCache() if cache is None else cache
    return plan.config, {spec.name: cache.compile(hf_config, plan.config, spec) for spec in specs}
