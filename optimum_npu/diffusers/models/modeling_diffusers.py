"""`RBLNDiffusersModel`: the model base for diffusers models (UNet, VAEs, transformers).

A compiled diffusers model is a diffusers `ModelMixin` and `ConfigMixin` (so a torch.nn.Module),
as the module it was compiled from: diffusers' pipelines find it among their torch components
(`pipe.to`, `pipe.device`, `pipe.dtype`, offloading hooks) and read its config as the
`FrozenDict` of a `config.json` (`unet.config.in_channels`, `vae.config.scaling_factor`).

`RBLNModel` comes first in the bases, so loading, saving and running are the framework-neutral
base's (compile, save, load a compiled folder, runtimes, padding and splitting batches, stats)
and diffusers' weight-loading `from_pretrained` / `save_pretrained` never run: a compiled model
has no weights on the host (no parameters), its graphs live on the simulated device. `device`
and `dtype` are the host's (cpu, float32), `to()` moves nothing (see `RBLNModel.to`). What
differs from a transformers model is the config I/O: a diffusers `config.json` (with
`_class_name`, read by `ModelMixin.load_config`), kept with `register_to_config`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import FrozenDict

from ...configuration import CONFIG_NAME
from ...modeling.base import RBLNModel


def _json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    return value


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


class RBLNDiffusersModel(RBLNModel, ModelMixin, ConfigMixin):
    """A compiled diffusers model. `config` is the diffusers FrozenDict of the source model."""

    @classmethod
    def _read_hf_config(cls, model_id, hub_kwargs: dict) -> FrozenDict:
        return FrozenDict(cls.hf_class.load_config(model_id, **hub_kwargs))

    @classmethod
    def _load_hf_configs(cls, folder: Path):
        return cls._read_hf_config(folder, {}), None

    @classmethod
    def _check_model_type(cls, hf_config) -> None:
        """ValueError unless the config is one of `hf_class` (diffusers names the class, not a model_type)."""
        found = hf_config.get("_class_name") if isinstance(hf_config, dict) else None
        if found is not None and found != cls.hf_class.__name__:
            raise ValueError(f"{cls.__name__} compiles {cls.hf_class.__name__} models; this config is a {found!r}.")

    @classmethod
    def _graph_inputs(cls, hf_config, config) -> dict[str, tuple] | None:
        """{graph: its (name, shape, dtype) inputs} as the options and the model's config imply them, or None
        for a family that does not derive them here (then only every input's batch is checked)."""
        return None

    @classmethod
    def _check_graphs_against_config(cls, config, graphs, hf_config=None) -> None:
        """Also: the programs take what the options say (a rbln_config.json saying batch 4 beside a batch-2
        program is refused, not run with the wrong batch)."""
        super()._check_graphs_against_config(config, graphs, hf_config)
        actual = {name: [(s.name, tuple(s.shape), s.dtype) for s in g.program.inputs] for name, g in graphs.items()}
        implied = cls._graph_inputs(hf_config, config) if hf_config is not None else None
        if implied is not None:
            expected = {name: [(n, tuple(shape), dtype) for n, shape, dtype in inputs] for name, inputs in implied.items()}
            if expected != actual:
                raise ValueError(f"{CONFIG_NAME} implies the graphs {expected} from its options, but the folder holds "
                                 f"{actual}. The folder was edited or mixed from two models; compile the model again "
                                 "(export=True).")
            return
        for name, inputs in actual.items():
            wrong = [n for n, shape, _ in inputs if not shape or shape[0] != config.batch_size]
            if wrong:
                raise ValueError(f"{CONFIG_NAME} says batch_size {config.batch_size}, but {name}.rbln takes {wrong[0]} "
                                 f"with shape {dict((n, s) for n, s, _ in inputs)[wrong[0]]}. The folder was edited or "
                                 "mixed from two models; compile the model again (export=True).")

    def _keep_hf_config(self, hf_config) -> None:
        self.register_to_config(**hf_config)

    def _save_hf_configs(self, folder: Path) -> None:
        """config.json as diffusers writes it, so that `ModelMixin.load_config` reads it back."""
        # Private keys (`_name_or_path`, `_use_default_values`) describe where the source came from.
        public = {k: _json_value(v) for k, v in self.config.items() if not k.startswith("_")}
        data = {"_class_name": self.hf_class.__name__, "_diffusers_version": _diffusers_version(), **public}
        (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class WithoutDiffusersLayers:
    """A base to put between `RBLNDiffusersModel` and a diffusers class a compiled model must also be an
    instance of (diffusers' ControlNet pipelines check `isinstance(controlnet, ControlNetModel)` at every
    step): `RBLNModel.__init__`'s cooperative `super().__init__()` reaches this one, which sets up the torch
    module without the diffusers class's `__init__` (that would build its layers, with random weights, on
    the host). The compiled class's own methods come first; the diffusers class only answers isinstance."""

    def __init__(self):
        ModelMixin.__init__(self)


def reject_unsupported(model: str, **arguments: Any) -> None:
    """TypeError naming the first argument a compiled graph cannot take (given and not None)."""
    for name, value in arguments.items():
        if value is not None and value is not False and value != {}:
            raise TypeError(f"{model}.forward() does not support {name} (the compiled graph has no such input)")
