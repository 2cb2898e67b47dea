"""The configuration of one compiled model: `rbln_*` options, their validation, rbln_config.json.

A model is compiled with a set of options of two kinds (as in optimum-rbln):

- COMPILE-TIME options are baked into the compiled program (target npu, dtype, batch size,
  sequence length, ...). Changing one means recompiling (`from_pretrained(..., export=True)`).
- RUNTIME options only say how to run the program (which device, whether to create
  runtimes at all, profiling). They are chosen at each load (`from_pretrained(folder,
  rbln_device=...)`) and are not saved: rbln_config.json records what was compiled, never
  a device of the export machine that a load would then ignore (as optimum-rbln).

A config is plain frozen data. The life of one:

    config, hf_kwargs = RBLNLlamaForCausalLMConfig.from_kwargs(kwargs)   # export: rbln_* options
    config = config.with_compiled(cls_name="RBLNLlamaForCausalLM", graphs=...)  # after compiling
    config.save(folder)                                                   # rbln_config.json
    config, hf_kwargs = RBLNLlamaForCausalLMConfig.from_compiled(folder, kwargs)  # load: runtime options only

Users pass options in three equivalent ways; `rbln_*` kwargs win over the dict / object:

    from_pretrained(..., rbln_batch_size=4)
    from_pretrained(..., rbln_config={"batch_size": 4})
    from_pretrained(..., rbln_config=RBLNLlamaForCausalLMConfig(batch_size=4))

A subclass adds its own compile-time options by declaring plain dataclass fields; runtime
options are declared with `runtime_option(...)`. Every subclass is registered by class name
so that `RBLNModelConfig.load(folder)` can rebuild the right class from the JSON.

Nested configs (a pipeline's components, the guardrail's networks, an encoder-decoder's two
halves, a vision tower beside a language model) are typed `submodule(...)` fields:

    @dataclass(frozen=True, kw_only=True)
    class RBLNMyPipelineConfig(RBLNModelConfig):
        broadcast_options: ClassVar = ("npu", "dtype", "numerics", "create_runtimes", "activate_profiler")
        text_encoder: RBLNCLIPTextModelConfig | None = submodule(RBLNCLIPTextModelConfig)
        unet: RBLNUNet2DConditionModelConfig | None = submodule(RBLNUNet2DConditionModelConfig)

    from_pretrained(..., rbln_config={"dtype": "float16", "unet": {"batch_size": 2}})  # or rbln_unet={...}
    RBLNMyPipelineConfig(unet={"batch_size": 2})       # a dict: the user's options for that sub-config
    RBLNMyPipelineConfig(unet=RBLNUNet2DConditionModelConfig(...))   # an object: that exact sub-config

A sub-config given as a dict is validated at once (an unknown name is an error naming
`rbln_config['unet']`, the closest valid name and every valid one) and what the user set is kept in
`submodule_options`: `options_for_submodule(name, derived)` gives the options a sub-model is
compiled or loaded with: the parent's `broadcast_options` the user set, then what the parent derives
for it (its `derived_submodule_options(name)` hook, or `derived`), then the user's own for it (which win). rbln_config.json nests each sub-config
present under "components" and the user's per-sub-config options under "requested"; `load(folder,
submodules)` reads them back and checks sub-configs loaded from their own folders against the
nested copies.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Self

from optimum_npu.sim_device.files import write_file_atomically
from optimum_npu.untrusted_files import read_json_object
from optimum_npu.sim_device.program import DEVICE_DTYPES as DTYPES, NUMERICS
from optimum_npu.sim_device.specs import DEFAULT_NPU, get_npu_spec

CONFIG_NAME = "rbln_config.json"
OPTION_PREFIX = "rbln_"          # `from_pretrained(rbln_batch_size=4)` sets option `batch_size`
CONFIG_KWARG = "rbln_config"     # `from_pretrained(rbln_config={...} or a config object)`

# Other names of options: newer optimum-rbln calls the tensor-parallel size `num_devices`.
OPTION_ALIASES = {"num_devices": "tensor_parallel_size"}



# One graph input as the compiler sees it: (name, shape, dtype), e.g. ("input_ids", (1, 128), "int64").
InputInfo = tuple[str, tuple[int, ...], str]

# Names of graphs and files in a compiled folder: one plain file name each (no "/", no "..", no
# leading dot, not absolute), so that nothing read from rbln_config.json can reach outside it.
PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

# Field kinds, kept in each dataclass field's metadata. A field without a kind is a compile-time option.
_KIND = "optimum_npu_kind"
_COMPILE, _RUNTIME, _INTERNAL, _SUBMODULE = "compile", "runtime", "internal", "submodule"
_SUBMODULE_CLASS = "optimum_npu_submodule_class"   # field metadata: the config class of a submodule field

# Every RBLNModelConfig subclass, by class name: `load()` resolves "config_cls" through it.
CONFIG_REGISTRY: dict[str, type[RBLNModelConfig]] = {}


def runtime_option(default: Any) -> Any:
    """Declare a RUNTIME option: it may change when a compiled folder is loaded."""
    return field(default=default, metadata={_KIND: _RUNTIME})


def submodule(config_class: type[RBLNModelConfig]) -> Any:
    """Declare a nested sub-config (see the module docstring): None, or a `config_class` instance;
    built from a dict of the user's options for it."""
    return field(default=None, metadata={_KIND: _SUBMODULE, _SUBMODULE_CLASS: config_class})


