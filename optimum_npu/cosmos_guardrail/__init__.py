"""The Cosmos guardrail on the simulated NPU (`RBLNCosmosSafetyChecker`), one file per part:

- `blocklist.py`      keyword blocklist (text)
- `guard_llm.py`      Llama-Guard-3-style guard LLM on the NPU decoder (text)
- `video_filter.py`   SigLIP + safety classifier on sampled frames (video)
- `face_blur.py`      RetinaFace face detector + pixelation / Gaussian blur (video)
- `checker.py`        the checker diffusers' Cosmos pipelines call
"""

from .blocklist import Blocklist
from .checker import RBLNCosmosSafetyChecker, RBLNCosmosSafetyCheckerConfig, UnsafePromptError, UnsafeVideoError
from .face_blur import RBLNRetinaFace, RBLNRetinaFaceConfig, RetinaFaceFilter
from .guard_llm import RBLNLlamaGuard3
from .video_filter import (
    RBLNSiglipVisionModel,
    RBLNSiglipVisionModelConfig,
    RBLNVideoSafetyModel,
    RBLNVideoSafetyModelConfig,
    VideoContentSafetyFilter,
)

__all__ = [
    "Blocklist", "RBLNCosmosSafetyChecker", "RBLNCosmosSafetyCheckerConfig", "RBLNLlamaGuard3", "RBLNRetinaFace",
    "RBLNRetinaFaceConfig", "RBLNSiglipVisionModel", "RBLNSiglipVisionModelConfig", "RBLNVideoSafetyModel",
    "RBLNVideoSafetyModelConfig", "RetinaFaceFilter", "UnsafePromptError", "UnsafeVideoError",
    "VideoContentSafetyFilter",
]
