"""Stable Diffusion on the simulated NPU, end to end on tiny random components (~30 s).

    python examples/stable-diffusion/text_to_image.py [out_folder]

1. `optimum_npu.testing.build_tiny_stable_diffusion` writes a diffusers Stable Diffusion folder
   (CLIP text encoder, UNet, VAE, scheduler, tokenizer) with small random weights: the images
   are noise-like, but every code path (loading, compiling, diffusers' own pipeline loop) is real.
2. `RBLNStableDiffusionPipeline.from_pretrained(..., export=True, rbln_config={...})` compiles
   the text encoder, the UNet (batch 2: classifier-free guidance runs prompt and negative
   prompt in one call) and the VAE decoder, each on its own device.
3. diffusers' `StableDiffusionPipeline.__call__` runs unchanged on them; the image is written as
   a PNG, and the simulated time of each component is printed.
4. The compiled pipeline is saved as a diffusers folder (model_index.json naming our classes),
   loaded back without compiling, and an image-to-image pipeline reworks the image.

Outputs go to examples/stable-diffusion/out/ (checkpoint, compiled pipeline, text_to_image.png,
image_to_image.png).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from optimum_npu import RBLNStableDiffusionImg2ImgPipeline, RBLNStableDiffusionPipeline
from optimum_npu.testing import build_tiny_stable_diffusion

OUT = Path(__file__).resolve().parent / "out"
PROMPT = "an astronaut riding a horse"
SIZE = 32  # pixels (Stable Diffusion 1.5 makes 512 x 512)
RBLN_CONFIG = {"height": SIZE, "width": SIZE, "text_encoder": {"device": 0}, "unet": {"device": 1},
               "vae": {"device": 2}}


@dataclass
class Result:
    image: np.ndarray            # [height, width, 3] in [0, 1]
    reloaded_image: np.ndarray   # the same prompt and seed on the reloaded pipeline
    reworked_image: np.ndarray   # image-to-image from `image`
    compiled_folder: Path
    png: Path


def save_png(image: np.ndarray, path: Path, scale: int = 8) -> Path:
    """The image, enlarged `scale` times (nearest) so that a tiny one is visible."""
    pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(pixels).resize((pixels.shape[1] * scale, pixels.shape[0] * scale), Image.NEAREST).save(path)
    return path


def generate(pipe, **kwargs) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(**kwargs, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


def main(out: Path = OUT) -> Result:
    out = Path(out)
    checkpoint = Path(build_tiny_stable_diffusion(out / "tiny-sd-checkpoint", sample_size=SIZE))
    print(f"tiny Stable Diffusion checkpoint: {checkpoint}")

    pipe = RBLNStableDiffusionPipeline.from_pretrained(checkpoint, export=True, rbln_config=RBLN_CONFIG)
    for name, config in pipe.rbln_config.components.items():
        print(f"  compiled {name:<13} batch {config.batch_size}, device {config.device}")
    image = generate(pipe, prompt=PROMPT)
    png = save_png(image, out / "text_to_image.png")
    print(f"\n{PROMPT!r} -> {png} (noise: the tiny components have random weights)\n{pipe.generation_stats}\n"
          f"{pipe.memory_summary()}")

    compiled = Path(pipe.save_pretrained(out / "compiled-sd"))
    pipe = None  # frees its devices before the reload takes them
    reloaded = RBLNStableDiffusionPipeline.from_pretrained(compiled, rbln_config=RBLN_CONFIG)
    reloaded_image = generate(reloaded, prompt=PROMPT)
    print(f"\nreloaded {compiled} without compiling: same image: {np.array_equal(reloaded_image, image)}")
    reloaded = None

    img2img = RBLNStableDiffusionImg2ImgPipeline.from_pretrained(checkpoint, export=True, rbln_config=RBLN_CONFIG)
    reworked = generate(img2img, prompt="a painting of a horse", image=torch.from_numpy(image).permute(2, 0, 1)[None],
                        strength=0.6)
    save_png(reworked, out / "image_to_image.png")
    print(f"image-to-image -> {out / 'image_to_image.png'} (noise too)\n{img2img.generation_stats}")
    return Result(image, reloaded_image, reworked, compiled, png)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
