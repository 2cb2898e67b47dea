"""`RBLNDiffusersModel`: the model base for diffusers `ModelMixin` models (UNet, VAEs, transformers).

What differs from a transformers model is only its config: a diffusers `config.json` (with
`_class_name`, read by `ModelMixin.load_config`) held as the `FrozenDict` that diffusers
pipelines read attributes from (`unet.config.in_channels`, `vae.config.scaling_factor`).
Everything else (compile, save, load, runtimes, padding and splitting batches, stats) is the
framework-neutral base's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import FrozenDict

from ...modeling.base import RBLNModel


def _json_value(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    return value


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


class RBLNDiffusersModel(RBLNModel):
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

    def _save_hf_configs(self, folder: Path) -> None:
        """config.json as diffusers writes it, so that `ModelMixin.load_config` reads it back."""
        # Private keys (`_name_or_path`, `_use_default_values`) describe where the source came from.
        public = {k: _json_value(v) for k, v in self.config.items() if not k.startswith("_")}
        data = {"_class_name": self.hf_class.__name__, "_diffusers_version": _diffusers_version(), **public}
        (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @property
    def dtype(self) -> torch.dtype:
        """Float inputs and outputs are fp32 on the host (the device's 16-bit type is inside)."""
        return torch.float32


def reject_unsupported(model: str, **arguments: Any) -> None:
    """TypeError naming the first argument a compiled graph cannot take (given and not None)."""
    for name, value in arguments.items():
        if value is not None and value is not False and value != {}:
            raise TypeError(f"{model}.forward() does not support {name} (the compiled graph has no such input)")
