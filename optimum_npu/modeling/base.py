"""`RBLNModel`: what every RBLN model class shares, whatever the model.

- `from_pretrained(id_or_path, export=True, rbln_*=...)` compiles a Hugging Face checkpoint;
  `from_pretrained(compiled_folder)` loads a compiled folder without recompiling;
  `from_model(hf_model, rbln_*=...)` compiles a model already in memory.
- `save_pretrained(folder)` writes the `.rbln` graphs, `rbln_config.json`, the HF config,
  generation config and tokenizer files; `push_to_hub` uploads that folder.

Saving touches only the files of the compiled model, never anything else in the folder, and
never writes through a link; `rbln_config.json` lists every other file with its size and sha256
(the manifest), and loading checks it, so a load never runs a half-written or mixed folder.
How (staging folder, renames, locks) is `modeling/folder.py`, shared with pipelines and the checker.

A model family says which HF class it wraps (`hf_class`), which config class holds its options
(`config_class`), its graphs as data (`_graph_specs` -> `GraphSpec`s: name, input specs, the
module to export) and how to turn graph outputs back into the HF output class (`forward`).
A single-graph family only gives `_input_info` and `_export_module`; the base compiles,
saves, loads, creates runtimes, runs (padding a smaller batch, splitting a larger one:
`_run_graph`), and keeps the simulated stats of the last call (`inference_stats`).
Nothing here assumes a decoder. What is transformers-specific is the config I/O
(`_read_hf_config`, `_load_hf_configs`, `_save_hf_configs`): the adapter a diffusers
component overrides.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..compile import CompiledModel, compile_from_torch
from ..compile.progress import nested, track
from ..configuration import CONFIG_NAME, InputInfo, RBLNModelConfig, check_plain_name
from ..sim_device import Artifact, Runtime
from ..sim_device.stats import DeviceMemoryUsage, memory_summary, sum_memory
from .folder import (check_manifest, check_relative_path, check_save_target, is_compiled_folder, load_lock, manifest_of, read_file_below,
                     save_tree, staging_folders)
from .hf_files import MAX_SOURCE_FILE_BYTES, SOURCE_FILES, auto_class_from_pretrained, hub_kwargs_of, resolve_folder
from .registry import MODEL_REGISTRY, model_class_named, model_classes

@dataclass(frozen=True)
class GraphSpec:
    """One graph of a model, as data: its name (the file `<name>.rbln`), its inputs as
    (name, shape, dtype) triples in the order `module.forward` takes them, and the torch module
    that torch.export traces."""

    name: str
    input_info: tuple[InputInfo, ...]
    module: torch.nn.Module


@dataclass
class InferenceStats:
    """Simulated device performance of the last call of a model (all its compiled-size runs)."""

    samples: int = 0                 # rows of the call (images, sequences)
    compiled_batch_size: int = 0
    runs: int = 0                    # graph runs: padded or split batches
    device_s: float = 0.0            # simulated time of all runs
    host_s: float = 0.0              # wall time on this host, for comparison only
    unit: str = "samples"
    memory: list[DeviceMemoryUsage] = field(default_factory=list)

    @property
    def latency_s(self) -> float:
        """Simulated time of one compiled-size batch."""
        return self.device_s / self.runs if self.runs else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.device_s if self.device_s else 0.0

    def __str__(self) -> str:
        memory = memory_summary(self.memory)
        return (
            f"{self.samples} {self.unit} in {self.runs} run(s) of batch {self.compiled_batch_size}: "
            f"{self.latency_s * 1e3:.3f} ms per batch, {self.samples_per_s:.1f} {self.unit}/s (simulated) | "
            f"device memory: {memory} | host wall time {self.host_s * 1e3:.1f} ms"
        )


class RBLNModel:
    hf_class: ClassVar[type | None] = None
    config_class: ClassVar[type[RBLNModelConfig]] = RBLNModelConfig
    graph_name: ClassVar[str] = "model"            # the graph of a single-graph model
    main_input_name: ClassVar[str] = "input_ids"   # what transformers pipelines feed
    input_modalities: ClassVar[tuple[str, ...]] = ("text",)  # what a transformers pipeline's repr() shows
    stats_unit: ClassVar[str] = "samples"          # what a row of the batch is, in the stats

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        MODEL_REGISTRY[cls.__name__] = cls

    def __init__(self, hf_config, rbln_config: RBLNModelConfig, graphs: dict[str, Artifact],
                 source_folder: Path | None = None, generation_config=None):
        super().__init__()  # cooperative: a torch.nn.Module subclass (the diffusers models) sets up its state
        self._keep_hf_config(hf_config)
        self.rbln_config = rbln_config
        self.graphs = graphs
        self.generation_config = generation_config
        self._source_folder = source_folder
        self.inference_stats = InferenceStats(unit=self.stats_unit)
        self.runtimes: dict[str, Runtime] = {}
        if rbln_config.create_runtimes:
            self.runtimes = self._create_runtimes()

    # ---- to be provided by a model family -------------------------------------------

    @classmethod
    def _resolve_config(cls, hf_model, rbln_config: RBLNModelConfig, source_folder: Path | None) -> RBLNModelConfig:
        """The config with every option the user left open decided (from the HF model, or the
        checkpoint folder's files), checked against the model. Default: as given."""
        return rbln_config

    @classmethod
    def _graph_specs(cls, hf_model, rbln_config: RBLNModelConfig) -> list[GraphSpec]:
        """The graphs to compile. Default: one graph, `graph_name`, from the two hooks below."""
        module = cls._export_module(hf_model, rbln_config)
        return [GraphSpec(cls.graph_name, tuple(cls._input_info(hf_model.config, rbln_config)), module)]

    @classmethod
    def _input_info(cls, hf_config, rbln_config: RBLNModelConfig) -> list[InputInfo]:
        """(name, shape, dtype) of each input of the single graph, from the options."""
        raise NotImplementedError(f"{cls.__name__} gives neither _graph_specs nor _input_info")

    @classmethod
    def _export_module(cls, hf_model, rbln_config: RBLNModelConfig) -> torch.nn.Module:
        """The module torch.export traces for the single graph: takes the inputs of `_input_info`
        positionally, returns tensors."""
        raise NotImplementedError(f"{cls.__name__} gives neither _graph_specs nor _export_module")

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward")

    def _create_runtimes(self) -> dict[str, Runtime]:
        """Default: one runtime per graph, each on its own; models with shared state override."""
        return {
            name: Runtime(graph, device=self.rbln_config.device, activate_profiler=self.rbln_config.activate_profiler,
                          name=f"{type(self).__name__}.{name}")
            for name, graph in self.graphs.items()
        }

    def _external_tensors(self, graph_name: str) -> tuple[str, ...]:
        """Tensors of `graph_name` stored in another graph's file (weights are written once)."""
        return ()

    # ---- compiling ------------------------------------------------------------------

    @classmethod
    def _compile(cls, hf_model, rbln_config: RBLNModelConfig, source_folder: Path | None = None,
                 ) -> tuple[RBLNModelConfig, dict[str, CompiledModel]]:
        """Compile the graphs of `hf_model`; returns the final config and the graphs by name."""
        with nested():   # e.g. a decoder's memory probe compiles a graph: part of this model's compile
            rbln_config = cls._resolve_config(hf_model, rbln_config, source_folder)
        specs = cls._graph_specs(hf_model, rbln_config)
        graphs = {}
        for spec in track(specs, f"Compiling {cls.__name__}", "graph", label=lambda spec: spec.name):
            check_plain_name("a graph name", spec.name)
            graphs[spec.name] = compile_from_torch(
                spec.module, input_info=list(spec.input_info), npu=rbln_config.npu, dtype=rbln_config.dtype,
                numerics=rbln_config.numerics, tensor_parallel_size=rbln_config.tensor_parallel_size,
                cache=rbln_config.cache,
            )
        return rbln_config, graphs

    # ---- running --------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        """Where inputs go and outputs come from, for HF code: the host (the device is simulated)."""
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of float outputs (fp32, cast back from the device's 16-bit type)."""
        return torch.float32

    def to(self, *args, **kwargs):
        """`model.to(device, dtype)` as torch and HF pipelines call it: the host (cpu) in float32 is where a
        compiled model already takes and returns tensors, so that is a no-op; anything else is a ValueError,
        since the device (rbln_device) and its number format (rbln_dtype) are chosen at load / compile time."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        kwargs.pop("non_blocking", None)
        if kwargs or len(args) > 2:
            raise TypeError(f"{type(self).__name__}.to() takes a device and / or a dtype; got {args} {kwargs}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, torch.Tensor):
                device, dtype = arg.device, arg.dtype
            elif arg is not None:
                device = arg
        if device is not None:
            try:
                device_type = torch.device(device).type
            except (RuntimeError, TypeError):
                raise ValueError(f"{type(self).__name__}.to(): {device!r} is not a torch device") from None
            if device_type != self.device.type:
                raise ValueError(
                    f"{type(self).__name__}.to({str(device)!r}): a compiled model runs on the simulated NPU and takes and "
                    "returns tensors on the host ('cpu'); choose its NPU with rbln_device when loading")
        if dtype is not None and dtype != self.dtype:
            raise ValueError(
                f"{type(self).__name__}.to({dtype}): a compiled model takes and returns {self.dtype} on the host; "
                f"its device computes in rbln_dtype={self.rbln_config.dtype!r}, fixed at compile time (recompile "
                "with export=True and rbln_dtype=... to change it)")
        return self

    @classmethod
    def can_generate(cls) -> bool:
        return False

    def _run_graph(self, name: str, inputs: list[torch.Tensor], shared: tuple[torch.Tensor, ...] = ()
                   ) -> tuple[torch.Tensor, ...]:
        """Run graph `name` on `inputs` (batch first) of any number of rows: a smaller batch than
        compiled is padded (with copies of its last row) and sliced back, a larger one split into
        compiled-size runs. `shared` inputs have no batch dimension (the same for every row, e.g.
        positional tables computed on the host) and follow `inputs` in every run. Records the call
        in `inference_stats`."""
        runtime = self._runtime(name)
        compiled = runtime.program.inputs[0].shape[0]
        rows = inputs[0].shape[0]
        if rows == 0 or any(t.shape[0] != rows for t in inputs):
            raise ValueError(f"the inputs must have the same number of rows (>= 1); got {[tuple(t.shape) for t in inputs]}")
        started, device_s, pieces = time.perf_counter(), 0.0, []
        with runtime.timeline.lock:  # the runs of one call back to back, and their times ours alone
            for start in range(0, rows, compiled):
                chunk = [t[start : start + compiled] for t in inputs]
                valid = chunk[0].shape[0]
                if valid < compiled:
                    chunk = [torch.cat([t, t[-1:].expand(compiled - valid, *t.shape[1:])]) for t in chunk]
                out = runtime.run(*chunk, *shared)
                device_s += runtime.stats.last_run_s
                pieces.append([o[:valid] for o in (out if isinstance(out, tuple) else (out,))])
        outputs = tuple(torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*pieces))
        self.inference_stats = InferenceStats(
            samples=rows, compiled_batch_size=compiled, runs=len(pieces), device_s=device_s,
            host_s=time.perf_counter() - started, unit=self.stats_unit, memory=self.device_memory(),
        )
        return outputs

    def device_memory(self) -> list[DeviceMemoryUsage]:
        """Device memory per device, summed over this model's runtimes."""
        return sum_memory(m for runtime in self.runtimes.values() for m in runtime.stats.memory)

    def save_trace(self, path: str | os.PathLike = "trace.json") -> str:
        """The profiler trace of everything this model ran (needs rbln_activate_profiler=True)."""
        return self._runtime(next(iter(self.graphs))).save_trace(path)

    # ---- loading and exporting ------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_id: str | os.PathLike, export: bool = False, **kwargs: Any):
        hub_kwargs = hub_kwargs_of(kwargs, pop=True)
        # The folder first (local, or the Hub snapshot): a clear error for a bad path, and for an
        # export the checkpoint folder the tokenizer files come from.
        folder = resolve_folder(model_id, hub_kwargs)
        if export:
            if cls.hf_class is None:  # a generic class: the family class of the checkpoint's model_type
                family = cls._family_for(cls._read_hf_config(folder, {}))
                return family.from_pretrained(model_id, export=True, **hub_kwargs, **kwargs)
            config, hf_kwargs = cls.config_class.from_kwargs(kwargs)
            if config.create_runtimes:   # before loading weights, which may take minutes
                config.check_devices_exist()
            hf_model = cls._load_hf_model(model_id, {**hub_kwargs, **hf_kwargs}, config)
            return cls._from_hf_model(hf_model, config, source_folder=folder)
        if not is_compiled_folder(folder):
            raise ValueError(cls._not_compiled_message(folder, model_id))
        with load_lock(folder):   # every file read while no save moves files in (a re-save finishes first)
            return cls._from_compiled(folder, kwargs)

    @classmethod
    def _not_compiled_message(cls, folder: Path, model_id) -> str:
        if any(p.parent == folder for p in staging_folders(folder)):
            return (f"{model_id} holds no complete compiled model: a save into it was interrupted (no {CONFIG_NAME} "
                    "yet). Save the model again.")
        if (folder / "config.json").is_file():
            return (f"{model_id} is a Hugging Face checkpoint, not a compiled model (no {CONFIG_NAME}). To compile "
                    f"it, call {cls.__name__}.from_pretrained(..., export=True).")
        return (f"{model_id} is not a compiled model folder (no {CONFIG_NAME}). To compile a Hugging Face "
                f"checkpoint, call {cls.__name__}.from_pretrained(..., export=True).")

    @classmethod
    def from_model(cls, hf_model, **kwargs: Any):
        """Compile a transformers / diffusers model that is already in memory."""
        if cls.hf_class is None and getattr(hf_model, "config", None) is not None:
            return cls._family_for(hf_model.config).from_model(hf_model, **kwargs)
        config, leftover = cls.config_class.from_kwargs(kwargs)
        if leftover:
            raise TypeError(f"from_model() got unexpected arguments {sorted(leftover)}; options are rbln_*")
        return cls._from_hf_model(hf_model, config, source_folder=None)

    @classmethod
    def _load_hf_model(cls, model_id, hf_kwargs: dict, config: RBLNModelConfig):
        cls._check_before_loading(model_id, hf_kwargs)
        return cls.hf_class.from_pretrained(model_id, **hf_kwargs)

    @classmethod
    def _check_before_loading(cls, model_id, hf_kwargs: dict) -> None:
        """Checks that need no weights, run before loading them (which may take minutes)."""
        if cls.hf_class is None:
            raise TypeError(f"{cls.__name__} cannot export: it has no hf_class")
        cls._check_model_type(cls._read_hf_config(model_id, hub_kwargs_of(hf_kwargs)))

    @classmethod
    def _read_hf_config(cls, model_id, hub_kwargs: dict):
        from transformers import AutoConfig

        return auto_class_from_pretrained(AutoConfig, resolve_folder(model_id, hub_kwargs))

    @classmethod
    def _family_for(cls, hf_config) -> type[RBLNModel]:
        """The class that compiles `hf_config`: `cls` itself, or for a generic class (no hf_class)
        its registered subclass of that model_type; ValueError naming the supported ones."""
        cls._check_model_type(hf_config)
        return cls if cls.hf_class is not None else cls._model_types()[hf_config.model_type]

    @classmethod
    def _model_types(cls) -> dict[str, type[RBLNModel]]:
        """HF model_type -> class, for the checkpoints this class compiles: its hf_class's, or for a
        generic class without one (e.g. the decoder-only base), those of its registered subclasses."""
        classes = [cls] if cls.hf_class is not None else [c for c in model_classes() if issubclass(c, cls)]
        # The first class of a model_type serves it (e.g. CLIPTextModel before its WithProjection variant).
        found: dict[str, type[RBLNModel]] = {}
        for c in classes:
            if c.hf_model_type() is not None:
                found.setdefault(c.hf_model_type(), c)
        return found

    @classmethod
    def hf_model_type(cls) -> str | None:
        """The transformers model_type of `hf_class` (None for a class without one, e.g. diffusers models)."""
        return getattr(getattr(cls.hf_class, "config_class", None), "model_type", None)

    @classmethod
    def _check_model_type(cls, hf_config) -> None:
        """ValueError unless `hf_config` is of this class's family (another family's weights would be
        silently dropped or left random)."""
        model_type = getattr(hf_config, "model_type", None)
        accepted = cls._model_types()
        if model_type in accepted:
            return
        serving = sorted(c.__name__ for c in model_classes(model_type)) if isinstance(model_type, str) else []
        advice = f"use {' or '.join(serving)}" if serving else "no RBLN class supports it yet"
        raise ValueError(
            f"{cls.__name__} compiles model_type {' / '.join(sorted(accepted)) or '(none)'}, but this checkpoint "
            f"has model_type {model_type!r}: {advice}."
        )

    @classmethod
    def _from_hf_model(cls, hf_model, config: RBLNModelConfig, source_folder: Path | None):
        cls._check_model_type(hf_model.config)
        if cls.hf_class is not None and not isinstance(hf_model, cls.hf_class):
            raise ValueError(
                f"{cls.__name__} compiles {cls.hf_class.__name__} models, got a {type(hf_model).__name__}; "
                "use the RBLN class of its family, or an RBLNAuto class."
            )
        if config.create_runtimes:
            config.check_devices_exist()
        hf_model.eval()
        config, graphs = cls._compile(hf_model, config, source_folder)
        config = config.with_compiled(
            cls_name=cls.__name__,
            graphs={name: [(s.name, list(s.shape), s.dtype) for s in g.program.inputs] for name, g in graphs.items()},
        )
        generation_config = getattr(hf_model, "generation_config", None)
        return cls(hf_model.config, config, graphs, source_folder=source_folder, generation_config=generation_config)

    @classmethod
    def _from_compiled(cls, folder: Path, kwargs: dict):
        config, leftover = cls.config_class.from_compiled(folder, kwargs)
        if leftover:
            raise TypeError(f"unexpected arguments {sorted(leftover)} when loading a compiled model; options are rbln_*")
        # The class it was compiled for, or one of its subclasses when loaded by a generic class.
        target = model_class_named(config.cls_name) if isinstance(config.cls_name, str) else None
        if target is None or not issubclass(target, cls):
            raise ValueError(
                f"{folder} was compiled for {config.cls_name}, not {cls.__name__}: load it with {config.cls_name} "
                "(or an RBLNAuto class), or recompile with export=True."
            )
        if config.create_runtimes:
            config.check_devices_exist()
        graph_files = {name: f"{name}.rbln" for name in config.graphs}  # plain names: checked by the config
        # A model with sub-models (a VLM's language model) keeps them in sub-folders, listed in its manifest.
        check_manifest(folder, needed=[*graph_files.values(), "config.json"], nested=bool(config.submodule_classes()))
        hf_config, generation_config = target._load_hf_configs(folder)
        target._check_model_type(hf_config)
        graphs = {name: Artifact.load(folder / filename) for name, filename in graph_files.items()}
        target._check_graphs_against_config(config, graphs, hf_config)
        config, parts = target._load_submodels(folder, config)
        return target(hf_config, config, graphs, source_folder=folder, generation_config=generation_config, **parts)

    @classmethod
    def _load_submodels(cls, folder: Path, config: RBLNModelConfig) -> tuple[RBLNModelConfig, dict[str, Any]]:
        """A model made of several compiled models loads the others here (from its sub-folders): returns the
        config with their sub-configs and the keyword arguments its __init__ takes them as. None by default."""
        return config, {}

    @classmethod
    def _check_graphs_against_config(cls, config: RBLNModelConfig, graphs: dict[str, Artifact], hf_config=None) -> None:
        """ValueError if rbln_config.json says something the `.rbln` programs contradict.

        Generic checks: each graph's recorded inputs (names, shapes, dtypes) and the compile
        options every program records (npu, dtype, numerics, tensor parallelism); for a
        single-graph model, that its graph takes the inputs its options imply (`_input_info`).
        A multi-graph family overrides this to check its own options too, calling super() first.
        """
        try:  # a single-graph family: its options say what the graph takes
            expected = {cls.graph_name: [tuple(i) for i in cls._input_info(hf_config, config)]} if hf_config else None
        except NotImplementedError:
            expected = None  # a multi-graph family checks its own options (overriding this)
        if expected is not None:
            actual = {name: [(s.name, tuple(s.shape), s.dtype) for s in graphs[name].program.inputs]
                      for name in expected if name in graphs}
            if actual != expected:
                raise ValueError(
                    f"{CONFIG_NAME} implies the graph {expected} from its options, but the folder holds {actual}. "
                    "The folder was edited or mixed from two models; compile the model again (export=True)."
                )
        for name, artifact in graphs.items():
            program = artifact.program
            recorded = {
                "inputs": list(config.graphs[name]),
                "npu": config.npu, "dtype": config.dtype, "numerics": config.numerics,
                "tensor_parallel_size": config.tensor_parallel_size,
            }
            actual = {
                "inputs": [(s.name, tuple(s.shape), s.dtype) for s in program.inputs],
                "npu": program.npu, "dtype": program.device_dtype, "numerics": program.numerics,
                "tensor_parallel_size": program.tensor_parallel_size,
            }
            for key in recorded:
                if recorded[key] != actual[key]:
                    raise ValueError(
                        f"{CONFIG_NAME} contradicts {name}.rbln: {key} is {recorded[key]!r} in {CONFIG_NAME} but "
                        f"{actual[key]!r} in the program. The folder was edited or mixed from two models; "
                        "compile the model again (export=True)."
                    )

    @classmethod
    def _load_hf_configs(cls, folder: Path):
        from transformers import AutoConfig, GenerationConfig

        hf_config = auto_class_from_pretrained(AutoConfig, folder)
        generation_config = None
        if (folder / "generation_config.json").is_file():
            generation_config = GenerationConfig.from_pretrained(folder)
        elif cls.can_generate():
            generation_config = GenerationConfig.from_model_config(hf_config)
        return hf_config, generation_config

    # ---- saving ---------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, *, exist_ok: bool = False) -> str:
        """Write the compiled model into `save_directory`; returns its path.

        Only the files of the compiled model are written (graphs, rbln_config.json, config.json,
        generation_config.json, tokenizer / image processor files); other files in the folder are left alone. A new
        folder appears whole or not at all; in an existing one, a load sees the previous model
        until the last rename, and an error (never a mix) if the save is cut short in between.

        A compiled model folder is updated in place. A folder holding a checkpoint's weights or
        other files is refused unless `exist_ok=True` (its other files are kept either way);
        a file is always refused.
        """
        return str(save_tree(save_directory, self._write_files, lambda target: check_save_target(target, exist_ok)))

    def _write_files(self, folder: Path) -> None:
        """Every file of the compiled model into the (empty, new) `folder`, the manifest last."""
        for name, graph in self.graphs.items():
            check_plain_name("a graph name", name)
            graph.save(folder / f"{name}.rbln", external=self._external_tensors(name))
        self._save_hf_configs(folder)
        if self._source_folder is not None:
            for filename in SOURCE_FILES:
                if (self._source_folder / filename).is_file():   # never through a link out of the checkpoint
                    (folder / filename).write_bytes(read_file_below(
                        self._source_folder, filename, MAX_SOURCE_FILE_BYTES, what="tokenizer or processor file"))
        # The usual permissions (0o666 minus the umask, as for the folder itself): some writers
        # create files 0o600 (tempfile.mkstemp) or copy the source's mode.
        mode = folder.stat().st_mode & 0o666
        manifest = manifest_of(folder)
        for name in manifest:
            check_relative_path("a saved file name", name)
            os.chmod(folder / name, mode)
        self.rbln_config.save(folder, files=manifest)

    def _keep_hf_config(self, hf_config) -> None:
        """`config`: the source model's config, which HF code reads (a diffusers model keeps it as its ConfigMixin)."""
        self.config = hf_config

    def _save_hf_configs(self, folder: Path) -> None:
        """The source model's config files: config.json (and generation_config.json) as transformers
        writes them, and `_load_hf_configs` reads them; a diffusers model writes its own config.json."""
        self.config.save_pretrained(folder)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(folder)

    def push_to_hub(self, repo_id: str, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload compiled model", **kwargs) -> str:
        """Upload the compiled folder with the standard Hub API; returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model")
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, **kwargs)

    def close(self) -> None:
        """Free the device memory the runtimes hold; the model cannot run afterwards."""
        for runtime in self.runtimes.values():
            runtime.close()
        self.runtimes = {}
        self._closed = True

    def _runtime(self, name: str) -> Runtime:
        if not self.runtimes:
            if getattr(self, "_closed", False):
                raise RuntimeError("This model was closed (its device memory was freed); load it again to run it.")
            raise RuntimeError(
                "This model has no runtimes (rbln_create_runtimes=False): it can be saved but not run. "
                "Load it again with rbln_create_runtimes=True."
            )
        return self.runtimes[name]

    def __repr__(self) -> str:
        devices = sorted({d for r in self.runtimes.values() for d in r.devices})
        return f"{type(self).__name__}(graphs={list(self.graphs)}, npu={self.rbln_config.npu}, devices={devices})"
