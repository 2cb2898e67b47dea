"""The video content filter: a SigLIP image encoder and a small MLP classify sampled frames.

As upstream (the Cosmos guardrail's `video_content_safety_filter`): each sampled frame is
encoded by SigLIP's vision tower (google/siglip-so400m-patch14-384 upstream: its pooled output,
L2-normalised), and an MLP (Linear-BatchNorm-ReLU x2, Linear) classifies the embedding into 7
classes, 0 being "Safe". One unsafe frame makes the video unsafe. Both networks run on the NPU,
each a single-graph model on its own devices: `RBLNSiglipVisionModel` and `RBLNVideoSafetyModel`.

Checkpoint layouts read:
- the MLP: ours, `config.json` + `model.safetensors`; or upstream's `safety_filter.pt`
  ({"model": state dict with "network.layers.*" keys}, read with `torch.load(weights_only=True)`:
  tensors and plain containers only, never code);
- SigLIP: any transformers SigLIP checkpoint (a full `SiglipModel` one too: only the vision tower
  is loaded), with its `preprocessor_config.json` for the image processor.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, SiglipVisionModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..configuration import RBLNModelConfig
from ..modeling.base import RBLNModel
from ..modeling.image_classification import normalize_image_size
from .upstream_checkpoints import load_exact_state_dict, load_torch_checkpoint

logger = logging.getLogger(__name__)

UPSTREAM_SAFETY_FILTER = "safety_filter.pt"
DEFAULT_SIGLIP_ID = "google/siglip-so400m-patch14-384"
# The classes of the upstream classifier, by index.
SAFETY_CLASSES = ("Safe", "Sexual_Content", "Violence", "Drugs", "Child_Abuse", "Hate_and_Harassment", "Self-Harm")
# Upstream checks a video file at 2 frames per second; Cosmos generates 24 fps: every 12th frame.
DEFAULT_FRAME_STRIDE = 12


class VideoSafetyConfig(PretrainedConfig):
    model_type = "cosmos_video_safety"

    def __init__(self, input_size: int = 1152, hidden_sizes=(512, 256), num_classes: int = len(SAFETY_CLASSES),
                 initializer_range: float = 0.02, **kwargs):
        self.input_size = input_size
        self.hidden_sizes = list(hidden_sizes)
        self.num_classes = num_classes
        self.initializer_range = initializer_range
        super().__init__(**kwargs)


AutoConfig.register(VideoSafetyConfig.model_type, VideoSafetyConfig, exist_ok=True)


class SafetyClassifier(nn.Module):
    """Linear-BatchNorm-ReLU blocks then a Linear to class logits (upstream's layer indices)."""

    def __init__(self, input_size: int, hidden_sizes, num_classes: int):
        super().__init__()
        layers, width = [], input_size
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, embeddings):
        return self.layers(embeddings)


class VideoSafetyModel(PreTrainedModel):
    """The frame classifier: L2-normalised image embeddings [batch, input_size] -> logits [batch, classes]."""

    config_class = VideoSafetyConfig
    base_model_prefix = "video_safety"
    main_input_name = "embeddings"

    def __init__(self, config: VideoSafetyConfig):
        super().__init__(config)
        self.network = SafetyClassifier(config.input_size, config.hidden_sizes, config.num_classes)
        self.post_init()

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.network(embeddings)


def load_video_safety_model(folder: str | os.PathLike) -> VideoSafetyModel:
    """The frame classifier in `folder`: ours (config.json + model.safetensors), or upstream's
    `safety_filter.pt` (the 1152 -> 7 classes shape, or the one a config.json beside it gives)."""
    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return VideoSafetyModel.from_pretrained(folder).eval()
    path = folder / UPSTREAM_SAFETY_FILTER
    if not path.is_file():
        raise ValueError(f"{folder} holds no video safety classifier: expected config.json + model.safetensors, "
                         f"or the upstream {UPSTREAM_SAFETY_FILTER}")
    checkpoint = load_torch_checkpoint(path)
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    config = VideoSafetyConfig.from_pretrained(folder) if (folder / "config.json").is_file() else VideoSafetyConfig()
    return load_exact_state_dict(VideoSafetyModel(config).eval(), state, path)


@dataclass(frozen=True)
class FrameVerdict:
    frame: int           # index in the video
    label: str           # one of SAFETY_CLASSES


def sampled_frames(num_frames: int, stride: int) -> list[int]:
    """Indices of the frames to check: every `stride`-th from the first, and the last one."""
    indices = list(range(0, num_frames, stride))
    if num_frames and indices[-1] != num_frames - 1:
        indices.append(num_frames - 1)
    return indices


def check_video_frames(frames: np.ndarray) -> np.ndarray:
    """`frames` as an RGB uint8 video [T, H, W, 3], or a clear error."""
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"the video must be a numpy array [frames, height, width, 3]; got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"the video must be a uint8 array [frames, height, width, 3]; got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"the video must hold uint8 pixels (0-255), as diffusers' Cosmos pipelines pass it; "
                         f"got {frames.dtype}")
    return frames


# ---- on the NPU ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RBLNSiglipVisionModelConfig(RBLNModelConfig):
    """Options of the compiled SigLIP vision tower: images per run and their size."""

    image_size: tuple[int, int] | None = None   # (height, width); None: the model config's image_size

    def _validate(self) -> None:
        super()._validate()
        self._set("image_size", normalize_image_size(self.image_size))


