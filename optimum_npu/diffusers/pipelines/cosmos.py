"""Cosmos world-model pipelines (Cosmos-Predict1 text-to-world and video-to-world) with the T5
text encoder, the Cosmos transformer and the video VAE compiled, and the guardrail required.

    checker = RBLNCosmosSafetyChecker.from_pretrained("guardrail-folder", export=True)
    pipe = RBLNCosmosTextToWorldPipeline.from_pretrained(
        "cosmos-folder", export=True, safety_checker=checker,
        rbln_config={"height": 704, "width": 1280, "num_frames": 121,
                     "transformer": {"tensor_parallel_size": 4}})
    video = pipe(prompt="a robot arm lifts a red cube").frames[0]

diffusers' Cosmos loop calls the transformer once for the prompt and once for the negative
prompt (classifier-free guidance), each at the pipeline's batch: its compiled batch is not
doubled, unlike Stable Diffusion's UNet. The pipelines refuse to run without a safety checker,
as diffusers' do: there is no unguarded mode.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping

from diffusers import CosmosTextToWorldPipeline, CosmosVideoToWorldPipeline

from ...cosmos_guardrail.checker import PROMPT_REFUSED
from ...modeling.hf_files import hub_kwargs_of, resolve_folder
from ...modeling.encoders import RBLNT5EncoderModel, RBLNT5EncoderModelConfig
from ..configuration import RBLNDiffusionPipelineConfig, component
from ..models.autoencoder_kl_cosmos import RBLNAutoencoderKLCosmos, RBLNAutoencoderKLCosmosConfig, latent_size
from ..models.transformer_cosmos import (
    FPS_DEPRECATION, RBLNCosmosTransformer3DModel, RBLNCosmosTransformer3DModelConfig,
)
from .base import ComponentStats, RBLNDiffusionPipelineMixin
from .cosmos_prompt_upsampler import FOLDER as UPSAMPLER_FOLDER
from .cosmos_prompt_upsampler import RBLNCosmosPromptUpsampler

# diffusers' CosmosTextToWorldPipeline.__call__ defaults (Cosmos-Predict1: 704 x 1280, 121 frames).
COSMOS_DEFAULTS = {"height": 704, "width": 1280, "num_frames": 121, "max_seq_len": 512, "guidance_scale": 7.0}
CHECKER_CLASS = "RBLNCosmosSafetyChecker"
_FROM_FOLDER = object()   # prompt_upsampler not given: the one saved with a compiled pipeline, if any
HOW_TO_GUARD = (
    "Pass one: safety_checker=RBLNCosmosSafetyChecker.from_pretrained(<guardrail checkpoint or compiled folder>, "
    "export=...) (from optimum_npu.cosmos_guardrail; optimum_npu.testing.build_tiny_cosmos_guardrail(folder) "
    "writes a tiny one for trying it offline), or any object with check_text_safety(prompt) -> bool and "
    "check_video_safety(frames) -> frames."
)


@dataclass(frozen=True, kw_only=True)
class RBLNCosmosTextToWorldPipelineConfig(RBLNDiffusionPipelineConfig):
    text_encoder: RBLNT5EncoderModelConfig | None = component(RBLNT5EncoderModelConfig)
    transformer: RBLNCosmosTransformer3DModelConfig | None = component(RBLNCosmosTransformer3DModelConfig)
    vae: RBLNAutoencoderKLCosmosConfig | None = component(RBLNAutoencoderKLCosmosConfig)

    pipeline_name: ClassVar[str] = "RBLNCosmosTextToWorldPipeline"
    conditions_on_video: ClassVar[bool] = False   # video-to-world: VAE encoder and condition mask

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fps is not None:   # a call-time argument now (pipe(..., fps=...)), as in diffusers
            warnings.warn(FPS_DEPRECATION, FutureWarning, stacklevel=3)
            object.__setattr__(self, "fps", None)

    def _pipeline_defaults(self, models: Mapping[str, Any]) -> dict[str, Any]:
        return dict(COSMOS_DEFAULTS)

    def _component_options(self, models: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        vae = models["vae"].config
        video = (self.num_frames, self.height, self.width)
        if (self.num_frames - 1) % vae.temporal_compression_ratio or self.height % vae.spatial_compression_ratio or (
                self.width % vae.spatial_compression_ratio):
            raise ValueError(
                f"rbln_num_frames - 1 must be a multiple of {vae.temporal_compression_ratio} and rbln_height / "
                f"rbln_width multiples of {vae.spatial_compression_ratio} (the video VAE's compression); got "
                f"{self.num_frames} frames of {self.height} x {self.width}")
        return {
            "text_encoder": {"batch_size": self.batch_size, "max_seq_len": self.max_seq_len},
            "transformer": {"batch_size": self.batch_size, "sample_size": latent_size(vae, *video),
                            "max_seq_len": self.max_seq_len,
                            "uses_condition_mask": self.conditions_on_video},
            "vae": {"batch_size": self.batch_size, "sample_size": video, "uses_encoder": self.conditions_on_video},
        }


@dataclass(frozen=True, kw_only=True)
class RBLNCosmosVideoToWorldPipelineConfig(RBLNCosmosTextToWorldPipelineConfig):
    pipeline_name: ClassVar[str] = "RBLNCosmosVideoToWorldPipeline"
    conditions_on_video: ClassVar[bool] = True


class RBLNCosmosPipelineMixin(RBLNDiffusionPipelineMixin):
    """What the Cosmos pipelines add: the safety checker is required, compiled or the user's."""

    rbln_classes = {"text_encoder": RBLNT5EncoderModel, "transformer": RBLNCosmosTransformer3DModel,
                    "vae": RBLNAutoencoderKLCosmos}
    denoiser = "transformer"

    def __call__(self, *args, **kwargs):
        """diffusers' `__call__`; when the checker refuses the prompt, the error also names the
        guardrail that fired (diffusers' own message says only "unsafe text")."""
        checker = self.safety_checker
        if hasattr(checker, "last_report"):
            checker.last_report = ""      # a report of an earlier call must not explain this one's error
        try:
            return super().__call__(*args, **kwargs)
        except ValueError as err:
            report = getattr(checker, "last_report", "")
            if not report.startswith(PROMPT_REFUSED):
                raise
            raise ValueError(f"{err} The Cosmos guardrail says: {report}") from None

    @classmethod
    def _load_safety_checker(cls, folder: Path, class_name: str, compiled: bool):
        """The checker saved with a compiled pipeline; a source checkpoint's upstream checker
        (cosmos_guardrail, which needs torchvision) cannot be loaded here."""
        if not compiled or class_name != CHECKER_CLASS:
            raise ValueError(f"{cls.__name__}: the folder's safety checker ({class_name}) cannot be loaded here. "
                             + HOW_TO_GUARD)
        try:
            from ...cosmos_guardrail import RBLNCosmosSafetyChecker
        except ImportError as err:
            raise ValueError(f"{cls.__name__}: this folder's {CHECKER_CLASS} needs optimum_npu.cosmos_guardrail "
                             f"({err}). {HOW_TO_GUARD}") from None
        return RBLNCosmosSafetyChecker.from_pretrained(folder)

    @classmethod
    def _check_parts(cls, parts: dict[str, Any]) -> None:
        checker = parts.get("safety_checker")
        if checker is None:
            raise ValueError(f"{cls.__name__} needs a safety checker (the Cosmos license requires the guardrail; "
                             f"the pipeline never runs unguarded) and none was found in the folder. {HOW_TO_GUARD}")
        missing = [m for m in ("check_text_safety", "check_video_safety", "to") if not callable(getattr(checker, m, None))]
        if missing:
            raise TypeError(f"safety_checker={type(checker).__name__} lacks {missing}. {HOW_TO_GUARD}")


