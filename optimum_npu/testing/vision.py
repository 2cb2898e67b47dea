"""A tiny random image classifier checkpoint, in the layout `from_pretrained` reads.

    build_tiny_image_classifier(folder)      # a ResNet (~30k parameters) + its PIL image processor

The weights are random (the labels it gives mean nothing); the files are those of a Hub image
classifier (config.json with id2label, model.safetensors, preprocessor_config.json), so the image
size comes from the processor as for a real checkpoint. `examples/image-classification/` trains
one that names colours.
"""

from __future__ import annotations

from pathlib import Path

import torch

LABELS = ("cat", "dog", "bird")


def build_tiny_image_classifier(folder: str | Path, image_size: int = 32) -> Path:
    """Save a tiny random ResNet image classifier and its image processor into `folder`; returns it."""
    from transformers import ResNetConfig, ResNetForImageClassification
    from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

    folder = Path(folder)
    config = ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ResNetForImageClassification(config).eval()
    model.save_pretrained(folder)
    ConvNextImageProcessorPil(size={"shortest_edge": image_size}, crop_pct=1.0).save_pretrained(folder)
    return folder
