"""`RBLNCosmosSafetyChecker`: the Cosmos guardrail with its networks compiled to the NPU.

The object diffusers' Cosmos pipelines call (`check_text_safety(prompt) -> bool`,
`check_video_safety(frames) -> frames`, `to()`, `device`, `dtype`), made of four guardrails run
in the upstream order:

    text:  Blocklist -> LlamaGuard3 (guard LLM)          a prompt is refused by the first that fires
           -> Qwen3Guard (optional, upstream's newer text guard: rbln_config={"qwen3guard": {...}})
    video: VideoContentSafetyFilter (SigLIP + MLP)       an unsafe video is replaced by black frames
           RetinaFaceFilter                              faces are blurred in every frame

Each network is a compiled model of its own, with its own options and devices:

    checker = RBLNCosmosSafetyChecker.from_pretrained(
        "guardrail-checkpoint", export=True,
        rbln_config={"npu": "RBLN-CA25",                          # broadcast to every sub-model
                     # Llama-Guard-3-8B in bf16 is 16 GB: more than one 16 GiB device holds
                     "llamaguard3": {"tensor_parallel_size": 2, "device": [0, 1], "max_seq_len": 2048},
                     "siglip_encoder": {"device": 2}, "video_safety_model": {"device": 2},
                     "face_blur_filter": {"device": 3, "image_size": (704, 1280), "batch_size": 4}})
    checker.save_pretrained("compiled-guardrail")
    checker = RBLNCosmosSafetyChecker.from_pretrained("compiled-guardrail")   # no recompilation

Folder layout (the upstream checkpoint's, so an upstream checkpoint compiles as is, and the
compiled folder mirrors it):

    blocklist/{custom,exact_match,whitelist}/*     keyword lists (data)
    llamaGuard3/                                   guard LLM: HF checkpoint | compiled decoder
    video_content_safety_filter/siglip_encoder/    SigLIP: HF checkpoint | compiled
    video_content_safety_filter/safety_filter/     frame classifier: ours | compiled
    face_blur_filter/                              RetinaFace: ours | compiled
    rbln_config.json                               (compiled folder only) the checker's options

Upstream, the frame classifier is `video_content_safety_filter/safety_filter.pt`, the detector
`face_blur_filter/Resnet50_Final.pth` (both read with `torch.load(weights_only=True)`), and the
guard LLM and SigLIP are downloaded from the Hub (meta-llama/Llama-Guard-3-8B,
google/siglip-so400m-patch14-384) into `llamaGuard3/` and `video_content_safety_filter/` as
Hub caches: an export reads that layout too.

A part can be switched off (`blocklist=False`, `guard_llm=False`, `video_filter=False`,
`face_blur=False`, as `rbln_*` kwargs or `rbln_config` keys); that is logged as a warning, and
a part left out at export is not compiled (it cannot be switched on at load). A compiled folder
missing a part it was saved with (its folder deleted or replaced by a file) does not load unless
that part is switched off explicitly at load (`rbln_guard_llm=False`, ...): the opt-out, logged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..configuration import CONFIG_KWARG, CONFIG_NAME, OPTION_PREFIX, RBLNModelConfig, check_bool, check_choice, \
    check_int, runtime_option, submodule
from ..modeling.decoderonly.configuration_decoderonly import RBLNDecoderOnlyModelForCausalLMConfig
from ..modeling.hf_files import HUB_KWARGS, hub_kwargs_of, resolve_folder
from ..modeling.hf_files import auto_class_from_pretrained, refuse_remote_code
from ..modeling.folder import check_manifest, load_lock, manifest_of, save_tree
from .blocklist import Blocklist
from .face_blur import BLUR_METHODS, CONFIDENCE_THRESHOLD, UPSTREAM_CHECKPOINT, RBLNRetinaFace, RBLNRetinaFaceConfig, \
    RetinaFaceFilter
from .guard_llm import DEFAULT_MODEL_ID as GUARD_MODEL_ID
from .guard_llm import RBLNLlamaGuard3
from .qwen3guard import DEFAULT_MODEL_ID as QWEN3GUARD_MODEL_ID
from .qwen3guard import RBLNQwen3Guard
from .video_filter import (
    DEFAULT_FRAME_STRIDE,
    DEFAULT_SIGLIP_ID,
    UPSTREAM_SAFETY_FILTER,
    RBLNSiglipVisionModel,
    RBLNSiglipVisionModelConfig,
    RBLNVideoSafetyModel,
    RBLNVideoSafetyModelConfig,
    VideoContentSafetyFilter,
    check_video_frames,
)

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = "nvidia/Cosmos-Guardrail1"
# Sub-model (its rbln_config key) -> its folder, in the source checkpoint and the compiled folder alike.
SUBMODEL_FOLDERS = {
    "llamaguard3": "llamaGuard3",
    "siglip_encoder": "video_content_safety_filter/siglip_encoder",
    "video_safety_model": "video_content_safety_filter/safety_filter",
    "face_blur_filter": "face_blur_filter",
    "qwen3guard": "qwen3guard",
}
# Sub-models whose upstream checkpoint is a single PyTorch file (read with weights_only=True).
UPSTREAM_FILES = {"video_safety_model": f"video_content_safety_filter/{UPSTREAM_SAFETY_FILTER}",
                  "face_blur_filter": f"face_blur_filter/{UPSTREAM_CHECKPOINT}"}
# Sub-models the upstream guardrail downloads from the Hub: (model id, cache folder in the checkpoint).
HUB_MODELS = {"llamaguard3": (GUARD_MODEL_ID, "llamaGuard3"),
              "siglip_encoder": (DEFAULT_SIGLIP_ID, "video_content_safety_filter"),
              "qwen3guard": (QWEN3GUARD_MODEL_ID, "qwen3guard")}
BLOCKLIST_FOLDER = "blocklist"
# Guardrail (its on/off option) -> the sub-models it needs.
PART_SUBMODELS = {"blocklist": (), "guard_llm": ("llamaguard3",),
                  "video_filter": ("siglip_encoder", "video_safety_model"), "face_blur": ("face_blur_filter",),
                  "qwen3guard_llm": ("qwen3guard",)}
# Guardrails off unless asked for (upstream's newer text guard, beside Llama-Guard-3): not warned about when off.
OPTIONAL_PARTS = ("qwen3guard_llm",)
# Checker options passed on to every sub-model unless its own sub-config sets them.
BROADCAST_OPTIONS = ("npu", "dtype", "numerics", "create_runtimes", "activate_profiler", "device")
VIDEO_SUBMODELS = ("siglip_encoder", "video_safety_model", "face_blur_filter")   # batch_size goes to these
UNSAFE_VIDEO_ACTIONS = ("black", "raise")
PROMPT_REFUSED = "the prompt was refused by the"   # how `last_report` starts after a refused prompt


class UnsafePromptError(ValueError):
    """A prompt refused by a text guardrail; the message names it."""


class UnsafeVideoError(ValueError):
    """A video refused by the video guardrail (with on_unsafe_video="raise")."""


@dataclass(frozen=True, kw_only=True)
class RBLNCosmosSafetyCheckerConfig(RBLNModelConfig):
    """The checker's own options, and one sub-config per network (`submodule` fields, named as in
    `SUBMODEL_FOLDERS`). npu / dtype / numerics / create_runtimes / activate_profiler / device are
    passed on to every sub-model, batch_size to the video ones (frames per run); each sub-model's
    `rbln_config[<name>]` sets its own."""

    broadcast_options: ClassVar[tuple[str, ...]] = BROADCAST_OPTIONS
    # The guard LLM's family (Llama, Qwen, ...) is read from its checkpoint: any decoder's config.
    llamaguard3: RBLNDecoderOnlyModelForCausalLMConfig | None = submodule(RBLNDecoderOnlyModelForCausalLMConfig)
    siglip_encoder: RBLNSiglipVisionModelConfig | None = submodule(RBLNSiglipVisionModelConfig)
    video_safety_model: RBLNVideoSafetyModelConfig | None = submodule(RBLNVideoSafetyModelConfig)
    face_blur_filter: RBLNRetinaFaceConfig | None = submodule(RBLNRetinaFaceConfig)
    qwen3guard: RBLNDecoderOnlyModelForCausalLMConfig | None = submodule(RBLNDecoderOnlyModelForCausalLMConfig)

    blocklist: bool = runtime_option(True)          # the keyword guardrail
    guard_llm: bool = runtime_option(True)          # the guard LLM (LlamaGuard3)
    video_filter: bool = runtime_option(True)       # SigLIP + safety classifier on sampled frames
    face_blur: bool = runtime_option(True)          # RetinaFace + blur in every frame
    qwen3guard_llm: bool = runtime_option(False)    # Qwen3Guard-Gen after the guard LLM (on with a qwen3guard sub-config)
    blur_method: str = runtime_option("pixelate")   # "pixelate" (upstream) | "gaussian"
    frame_stride: int = runtime_option(DEFAULT_FRAME_STRIDE)   # check every n-th frame (and the last)
    face_confidence: float = runtime_option(CONFIDENCE_THRESHOLD)
    on_unsafe_video: str = runtime_option("black")  # "black": replace every frame; "raise": UnsafeVideoError
    raise_on_unsafe_prompt: bool = runtime_option(False)   # check_text_safety raises UnsafePromptError

    # Which guardrails a saved folder holds: recorded, so that a load can tell a part switched off at
    # export from one whose folder went missing (see `_without_parts_not_compiled`).
    recorded_runtime_options: ClassVar[tuple[str, ...]] = tuple(PART_SUBMODELS)

    def _validate(self) -> None:
        super()._validate()
        for part in PART_SUBMODELS:
            check_bool(part, getattr(self, part))
        check_bool("raise_on_unsafe_prompt", self.raise_on_unsafe_prompt)
        check_choice("blur_method", self.blur_method, BLUR_METHODS)
        check_choice("on_unsafe_video", self.on_unsafe_video, UNSAFE_VIDEO_ACTIONS)
        check_int("frame_stride", self.frame_stride)
        if isinstance(self.face_confidence, bool) or not isinstance(self.face_confidence, (int, float)) or not (
                0.0 <= self.face_confidence < 1.0):
            raise ValueError(f"{OPTION_PREFIX}face_confidence must be a number in [0, 1); got {self.face_confidence!r}")

    def enabled_submodels(self) -> list[str]:
        return [name for part, names in PART_SUBMODELS.items() if getattr(self, part) for name in names]

    def derived_submodule_options(self, name: str) -> dict:
        """The checker's batch_size (frames per run) for the video networks."""
        if name in VIDEO_SUBMODELS and "batch_size" in self.explicit_options():
            return {"batch_size": self.batch_size}
        return {}