class RBLNCosmosTextToWorldPipeline(RBLNCosmosPipelineMixin, CosmosTextToWorldPipeline):
    """diffusers' CosmosTextToWorldPipeline with the T5 encoder, transformer and video VAE compiled, and
    optionally Cosmos-Predict1's prompt upsampler (`prompt_upsampler=RBLNCosmosPromptUpsampler...`, on
    devices of its own): the user's prompt passes the guardrail, is upsampled, and the upsampled prompt
    passes the guardrail inside diffusers' call like any prompt. A saved pipeline keeps it in
    `prompt_upsampler/` and loads it back; `prompt_upsampler=None` at load leaves it out."""

    config_class = RBLNCosmosTextToWorldPipelineConfig
    prompt_upsampler: RBLNCosmosPromptUpsampler | None = None
    last_upsampled_prompt: str | list[str] | None = None

    @classmethod
    def from_pretrained(cls, model_id, export: bool = False, **kwargs: Any):
        upsampler = kwargs.pop("prompt_upsampler", _FROM_FOLDER)
        if upsampler is not _FROM_FOLDER and upsampler is not None and not callable(getattr(upsampler, "upsample",
                                                                                            None)):
            raise TypeError(f"prompt_upsampler={type(upsampler).__name__} has no upsample(prompt) method; pass an "
                            "RBLNCosmosPromptUpsampler (optimum_npu.diffusers) or None")
        pipe = super().from_pretrained(model_id, export=export, **kwargs)
        if upsampler is _FROM_FOLDER:   # a compiled pipeline saved with one loads it back
            path = resolve_folder(model_id, hub_kwargs_of(kwargs)) / UPSAMPLER_FOLDER
            upsampler = RBLNCosmosPromptUpsampler.from_pretrained(path) if not export and path.is_dir() else None
        pipe.prompt_upsampler = upsampler
        return pipe

    def __call__(self, *args, **kwargs):
        self.last_upsampled_prompt = None
        if self.prompt_upsampler is None:
            return super().__call__(*args, **kwargs)
        arguments = self._call_arguments(args, kwargs)
        prompt = arguments["prompt"]
        if prompt is None:   # prompt embeddings given: nothing to upsample
            return super().__call__(*args, **kwargs)
        calls, seconds = self.prompt_upsampler.calls, self.prompt_upsampler.simulated_s
        upsampled = [self._upsample(p) for p in ([prompt] if isinstance(prompt, str) else prompt)]
        self.last_upsampled_prompt = upsampled[0] if isinstance(prompt, str) else upsampled
        output = super().__call__(**{**arguments, "prompt": self.last_upsampled_prompt})
        self.generation_stats.components["prompt_upsampler"] = ComponentStats(
            self.prompt_upsampler.calls - calls, self.prompt_upsampler.simulated_s - seconds)
        return output

    def _upsample(self, prompt: str) -> str:
        """The user's prompt through the guardrail (as upstream, before the upsampler reads it), then upsampled."""
        if not self.safety_checker.check_text_safety(prompt):
            report = getattr(self.safety_checker, "last_report", "")
            raise ValueError(f"Cosmos Guardrail detected unsafe text in the prompt: {prompt}. It is not upsampled."
                             + (f" The Cosmos guardrail says: {report}" if report else ""))
        return self.prompt_upsampler.upsample(prompt)

    def _write_pipeline(self, folder: Path) -> None:
        if self.prompt_upsampler is not None:   # before the pipeline's files: its manifest lists the upsampler's
            self.prompt_upsampler.save_pretrained(folder / UPSAMPLER_FOLDER)
        super()._write_pipeline(folder)

    def device_memory(self) -> dict[str, list]:
        found = super().device_memory()
        if self.prompt_upsampler is not None:
            found["prompt_upsampler"] = self.prompt_upsampler.device_memory()
        return found


class RBLNCosmosVideoToWorldPipeline(RBLNCosmosPipelineMixin, CosmosVideoToWorldPipeline):
    """diffusers' CosmosVideoToWorldPipeline with the T5 encoder, transformer and video VAE (encoder too) compiled."""

    config_class = RBLNCosmosVideoToWorldPipelineConfig
