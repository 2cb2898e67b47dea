"""Compile-time LoRA adapters of a decoder: `RBLNLoRAConfig(adapters=[RBLNLoRAAdapterConfig(...), ...])`.

As on optimum-rbln 0.12, every adapter is fixed at compile time: its low-rank weights are
compiled into the program beside the base weights, and a request picks one of them by its
`lora_int_id` (0 is reserved: the base model, no adapter). The compiled graphs take one adapter
slot per batch row, so rows of one batch may use different adapters.

    lora = RBLNLoRAConfig(adapters=[RBLNLoRAAdapterConfig(1, "math", "adapters/math"),
                                    RBLNLoRAAdapterConfig(2, "code", "adapters/code")])
    model = RBLNLlamaForCausalLM.from_pretrained(base, export=True, rbln_lora_config=lora)
    model.generate(**inputs, lora_int_id=[1, 2])       # one adapter per row (or one int for all)

These classes are plain data. Unset fields (r, lora_alpha, target_modules, use_rslora) are read
from each adapter folder at compile time (`lora_weights.resolve_adapters`); the compiled folder
records them resolved, and loading it never reads an adapter folder again.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from optimum_npu.configuration import OPTION_PREFIX

OPTION = f"{OPTION_PREFIX}lora_config"
BASE_ID = 0              # lora_int_id of the base model (no adapter), as on optimum-rbln and vLLM
BASE_NAME = "base"
# The projections of a Llama-style decoder layer an adapter may target (PEFT's module names).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _positive_int(what: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{OPTION}: {what} must be a positive int; got {value!r}")


def _positive_number(what: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{OPTION}: {what} must be a positive number; got {value!r}")


@dataclass(frozen=True)
class RBLNLoRAAdapterConfig:
    """One adapter compiled into the model: `RBLNLoRAAdapterConfig(1, "math", "path/to/peft/folder")`.

    lora_int_id: how requests select it (>= 1; 0 is the base model); lora_name: a name for
    `set_adapter`; lora_path: a local PEFT adapter folder (adapter_config.json +
    adapter_model.safetensors). r, lora_alpha, target_modules, use_rslora: None reads them from
    the folder; scaling_factor multiplies PEFT's scaling (lora_alpha / r, or / sqrt(r) with rsLoRA).
    """

    lora_int_id: int
    lora_name: str
    lora_path: str
    r: int | None = None
    lora_alpha: float | None = None
    target_modules: tuple[str, ...] | None = None
    use_rslora: bool | None = None
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"{OPTION}: lora_int_id must be an int >= 1 ({BASE_ID} is reserved for the base "
                             f"model); got {self.lora_int_id!r}")
        if not isinstance(self.lora_name, str) or not self.lora_name or self.lora_name == BASE_NAME:
            raise ValueError(f"{OPTION}: lora_name must be a non-empty string other than {BASE_NAME!r} (the base "
                             f"model's); got {self.lora_name!r}")
        if not isinstance(self.lora_path, (str, os.PathLike)) or not os.fspath(self.lora_path):
            raise ValueError(f"{OPTION}: lora_path of adapter {self.lora_name!r} must be a local folder path; "
                             f"got {self.lora_path!r}")
        object.__setattr__(self, "lora_path", os.fspath(self.lora_path))
        _positive_int(f"r of adapter {self.lora_name!r}", self.r)
        _positive_number(f"lora_alpha of adapter {self.lora_name!r}", self.lora_alpha)
        _positive_number(f"scaling_factor of adapter {self.lora_name!r}", self.scaling_factor)
        if self.use_rslora is not None and not isinstance(self.use_rslora, bool):
            raise ValueError(f"{OPTION}: use_rslora of adapter {self.lora_name!r} must be True, False or None; "
                             f"got {self.use_rslora!r}")
        if self.target_modules is not None:
            modules = self.target_modules
            if isinstance(modules, str) or not isinstance(modules, (list, tuple)) or not modules:
                raise ValueError(f"{OPTION}: target_modules of adapter {self.lora_name!r} must be a non-empty list "
                                 f"of {', '.join(PROJECTIONS)}; got {modules!r}")
            unknown = [m for m in modules if m not in PROJECTIONS]
            if unknown:
                raise ValueError(f"{OPTION}: target_modules of adapter {self.lora_name!r} has {unknown}; the "
                                 f"decoder's projections are {', '.join(PROJECTIONS)}")
            object.__setattr__(self, "target_modules", tuple(sorted(set(modules), key=PROJECTIONS.index)))

    @property
    def is_resolved(self) -> bool:
        return None not in (self.r, self.lora_alpha, self.target_modules, self.use_rslora)

    @property
    def scaling(self) -> float:
        """What the low-rank product is multiplied by: PEFT's lora_alpha / r (rsLoRA: / sqrt(r))."""
        if not self.is_resolved:
            raise ValueError(f"adapter {self.lora_name!r} is not resolved: its r / lora_alpha come from its folder")
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r) * self.scaling_factor

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.target_modules is not None:
            data["target_modules"] = list(self.target_modules)
        return data


