"""The configuration of a compiled diffusers pipeline: one typed sub-config per component.

A pipeline is not one compiled model but several (text encoder, denoiser, VAE), each compiled
on its own with its own options, as on the real stack (optimum-rbln nests them the same way):

    RBLNStableDiffusionPipeline.from_pretrained(
        "sd-folder", export=True,
        rbln_config={"height": 512, "width": 512,                 # pipeline-wide: broadcast
                     "unet": {"batch_size": 2, "device": 1},      # one component's own options
                     "vae": {"device": 2}},
        rbln_guidance_scale=7.5,                                  # rbln_* kwargs: pipeline-wide too
    )

Pipeline-wide options (`PIPELINE_OPTIONS`) go to every component that needs them, turned into
what that component compiles for (pixels -> latents through the VAE's compression, a CFG
pipeline's doubled denoiser batch, the tokenizer's length -> the encoder's and the denoiser's
sequence length). A component's own options win over what the pipeline derives. Each
component's `device`, `tensor_parallel_size`, `create_runtimes`, `activate_profiler` are its own.

Compile-time options are fixed at load: `from_pretrained(compiled_folder, rbln_height=...)` with
another value than compiled is an error, while runtime options (`device`, `create_runtimes`,
`activate_profiler`, per component or pipeline-wide) may change at every load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from ..configuration import (
    CONFIG_KWARG, CONFIG_NAME, DTYPES, NUMERICS, OPTION_PREFIX, RBLNModelConfig, _to_json, check_bool, check_choice,
    check_int, check_option_names, package_version, read_json_object, runtime_option,
)
from ..sim_device.files import write_file_atomically
from ..sim_device.specs import DEFAULT_NPU, get_npu_spec

# Pipeline-wide options a user may give once for the whole pipeline.
PIPELINE_OPTIONS = (
    "batch_size", "height", "width", "num_frames", "fps", "max_seq_len", "guidance_scale", "npu", "dtype", "numerics",
    "create_runtimes", "activate_profiler",
)
# Pipeline-wide options every component receives as they are (the others are turned into
# each component's own options by the pipeline's `_component_options`).
SHARED_OPTIONS = ("npu", "dtype", "numerics", "create_runtimes", "activate_profiler")
_COMPONENT = "optimum_npu_component"  # field metadata: the config class of a component field


def component(config_class: type[RBLNModelConfig]) -> Any:
    """Declare a compiled component of a pipeline config, with the config class of its options."""
    return field(default=None, metadata={_COMPONENT: config_class})


def check_size(name: str, value: Any, dims: int) -> tuple[int, ...] | None:
    """`value` as a tuple of `dims` ints >= 1 (an int is broadcast), or None; else a clear error."""
    if value is None:
        return None
    values = (value,) * dims if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) or len(values) != dims:
        raise TypeError(f"{OPTION_PREFIX}{name} must be an int or {dims} ints; got {value!r}")
    for v in values:
        check_int(name, v)
    return tuple(values)


@dataclass(frozen=True, kw_only=True)
class RBLNDiffusionPipelineConfig:
    """Options of a compiled pipeline. Subclasses declare their components with `component(...)`.

    Before export the component fields hold what the user asked for each component (built from
    their options only; `requested` keeps exactly which options they set); `resolved(...)` turns
    them into the complete configs each component is compiled with.
    """

    # --- pipeline-wide compile-time options (None: the pipeline's default, or derived) ---
    batch_size: int = 1                 # images / videos per call
    height: int | None = None           # pixels
    width: int | None = None
    num_frames: int | None = None       # video pipelines: frames of the generated video
    fps: int | None = None              # deprecated (Cosmos: a call-time argument); accepted with a warning
    max_seq_len: int | None = None      # prompt tokens (the tokenizer pads to it)
    guidance_scale: float | None = None  # > 1: classifier-free guidance
    npu: str = DEFAULT_NPU
    dtype: str = "bfloat16"
    numerics: str = "device"
    # --- pipeline-wide runtime options ---
    create_runtimes: bool = runtime_option(True)
    activate_profiler: bool = runtime_option(False)
    # --- the options each component's user asked for (name -> {option: value}) ---
    requested: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False, repr=False)

    # The pipeline class this config belongs to (e.g. "RBLNStableDiffusionPipeline").
    pipeline_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        try:
            get_npu_spec(self.npu)
        except ValueError as err:
            raise ValueError(f"{OPTION_PREFIX}npu: {err}") from None
        check_int("batch_size", self.batch_size)
        for name in ("height", "width", "num_frames", "fps", "max_seq_len"):
            check_int(name, getattr(self, name), allow_none=True)
        if self.guidance_scale is not None and (
            isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float))
        ):
            raise TypeError(f"{OPTION_PREFIX}guidance_scale must be a number; got {self.guidance_scale!r}")
        object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("numerics", self.numerics, NUMERICS)
        check_bool("create_runtimes", self.create_runtimes)
        check_bool("activate_profiler", self.activate_profiler)
        for name, config_class in self.component_classes().items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, config_class):
                raise TypeError(f"{OPTION_PREFIX}config[{name!r}] must be a {config_class.__name__}; got {value!r}")

    # --- names ------------------------------------------------------------------------------

    @classmethod
    def component_classes(cls) -> dict[str, type[RBLNModelConfig]]:
        """The compiled components and the config class of each, e.g. {"unet": RBLNUNet2DConditionModelConfig}."""
        return {f.name: f.metadata[_COMPONENT] for f in dataclasses.fields(cls) if _COMPONENT in f.metadata}

    @property
    def components(self) -> dict[str, RBLNModelConfig]:
        return {name: getattr(self, name) for name in self.component_classes()}

    @classmethod
    def _valid_keys(cls) -> tuple[str, ...]:
        return PIPELINE_OPTIONS + tuple(cls.component_classes())

    # --- building from from_pretrained kwargs ------------------------------------------------

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> tuple[Self, dict[str, Any]]:
        """(config, other kwargs) from `rbln_config=` (a dict or a config) and `rbln_*` kwargs.

        Keys are pipeline-wide options or component names (whose value is a dict of that
        component's options, or its config object); `rbln_*` kwargs win over `rbln_config`.
        """
        remaining = dict(kwargs)
        base = remaining.pop(CONFIG_KWARG, None)
        overrides = {key.removeprefix(OPTION_PREFIX): remaining.pop(key)
                     for key in [k for k in remaining if k.startswith(OPTION_PREFIX)]}
        if base is None:
            options: dict[str, Any] = {}
        elif isinstance(base, Mapping):
            check_option_names(cls.__name__, base, cls._valid_keys(), prefix="", where=f"in {CONFIG_KWARG}")
            options = dict(base)
        elif isinstance(base, cls):
            options = base.explicit_options()
        else:
            raise TypeError(f"{CONFIG_KWARG} must be a dict or a {cls.__name__}; got {type(base).__name__}")
        check_option_names(cls.__name__, overrides, cls._valid_keys(), prefix=OPTION_PREFIX, where="in kwargs")
        options.update(overrides)
        return cls.from_options(options), remaining

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Self:
        """A config from a flat mapping of pipeline-wide options and {component: options}."""
        pipeline_options, requested, components = {}, {}, {}
        for key, value in options.items():
            config_class = cls.component_classes().get(key)
            if config_class is None:
                pipeline_options[key] = value
                continue
            if isinstance(value, RBLNModelConfig):
                if not isinstance(value, config_class):
                    raise TypeError(f"{CONFIG_KWARG}[{key!r}] must be a {config_class.__name__}; got {type(value).__name__}")
                value = value.explicit_options()
            if not isinstance(value, Mapping):
                raise TypeError(f"{CONFIG_KWARG}[{key!r}] must be a dict of {key}'s options; got {value!r}")
            config_class._check_option_names(value, prefix="", where=f"in {CONFIG_KWARG}[{key!r}]")
            requested[key] = dict(value)
            components[key] = config_class(**value)  # validates the values now, not after loading weights
        return cls(**pipeline_options, **components, requested=requested)

    def explicit_options(self) -> dict[str, Any]:
        """What the user chose: pipeline-wide options that differ from the defaults, and each
        component's requested options."""
        chosen = {}
        for f in dataclasses.fields(self):
            if f.name == "requested" or _COMPONENT in f.metadata:
                continue
            if getattr(self, f.name) != f.default:
                chosen[f.name] = getattr(self, f.name)
        chosen.update({name: dict(options) for name, options in self.requested.items()})
        return chosen

    # --- resolving: what each component is compiled with ---------------------------------

    def _pipeline_defaults(self, models: Mapping[str, Any]) -> dict[str, Any]:
        """Values for the pipeline-wide options left at None, from the loaded components
        (`models`: name -> torch module, tokenizer, scheduler). Per pipeline."""
        return {}

    def _component_options(self, models: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Each component's options derived from the (filled) pipeline-wide ones. Per pipeline."""
        raise NotImplementedError

    def resolved(self, models: Mapping[str, Any]) -> Self:
        """The config with every option decided: pipeline-wide ones left open filled from the
        components, then each component's options: the shared pipeline-wide ones, what the
        pipeline derives for it, and the user's own options for it (which win)."""
        defaults = {k: v for k, v in self._pipeline_defaults(models).items() if getattr(self, k) is None}
        filled = dataclasses.replace(self, **defaults)
        derived = filled._component_options(models)
        shared = {name: getattr(filled, name) for name in SHARED_OPTIONS}
        components = {}
        for name, config_class in self.component_classes().items():
            options = {**shared, **derived.get(name, {}), **self.requested.get(name, {})}
            try:
                components[name] = config_class(**options)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{name}: {err}") from None
        return dataclasses.replace(filled, **components)

    # --- loading: compile-time options are fixed ----------------------------------------------

    def check_load_options(self, requested: Self) -> None:
        """ValueError if `requested` (from load kwargs) changes a pipeline-wide compile-time option."""
        runtime = {f.name for f in dataclasses.fields(self) if f.metadata.get("optimum_npu_kind") == "runtime"}
        for name, value in requested.explicit_options().items():
            if name in self.component_classes() or name in runtime:
                continue
            if getattr(self, name) != value:
                raise ValueError(
                    f"{OPTION_PREFIX}{name} is fixed at compile time (compiled with {getattr(self, name)!r}, "
                    f"requested {value!r}); recompile with export=True to change it."
                )

    def load_options_for(self, name: str) -> dict[str, Any]:
        """The `rbln_config` to load component `name` with (self: the options given at load): the
        pipeline-wide runtime options the user set, then that component's own (its class refuses
        compile-time ones that differ from what was compiled)."""
        explicit = self.explicit_options()
        options = {key: explicit[key] for key in ("create_runtimes", "activate_profiler") if key in explicit}
        options.update(self.requested.get(name, {}))
        return options

    # --- JSON ---------------------------------------------------------------------------------

    def to_json_dict(self) -> dict[str, Any]:
        runtime = ("create_runtimes", "activate_profiler")
        return {
            "cls_name": self.pipeline_name,
            "config_cls": type(self).__name__,
            "optimum_npu_version": package_version(),
            "compile_options": {n: _to_json(getattr(self, n)) for n in PIPELINE_OPTIONS if n not in runtime},
            "runtime_options": {},   # chosen at each load, never saved (see optimum_npu/configuration.py)
            "components": {name: c.to_json_dict() for name, c in self.components.items() if c is not None},
            # What the user set per component at export (it wins over what the pipeline derives): a load
            # re-derives each component's options from the pipeline's and checks them (check_components).
            "requested": {name: {k: _to_json(v) for k, v in options.items()} for name, options in self.requested.items()},
        }

    def save(self, folder: str | os.PathLike, files: Mapping[str, Any] | None = None) -> str:
        """Write `folder/rbln_config.json` (pipeline options, each component's config nested, and `files`:
        the manifest of the folder's other files, see `modeling/folder.py`)."""
        path = os.path.join(folder, CONFIG_NAME)
        data = self.to_json_dict() if files is None else {**self.to_json_dict(), "files": dict(files)}
        write_file_atomically(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike, components: Mapping[str, RBLNModelConfig],
             runtime_options: Mapping[str, Any]) -> Self:
        """The pipeline config saved in `folder` with the user's `runtime_options` (saved ones
        describe the export machine), and `components` (each loaded from its own subfolder,
        which is what runs) checked against the nested copies."""
        path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {CONFIG_NAME} in {os.fspath(folder)!r}: not a compiled pipeline folder. "
                                    "To compile a diffusers pipeline, pass export=True.")
        data = read_json_object(path)
        for key, kind in (("config_cls", str), ("compile_options", dict), ("components", dict)):
            if not isinstance(data.get(key), kind):
                raise ValueError(f"{path} is malformed: {key!r} must be a {kind.__name__}; got {data.get(key)!r}")
        if data["config_cls"] != cls.__name__:
            raise ValueError(f"{path} holds a {data['config_cls']}, not a {cls.__name__}: it is another pipeline")
        options = {**data["compile_options"], **runtime_options}
        check_option_names(cls.__name__, options, PIPELINE_OPTIONS, prefix="", where=f"in {path}")
        nested = data["components"]
        if set(nested) != set(components):
            raise ValueError(f"{path}: 'components' must list {sorted(components)}; got {nested!r}")
        for name, config in components.items():
            saved = nested[name].get("compile_options") if isinstance(nested[name], dict) else None
            if saved != {k: _to_json(v) for k, v in config.compile_options.items()}:
                raise ValueError(
                    f"{path} and {name}/{CONFIG_NAME} disagree on {name}'s compile options: the folder was edited "
                    "or mixed from two pipelines; compile it again (export=True)."
                )
        requested = data.get("requested", {})
        if not isinstance(requested, dict) or not all(
                name in components and isinstance(value, dict) for name, value in requested.items()):
            raise ValueError(f"{path} is malformed: 'requested' must map components to their options; got {requested!r}")
        for name, value in requested.items():
            components[name]._check_option_names(value, prefix="", where=f"in {path} (requested[{name!r}])")
        try:
            return cls(**options, **components, requested=requested)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{path}: {err}") from None

    def check_components(self, models: Mapping[str, Any], loaded: list[str]) -> None:
        """ValueError unless each component in `loaded` was compiled with the options this pipeline
        config gives it (what `resolved` would give: the shared options, what the pipeline derives,
        what the user asked for that component). Catches pipeline-wide options edited in the file
        (height, batch, npu, dtype, a guidance_scale that changes the UNet batch)."""
        derived = self._component_options(models)
        shared = {name: getattr(self, name) for name in SHARED_OPTIONS}
        for name in loaded:
            compiled = self.components[name].compile_options
            expected = {**shared, **derived.get(name, {}), **self.requested.get(name, {})}
            for key, value in expected.items():
                if key in compiled and _to_json(value) != _to_json(compiled[key]):
                    raise ValueError(
                        f"{CONFIG_NAME} of this pipeline gives {name} {key}={_to_json(value)!r}, but {name} was compiled "
                        f"with {_to_json(compiled[key])!r}: the folder was edited or mixed from two pipelines; compile "
                        "it again (export=True).")
