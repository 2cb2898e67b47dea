"""`RBLNModel`: what every RBLN model class shares, whatever the model.

- `from_pretrained(id_or_path, export=True, rbln_*=...)` compiles a Hugging Face checkpoint;
  `from_pretrained(compiled_folder)` loads a compiled folder without recompiling;
  `from_model(hf_model, rbln_*=...)` compiles a model already in memory.
- `save_pretrained(folder)` writes the `.rbln` graphs, `rbln_config.json`, the HF config,
  generation config and tokenizer files, atomically; `push_to_hub` uploads that folder.

A subclass says which HF class it wraps (`hf_class`), which config class holds its options
(`config_class`), how to compile (`_compile(hf_model, rbln_config)` -> named graphs) and
how to run (`_create_runtimes`). Nothing here assumes a decoder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from ..compile import CompiledModel
from ..configuration import CONFIG_NAME, RBLNModelConfig
from ..sim_device import Artifact, Runtime

MODEL_REGISTRY: dict[str, type[RBLNModel]] = {}

# Files from the source checkpoint that travel with the compiled model.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


# from_pretrained kwargs that say where on the Hub to look, not how to build the model.
HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only")


def hub_kwargs_of(kwargs: dict, pop: bool = False) -> dict:
    return {k: (kwargs.pop(k) if pop else kwargs[k]) for k in HUB_KWARGS if k in kwargs}


def _resolve_folder(model_id: str | os.PathLike, hub_kwargs: dict) -> Path:
    """A local folder as is; a Hub id through the standard cache (works offline from the cache)."""
    path = Path(model_id)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(model_id), **hub_kwargs))


def is_compiled_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


class RBLNModel:
    hf_class: ClassVar[type | None] = None
    config_class: ClassVar[type[RBLNModelConfig]] = RBLNModelConfig
    graph_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        MODEL_REGISTRY[cls.__name__] = cls

    def __init__(self, hf_config, rbln_config: RBLNModelConfig, graphs: dict[str, Artifact],
                 source_folder: Path | None = None, generation_config=None):
        self.config = hf_config
        self.rbln_config = rbln_config
        self.graphs = graphs
        self.generation_config = generation_config
        self._source_folder = source_folder
        self.runtimes: dict[str, Runtime] = {}
        if rbln_config.create_runtimes:
            self.runtimes = self._create_runtimes()

    # ---- to be provided by a model family -------------------------------------------

    @classmethod
    def _compile(cls, hf_model, rbln_config: RBLNModelConfig) -> tuple[RBLNModelConfig, dict[str, CompiledModel]]:
        """Compile the graphs of `hf_model`; returns the final config and the graphs by name."""
        raise NotImplementedError

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

    # ---- loading and exporting ------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_id: str | os.PathLike, export: bool = False, **kwargs: Any):
        hub_kwargs = hub_kwargs_of(kwargs, pop=True)
        if export:
            config, hf_kwargs = cls.config_class.from_kwargs(kwargs)
            hf_model = cls._load_hf_model(model_id, {**hub_kwargs, **hf_kwargs})
            # The checkpoint folder (local, or the Hub snapshot HF just used) has the tokenizer files.
            return cls._from_hf_model(hf_model, config, source_folder=_resolve_folder(model_id, hub_kwargs))
        folder = _resolve_folder(model_id, hub_kwargs)
        if not is_compiled_folder(folder):
            raise ValueError(
                f"{model_id} is not a compiled model folder (no {CONFIG_NAME}). "
                f"To compile a Hugging Face checkpoint, call {cls.__name__}.from_pretrained(..., export=True)."
            )
        return cls._from_compiled(folder, kwargs)

    @classmethod
    def from_model(cls, hf_model, **kwargs: Any):
        """Compile a transformers / diffusers model that is already in memory."""
        config, leftover = cls.config_class.from_kwargs(kwargs)
        if leftover:
            raise TypeError(f"from_model() got unexpected arguments {sorted(leftover)}; options are rbln_*")
        return cls._from_hf_model(hf_model, config, source_folder=None)

    @classmethod
    def _load_hf_model(cls, model_id, hf_kwargs: dict):
        if cls.hf_class is None:
            raise TypeError(f"{cls.__name__} cannot export: it has no hf_class")
        return cls.hf_class.from_pretrained(model_id, **hf_kwargs)

    @classmethod
    def _from_hf_model(cls, hf_model, config: RBLNModelConfig, source_folder: Path | None):
        hf_model.eval()
        config, graphs = cls._compile(hf_model, config)
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
        if config.cls_name != cls.__name__ and not cls._accepts(config.cls_name):
            raise ValueError(
                f"{folder} was compiled for {config.cls_name}, not {cls.__name__}: load it with {config.cls_name} "
                "(or an RBLNAuto class), or recompile with export=True."
            )
        graphs = {}
        for name in config.graphs:
            graphs[name] = Artifact.load(folder / f"{name}.rbln")
        hf_config, generation_config = cls._load_hf_configs(folder)
        return cls(hf_config, config, graphs, source_folder=folder, generation_config=generation_config)

    @classmethod
    def _accepts(cls, compiled_cls_name: str | None) -> bool:
        return False

    @classmethod
    def _load_hf_configs(cls, folder: Path):
        from transformers import AutoConfig, GenerationConfig

        hf_config = AutoConfig.from_pretrained(folder)
        try:
            generation_config = GenerationConfig.from_pretrained(folder)
        except OSError:
            generation_config = GenerationConfig.from_model_config(hf_config)
        return hf_config, generation_config

    # ---- saving ---------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write the compiled model; the folder appears whole or not at all."""
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        try:
            for name, graph in self.graphs.items():
                graph.save(staging / f"{name}.rbln", external=self._external_tensors(name))
            self.rbln_config.save(staging)
            self.config.save_pretrained(staging)
            if self.generation_config is not None:
                self.generation_config.save_pretrained(staging)
            if self._source_folder is not None:
                for filename in TOKENIZER_FILES:
                    if (self._source_folder / filename).is_file():
                        shutil.copy2(self._source_folder / filename, staging / filename)
            if target.exists():
                backup = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, backup)
                os.replace(staging, target)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return str(target)

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