@dataclass(frozen=True)
class RBLNLoRAConfig:
    """All the adapters compiled into a model (at least one; ids and names unique).

    max_lora_rank: the rank every adapter is padded to in the compiled weights (None: the
    largest r); `adapters` may hold RBLNLoRAAdapterConfig objects or dicts of their fields.
    """

    adapters: tuple[RBLNLoRAAdapterConfig, ...]
    max_lora_rank: int | None = None

    def __post_init__(self) -> None:
        adapters = self.adapters
        if isinstance(adapters, (str, bytes, Mapping)) or not isinstance(adapters, (list, tuple)) or not adapters:
            raise ValueError(f"{OPTION}: adapters must be a non-empty list of RBLNLoRAAdapterConfig (or dicts of "
                             f"their fields); got {adapters!r}")
        parsed = []
        for adapter in adapters:
            if isinstance(adapter, Mapping):
                unknown = set(adapter) - {f.name for f in dataclasses.fields(RBLNLoRAAdapterConfig)}
                if unknown:
                    raise ValueError(f"{OPTION}: unknown adapter fields {sorted(unknown)}; the fields are "
                                     f"{[f.name for f in dataclasses.fields(RBLNLoRAAdapterConfig)]}")
                try:
                    adapter = RBLNLoRAAdapterConfig(**adapter)
                except TypeError as err:
                    raise ValueError(f"{OPTION}: an adapter needs lora_int_id, lora_name and lora_path ({err})") from None
            if not isinstance(adapter, RBLNLoRAAdapterConfig):
                raise ValueError(f"{OPTION}: an adapter must be an RBLNLoRAAdapterConfig or a dict; got {adapter!r}")
            parsed.append(adapter)
        for what in ("lora_int_id", "lora_name"):
            values = [getattr(a, what) for a in parsed]
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"{OPTION}: each adapter needs its own {what}; {repeated} appear(s) more than once")
        object.__setattr__(self, "adapters", tuple(sorted(parsed, key=lambda a: a.lora_int_id)))
        _positive_int("max_lora_rank", self.max_lora_rank)
        ranks = [a.r for a in self.adapters if a.r is not None]
        if self.max_lora_rank is not None and ranks and max(ranks) > self.max_lora_rank:
            raise ValueError(f"{OPTION}: max_lora_rank={self.max_lora_rank} is below the rank {max(ranks)} of an "
                             "adapter; raise it or leave it None (the largest r)")

    @classmethod
    def coerce(cls, value: Any) -> RBLNLoRAConfig | None:
        """The option as given (a config, a dict as in rbln_config.json, or None) as a config."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"adapters", "max_lora_rank"}
            if unknown:
                raise ValueError(f"{OPTION}: unknown keys {sorted(unknown)}; the keys are 'adapters', 'max_lora_rank'")
            if "adapters" not in value:
                raise ValueError(f"{OPTION} needs 'adapters', a list of adapters")
            return cls(adapters=value["adapters"], max_lora_rank=value.get("max_lora_rank"))
        raise TypeError(f"{OPTION} must be an RBLNLoRAConfig, a dict or None; got {type(value).__name__}")

    @property
    def is_resolved(self) -> bool:
        return all(a.is_resolved for a in self.adapters) and self.max_lora_rank is not None

    @property
    def rank(self) -> int:
        """The rank of the compiled low-rank weights (every adapter padded to it)."""
        return self.max_lora_rank if self.max_lora_rank is not None else max(a.r for a in self.adapters)

    # The compiled weights stack one slot per adapter, slot 0 the base model (zero weights).
    @property
    def adapter_ids(self) -> tuple[int, ...]:
        return (BASE_ID, *(a.lora_int_id for a in self.adapters))

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return (BASE_NAME, *(a.lora_name for a in self.adapters))

    @property
    def num_slots(self) -> int:
        return len(self.adapters) + 1

    def targets(self) -> tuple[str, ...]:
        """The projections some adapter targets, in layer order."""
        return tuple(p for p in PROJECTIONS if any(p in (a.target_modules or ()) for a in self.adapters))

    def slot_of(self, adapter: int | str) -> int:
        """The compiled slot of an adapter given by lora_int_id or lora_name (0 / "base": the base model)."""
        if isinstance(adapter, str):
            if adapter in self.adapter_names:
                return self.adapter_names.index(adapter)
        elif isinstance(adapter, int) and not isinstance(adapter, bool) and adapter in self.adapter_ids:
            return self.adapter_ids.index(adapter)
        compiled = ", ".join(f"{i} ({n})" for i, n in zip(self.adapter_ids, self.adapter_names))
        raise ValueError(f"no LoRA adapter {adapter!r} was compiled into this model: adapters are fixed at compile "
                         f"time (rbln_lora_config); this model has lora_int_id {compiled}")

    def to_json(self) -> dict[str, Any]:
        return {"adapters": [a.to_json() for a in self.adapters], "max_lora_rank": self.max_lora_rank}
