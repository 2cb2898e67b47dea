"""Tiny random checkpoints for trying optimum-npu offline (examples, tests, a first look).

Every builder writes a folder in the layout the real loading code reads, from configs built
here with small random (or briefly trained) weights, so what runs on them is the real path:
nothing is stubbed. The models are meaningless as models; their shapes, file layouts and code
paths are real. One module per family:

- `llama.py`             `build_tiny_llama(folder, steps)`: a 0.9M-parameter Llama trained to write English;
                         `build_tiny_random_llama(folder, max_position_embeddings=...)`: untrained, any length
- `vision.py`            `build_tiny_image_classifier(folder)`: a random ResNet with its image processor
- `cosmos_guardrail.py`  `build_tiny_cosmos_guardrail(folder, blocklist=[...])` and its parts
                         (`build_tiny_guard_llm`, `build_tiny_qwen3guard`, `build_tiny_siglip`,
                         `build_tiny_video_safety_model`, `build_tiny_retinaface`)
- `diffusers.py`         `build_tiny_stable_diffusion(folder)`, `build_tiny_stable_diffusion_xl(folder)`,
                         `build_tiny_stable_diffusion_3(folder)`, `build_tiny_controlnet(folder, unet_folder)`,
                         `build_tiny_cosmos(folder)`: pipeline folders; `build_tiny_prompt_upsampler(folder)`
- `llava.py`             `build_tiny_llava(folder)`: a random LLaVA (CLIP vision + projector + Llama), its processor
"""

from .cosmos_guardrail import (
    build_tiny_cosmos_guardrail,
    build_tiny_guard_llm,
    build_tiny_qwen3guard,
    build_tiny_retinaface,
    build_tiny_siglip,
    build_tiny_video_safety_model,
)
from .diffusers import (
    build_tiny_controlnet, build_tiny_cosmos, build_tiny_prompt_upsampler, build_tiny_stable_diffusion,
    build_tiny_stable_diffusion_3, build_tiny_stable_diffusion_xl,
)
from .llama import build_tiny_llama, build_tiny_random_llama
from .llava import build_tiny_llava
from .vision import build_tiny_image_classifier

__all__ = [
    "build_tiny_cosmos", "build_tiny_cosmos_guardrail", "build_tiny_guard_llm", "build_tiny_image_classifier",
    "build_tiny_llama", "build_tiny_llava", "build_tiny_random_llama", "build_tiny_retinaface", "build_tiny_siglip",
    "build_tiny_stable_diffusion", "build_tiny_video_safety_model", "build_tiny_controlnet", "build_tiny_qwen3guard",
    "build_tiny_stable_diffusion_3", "build_tiny_stable_diffusion_xl", "build_tiny_prompt_upsampler",
]
