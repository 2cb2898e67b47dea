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

Pipeline-wide options (the fields of `RBLNDiffusionPipelineConfig`) go to every component that needs them, turned into
what that component compiles for (pixels -> latents through the VAE's compression, a CFG
pipeline's doubled denoiser batch, the tokenizer's length -> the encoder's and the denoiser's
sequence length). A component's own options win over what the pipeline derives. Each
component's `device`, `tensor_parallel_size`, `create_runtimes`, `activate_profiler` are its own.

The nesting is `RBLNModelConfig`'s (`submodule(...)` fields, see optimum_npu/configuration.py);
what is the pipeline's own here is which options exist and how they turn into each component's.

Compile-time options are fixed at load: `from_pretrained(compiled_folder, rbln_height=...)` with
another value than compiled is an error, while runtime options (`device`, `create_runtimes`,
`activate_profiler`, per component or pipeline-wide) may change at every load.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from ..configuration import CONFIG_NAME, OPTION_PREFIX, RBLNModelConfig, _to_json, check_int, submodule

# Pipeline-wide options every component receives (unless its own options set them); the others are
# turned into each component's own options by the pipeline's `_component_options`.
SHARED_OPTIONS = ("npu", "dtype", "numerics", "create_runtimes", "activate_profiler", "cache")
# RBLNModelConfig options that belong to one component, never to the whole pipeline.
PER_COMPONENT_OPTIONS = ("tensor_parallel_size", "device")


