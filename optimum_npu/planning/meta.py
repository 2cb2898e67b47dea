"""Compile a decoder-only model from its Hugging Face config alone, on the meta device.

No weight is ever created on the host: the programs hold shapes, a memory plan and costs
(what the planner and the calibration need), and cannot run. Seconds and little host memory
even for a 70B model.
"""

from __future__ import annotations

from typing import Any

import torch

from ..compile import CompiledModel


def load_hf_config(model: Any):
    """A transformers config from a config object, a Hub id, a folder or a `config.json` path."""
    from pathlib import Path

    from transformers import AutoConfig, PretrainedConfig

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
        return AutoConfig.from_pretrained(str(path) if path.exists() else str(model))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read a model config from {model!r}: {str(error).splitlines()[0]}") from None


def compile_decoder_on_meta(hf_config, check_memory: bool = True, **rbln_options) -> tuple[Any, dict[str, CompiledModel]]:
    """(final RBLN config, compiled graphs by name) of the decoder-only family of `hf_config`,
    compiled with `rbln_*` options as `from_pretrained(export=True, rbln_...)` takes them.
    Raises DeviceMemoryError (naming what to change) if the model does not fit the device;
    `check_memory=False` skips that check (and its probe compilation): the planner sizes
    memory itself."""
    from ..compile import compile_from_torch
    from ..modeling.auto import RBLNAutoModelForCausalLM

    cls = RBLNAutoModelForCausalLM.class_for_config(hf_config)
    config, unknown = cls.config_class.from_kwargs(rbln_options)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}: options are rbln_* keyword arguments")
    with torch.device("meta"):
        hf_model = cls.hf_class(hf_config)
        if check_memory:
            return cls._compile(hf_model, config)
        config = config.finalize(hf_config)
        graphs = {
            spec.name: compile_from_torch(spec.module, input_info=list(spec.input_info), npu=config.npu,
                                          dtype=config.dtype, numerics=config.numerics,
                                          tensor_parallel_size=config.tensor_parallel_size)
            for spec in cls._graph_specs(hf_model, config)
        }
    return config, graphs
