"""The Cosmos guardrail on the simulated NPU, end to end on tiny random components (~20 s).

    python examples/cosmos/guardrail.py [out_folder]

1. `optimum_npu.testing.build_tiny_cosmos_guardrail` writes a guardrail checkpoint in the
   upstream layout: a keyword blocklist (here the made-up word "zorblax"), a tiny Llama guard
   model whose weights make it answer "safe", a tiny SigLIP with a frame classifier, and a tiny
   RetinaFace. The networks are random: what they decide about real content means nothing, but
   the loading, compiling and checking code is the real one.
2. `RBLNCosmosSafetyChecker.from_pretrained(..., export=True, rbln_config={...})` compiles each
   network on its own device(s): the guard LLM on device 0, SigLIP and the classifier on 1,
   the face detector on 2.
3. Prompts go through the text guardrails (blocklist, then the guard LLM): variants of the
   blocked word are refused, naming the guardrail that fired; a clean prompt passes.
4. A synthetic video goes through the video guardrails (sampled frames classified, faces
   blurred in every frame) and comes back with the same shape.
5. The compiled checker is saved, loaded back without recompiling, and checked again; the
   simulated device time of each sub-model is printed.

Outputs go to examples/cosmos/out/guardrail/ (the checkpoint, the compiled checker, video.gif).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optimum_npu.cosmos_guardrail import RBLNCosmosSafetyChecker
from optimum_npu.testing import build_tiny_cosmos_guardrail

OUT = Path(__file__).resolve().parent / "out" / "guardrail"
PROMPTS = [
    "a robot arm lifts a red cube",
    "Two Zorblaxes walk by",
    "a z-o-r-b-l-a-x on the table",
    "a green car in a city street at night",
]
FRAMES, HEIGHT, WIDTH = 24, 64, 96      # a tiny video (Cosmos-1.0 makes 121 frames of 704 x 1280)
RBLN_CONFIG = {
    "llamaguard3": {"device": 0, "max_seq_len": 512},
    "siglip_encoder": {"device": 1, "batch_size": 2},
    "video_safety_model": {"device": 1, "batch_size": 2},
    "face_blur_filter": {"device": 2, "batch_size": 4, "image_size": (HEIGHT, WIDTH)},
}


@dataclass
class Result:
    verdicts: dict[str, bool]          # prompt -> passed the text guardrails
    reports: dict[str, str]            # prompt -> what the checker said
    video_in: np.ndarray
    video_out: np.ndarray
    video_report: str
    reloaded_verdicts: dict[str, bool]
    simulated_time_s: dict[str, float]
    compiled_folder: Path


def synthetic_video() -> np.ndarray:
    """A colour gradient with a bright square moving across it, RGB uint8 [frames, height, width, 3]."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    video = np.empty((FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    for t in range(FRAMES):
        video[t, ..., 0] = (x * 255 // WIDTH).astype(np.uint8)
        video[t, ..., 1] = (y * 255 // HEIGHT).astype(np.uint8)
        video[t, ..., 2] = 96
        left = 4 + t * (WIDTH - 28) // FRAMES
        video[t, 20:44, left:left + 24] = (250, 220, 190)
    return video


def check_prompts(checker: RBLNCosmosSafetyChecker) -> tuple[dict[str, bool], dict[str, str]]:
    verdicts, reports = {}, {}
    for prompt in PROMPTS:
        verdicts[prompt] = checker.check_text_safety(prompt)
        reports[prompt] = checker.last_report
        print(f"  {'PASS   ' if verdicts[prompt] else 'REFUSED'} {prompt!r}: {checker.last_report}")
    return verdicts, reports


def main(out: Path = OUT) -> Result:
    # The checker logs each refusal at CRITICAL level; this example prints them itself.
    logging.getLogger("optimum_npu.cosmos_guardrail").setLevel(logging.CRITICAL + 1)
    out = Path(out)
    source = build_tiny_cosmos_guardrail(out / "tiny-guardrail", blocklist=["zorblax"])
    print(f"1. tiny guardrail checkpoint in {source}")

    checker = RBLNCosmosSafetyChecker.from_pretrained(source, export=True, rbln_config=RBLN_CONFIG)
    print(f"2. compiled: {checker}")
    for name, memory in checker.device_memory().items():
        print(f"   {name:<20} " + ", ".join(f"npu{m.device}: {m.total_bytes / 2**20:.2f} MiB" for m in memory))

    print("3. text guardrails")
    verdicts, reports = check_prompts(checker)

    video = synthetic_video()
    checked = checker.check_video_safety(video)
    video_report = checker.last_report
    print(f"4. video {video.shape} -> {checked.shape}: {video_report}")
    try:
        from PIL import Image

        frames = [Image.fromarray(frame) for frame in checked]
        frames[0].save(out / "video.gif", save_all=True, append_images=frames[1:], duration=1000 // 24, loop=0)
    except ImportError:  # Pillow comes with diffusers; the GIF is a nicety
        pass

    compiled = Path(checker.save_pretrained(out / "compiled-guardrail"))
    checker.close()
    reloaded = RBLNCosmosSafetyChecker.from_pretrained(compiled)
    print(f"5. reloaded from {compiled} (no recompilation)")
    reloaded_verdicts, _ = check_prompts(reloaded)
    times = dict(checker.simulated_time_s)
    print("   simulated device time of the first checker, per sub-model: "
          + ", ".join(f"{name} {seconds * 1e3:.3f} ms" for name, seconds in times.items()))
    reloaded.close()
    return Result(verdicts, reports, video, checked, video_report, reloaded_verdicts, times, compiled)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