def _internal_field(**kwargs: Any) -> Any:
    """Not a user option: filled by the model after compiling (what the artifact contains)."""
    return field(metadata={_KIND: _INTERNAL}, **kwargs)


def package_version() -> str:
    """Version of optimum-npu, from the installed metadata or, in a source checkout, the package."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("optimum-npu")
    except PackageNotFoundError:
        pass
    try:  # not installed (e.g. running from a checkout); the package may not define it yet either
        from optimum_npu import __version__

        return str(__version__)
    except (ImportError, AttributeError):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Small validation helpers: each error names the option as the user typed it (rbln_<name>).


def check_int(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    # bool is an int subclass in Python; `rbln_batch_size=True` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        expected = "an int or None" if allow_none else "an int"
        raise TypeError(f"{OPTION_PREFIX}{name} must be {expected}; got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{OPTION_PREFIX}{name} must be >= {minimum}; got {value}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{OPTION_PREFIX}{name} must be True or False; got {value!r} ({type(value).__name__})")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{OPTION_PREFIX}{name} must be one of {allowed}; got {value!r}")


def check_option_names(owner: str, names: Any, valid: Sequence[str], *, prefix: str, where: str) -> None:
    """ValueError for the first of `names` not in `valid`, with the closest valid name and the full list."""
    for name in names:
        if name in valid:
            continue
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f" Did you mean {prefix}{close[0]}?" if close else ""
        listing = ", ".join(prefix + v for v in valid)
        where_text = f" {where}" if where else ""
        raise ValueError(f"Unknown option {prefix}{name}{where_text} for {owner}.{hint} Valid options: {listing}")


def check_plain_name(what: str, name: Any) -> str:
    """`name` if it is a plain file name (see PLAIN_NAME), else a ValueError naming `what`."""
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise ValueError(
            f"{what} must be a plain name of letters, digits, '_', '.' and '-' (not starting with '.'); got {name!r}"
        )
    return name


def _dtype_name(dtype: Any) -> str:
    """'bfloat16' for 'bfloat16' or torch.bfloat16 (without importing torch here)."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def _normalize_graphs(graphs: Mapping[str, Any]) -> Mapping[str, tuple[InputInfo, ...]]:
    """Graph input specs as read-only, hashable-inside data: {graph: ((name, shape, dtype), ...)}.

    They may come from an untrusted rbln_config.json: every part is type-checked, and graph names
    are plain file names (each graph is the file `<name>.rbln` of the folder).
    """
    if not isinstance(graphs, Mapping):
        raise TypeError(f"graphs must be a mapping graph name -> input infos; got {type(graphs).__name__}")
    normalized = {}
    for graph_name, input_infos in graphs.items():
        check_plain_name("a graph name", graph_name)
        if not isinstance(input_infos, (list, tuple)):
            raise TypeError(f"graph {graph_name!r}: input infos must be a list; got {input_infos!r}")
        specs = []
        for info in input_infos:
            if not isinstance(info, (list, tuple)) or len(info) != 3:
                raise ValueError(f"graph {graph_name!r}: an input info is (name, shape, dtype); got {info!r}")
            name, shape, dtype = info
            if not isinstance(name, str):
                raise TypeError(f"graph {graph_name!r}: input name must be str; got {name!r}")
            if not isinstance(shape, (list, tuple)) or not all(
                isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape
            ):
                raise TypeError(f"graph {graph_name!r}: input {name!r} shape must be a list of ints >= 0; got {shape!r}")
            if not isinstance(dtype, str):
                raise TypeError(f"graph {graph_name!r}: input {name!r} dtype must be a str; got {dtype!r}")
            specs.append((name, tuple(shape), dtype))
        normalized[graph_name] = tuple(specs)
    return MappingProxyType(normalized)


