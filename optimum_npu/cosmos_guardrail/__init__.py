"""The Cosmos guardrail on the simulated NPU (`RBLNCosmosSafetyChecker`), one file per part:

- `blocklist.py`      keyword blocklist (text)
- `guard_llm.py`      guard LLMs on the NPU decoder, and Llama-Guard-3's prompt and answers (text)
- `qwen3guard.py`     Qwen3Guard-Gen, upstream's newer text guard (text, optional)
- `video_filter.py`   SigLIP + safety classifier on sampled frames (video)
- `face_blur.py`      RetinaFace face detector + pixelation / Gaussian blur (video)
- `checker.py`        the checker diffusers' Cosmos pipelines call
"""

from .blocklist import Blocklist
from .checker import RBLNCosmosSafetyChecker, RBLNCosmosSafetyCheckerConfig, UnsafePromptError, UnsafeVideoError
from .face_blur import RBLNRetinaFace, RBLNRetinaFaceConfig, RetinaFaceFilter
from .guard_llm import RBLNLlamaGuard3
from .qwen3guard import RBLNQwen3Guard
from .video_filter import (
    RBLNSiglipVisionModel,
    RBLNSiglipVisionModelConfig,
    RBLNVideoSafetyModel,
    RBLNVideoSafetyModelConfig,
    VideoContentSafetyFilter,
)

__all__ = [
    "Blocklist", "RBLNCosmosSafetyChecker", "RBLNCosmosSafetyCheckerConfig", "RBLNLlamaGuard3", "RBLNQwen3Guard", "RBLNRetinaFace",
    "RBLNRetinaFaceConfig", "RBLNSiglipVisionModel", "RBLNSiglipVisionModelConfig", "RBLNVideoSafetyModel",
    "RBLNVideoSafetyModelConfig", "RetinaFaceFilter", "UnsafePromptError", "UnsafeVideoError",
    "VideoContentSafetyFilter",
]