class _PooledImageEmbedding(nn.Module):
    """The exported graph: pixel_values -> SigLIP's pooled embedding (what `get_image_features` gives)."""

    def __init__(self, model: SiglipVisionModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output


class _SiglipVisionTower(SiglipVisionModel):
    """SiglipVisionModel loading from a full SigLIP checkpoint (the upstream guardrail's) without a
    load report listing every weight of the text tower as unexpected: it is not needed here."""

    _keys_to_ignore_on_load_unexpected = [r"^text_model\.", r"^logit_scale$", r"^logit_bias$"]


class RBLNSiglipVisionModel(RBLNModel):
    """SigLIP's vision tower compiled to the NPU; `forward(pixel_values)` -> `pooler_output`.

    Compiles from a vision-only checkpoint or a full SigLIP one (only the vision tower is loaded)."""

    hf_class = SiglipVisionModel
    config_class = RBLNSiglipVisionModelConfig
    main_input_name = "pixel_values"
    stats_unit = "images"

    @classmethod
    def _check_model_type(cls, hf_config) -> None:
        if getattr(hf_config, "model_type", None) == "siglip":   # a full SigLIP checkpoint: its vision tower
            hf_config = hf_config.vision_config
        super()._check_model_type(hf_config)

    @classmethod
    def _load_hf_model(cls, model_id, hf_kwargs: dict, config):
        cls._check_before_loading(model_id, hf_kwargs)
        return _SiglipVisionTower.from_pretrained(model_id, **hf_kwargs)

    @classmethod
    def _resolve_config(cls, hf_model, config, source_folder=None):
        if config.image_size is not None:
            return config
        return dataclasses.replace(config, image_size=normalize_image_size(hf_model.config.image_size))

    @classmethod
    def _input_info(cls, hf_config, config):
        return [("pixel_values", (config.batch_size, hf_config.num_channels, *config.image_size), "float32")]

    @classmethod
    def _export_module(cls, hf_model, config) -> nn.Module:
        return _PooledImageEmbedding(hf_model)

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None):
        (pooled,) = self._run_graph(self.graph_name, [pixel_values.float()])
        result = BaseModelOutputWithPooling(pooler_output=pooled)
        return result if return_dict is not False else (pooled,)


@dataclass(frozen=True, kw_only=True)
class RBLNVideoSafetyModelConfig(RBLNModelConfig):
    """Options of the compiled frame classifier: embeddings per run (`batch_size`)."""


class RBLNVideoSafetyModel(RBLNModel):
    """The frame classifier compiled to the NPU: `forward(embeddings)` -> logits."""

    hf_class = VideoSafetyModel
    config_class = RBLNVideoSafetyModelConfig
    main_input_name = "embeddings"
    stats_unit = "frames"

    @classmethod
    def _load_hf_model(cls, model_id, hf_kwargs: dict, config):
        return load_video_safety_model(model_id)

    @classmethod
    def _input_info(cls, hf_config, config):
        return [("embeddings", (config.batch_size, hf_config.input_size), "float32")]

    @classmethod
    def _export_module(cls, hf_model, config) -> nn.Module:
        return hf_model

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        (logits,) = self._run_graph(self.graph_name, [embeddings.float()])
        return logits


class VideoContentSafetyFilter:
    """The video guardrail: `is_safe(frames)` -> (safe, message), frames RGB uint8 [T, H, W, 3]."""

    name = "VideoContentSafetyFilter"

    def __init__(self, encoder: RBLNSiglipVisionModel, classifier: RBLNVideoSafetyModel, image_processor,
                 frame_stride: int = DEFAULT_FRAME_STRIDE):
        if isinstance(frame_stride, bool) or not isinstance(frame_stride, int) or frame_stride < 1:
            raise ValueError(f"frame_stride must be an int >= 1; got {frame_stride!r}")
        self.encoder = encoder
        self.classifier = classifier
        self.image_processor = image_processor
        self.frame_stride = frame_stride
        self.simulated_s = {"siglip_encoder": 0.0, "video_safety_model": 0.0}

    def classify(self, frames: np.ndarray) -> list[FrameVerdict]:
        """The label of each sampled frame."""
        indices = sampled_frames(len(frames), self.frame_stride)
        pixels = self.image_processor(images=[frames[i] for i in indices], return_tensors="pt")["pixel_values"]
        embeddings = self.encoder(pixels).pooler_output
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
        logits = self.classifier(embeddings)
        self.simulated_s["siglip_encoder"] += self.encoder.inference_stats.device_s
        self.simulated_s["video_safety_model"] += self.classifier.inference_stats.device_s
        labels = logits.argmax(dim=-1).tolist()
        return [FrameVerdict(i, SAFETY_CLASSES[c] if c < len(SAFETY_CLASSES) else f"class {c}")
                for i, c in zip(indices, labels)]

    def is_safe(self, frames: np.ndarray) -> tuple[bool, str]:
        verdicts = self.classify(check_video_frames(frames))
        unsafe = [v for v in verdicts if v.label != SAFETY_CLASSES[0]]
        if not unsafe:
            return True, f"{len(verdicts)} sampled frame(s) classified safe"
        found = ", ".join(f"frame {v.frame}: {v.label}" for v in unsafe[:5])
        return False, f"{len(unsafe)} of {len(verdicts)} sampled frame(s) classified unsafe ({found})"