def _part_folders(part: str) -> list[str]:
    """The folders of a compiled checker that hold guardrail `part`."""
    return [SUBMODEL_FOLDERS[n] for n in PART_SUBMODELS[part]] or [BLOCKLIST_FOLDER]


class RBLNCosmosSafetyChecker:
    """The Cosmos guardrail on the simulated NPU (see the module docstring)."""

    def __init__(self, config: RBLNCosmosSafetyCheckerConfig, blocklist: Blocklist | None,
                 guard_llm: RBLNLlamaGuard3 | None, video_filter: VideoContentSafetyFilter | None,
                 face_filter: RetinaFaceFilter | None, qwen3guard: RBLNQwen3Guard | None = None):
        self.rbln_config = config
        self.blocklist = blocklist
        self.guard_llm = guard_llm
        self.video_filter = video_filter
        self.face_filter = face_filter
        self.qwen3guard = qwen3guard
        self.last_report = ""     # what the last check found, naming the guardrail that fired
        off = [part for part in PART_SUBMODELS if not getattr(config, part) and part not in OPTIONAL_PARTS]
        if off:
            logger.warning("Cosmos guardrail: %s switched off: not checked", ", ".join(off))

    # ---- building -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, model_id: str | os.PathLike = DEFAULT_CHECKPOINT, export: bool = False,
                        **kwargs: Any) -> RBLNCosmosSafetyChecker:
        """Compile a guardrail checkpoint (export=True) or load a compiled checker folder."""
        hub_kwargs = hub_kwargs_of(kwargs, pop=True)
        own = kwargs.get(CONFIG_KWARG)
        given = own.explicit_options() if isinstance(own, RBLNModelConfig) else dict(own or {}) if isinstance(
            own, dict) else {}
        asked = {**given, **{k.removeprefix(OPTION_PREFIX): v for k, v in kwargs.items()
                             if k.startswith(OPTION_PREFIX)}}
        if "qwen3guard" in asked and "qwen3guard_llm" not in asked:   # its sub-config asks for it
            asked["qwen3guard_llm"] = kwargs[f"{OPTION_PREFIX}qwen3guard_llm"] = True
        folder = resolve_folder(model_id, hub_kwargs)
        if export:
            return cls._build(folder, model_id, kwargs, asked, export, hub_kwargs)
        with load_lock(folder):   # every file read while no save moves files in (a re-save finishes first)
            return cls._build(folder, model_id, kwargs, asked, export, hub_kwargs)

    @classmethod
    def _build(cls, folder: Path, model_id, kwargs: dict, asked: dict, export: bool,
               hub_kwargs: dict) -> RBLNCosmosSafetyChecker:
        """The checker compiled from the checkpoint `folder` (export), or loaded from the compiled one."""
        if export:
            config, leftover = RBLNCosmosSafetyCheckerConfig.from_kwargs(kwargs)
        else:
            if not (folder / CONFIG_NAME).is_file():
                raise ValueError(f"{model_id} is not a compiled Cosmos guardrail folder (no {CONFIG_NAME}); to compile "
                                 "a guardrail checkpoint, pass export=True")
            config, leftover = RBLNCosmosSafetyCheckerConfig.from_compiled(folder, kwargs)
            if config.cls_name != cls.__name__:
                raise ValueError(f"{folder} holds a compiled {config.cls_name}, not a {cls.__name__}")
            config = cls._without_parts_not_compiled(folder, config, asked)
        if leftover:
            raise TypeError(f"unexpected arguments {sorted(leftover)}; options are rbln_* or {CONFIG_KWARG}={{...}}, "
                            f"hub arguments {', '.join(HUB_KWARGS)}")
        options = {name: config.options_for_submodule(name) for name in SUBMODEL_FOLDERS}
        for name in SUBMODEL_FOLDERS:  # before compiling or loading anything: no folder of it names code to run
            if (folder / SUBMODEL_FOLDERS[name]).is_dir():
                refuse_remote_code(folder / SUBMODEL_FOLDERS[name])
        if config.create_runtimes:
            config.check_devices_exist()
        if not export:   # the files of parts switched off at load (the opt-out) are not read, nor checked
            check_manifest(folder, needed=[], skip=tuple(f for part in PART_SUBMODELS if not getattr(config, part)
                                                         for f in _part_folders(part)))
        parts = cls._load_parts(folder, config, options, export, hub_kwargs)
        if export:
            config = config.with_compiled(cls_name=cls.__name__, graphs={})
        checker = cls(config, *parts)
        # The sub-configs are those of the networks built (what runs and is saved); at a load, the
        # copies nested in rbln_config.json must agree with them.
        built = {name: model.rbln_config for name, model in checker._submodels().items()}
        built = {name: built.get(name) for name in SUBMODEL_FOLDERS}
        checker.rbln_config = dataclasses.replace(config, **built) if export else config.with_loaded_submodules(
            built, str(folder / CONFIG_NAME))
        return checker

    @staticmethod
    def _without_parts_not_compiled(folder: Path, config, asked: dict) -> RBLNCosmosSafetyCheckerConfig:
        """A compiled folder holds the guardrails that were on when it was saved (its rbln_config.json
        says which). The others are off (logged), and asking for one of them is an error. One that was
        saved but whose folder is gone (deleted, or replaced by a file) is an error too: the checker
        never runs with less than it was saved with unless the user switches that part off at load
        (`rbln_<part>=False`, the opt-out, logged)."""
        saved = RBLNCosmosSafetyCheckerConfig.load(folder)
        # An optional guardrail (off by default) saved on is on at load too, unless switched off there.
        config = dataclasses.replace(config, **{part: True for part in OPTIONAL_PARTS
                                                if getattr(saved, part) and asked.get(part) is not False})
        off, gone = {}, []
        for part in PART_SUBMODELS:
            folders = _part_folders(part)
            if not getattr(config, part) or asked.get(part) is False:
                continue
            for name in folders:
                if (folder / name).exists() and not (folder / name).is_dir():
                    raise ValueError(f"{folder / name} is a file: the {part} guardrail's {name}/ must be a folder")
            if all((folder / f).is_dir() for f in folders):
                continue
            if getattr(saved, part):
                gone.append((part, folders))
            elif asked.get(part) is True:
                raise ValueError(f"{folder} was saved without the {part} guardrail ({', '.join(folders)}/ "
                                 "missing): it cannot be switched on at load; export the checker again with it.")
            else:
                off[part] = False
        if gone:
            lost = "; ".join(f"{part} ({', '.join(f'{f}/' for f in folders)} missing)" for part, folders in gone)
            opt_out = ", ".join(f"{OPTION_PREFIX}{part}=False" for part, _ in gone)
            raise ValueError(f"{folder} was saved with guardrails whose folders are gone: {lost}. Restore them, or "
                             f"load without them knowingly by passing {opt_out}.")
        if off:
            logger.warning("Cosmos guardrail: %s not in the compiled folder %s (switched off when it was saved)",
                           ", ".join(off), folder)
        return dataclasses.replace(config, **off)

    @classmethod
    def _load_parts(cls, folder: Path, config, options: dict[str, dict], export: bool, hub_kwargs: dict):
        """The four guardrails (None where switched off), compiled from `folder` or loaded from it."""

        def locate(name: str) -> tuple[str | Path, dict]:
            """Where a sub-model comes from: its folder (a checkpoint, a compiled model or the upstream
            PyTorch file); at export, else its Hub id, cached where the upstream guardrail caches it."""
            path = folder / SUBMODEL_FOLDERS[name]
            if any((path / f).is_file() for f in ("config.json", CONFIG_NAME)):
                return path, {}
            if export and name in UPSTREAM_FILES and (folder / UPSTREAM_FILES[name]).is_file():
                return (folder / UPSTREAM_FILES[name]).parent, {}
            if not export:
                raise ValueError(f"{folder} has no compiled {name} ({SUBMODEL_FOLDERS[name]}/): it was switched off at "
                                 "export. Switch its guardrail off here too, or export again with it.")
            if name not in HUB_MODELS:
                raise ValueError(f"{folder} has no {name} checkpoint: expected {SUBMODEL_FOLDERS[name]}/ (config.json "
                                 f"+ weights){f' or {UPSTREAM_FILES[name]}' if name in UPSTREAM_FILES else ''}")
            hub_id, cache = HUB_MODELS[name]
            return hub_id, {**hub_kwargs, "cache_dir": hub_kwargs.get("cache_dir", folder / cache)}

        def submodel(model_class, name: str):
            source, extra = locate(name)
            try:
                model = model_class.from_pretrained(source, export=export, rbln_config=options[name], **extra)
            except OSError as err:
                if not extra:
                    raise
                raise ValueError(f"{folder} has no {name} checkpoint ({SUBMODEL_FOLDERS[name]}/), and {source} could "
                                 f"not be loaded from the Hub (cache {extra['cache_dir']}): {err}") from None
            built.append(model)
            return model

        built = []   # closed (their device memory freed) if a later part fails
        try:
            blocklist = guard = video = faces = qwen3guard = None
            if config.blocklist:
                blocklist = Blocklist.from_path(folder / BLOCKLIST_FOLDER, within=folder)
            if config.guard_llm:
                guard = submodel(RBLNLlamaGuard3, "llamaguard3")
            if config.qwen3guard_llm:
                qwen3guard = submodel(RBLNQwen3Guard, "qwen3guard")
            if config.video_filter:
                from transformers import AutoImageProcessor

                encoder = submodel(RBLNSiglipVisionModel, "siglip_encoder")
                source, extra = locate("siglip_encoder")
                processor = auto_class_from_pretrained(AutoImageProcessor, resolve_folder(source, extra))
                classifier = submodel(RBLNVideoSafetyModel, "video_safety_model")
                video = VideoContentSafetyFilter(encoder, classifier, processor, config.frame_stride)
            if config.face_blur:
                faces = RetinaFaceFilter(submodel(RBLNRetinaFace, "face_blur_filter"), config.face_confidence,
                                         config.blur_method)
        except BaseException:
            for model in built:
                model.close()
            raise
        return blocklist, guard, video, faces, qwen3guard

    def _submodels(self) -> dict[str, Any]:
        """The compiled sub-models by name (those of the guardrails switched on)."""
        found = {}
        if self.guard_llm is not None:
            found["llamaguard3"] = self.guard_llm
        if self.qwen3guard is not None:
            found["qwen3guard"] = self.qwen3guard
        if self.video_filter is not None:
            found["siglip_encoder"] = self.video_filter.encoder
            found["video_safety_model"] = self.video_filter.classifier
        if self.face_filter is not None:
            found["face_blur_filter"] = self.face_filter.detector
        return found

    # ---- saving ---------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, *, exist_ok: bool = False) -> str:
        """Write the compiled checker (the layout in the module docstring). A new folder appears whole
        (written aside, then renamed); a previously saved checker folder is updated in place, each
        sub-model atomically, rbln_config.json last. Any other non-empty folder is refused unless
        `exist_ok=True` (as for every compiled model: the checker's files are added, others kept)."""
        def check_target(target: Path) -> None:
            if not exist_ok and target.is_dir() and any(target.iterdir()):
                try:
                    ours = RBLNModelConfig.read_json(target).get("cls_name") == type(self).__name__
                except (OSError, ValueError):
                    ours = False
                if not ours:
                    raise ValueError(f"Cannot save into {target}: it is not empty and holds no saved "
                                     f"{type(self).__name__}. Save into a new or empty folder, or pass "
                                     "save_pretrained(..., exist_ok=True) to add the checker's files there.")

        return str(save_tree(save_directory, self._write, check_target))

    def _write(self, folder: Path) -> None:
        for name, model in self._submodels().items():
            model.save_pretrained(folder / SUBMODEL_FOLDERS[name])
        if self.blocklist is not None:
            self.blocklist.save(folder / BLOCKLIST_FOLDER)
        self.rbln_config.save(folder, files=manifest_of(folder))   # last: the manifest of every file

    # ---- what diffusers' Cosmos pipelines call --------------------------------------------

    def check_text_safety(self, prompt: str) -> bool:
        """True if the prompt passes every text guardrail switched on; else False (or UnsafePromptError
        with rbln_raise_on_unsafe_prompt=True), the guardrail that fired named in `last_report` and the log."""
        guards = [g for g in (self.blocklist, self.guard_llm, self.qwen3guard) if g is not None]
        if not guards:
            logger.warning("Cosmos guardrail: every text guardrail is switched off; the prompt is not checked")
        for guard in guards:
            safe, message = guard.is_safe(prompt)
            if not safe:
                self.last_report = f"{PROMPT_REFUSED} {guard.name} guardrail: {message}"
                logger.critical("GUARDRAIL BLOCKED: %s", self.last_report)
                if self.rbln_config.raise_on_unsafe_prompt:
                    raise UnsafePromptError(f"Cosmos guardrail: {self.last_report}")
                return False
        self.last_report = f"the prompt passed {', '.join(g.name for g in guards) or 'no guardrail'}"
        return True

    def check_video_safety(self, frames: np.ndarray) -> np.ndarray:
        """The video (RGB uint8 [T, H, W, 3]) to keep: with faces blurred; all black frames if the
        content filter finds it unsafe (or UnsafeVideoError with rbln_on_unsafe_video="raise")."""
        frames = check_video_frames(frames)
        report = []
        if self.video_filter is not None:
            safe, message = self.video_filter.is_safe(frames)
            if not safe:
                self.last_report = f"the video was refused by the {self.video_filter.name} guardrail: {message}"
                raising = self.rbln_config.on_unsafe_video == "raise"
                logger.critical("GUARDRAIL BLOCKED: %s; %s", self.last_report,
                                "raising" if raising else "every frame replaced by black")
                if raising:
                    raise UnsafeVideoError(f"Cosmos guardrail: {self.last_report}")
                return np.zeros_like(frames)
            report.append(message)
        if self.face_filter is not None:
            before = self.face_filter.faces_found
            frames = self.face_filter.postprocess(frames)
            report.append(f"{self.face_filter.faces_found - before} face(s) blurred")
        self.last_report = "the video passed: " + ("; ".join(report) or "no video guardrail switched on")
        return frames

    def to(self, *args, **kwargs) -> RBLNCosmosSafetyChecker:
        """The networks live on simulated NPU devices (set at compile / load with `device`); the pipeline's
        device and dtype moves do not apply to them."""
        return self

    @property
    def device(self) -> torch.device:
        """Where the checker takes and returns data: the host."""
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    # ---- reporting ------------------------------------------------------------------------

    @property
    def simulated_time_s(self) -> dict[str, float]:
        """Simulated device time of every check so far, per sub-model."""
        times = {}
        if self.guard_llm is not None:
            times["llamaguard3"] = self.guard_llm.simulated_s
        if self.qwen3guard is not None:
            times["qwen3guard"] = self.qwen3guard.simulated_s
        if self.video_filter is not None:
            times.update(self.video_filter.simulated_s)
        if self.face_filter is not None:
            times["face_blur_filter"] = self.face_filter.simulated_s
        return times

    def device_memory(self) -> dict[str, list]:
        """Device memory per sub-model (each on its own devices)."""
        return {name: model.device_memory() for name, model in self._submodels().items()}

    def close(self) -> None:
        """Free the device memory of every sub-model."""
        for model in self._submodels().values():
            model.close()

    def __repr__(self) -> str:
        parts = [part for part in PART_SUBMODELS if getattr(self.rbln_config, part)]
        return f"{type(self).__name__}(guardrails={parts}, npu={self.rbln_config.npu})"