def component(config_class: type[RBLNModelConfig]) -> Any:
    """Declare a compiled component of a pipeline config, with the config class of its options."""
    return submodule(config_class)


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
class RBLNDiffusionPipelineConfig(RBLNModelConfig):
    """Options of a compiled pipeline. Subclasses declare their components with `component(...)`.

    Before export the component fields hold what the user asked for each component (built from
    their options only; `submodule_options` keeps exactly which options they set); `resolved(...)`
    turns them into the complete configs each component is compiled with.
    """

    # --- pipeline-wide compile-time options (None: the pipeline's default, or derived) ---
    height: int | None = None           # pixels
    width: int | None = None
    num_frames: int | None = None       # video pipelines: frames of the generated video
    fps: int | None = None              # deprecated (Cosmos: a call-time argument); accepted with a warning
    max_seq_len: int | None = None      # prompt tokens (the tokenizer pads to it)
    guidance_scale: float | None = None  # > 1: classifier-free guidance

    broadcast_options: ClassVar[tuple[str, ...]] = SHARED_OPTIONS
    # The pipeline class this config belongs to (e.g. "RBLNStableDiffusionPipeline").
    pipeline_name: ClassVar[str] = ""

    def _validate(self) -> None:
        super()._validate()
        for name in PER_COMPONENT_OPTIONS:
            if getattr(self, name) != RBLNModelConfig.__dataclass_fields__[name].default:
                raise ValueError(
                    f"{OPTION_PREFIX}{name} is a component's option, not the pipeline's: set it per component, e.g. "
                    f"rbln_config={{{next(iter(self.submodule_classes()), 'unet')!r}: {{{name!r}: ...}}}}")
        for name in ("height", "width", "num_frames", "fps", "max_seq_len"):
            check_int(name, getattr(self, name), allow_none=True)
        if self.guidance_scale is not None and (
            isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float))
        ):
            raise TypeError(f"{OPTION_PREFIX}guidance_scale must be a number; got {self.guidance_scale!r}")
        if self.pipeline_name:   # the pipeline class (a config converted by from_pipe carries the other's)
            self._set("cls_name", self.pipeline_name)

    # --- names ------------------------------------------------------------------------------

    @classmethod
    def component_classes(cls) -> dict[str, type[RBLNModelConfig]]:
        """The compiled components and the config class of each, e.g. {"unet": RBLNUNet2DConditionModelConfig}."""
        return cls.submodule_classes()

    @property
    def components(self) -> dict[str, RBLNModelConfig]:
        return self.submodules

    # --- resolving: what each component is compiled with ---------------------------------

    def _pipeline_defaults(self, models: Mapping[str, Any]) -> dict[str, Any]:
        """Values for the pipeline-wide options left at None, from the loaded components
        (`models`: name -> torch module, tokenizer, scheduler). Per pipeline."""
        return {}

    def _component_options(self, models: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Each component's options derived from the (filled) pipeline-wide ones. Per pipeline."""
        raise NotImplementedError

    def _options_of(self, name: str, derived: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        """What component `name` is compiled with: the shared pipeline-wide options (every one, set or
        default), what the pipeline derives for it, the user's own options for it (which win)."""
        shared = {key: getattr(self, key) for key in self.broadcast_options}
        return {**shared, **self.options_for_submodule(name, derived.get(name, {}))}

    def resolved(self, models: Mapping[str, Any]) -> Self:
        """The config with every option decided: pipeline-wide ones left open filled from the
        components, then each component's options: the shared pipeline-wide ones, what the
        pipeline derives for it, and the user's own options for it (which win)."""
        defaults = {k: v for k, v in self._pipeline_defaults(models).items() if getattr(self, k) is None}
        filled = dataclasses.replace(self, **defaults)
        derived = filled._component_options(models)
        components = {}
        for name, config_class in self.component_classes().items():
            try:
                components[name] = config_class(**filled._options_of(name, derived))
            except (TypeError, ValueError) as err:
                raise type(err)(f"{name}: {err}") from None
        return dataclasses.replace(filled, **components)

    # --- loading: compile-time options are fixed ----------------------------------------------

    def check_load_options(self, requested: Self) -> None:
        """ValueError if `requested` (from load kwargs) changes a pipeline-wide compile-time option."""
        pipeline_wide = {k: v for k, v in requested.explicit_options().items() if k not in self.component_classes()}
        self.with_runtime_options(**pipeline_wide)

    def load_options_for(self, name: str) -> dict[str, Any]:
        """The `rbln_config` to load component `name` with (self: the options given at load): the
        pipeline-wide runtime options the user set, then that component's own (its class refuses
        compile-time ones that differ from what was compiled)."""
        runtime = set(self.runtime_option_names())
        inherited = {k: v for k, v in self.options_for_submodule(name).items() if k in runtime}
        return {**inherited, **self.submodule_options.get(name, {})}

    @classmethod
    def load(cls, folder: str | os.PathLike, components: Mapping[str, RBLNModelConfig] | None = None,
             runtime_options: Mapping[str, Any] | None = None) -> Self:
        """The pipeline config saved in `folder` with the user's `runtime_options` (saved ones
        describe the export machine), and `components` (each loaded from its own subfolder,
        which is what runs) checked against the nested copies."""
        path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No {CONFIG_NAME} in {os.fspath(folder)!r}: not a compiled pipeline folder. "
                                    "To compile a diffusers pipeline, pass export=True.")
        saved = cls.read_json(folder).get("config_cls")
        if saved != cls.__name__:
            raise ValueError(f"{path} holds a {saved}, not a {cls.__name__}: it is another pipeline")
        components = dict(components or {})
        config = super().load(folder, components)
        missing = [name for name, sub in config.components.items() if sub is None]
        if components and missing:
            raise ValueError(f"{path}: 'components' must list {sorted(cls.component_classes())}; lacks {missing}")
        return config.with_runtime_options(**(runtime_options or {}))

    def check_components(self, models: Mapping[str, Any], loaded: list[str]) -> None:
        """ValueError unless each component in `loaded` was compiled with the options this pipeline
        config gives it (what `resolved` would give: the shared options, what the pipeline derives,
        what the user asked for that component). Catches pipeline-wide options edited in the file
        (height, batch, npu, dtype, a guidance_scale that changes the UNet batch)."""
        derived = self._component_options(models)
        for name in loaded:
            compiled = self.components[name].compile_options
            for key, value in self._options_of(name, derived).items():
                if key in compiled and _to_json(value) != _to_json(compiled[key]):
                    raise ValueError(
                        f"{CONFIG_NAME} of this pipeline gives {name} {key}={_to_json(value)!r}, but {name} was compiled "
                        f"with {_to_json(compiled[key])!r}: the folder was edited or mixed from two pipelines; compile "
                        "it again (export=True).")
