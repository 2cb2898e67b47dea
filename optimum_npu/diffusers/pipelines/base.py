"""`RBLNDiffusionPipelineMixin`: a diffusers pipeline whose models are compiled components.

A pipeline class is the diffusers pipeline class plus this mixin and three pieces of data:
its config class (one sub-config per compiled component), which RBLN class compiles each
component, and which pipeline-wide options each component receives. diffusers' own
`__call__` runs unchanged on the compiled components, which expose what it touches.

- `from_pretrained(folder_or_id, export=True, rbln_config=...)` loads each part of a diffusers
  folder (allowlisted libraries only: the folder is data), compiles the models, keeps tokenizers,
  schedulers and feature extractors on the host;
- `save_pretrained(folder)` writes a diffusers folder: one subfolder per component (a compiled one
  with its config.json, rbln_config.json and .rbln files), `model_index.json` naming our classes,
  and `rbln_config.json` with the pipeline options and every component's config nested;
- `from_pretrained(compiled_folder)` loads it back without compiling; keyword arguments named
  after a component replace it (`safety_checker=my_checker`), as in diffusers.

After each call, `generation_stats` holds the simulated device time of each component (calls,
time per call) and of the whole generation.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ...configuration import CONFIG_NAME
from ...untrusted_files import read_json_object
from ...modeling.base import RBLNModel
from ...modeling.hf_files import hub_kwargs_of, resolve_folder
from ...modeling.hf_files import concrete_class, refuse_remote_code
from ...modeling.folder import MODEL_INDEX, check_manifest, load_lock, manifest_of, save_tree
from ...sim_device.files import write_file_atomically
from ...sim_device.stats import memory_summary
from ..configuration import RBLNDiffusionPipelineConfig

logger = logging.getLogger(__name__)

# Files of a Hub pipeline repository that loading never reads (single-file checkpoints, other
# weight variants and frameworks), so that a snapshot fetches only the diffusers folders.
HUB_FILES_NOT_NEEDED = ["*.ckpt", "*.pt", "*.pth", "*.fp16.*", "*non_ema*", "*.ema.*", "*.msgpack", "*.onnx",
                        "*.onnx_data", "*.pb", "*.h5", "*.ot", "*.mlmodel*", "*.gguf"]
# Libraries a model_index.json may name for a host component, and the module holding their
# classes: a folder from anywhere never chooses which module gets imported.
HOST_LIBRARIES = {
    "diffusers": "diffusers",
    "transformers": "transformers",
    "stable_diffusion": "diffusers.pipelines.stable_diffusion",
}


@dataclass
class ComponentStats:
    """Simulated device time of one component over one pipeline call."""

    calls: int | None = 0          # None: a compound part (the guardrail) reports time only
    device_s: float = 0.0

    @property
    def per_call_s(self) -> float:
        return self.device_s / self.calls if self.calls else 0.0


@dataclass
class PipelineStats:
    """Simulated time of one generation, per component, and the host wall time for comparison."""

    components: dict[str, ComponentStats] = field(default_factory=dict)
    denoising_steps: int = 0
    denoiser: str = ""
    host_s: float = 0.0

    @property
    def device_s(self) -> float:
        return sum(c.device_s for c in self.components.values())

    @property
    def per_step_s(self) -> float:
        """Simulated denoiser time of one denoising step (all its calls: CFG may call it twice)."""
        denoiser = self.components.get(self.denoiser)
        return denoiser.device_s / self.denoising_steps if denoiser and self.denoising_steps else 0.0

    def __str__(self) -> str:
        # The denoiser's calls, not "steps": a scheduler may call it more often than num_inference_steps
        # (PNDM: once more), and Cosmos calls it twice per step (conditional and unconditional).
        denoiser = self.components.get(self.denoiser)
        calls = f"{denoiser.calls} {self.denoiser} call(s)" if denoiser and denoiser.calls is not None else "no denoiser"
        lines = [f"simulated generation: {self.device_s * 1e3:.3f} ms on the device ({calls}); "
                 f"host wall time {self.host_s:.2f} s"]
        for name, c in self.components.items():
            calls = f"{c.calls:>4} call(s) x {c.per_call_s * 1e3:10.3f} ms" if c.calls is not None else " " * 28
            lines.append(f"  {name:<15} {calls} = {c.device_s * 1e3:10.3f} ms")
        return "\n".join(lines)


def _device_clock(component) -> tuple[int | None, float]:
    """(runs, simulated seconds) so far: of a compiled model's runtimes, or of a compound part
    that reports its own `simulated_time_s` per sub-model (the guardrail; runs unknown: None);
    (0, 0.0) for host-only parts (tokenizer, scheduler)."""
    runtimes = getattr(component, "runtimes", None)
    if isinstance(runtimes, dict):
        stats = [r.stats for r in runtimes.values()]
        return sum(s.runs for s in stats), sum(s.total_s for s in stats)
    per_part = getattr(component, "simulated_time_s", None)
    if isinstance(per_part, dict):
        return None, float(sum(per_part.values()))
    return 0, 0.0


class RBLNDiffusionPipelineMixin:
    """Mixed in before the diffusers pipeline class: `class P(RBLNDiffusionPipelineMixin, SDPipeline)`."""

    config_class: ClassVar[type[RBLNDiffusionPipelineConfig]]
    rbln_classes: ClassVar[dict[str, type[RBLNModel]]]   # compiled component -> its RBLN class
    denoiser: ClassVar[str]                              # the component the steps call

    @classmethod
    def _get_signature_types(cls) -> dict[str, tuple[type, ...]]:
        """diffusers' component types by __init__ argument (`from_pipe` passes on a `ModelMixin` only of
        exactly such a type), with the RBLN class of each compiled component in place of the class it compiles."""
        return {**super()._get_signature_types(), **{name: (c,) for name, c in cls.rbln_classes.items()}}

    # ---- loading ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_id: str | os.PathLike, export: bool = False, **kwargs: Any):
        hub_kwargs = hub_kwargs_of(kwargs, pop=True)
        folder = resolve_folder(model_id, {**hub_kwargs, "ignore_patterns": HUB_FILES_NOT_NEEDED})
        init_names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        given = {name: kwargs.pop(name) for name in list(kwargs) if name in init_names}  # e.g. safety_checker=
        config, leftover = cls.config_class.from_kwargs(kwargs)
        if leftover:
            raise TypeError(f"{cls.__name__}.from_pretrained() got unexpected arguments {sorted(leftover)}; "
                            f"components are {sorted(init_names)}, options are rbln_* or rbln_config")
        if export:
            return cls._export(folder, cls._read_model_index(folder), config, given)
        with load_lock(folder):   # every file read while no save moves files in (a re-save finishes first)
            return cls._load_compiled(folder, cls._read_model_index(folder), config, given)

    @classmethod
    def _read_model_index(cls, folder: Path) -> dict[str, Any]:
        path = folder / MODEL_INDEX
        if not path.is_file():
            raise ValueError(f"{folder} is not a diffusers pipeline folder (no {MODEL_INDEX})")
        return read_json_object(path)

    @classmethod
    def _components_in(cls, index: dict[str, Any], given: Any = ()) -> dict[str, tuple[str | None, str | None]]:
        """{component: (library, class name)} of a model_index.json, checked for shape; a compiled component
        in `given` (the user's, e.g. a ControlNet beside a Stable Diffusion folder) need not be in it."""
        init_names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        components = {}
        for name, value in index.items():
            if name.startswith("_") or not isinstance(value, list):
                continue
            if name not in init_names:
                raise ValueError(f"{MODEL_INDEX} names a component {name!r} that {cls.__name__} does not take "
                                 f"({sorted(init_names)})")
            if len(value) != 2 or not all(v is None or isinstance(v, str) for v in value):
                raise ValueError(f"{MODEL_INDEX}: component {name!r} must be [library, class name]; got {value!r}")
            components[name] = (value[0], value[1])
        missing = [name for name in cls.rbln_classes if name not in components and name not in given]
        if missing:
            raise ValueError(f"{MODEL_INDEX} lacks the component(s) {missing} that {cls.__name__} compiles")
        return components

    @classmethod
    def _init_options(cls, index: dict[str, Any]) -> dict[str, Any]:
        """Plain options of the pipeline's __init__ saved in model_index.json (requires_safety_checker)."""
        init_names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        return {k: v for k, v in index.items() if k in init_names and isinstance(v, bool)}

    @staticmethod
    def _load_host_component(folder: Path, name: str, library: str, class_name: str):
        """A tokenizer / scheduler / feature extractor / host model, from an allowlisted library."""
        module_name = HOST_LIBRARIES.get(library)
        if module_name is None:
            raise ValueError(f"{MODEL_INDEX}: component {name!r} comes from library {library!r}; loadable host "
                             f"components come from {sorted(HOST_LIBRARIES)}")
        component_class = concrete_class(importlib.import_module(module_name), class_name,
                                         f"{MODEL_INDEX}: component {name!r}")
        refuse_remote_code(folder / name)
        return component_class.from_pretrained(folder / name)

    @classmethod
    def _load_parts(cls, folder: Path, components: dict, given: dict, compiled: bool) -> dict[str, Any]:
        """Every host component (compiled ones are the caller's), the user's ones replacing them."""
        parts = {}
        for name, (library, class_name) in components.items():
            if name in given or name in cls.rbln_classes:
                continue
            if library is None or class_name is None:
                parts[name] = None
            elif name == "safety_checker" and hasattr(cls, "_load_safety_checker"):
                parts[name] = cls._load_safety_checker(folder / name, class_name, compiled=compiled)
            else:
                parts[name] = cls._load_host_component(folder, name, library, class_name)
        return parts

    @classmethod
    def _export(cls, folder: Path, index: dict, config: RBLNDiffusionPipelineConfig, given: dict):
        components = cls._components_in(index, given)
        models = {}
        for name, rbln_class in cls.rbln_classes.items():
            if name in given:   # the user's model, compiled in place of the folder's (as diffusers takes controlnet=)
                if not isinstance(given[name], rbln_class.hf_class) or isinstance(given[name], rbln_class):
                    raise ValueError(f"{name}= at export must be a {rbln_class.hf_class.__name__} to compile (export=True "
                                     f"compiles it with {rbln_class.__name__}); got a {type(given[name]).__name__}")
                models[name] = given.pop(name)
                continue
            _, class_name = components[name]
            if class_name != rbln_class.hf_class.__name__:
                raise ValueError(f"{MODEL_INDEX}: {name} is a {class_name}; {cls.__name__} compiles a "
                                 f"{rbln_class.hf_class.__name__} there")
            refuse_remote_code(folder / name)
            models[name] = rbln_class.hf_class.from_pretrained(folder / name)
        parts = cls._load_parts(folder, components, given, compiled=False)
        cls._check_parts({**parts, **given})  # before compiling anything
        config, compiled = cls._compile_components({**parts, **given, **models}, config)
        return cls._assemble({**parts, **given, **compiled}, config, cls._init_options(index))

    @classmethod
    def _compile_components(cls, models: dict[str, Any], config: RBLNDiffusionPipelineConfig):
        """(final config, {component: compiled model}) from the loaded parts (`models`: the torch
        modules to compile and what the pipeline reads to derive options, like the tokenizer)."""
        config = config.resolved(models)
        compiled = {name: rbln_class.from_model(models[name], rbln_config=getattr(config, name))
                    for name, rbln_class in cls.rbln_classes.items()}
        return dataclasses.replace(config, **{name: m.rbln_config for name, m in compiled.items()}), compiled

    @classmethod
    def compile_components(cls, models: dict[str, Any], **kwargs: Any) -> dict[str, RBLNModel]:
        """Compile the pipeline's components from modules in memory, without assembling a pipeline:
        e.g. on the meta device (with rbln_create_runtimes=False) to size and place a large
        configuration (see `optimum_npu.diffusers.placement`). `models` holds each compiled
        component's torch module and what the options are derived from (Stable Diffusion: the tokenizer)."""
        config, leftover = cls.config_class.from_kwargs(kwargs)
        if leftover:
            raise TypeError(f"compile_components() got unexpected arguments {sorted(leftover)}; options are rbln_*")
        missing = [name for name in cls.rbln_classes if name not in models]
        if missing:
            raise ValueError(f"compile_components() needs the module of {missing}")
        return cls._compile_components(dict(models), config)[1]

    @classmethod
    def _load_compiled(cls, folder: Path, index: dict, requested: RBLNDiffusionPipelineConfig, given: dict):
        components = cls._components_in(index)
        if not (folder / CONFIG_NAME).is_file():
            raise ValueError(f"{folder} is a diffusers pipeline, not a compiled one (no {CONFIG_NAME}); compile it "
                             f"with {cls.__name__}.from_pretrained(..., export=True)")
        check_manifest(folder, needed=[MODEL_INDEX])
        parts = cls._load_parts(folder, components, given, compiled=True)
        cls._check_parts({**parts, **given})
        compiled = {}
        from_folder = [name for name in cls.rbln_classes if name not in given]
        for name, rbln_class in cls.rbln_classes.items():
            if name in given:
                compiled[name] = given.pop(name)
                continue
            _, class_name = components[name]
            if class_name != rbln_class.__name__:
                raise ValueError(f"{MODEL_INDEX}: {name} is a {class_name}, not the {rbln_class.__name__} that "
                                 f"{cls.__name__} loads; recompile with export=True")
            options = requested.load_options_for(name)
            compiled[name] = rbln_class.from_pretrained(folder / name, rbln_config=options)
        runtime = {k: getattr(requested, k) for k in ("create_runtimes", "activate_profiler")}
        config = cls.config_class.load(folder, {n: m.rbln_config for n, m in compiled.items()}, runtime)
        config.check_components({**parts, **given, **compiled}, loaded=from_folder)
        config.check_load_options(requested)
        return cls._assemble({**parts, **given, **compiled}, config, cls._init_options(index))

    @classmethod
    def _check_parts(cls, parts: dict[str, Any]) -> None:
        """Refuse host parts the pipeline cannot run with (before any compiling or device loading)."""

    @classmethod
    def _assemble(cls, parts: dict[str, Any], config: RBLNDiffusionPipelineConfig, init_options: dict):
        return cls._with_config(cls(**parts, **init_options), config)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs: Any):
        """diffusers' `from_pipe`: a pipeline of this class sharing `pipeline`'s components (not copies),
        with its compiled options, which must be ones this class compiles (an image-to-image pipeline
        needs the VAE encoder: a text-to-image pipeline compiled without it is refused)."""
        config = cls._config_for_pipe(pipeline)
        if not isinstance(config, cls.config_class):
            raise ValueError(f"{cls.__name__}.from_pipe() takes a compiled pipeline whose options are a "
                             f"{cls.config_class.__name__}; got a {type(pipeline).__name__}: compile the pipeline "
                             f"with {cls.__name__}.from_pretrained(..., export=True)")
        replaced = sorted(name for name in cls.rbln_classes if name in kwargs)
        if replaced:
            raise ValueError(f"from_pipe() cannot replace the compiled component(s) {replaced}: load the compiled "
                             f"pipeline with them instead ({cls.__name__}.from_pretrained(folder, {replaced[0]}=...))")
        return cls._with_config(super().from_pipe(pipeline, **kwargs), config)

    @classmethod
    def _config_for_pipe(cls, pipeline):
        """The compiled options `from_pipe` gives the new pipeline: `pipeline`'s own by default; a
        family whose pipelines share components (text-to-image / image-to-image) converts them."""
        return getattr(pipeline, "rbln_config", None)

    @classmethod
    def _with_config(cls, pipe, config: RBLNDiffusionPipelineConfig):
        pipe.rbln_config = config
        pipe.generation_stats = PipelineStats(denoiser=cls.denoiser)
        return pipe

    # ---- saving -------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> str:
        """Write the compiled pipeline as a diffusers folder; returns its path.

        As a compiled model is saved (`modeling/folder.py`): a new (or empty) folder appears whole or
        not at all; a folder holding this same compiled pipeline is updated file by file,
        `model_index.json` and `rbln_config.json` (with the manifest of every file) last, never
        through a link. Any other non-empty folder is refused, a compiled pipeline of another class
        too (saving there would mix two models in one folder): nothing of it is touched.
        """
        return str(save_tree(save_directory, self._write_pipeline, self._check_save_target))

    def _check_save_target(self, target: Path) -> None:
        if not target.is_dir() or not any(target.iterdir()):
            return
        if not ((target / MODEL_INDEX).is_file() and (target / CONFIG_NAME).is_file()):
            raise ValueError(f"Cannot save into {target}: it is not empty and not a compiled pipeline folder. "
                             "Save into a new or empty folder.")
        try:
            saved = read_json_object(target / CONFIG_NAME).get("cls_name")
        except (OSError, ValueError):
            saved = None   # a damaged save of ours: replaced
        if saved is not None and saved != self.rbln_config.pipeline_name:
            raise ValueError(f"Cannot save into {target}: it holds a compiled {saved}, not a "
                             f"{self.rbln_config.pipeline_name}; saving there would mix two models in one folder. "
                             "Save into a new or empty folder.")

    def _write_pipeline(self, folder: Path) -> None:
        unsaved = []
        for name, component in self.components.items():
            if component is None:
                continue
            if hasattr(component, "save_pretrained"):
                component.save_pretrained(folder / name)
            else:
                unsaved.append(name)
        self.save_config(folder)          # model_index.json, naming our classes
        if unsaved:  # e.g. a user's own safety checker: recorded as absent, to be passed again at load
            index = read_json_object(folder / MODEL_INDEX)
            index.update({name: [None, None] for name in unsaved})
            write_file_atomically(folder / MODEL_INDEX, (json.dumps(index, indent=2) + "\n").encode("utf-8"))
            logger.warning("%s not saved (no save_pretrained): pass it again when loading the pipeline",
                           ", ".join(unsaved))
        self.rbln_config.save(folder, files=manifest_of(folder))     # last: the manifest of every file

    # ---- running ------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        clocks = {name: _device_clock(c) for name, c in self.components.items()}
        started = time.perf_counter()
        output = super().__call__(*args, **kwargs)
        stats = PipelineStats(denoiser=self.denoiser, host_s=time.perf_counter() - started,
                              denoising_steps=getattr(self, "_num_timesteps", 0) or 0)
        for name, component in self.components.items():
            runs, seconds = _device_clock(component)
            (runs_before, seconds_before) = clocks[name]
            if runs is None:
                if seconds > seconds_before:
                    stats.components[name] = ComponentStats(None, seconds - seconds_before)
            elif runs > runs_before:
                stats.components[name] = ComponentStats(runs - runs_before, seconds - seconds_before)
        self.generation_stats = stats
        logger.info("%s\n%s", type(self).__name__, stats)
        return output

    def to(self, *args, **kwargs):
        """diffusers' `to` (host torch components move or cast), once every compiled component accepted the
        move: a ValueError leaves all components as they were (diffusers moves them one by one)."""
        move = {k: v for k, v in kwargs.items() if k in ("device", "dtype")}
        for name in self.rbln_classes:
            getattr(self, name).to(*args, **move)
        return super().to(*args, **kwargs)

    def _call_arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The arguments of this call of diffusers' `__call__` (of the pipeline class after the mixins) by
        name, defaults included."""
        call = inspect.signature(super(RBLNDiffusionPipelineMixin, self).__call__).bind(*args, **kwargs)
        call.apply_defaults()
        return call.arguments

    def enable_model_cpu_offload(self, *args, **kwargs):
        raise ValueError(self._offload_refusal("enable_model_cpu_offload"))

    def enable_sequential_cpu_offload(self, *args, **kwargs):
        raise ValueError(self._offload_refusal("enable_sequential_cpu_offload"))

    def enable_group_offload(self, *args, **kwargs):
        raise ValueError(self._offload_refusal("enable_group_offload"))

    def _offload_refusal(self, method: str) -> str:
        # diffusers' offloading moves a model's weights to the accelerator for each call (accelerate's
        # hooks read them from `parameters()`); a compiled component has no host weights to move.
        return (f"{type(self).__name__}.{method}(): the compiled components ({', '.join(self.rbln_classes)}) keep "
                "their weights in NPU memory and have none on the host to offload; choose their devices with "
                "rbln_config={<component>: {'device': ...}} and see pipe.memory_summary()")

    def device_memory(self) -> dict[str, list]:
        """Device memory each compiled component holds, per device (`DeviceMemoryUsage`); a compound
        part with its own sub-models (the compiled guardrail) is listed per sub-model."""
        found = {name: self.components[name].device_memory() for name in self.rbln_classes}
        for name, component in self.components.items():
            per_part = getattr(component, "device_memory", None) if name not in self.rbln_classes else None
            usages = per_part() if callable(per_part) else None
            if isinstance(usages, dict):
                found.update({f"{name}.{part}": usage for part, usage in usages.items()})
        return found

    def memory_summary(self) -> str:
        lines = []
        for name, usages in self.device_memory().items():
            where = memory_summary(usages) or "no runtimes"
            lines.append(f"  {name:<34} {where}")
        return "device memory per component:\n" + "\n".join(lines)