def _resolve_aliases(options: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """`options` with alias names replaced by the option they name (both given: they must agree)."""
    resolved = dict(options)
    for alias, name in OPTION_ALIASES.items():
        if alias in resolved:
            value = resolved.pop(alias)
            if name in resolved and resolved[name] != value:
                raise ValueError(f"{prefix}{alias}={value!r} and {prefix}{name}={resolved[name]!r} disagree: "
                                 f"{prefix}{alias} is another name for {prefix}{name}; give one of them")
            resolved[name] = value
    return resolved


def _to_json(value: Any) -> Any:
    """Tuples (how the frozen config stores sequences) become JSON lists; an option that is an
    object of its own (e.g. a LoRA config) writes itself (`to_json()`)."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RBLNModelConfig:
    """Options of one compiled model. Frozen: derive changed copies with the `with_*` methods."""

    # Runtime options that say what a saved folder holds (e.g. which guardrails the Cosmos checker saved),
    # not where or how to run it: written to rbln_config.json for the model to check a load against.
    recorded_runtime_options: ClassVar[tuple[str, ...]] = ()
    # Options of this config passed on to every submodule whose own options do not set them, when the
    # user set them here (e.g. a pipeline's npu / dtype); see `options_for_submodule`.
    broadcast_options: ClassVar[tuple[str, ...]] = ()

    # --- compile-time options ---
    npu: str = DEFAULT_NPU                 # hardware preset compiled for, see sim_device.specs
    tensor_parallel_size: int = 1          # devices the model is split across
    dtype: str = "bfloat16"                # device arithmetic: "bfloat16" | "float16"
    numerics: str = "device"               # "device" (16-bit) | "exact" (fp32 on host, priced as dtype)
    batch_size: int = 1

    # --- runtime options ---
    create_runtimes: bool = runtime_option(True)       # False: compile / load without devices
    device: int | tuple[int, ...] | None = runtime_option(None)  # device id, or one id per TP rank
    activate_profiler: bool = runtime_option(False)
    cache: bool = runtime_option(True)                 # export: reuse / keep programs in the compile cache

    # --- filled by the model after compiling; saved, not user options ---
    cls_name: str | None = _internal_field(default=None)  # the RBLN model class, e.g. "RBLNLlamaForCausalLM"
    graphs: Mapping[str, tuple[InputInfo, ...]] = _internal_field(
        default_factory=dict, hash=False  # a mapping is not hashable; the other fields identify the config
    )
    # What the user set for each submodule ({name: {option: value}}): it wins over what the parent derives.
    submodule_options: Mapping[str, Mapping[str, Any]] = _internal_field(default_factory=dict, hash=False, repr=False)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        registered = CONFIG_REGISTRY.get(cls.__name__)
        # Re-importing the module that defined it (e.g. importlib.reload) may register it again.
        is_reimport = registered is not None and registered.__qualname__ == cls.__qualname__ and (
            registered.__module__ == cls.__module__
        )
        if registered is not None and not is_reimport:
            raise TypeError(
                f"Config class name {cls.__name__!r} is already registered by {registered.__module__}; "
                "config class names must be unique because rbln_config.json refers to them by name."
            )
        CONFIG_REGISTRY[cls.__name__] = cls

    def __post_init__(self) -> None:
        self._validate()

    # A frozen dataclass refuses setattr; validation uses this to store normalized values
    # (lists -> tuples) exactly once, while the object is being built.
    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _validate(self) -> None:
        """Check and normalize every option. Subclasses extend it and call super() first."""
        try:
            spec = get_npu_spec(self.npu)
        except ValueError as err:
            raise ValueError(f"{OPTION_PREFIX}npu: {err}") from None
        check_int("tensor_parallel_size", self.tensor_parallel_size)
        max_tp = spec.devices_per_server   # TP spans at most one server
        if self.tensor_parallel_size > max_tp:
            raise ValueError(
                f"{OPTION_PREFIX}tensor_parallel_size must be <= {max_tp} on {spec.name} "
                f"({spec.devices_per_card} device(s) per card x {spec.cards_per_server} cards per server); "
                f"got {self.tensor_parallel_size}"
            )
        self._set("dtype", _dtype_name(self.dtype))
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("numerics", self.numerics, NUMERICS)
        check_int("batch_size", self.batch_size)

        check_bool("create_runtimes", self.create_runtimes)
        check_bool("activate_profiler", self.activate_profiler)
        check_bool("cache", self.cache)
        self._validate_device()

        if self.cls_name is not None and not isinstance(self.cls_name, str):
            raise TypeError(f"cls_name must be a str or None; got {self.cls_name!r}")
        self._set("graphs", _normalize_graphs(self.graphs))
        self._validate_submodules()

    def _validate_submodules(self) -> None:
        """Each submodule field: None, a config of its class, or a dict of the user's options for it (built
        into that config now, so that a bad value is an error before anything is loaded or compiled)."""
        classes = self.submodule_classes()
        if not isinstance(self.submodule_options, Mapping):
            raise TypeError(f"submodule_options must map submodule names to option dicts; got {self.submodule_options!r}")
        chosen = {}
        for name, options in self.submodule_options.items():
            if name not in classes or not isinstance(options, Mapping):
                raise ValueError(f"submodule_options must map submodules of {type(self).__name__} ({', '.join(classes)}) "
                                 f"to option dicts; got {name!r}: {options!r}")
            chosen[name] = dict(options)
        for name, config_class in classes.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                options = _submodule_dict(type(self), name, value)
                chosen[name] = {**chosen.get(name, {}), **options}
                try:
                    value = config_class(**chosen[name])
                except (TypeError, ValueError) as err:
                    raise type(err)(f"{CONFIG_KWARG}[{name!r}]: {err}") from None
                self._set(name, value)
            elif value is not None and not isinstance(value, config_class):
                raise TypeError(f"{CONFIG_KWARG}[{name!r}] must be a dict of {name}'s options or a "
                                f"{config_class.__name__}; got {value!r}")
        self._set("submodule_options", chosen)

    def _validate_device(self) -> None:
        device = self.device
        if device is None:
            return
        if isinstance(device, int) and not isinstance(device, bool):
            check_int("device", device, minimum=0)
            if self.tensor_parallel_size != 1:
                raise ValueError(
                    f"{OPTION_PREFIX}device must be a list of {self.tensor_parallel_size} device ids "
                    f"(one per tensor-parallel rank); got {device}"
                )
            return
        if not isinstance(device, (list, tuple)):
            raise TypeError(f"{OPTION_PREFIX}device must be None, an int or a list of ints; got {device!r}")
        for device_id in device:
            check_int("device", device_id, minimum=0)
        if len(device) != self.tensor_parallel_size or len(set(device)) != len(device):
            raise ValueError(
                f"{OPTION_PREFIX}device must list {self.tensor_parallel_size} distinct device id(s), "
                f"one per tensor-parallel rank; got {list(device)}"
            )
        self._set("device", tuple(device))

    # --- option names -------------------------------------------------------------------------

    @classmethod
    def _names_of_kind(cls, kind: str) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(_KIND, _COMPILE) == kind)

    @classmethod
    def compile_option_names(cls) -> tuple[str, ...]:
        return cls._names_of_kind(_COMPILE)

    @classmethod
    def runtime_option_names(cls) -> tuple[str, ...]:
        return cls._names_of_kind(_RUNTIME)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return cls.compile_option_names() + cls.runtime_option_names()

    @classmethod
    def submodule_classes(cls) -> dict[str, type[RBLNModelConfig]]:
        """The nested sub-configs and the config class of each, e.g. {"unet": RBLNUNet2DConditionModelConfig}."""
        return {f.name: f.metadata[_SUBMODULE_CLASS] for f in dataclasses.fields(cls)
                if f.metadata.get(_KIND) == _SUBMODULE}

    @property
    def submodules(self) -> dict[str, RBLNModelConfig | None]:
        return {name: getattr(self, name) for name in self.submodule_classes()}

    @classmethod
    def _check_option_names(cls, names: Any, *, prefix: str, where: str) -> None:
        """ValueError for the first unknown option (or submodule), with the closest valid name and the full list."""
        check_option_names(cls.__name__, names, cls.option_names() + tuple(cls.submodule_classes()), prefix=prefix,
                           where=where)

    def options_for_submodule(self, name: str, derived: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The `rbln_config` of submodule `name`: the `broadcast_options` the user set on this config, then
        what the parent derives for it (`derived`, by default `derived_submodule_options(name)`; e.g. a
        doubled batch), then the user's own options for it."""
        if name not in self.submodule_classes():
            raise ValueError(f"{type(self).__name__} has no submodule {name!r}; submodules: "
                             f"{', '.join(self.submodule_classes())}")
        chosen = self.explicit_options()
        inherited = {key: chosen[key] for key in self.broadcast_options if key in chosen}
        derived = self.derived_submodule_options(name) if derived is None else derived
        return {**inherited, **derived, **self.submodule_options.get(name, {})}

    def derived_submodule_options(self, name: str) -> dict[str, Any]:
        """What this config's own options imply for submodule `name` (a subclass says; none by default)."""
        return {}

    # --- building from from_pretrained kwargs --------------------------------------------------

    def explicit_options(self) -> dict[str, Any]:
        """The options whose value differs from the class default: what the user chose."""
        chosen = {}
        for f in dataclasses.fields(self):
            if f.metadata.get(_KIND, _COMPILE) in (_INTERNAL, _SUBMODULE):
                continue
            value = getattr(self, f.name)
            if f.default is dataclasses.MISSING or value != f.default:
                chosen[f.name] = value
        chosen.update({name: dict(options) for name, options in self.submodule_options.items()})
        return chosen

    @classmethod
    def split_kwargs(cls, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split `from_pretrained` kwargs into (options, other kwargs).

        Options come from `rbln_config` (a dict, or a config object whose non-default values
        count) overridden by `rbln_<option>` kwargs. Other kwargs are returned untouched: they
        belong to the Hugging Face `from_pretrained`. `kwargs` itself is not modified.
        """
        remaining = dict(kwargs)
        base = remaining.pop(CONFIG_KWARG, None)
        rbln_keys = [key for key in remaining if key.startswith(OPTION_PREFIX)]
        overrides = _resolve_aliases({key.removeprefix(OPTION_PREFIX): remaining.pop(key) for key in rbln_keys},
                                     OPTION_PREFIX)
        if base is None:
            options = {}
        elif isinstance(base, Mapping):
            base = _resolve_aliases(base, "")
            cls._check_option_names(base, prefix="", where=f"in {CONFIG_KWARG}")
            options = dict(base)
        elif isinstance(base, RBLNModelConfig):
            # A parent-class object is fine (e.g. a generic decoder config for Llama); a sibling is not.
            if not (isinstance(base, cls) or issubclass(cls, type(base))):
                raise TypeError(f"{CONFIG_KWARG} is a {type(base).__name__}, but this model needs a {cls.__name__}")
            options = base.explicit_options()
        else:
            raise TypeError(
                f"{CONFIG_KWARG} must be a dict or a {cls.__name__}; got {type(base).__name__}"
            )
        cls._check_option_names(overrides, prefix=OPTION_PREFIX, where="in kwargs")
        for name in cls.submodule_classes():   # a submodule's options: from rbln_config, then rbln_<name>={...}
            parts = [_submodule_dict(cls, name, source[name]) for source in (options, overrides) if name in source]
            if parts:
                overrides[name] = {key: value for part in parts for key, value in part.items()}
        options.update(overrides)
        return options, remaining

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> tuple[Self, dict[str, Any]]:
        """The export path: (validated config, non-rbln kwargs) from `from_pretrained` kwargs."""
        options, remaining = cls.split_kwargs(kwargs)
        base = kwargs.get(CONFIG_KWARG)
        # A config object keeps its own class (it may be a subclass of `cls`).
        target = type(base) if isinstance(base, cls) else cls
        return target(**options), remaining

    @classmethod
    def from_compiled(cls, folder: str | os.PathLike, kwargs: Mapping[str, Any]) -> tuple[Self, dict[str, Any]]:
        """The load path: the saved config with the user's runtime options applied.

        Compile-time options in `kwargs` are allowed only if they equal the compiled value.
        """
        config = cls.load(folder)
        # A load starts every runtime option from its default (the recorded ones too: they say what
        # the folder holds, for the model to check) and applies the user's.
        defaults = {f.name: f.default for f in dataclasses.fields(config) if f.name in config.runtime_option_names()}
        config = dataclasses.replace(config, **defaults)
        options, remaining = type(config).split_kwargs(kwargs)
        return config.with_runtime_options(**options), remaining

    # --- derived copies ---------------------------------------------------------------------------

    def with_runtime_options(self, **options: Any) -> Self:
        """A copy with runtime options changed. Compile-time options must keep their compiled value."""
        self._check_option_names(options, prefix=OPTION_PREFIX, where="")
        compile_names = self.compile_option_names()
        nested, chosen = {}, {k: dict(v) for k, v in self.submodule_options.items()}
        for name in self.submodule_classes():
            if name not in options:
                continue
            given = _submodule_dict(type(self), name, options.pop(name))
            chosen[name] = {**chosen.get(name, {}), **given}
            if getattr(self, name) is not None:   # a compiled sub-config: its compile-time options are fixed too
                try:
                    nested[name] = getattr(self, name).with_runtime_options(**given)
                except (TypeError, ValueError) as err:
                    raise type(err)(f"{CONFIG_KWARG}[{name!r}]: {err}") from None
        for name, value in options.items():
            if name not in compile_names or value is None:  # None means "not given" for compile options
                continue
            try:  # compare normalized values, e.g. a list against the stored tuple
                same = getattr(dataclasses.replace(self, **{name: value}), name) == getattr(self, name)
            except (TypeError, ValueError):
                same = False  # invalid here, so certainly not what was compiled
            if not same:
                raise ValueError(
                    f"{OPTION_PREFIX}{name} is fixed at compile time (compiled with {getattr(self, name)!r}, "
                    f"requested {value!r}); recompile with export=True to change it."
                )
        runtime = {name: value for name, value in options.items() if name not in compile_names}
        return dataclasses.replace(self, **runtime, **nested, submodule_options=chosen)

    def with_loaded_submodules(self, loaded: Mapping[str, RBLNModelConfig | None], path: str) -> Self:
        """A copy whose sub-configs are `loaded` (those of the sub-models loaded from their own folders: what
        runs; None: not loaded), each checked against the copy nested here, if any (`path`: the file it came
        from, for the error)."""
        check = {name: sub for name, sub in loaded.items() if sub is not None and getattr(self, name) is not None}
        self._nested_from_json(self.to_json_dict(), path, check)
        return dataclasses.replace(self, **loaded)

    def with_compiled(self, *, cls_name: str, graphs: Mapping[str, Sequence[InputInfo]]) -> Self:
        """A copy recording what was compiled: the model class name and each graph's input specs."""
        return dataclasses.replace(self, cls_name=cls_name, graphs=graphs)

    # --- JSON -----------------------------------------------------------------------------------

    @property
    def compile_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.compile_option_names()}

    @property
    def runtime_options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.runtime_option_names()}

    @classmethod
    def top_level_keys(cls) -> tuple[str, ...]:
        """Keys a config class adds at the top level of rbln_config.json for other readers (e.g.
        vLLM's); this package reads compile_options / runtime_options. None by default."""
        return ()

    def check_top_level_keys(self, data: dict[str, Any], path: str) -> None:
        """Called on load with the file's content: a class that adds top-level keys checks them here."""

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "cls_name": self.cls_name,
            "config_cls": type(self).__name__,
            "optimum_npu_version": package_version(),
            "compile_options": {k: _to_json(v) for k, v in self.compile_options.items()},
            # Chosen at each load, never saved, except those that say what the folder holds.
            "runtime_options": {k: _to_json(getattr(self, k)) for k in self.recorded_runtime_options},
            "graphs": {name: [[n, list(shape), dt] for n, shape, dt in infos] for name, infos in self.graphs.items()},
            **self._submodules_json(),
        }

    def _submodules_json(self) -> dict[str, Any]:
        """The nested sub-configs ("components") and the compile-time options the user set for each
        ("requested": they win over what the parent derives, at a load too), for a config with submodules."""
        if not self.submodule_classes():
            return {}
        return {
            "components": {name: sub.to_json_dict() for name, sub in self.submodules.items() if sub is not None},
            "requested": {name: {k: _to_json(v) for k, v in options.items()}
                          for name, options in self._compile_time_requests(self.submodule_options).items()},
        }

    @classmethod
    def _compile_time_requests(cls, requested: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """`requested` without runtime options: those are chosen at each load, never saved (nor read back)."""
        classes = cls.submodule_classes()
        return {name: {k: v for k, v in options.items() if k not in classes[name].runtime_option_names()}
                for name, options in requested.items() if name in classes and isinstance(options, Mapping)}

    def save(self, folder: str | os.PathLike, files: Mapping[str, Any] | None = None) -> str:
        """Write `folder/rbln_config.json` atomically (a reader never sees half a file). Returns its path.

        `files`, if given, is the manifest of the other files of the compiled folder (see
        `modeling.base`), stored under "files"; this file is written last, so it also marks a
        save as complete.
        """
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, CONFIG_NAME)
        data = self.to_json_dict()
        if files is not None:
            data["files"] = dict(files)
        write_file_atomically(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))
        return path

    @staticmethod
    def read_json(folder: str | os.PathLike) -> dict[str, Any]:
        """The content of `folder/rbln_config.json`, checked to have the expected keys and types.

        The file is untrusted: any malformed content is a ValueError naming the file.
        """
        path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No {CONFIG_NAME} in {os.fspath(folder)!r}: not a compiled model folder. "
                "To compile a Hugging Face checkpoint, pass export=True."
            )
        data = read_json_object(path)
        missing = {"config_cls", "compile_options", "runtime_options"} - set(data)
        if missing:
            raise ValueError(f"{path} is malformed: missing {sorted(missing)}")
        unknown = set(data) - set(_JSON_KEY_TYPES)
        if unknown:  # keys the config class adds for other readers are known
            unknown -= set(_lookup_config_class(data["config_cls"]).top_level_keys())
        if unknown:
            raise ValueError(f"{path} is malformed: unknown keys {sorted(unknown)}; expected {sorted(_JSON_KEY_TYPES)}")
        for key, types in _JSON_KEY_TYPES.items():
            if key in data and not isinstance(data[key], types):
                expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise ValueError(f"{path} is malformed: {key!r} must be {expected}; got {data[key]!r}")
        return data

    @classmethod
    def load(cls, folder: str | os.PathLike, submodules: Mapping[str, RBLNModelConfig] | None = None) -> Self:
        """Read `folder/rbln_config.json` into the config class named in it.

        Called on a subclass, the saved class must be that class or one of its subclasses. `submodules`
        (sub-configs loaded from their own folders: what runs) replace the nested copies, and must agree
        with them on every compile-time option.
        """
        path = os.path.join(folder, CONFIG_NAME)
        data = cls.read_json(folder)
        config_cls = _lookup_config_class(data["config_cls"])
        if not issubclass(config_cls, cls):
            raise ValueError(
                f"{path} holds a {config_cls.__name__} (for {data.get('cls_name')}), not a {cls.__name__}: "
                "it was compiled for a different model class."
            )
        return config_cls._from_json_dict(data, path, submodules or {})

    @classmethod
    def _from_json_dict(cls, data: Mapping[str, Any], path: str, submodules: Mapping[str, RBLNModelConfig]) -> Self:
        """The config of the (checked) JSON object `data` of the file `path`, a nested one for each submodule."""
        # Runtime options are chosen at load; of those saved, only the recorded ones are read (what the
        # folder holds); the rest (an older version saved them all) are ignored, not applied.
        options = {**data["compile_options"],
                   **{k: v for k, v in data["runtime_options"].items() if k in cls.recorded_runtime_options}}
        cls._check_option_names(options, prefix="", where=f"in {path}")
        nested = cls._nested_from_json(data, path, submodules)
        options = {k: v for k, v in options.items() if k not in nested}
        requested = data.get("requested", {})
        if not isinstance(requested, dict) or not all(isinstance(v, dict) for v in requested.values()):
            raise ValueError(f"{path} is malformed: 'requested' must map submodules to their options; got {requested!r}")
        try:
            config = cls(**options, **nested, cls_name=data.get("cls_name"), graphs=data.get("graphs", {}),
                         submodule_options=cls._compile_time_requests(requested))
        except (TypeError, ValueError) as err:
            error_type = ValueError if isinstance(err, ValueError) else TypeError
            raise error_type(f"{path}: {err}") from None
        config.check_top_level_keys(data, path)
        return config

    @classmethod
    def _nested_from_json(cls, data: Mapping[str, Any], path: str,
                          loaded: Mapping[str, RBLNModelConfig]) -> dict[str, RBLNModelConfig]:
        """{submodule: config} of the "components" of `data`; one in `loaded` is used instead of its nested
        copy, which must hold the same compile options (else the folder was edited or mixed)."""
        classes = cls.submodule_classes()
        components = data.get("components", {})
        check_option_names(cls.__name__, components, tuple(classes), prefix="", where=f"in {path} (components)")
        check_option_names(cls.__name__, loaded, tuple(classes), prefix="", where="(loaded submodules)")
        nested = {}
        for name, saved in components.items():
            if not isinstance(saved, dict) or not {"config_cls", "compile_options"} <= set(saved) or not isinstance(
                    saved.get("compile_options"), dict):
                raise ValueError(f"{path} is malformed: components[{name!r}] must be a saved config; got {saved!r}")
            if name in loaded:
                if saved["compile_options"] != {k: _to_json(v) for k, v in loaded[name].compile_options.items()}:
                    raise ValueError(
                        f"{path} and {name}/{CONFIG_NAME} disagree on {name}'s compile options: the folder was edited "
                        "or mixed from two models; compile it again (export=True).")
                nested[name] = loaded[name]
                continue
            sub_cls = _lookup_config_class(saved["config_cls"])
            if not issubclass(sub_cls, classes[name]):
                raise ValueError(f"{path}: components[{name!r}] is a {sub_cls.__name__}, not a {classes[name].__name__}")
            nested[name] = sub_cls._from_json_dict({"runtime_options": {}, **saved}, f"{path} (components[{name!r}])", {})
        missing = set(loaded) - set(components)
        if missing:
            raise ValueError(f"{path} records no {', '.join(sorted(missing))} in its components: it was saved without "
                             "them; compile it again (export=True).")
        return nested

    # --- the machine ----------------------------------------------------------------------------

    def check_devices_exist(self) -> None:
        """ValueError if `device` names a device this (simulated) machine lacks, or one of another NPU.

        Not part of validation: a config describes a model and may be built on a machine without
        the devices (e.g. compile-only). The model calls it before compiling or loading anything
        when it is about to create runtimes.
        """
        if self.device is None:
            return  # the runtime picks free devices of the right kind (and says so if there are none)
        from optimum_npu.sim_device.memory import devices

        machine = devices()
        for device_id in (self.device,) if isinstance(self.device, int) else self.device:
            if device_id >= len(machine):
                raise ValueError(
                    f"{OPTION_PREFIX}device={device_id} does not exist: this machine has devices 0..{len(machine) - 1} "
                    "(see `optimum-npu smi`; the simulated machine is set by OPTIMUM_NPU_SYSTEM)"
                )
            if machine[device_id].spec.name != self.npu:
                raise ValueError(
                    f"{OPTION_PREFIX}device={device_id} is a {machine[device_id].spec.name}, but the model is for "
                    f"{OPTION_PREFIX}npu={self.npu!r}; pick a device of that kind or compile for its NPU"
                )


