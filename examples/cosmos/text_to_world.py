"""Cosmos world generation on the simulated NPU, guarded, end to end on tiny random components (~1 min).

    python examples/cosmos/text_to_world.py [out_folder]

1. `optimum_npu.testing.build_tiny_cosmos` writes diffusers Cosmos-Predict1-shaped pipelines (T5
   text encoder, Cosmos transformer, video VAE, EDM scheduler) with small random weights, and
   `build_tiny_cosmos_guardrail` a guardrail checkpoint (blocklist with the made-up word
   "zorblax", guard LLM, SigLIP video filter, RetinaFace): the videos are noise-like, but every
   code path (loading, compiling, diffusers' own pipeline loop, the guardrail) is real.
2. The guardrail compiles to `RBLNCosmosSafetyChecker`; `RBLNCosmosTextToWorldPipeline` compiles
   the T5 encoder, the transformer and the VAE, each on its own device, and runs diffusers'
   `CosmosTextToWorldPipeline.__call__` unchanged: the video is written as a GIF.
3. A blocklisted prompt is refused by the guardrail (the pipeline never runs unguarded).
4. `RBLNCosmosVideoToWorldPipeline` continues the first frame of that video into a new one.

Outputs go to examples/cosmos/out/world/ (checkpoints, text_to_world.gif, video_to_world.gif).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from optimum_npu import RBLNCosmosSafetyChecker, RBLNCosmosTextToWorldPipeline, RBLNCosmosVideoToWorldPipeline
from optimum_npu.testing import build_tiny_cosmos, build_tiny_cosmos_guardrail

OUT = Path(__file__).resolve().parent / "out" / "world"
PROMPT = "a robot arm lifts a red cube"
# A tiny video (Cosmos-Predict1 makes 121 frames of 704 x 1280 at 30 fps).
SHAPE = {"num_frames": 9, "height": 32, "width": 32, "max_seq_len": 32}
FPS = 24   # a call-time argument: it scales the transformer's temporal positions (computed on the host)
RBLN_CONFIG = {**SHAPE, "text_encoder": {"device": 2}, "transformer": {"device": 3}, "vae": {"device": 2}}


@dataclass
class Result:
    video: np.ndarray            # [frames, height, width, 3] in [0, 1]
    continued: np.ndarray        # video-to-world from the first frame of `video`
    refused: str                 # the error for the blocklisted prompt
    gifs: tuple[Path, Path]


def save_gif(frames: np.ndarray, path: Path, fps: int, scale: int = 4) -> Path:
    """Frames [T, H, W, 3] in [0, 1] as an animated GIF, enlarged `scale` times (nearest)."""
    images = [Image.fromarray((np.clip(f, 0, 1) * 255).round().astype(np.uint8)) for f in frames]
    images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path


def generate(pipe, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    call = {**{k: SHAPE[k] for k in ("num_frames", "height", "width")}, "fps": FPS}
    out = pipe(**kwargs, **call, negative_prompt="static, blurry, low quality", num_inference_steps=4,
               max_sequence_length=SHAPE["max_seq_len"],
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.frames[0]


def main(out: Path = OUT) -> Result:
    out = Path(out)
    text_to_world = build_tiny_cosmos(out / "tiny-cosmos-text2world")
    video_to_world = build_tiny_cosmos(out / "tiny-cosmos-video2world", video_to_world=True)
    guardrail = build_tiny_cosmos_guardrail(out / "tiny-cosmos-guardrail", blocklist=["zorblax"])
    checker = RBLNCosmosSafetyChecker.from_pretrained(guardrail, export=True, rbln_config={
        "llamaguard3": {"device": 0, "max_seq_len": 512}, "siglip_encoder": {"device": 1},
        "video_safety_model": {"device": 1}, "face_blur_filter": {"device": 1, "image_size": (32, 32)}})

    pipe = RBLNCosmosTextToWorldPipeline.from_pretrained(text_to_world, export=True, safety_checker=checker,
                                                         rbln_config=RBLN_CONFIG)
    video = generate(pipe, prompt=PROMPT)
    first_gif = save_gif(video, out / "text_to_world.gif", FPS)
    print(f"\n{PROMPT!r} -> {first_gif} ({video.shape[0]} frames of noise: the tiny components have random "
          f"weights)\n{pipe.generation_stats}\n{pipe.memory_summary()}")
    try:
        generate(pipe, prompt="Two Zorblaxes walk by")
        refused = ""
    except ValueError as err:
        refused = str(err)
        print(f"\nrefused: {refused}")   # the error names the guardrail that fired
    pipe = None  # frees its devices

    pipe = RBLNCosmosVideoToWorldPipeline.from_pretrained(video_to_world, export=True, safety_checker=checker,
                                                          rbln_config=RBLN_CONFIG)
    first_frame = Image.fromarray((video[0] * 255).round().astype(np.uint8))
    continued = generate(pipe, prompt=PROMPT, image=first_frame)
    second_gif = save_gif(continued, out / "video_to_world.gif", FPS)
    print(f"\nvideo-to-world from the first frame -> {second_gif}\n{pipe.generation_stats}")
    return Result(video, continued, refused, (first_gif, second_gif))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
