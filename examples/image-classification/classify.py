"""Classify images on the simulated NPU: a tiny ResNet, trained here, through the whole flow.

1. `build()` draws images (a red, green or blue shape on a noisy gray background), trains a
   tiny Hugging Face ResNet (~30k parameters) to name the colour for a few seconds on the
   CPU, and saves it as an ordinary checkpoint folder with its image processor (the PIL one:
   no torchvision needed).
2. `main()` compiles it for the NPU (`from_pretrained(..., export=True)`), saves and reloads
   the compiled folder without recompiling, classifies freshly drawn PIL images with
   `transformers.pipeline("image-classification")`, checks the top-1 against the HF model,
   prints the simulated device figures and saves a Perfetto trace whose kernels show the
   fused convolutions (batch norms folded in, `conv2d+relu`, `conv2d+add+relu`).

Run: python examples/image-classification/classify.py [--out-dir DIR]   (default: examples/image-classification/out/)
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from transformers import ResNetConfig, ResNetForImageClassification, pipeline
from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

from optimum_npu import RBLNAutoModelForImageClassification

OUT = Path(__file__).resolve().parent / "out"   # checkpoint, compiled folder, trace (git-ignored)
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 220)}
IMAGE_SIZE = 32     # what the model sees; the drawn images are larger and get resized
TRAIN_STEPS = 40


def draw(colour: str, rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A disc or square of `colour` at a random place, on gray noise."""
    pixels = rng.normal(128, 30, (size, size, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    x, y = rng.integers(4, size // 2, 2)
    extent = int(rng.integers(size // 4, size // 2))
    shape = ImageDraw.Draw(image).ellipse if rng.random() < 0.5 else ImageDraw.Draw(image).rectangle
    shape([int(x), int(y), int(x) + extent, int(y) + extent], fill=COLOURS[colour])
    return image


def build(model_dir: str | Path, steps: int = TRAIN_STEPS, seed: int = 0) -> Path:
    """Train the tiny ResNet and save it with its image processor; reused if already there."""
    model_dir = Path(model_dir)
    if (model_dir / "model.safetensors").is_file():
        return model_dir
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    labels = list(COLOURS)
    config = ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=len(labels),
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
    )
    model = ResNetForImageClassification(config)
    processor = ConvNextImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_pct=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        targets = rng.integers(0, len(labels), 24)
        images = [draw(labels[t], rng) for t in targets]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        loss = model(pixel_values=pixel_values, labels=torch.tensor(targets)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return model_dir


@dataclass
class Result:
    truth: list[str]
    predicted: list[str]
    hf_predicted: list[str]
    stats: object
    trace_path: Path
    kernels: Counter


def main(model_dir: str | Path | None = None, out_dir: str | Path | None = None, train_steps: int = TRAIN_STEPS,
         count: int = 6) -> Result:
    out_dir = Path(out_dir or OUT)
    model_dir = build(model_dir or out_dir / "tiny-resnet", steps=train_steps)
    print(f"checkpoint: {model_dir} ({', '.join(sorted(p.name for p in model_dir.iterdir()))})")

    # Compile: the image size comes from the checkpoint's preprocessor_config.json.
    model = RBLNAutoModelForImageClassification.from_pretrained(model_dir, export=True, rbln_batch_size=4)
    compiled = model.save_pretrained(out_dir / "compiled")
    model.close()
    print(f"compiled {type(model).__name__} for {model.rbln_config.npu}, image size {model.rbln_config.image_size}, "
          f"batch {model.rbln_config.batch_size}: {', '.join(sorted(p.name for p in Path(compiled).iterdir()))}")

    # Load without recompiling, with the profiler on (a runtime option).
    model = RBLNAutoModelForImageClassification.from_pretrained(compiled, rbln_activate_profiler=True)
    processor = ConvNextImageProcessorPil.from_pretrained(compiled)
    classify = pipeline("image-classification", model=model, image_processor=processor)

    rng = np.random.default_rng(1234)
    truth = [list(COLOURS)[i % len(COLOURS)] for i in range(count)]
    images = [draw(colour, rng) for colour in truth]
    results = classify(images, top_k=1, batch_size=count)
    predicted = [r[0]["label"] for r in results]
    stats = model.inference_stats  # the pipeline's last call

    hf = ResNetForImageClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = hf(**processor(images=images, return_tensors="pt")).logits
    hf_predicted = [hf.config.id2label[int(i)] for i in logits.argmax(-1)]

    for colour, label, score in zip(truth, predicted, (r[0]["score"] for r in results)):
        print(f"  drawn {colour:<6} -> predicted {label:<6} ({score:.2f})")
    print(f"accuracy {sum(t == p for t, p in zip(truth, predicted))}/{count}; "
          f"top-1 equal to the HF model's: {predicted == hf_predicted}")
    print(f"simulated: {stats}")

    trace_path = Path(model.save_trace(out_dir / "trace.json"))
    events = json.loads(trace_path.read_text())["traceEvents"]
    kernels = Counter(e["name"] for e in events if e.get("ph") == "X" and e.get("cat") == "Neural Engine Clusters")
    print(f"trace: {trace_path} (open in https://ui.perfetto.dev); kernels: "
          + ", ".join(f"{name} x{n}" for name, n in kernels.most_common()))
    model.close()
    return Result(truth, predicted, hf_predicted, stats, trace_path, kernels)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=None, help="where the checkpoint, compiled folder and trace go")
    main(out_dir=parser.parse_args().out_dir)