# The top-level keys of rbln_config.json and their JSON types ("files": the folder's manifest).
_JSON_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "cls_name": (str, type(None)),
    "config_cls": (str,),
    "optimum_npu_version": (str,),
    "compile_options": (dict,),
    "runtime_options": (dict,),
    "graphs": (dict,),
    "files": (dict,),
    "components": (dict,),    # nested sub-configs (configs with submodules)
    "requested": (dict,),     # the user's options for each sub-config
}


def _submodule_dict(owner: type[RBLNModelConfig], name: str, value: Any) -> dict[str, Any]:
    """The user's options for submodule `name` of `owner` as a dict (a config object counts by its
    non-default values), their names checked against the submodule's config class."""
    config_class = owner.submodule_classes()[name]
    if isinstance(value, RBLNModelConfig):
        if not isinstance(value, config_class):
            raise TypeError(f"{CONFIG_KWARG}[{name!r}] must be a {config_class.__name__}; got {type(value).__name__}")
        value = value.explicit_options()
    if not isinstance(value, Mapping):
        raise TypeError(f"{CONFIG_KWARG}[{name!r}] must be a dict of {name}'s options or a {config_class.__name__}; "
                        f"got {value!r}")
    config_class._check_option_names(value, prefix="", where=f"in {CONFIG_KWARG}[{name!r}]")
    return dict(value)


# The base class is a valid config on its own (a model with no extra options).
CONFIG_REGISTRY[RBLNModelConfig.__name__] = RBLNModelConfig


def _lookup_config_class(name: Any) -> type[RBLNModelConfig]:
    if not isinstance(name, str):
        raise ValueError(f"config_cls in {CONFIG_NAME} must be a class name; got {name!r}")
    if name not in CONFIG_REGISTRY:
        # The package's public exports (if it lazily exports this name) import the defining module,
        # which registers the class. Only names the package itself exports are imported: a JSON
        # file never chooses which module gets imported.
        try:
            import optimum_npu

            getattr(optimum_npu, name, None)
        except ImportError:
            pass
    if name not in CONFIG_REGISTRY:
        raise ValueError(
            f"Unknown config class {name!r} in {CONFIG_NAME}. Import the module that defines it first. "
            f"Known: {', '.join(sorted(CONFIG_REGISTRY))}"
        )
    return CONFIG_REGISTRY[name]
