"""Image classifiers as single-graph models: one implementation for every HF family.

`RBLNModelForImageClassification` compiles `pixel_values [rbln_batch_size, channels, height,
width] -> logits` and returns the HF output class, so `transformers.pipeline("image-classification",
model=rbln_model, image_processor=...)` runs on it. A family is its HF class (and output class):
ResNet, ConvNeXt (V1, V2), ViT, DeiT, DINOv2, Swin, RegNet, MobileNet (V1, V2) below.

    model = RBLNResNetForImageClassification.from_pretrained("microsoft/resnet-50", export=True,
                                                              rbln_batch_size=8)
    logits = model(pixel_values).logits        # any number of images of the compiled size
    print(model.inference_stats)                 # simulated latency per batch, images/s, memory

The generic class (and `RBLNAutoModelForImageClassification`) picks the family from the
checkpoint's model_type. The image size is a compile-time option: `rbln_image_size` (an int,
`(height, width)` or `{"height": h, "width": w}`), else what the checkpoint's image processor
produces (preprocessor_config.json), else the model config's `image_size`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from transformers import (
    ConvNextForImageClassification,
    ConvNextV2ForImageClassification,
    DeiTForImageClassification,
    Dinov2ForImageClassification,
    MobileNetV1ForImageClassification,
    MobileNetV2ForImageClassification,
    RegNetForImageClassification,
    ResNetForImageClassification,
    SwinForImageClassification,
    ViTForImageClassification,
)
from transformers.modeling_outputs import ImageClassifierOutput, ImageClassifierOutputWithNoAttention
from transformers.models.swin.modeling_swin import SwinImageClassifierOutput

from ..configuration import OPTION_PREFIX, RBLNModelConfig
from ..sim_device.program import PROGRAM_DTYPES
from .base import RBLNModel
from .quantization import Quantization, check_fp8_support, normalize_option
from .quantized_convolutions import quantize_convolutions_
from .transformers_pipelines import list_for_pipelines

IMAGE_PROCESSOR_FILE = "preprocessor_config.json"


def _image_size_error(value) -> TypeError:
    return TypeError(
        f"{OPTION_PREFIX}image_size must be an int, (height, width) or {{'height': h, 'width': w}} with positive "
        f"ints; got {value!r}"
    )


def normalize_image_size(value) -> tuple[int, int] | None:
    """(height, width) from an int, a pair or a {"height", "width"} mapping; None stays None."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        if set(value) != {"height", "width"}:
            raise _image_size_error(value)
        value = (value["height"], value["width"])
    elif isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise _image_size_error(value)
    return tuple(value)


@dataclass(frozen=True, kw_only=True)
class RBLNModelForImageClassificationConfig(RBLNModelConfig):
    """Options of a compiled image classifier (plus the base npu / dtype / batch_size / ...)."""

    image_size: tuple[int, int] | None = None   # (height, width); None: from the image processor / config
    # W8A8 convolutions: {"weights": "int8", "activations": "int8"} (modeling/quantized_convolutions.py)
    quantization: Mapping | None = dataclasses.field(default=None, hash=False)

    def _validate(self) -> None:
        super()._validate()
        self._set("image_size", normalize_image_size(self.image_size))
        self._set("quantization", normalize_option(self.quantization))
        check_fp8_support(self.quantization, self.npu)
        spec = Quantization.parse(self.quantization)
        if spec is not None and (spec.activations == "fp16" or spec.kv_caches != "fp16"):
            raise ValueError(f"{OPTION_PREFIX}quantization of an image classifier is W8A8: {{'weights': 'int8', "
                             f"'activations': 'int8'}} (or 'fp8' for both); got {self.quantization}")


class _LogitsGraph(torch.nn.Module):
    """The exported graph: pixel_values -> logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def image_size_from_processor(folder: Path | None) -> tuple[int, int] | None:
    """The size of the images the checkpoint's image processor produces, if it says."""
    path = folder / IMAGE_PROCESSOR_FILE if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); pass rbln_image_size explicitly") from None
    if not isinstance(settings, dict):
        return None
    # The last step that sets the size wins: a center crop, else the resize.
    size = settings.get("crop_size") if settings.get("do_center_crop") else None
    size = size if size is not None else settings.get("size")
    if isinstance(size, dict) and set(size) == {"shortest_edge"}:
        size = size["shortest_edge"]  # square models (ResNet, ConvNeXt) crop to the shortest edge
    try:
        return normalize_image_size(size)
    except TypeError:
        return None


class RBLNModelForImageClassification(RBLNModel):
    """A compiled HF image classifier; `forward(pixel_values)` -> the HF output with `logits`."""

    config_class: ClassVar[type] = RBLNModelForImageClassificationConfig
    output_class: ClassVar[type] = ImageClassifierOutputWithNoAttention
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    stats_unit = "images"

    @classmethod
    def _resolve_config(cls, hf_model, config, source_folder=None):
        if config.image_size is not None:
            return config
        size = image_size_from_processor(source_folder) or normalize_image_size(
            getattr(hf_model.config, "image_size", None))
        if size is None:
            raise ValueError(
                f"{OPTION_PREFIX}image_size is not set and cannot be inferred: the checkpoint has no "
                f"{IMAGE_PROCESSOR_FILE} saying the image size and its config has no image_size. Pass "
                f"{OPTION_PREFIX}image_size=224 (or (height, width))."
            )
        return dataclasses.replace(config, image_size=size)

    @classmethod
    def _input_info(cls, hf_config, config):
        channels = getattr(hf_config, "num_channels", 3)
        return [("pixel_values", (config.batch_size, channels, *config.image_size), "float32")]

    @classmethod
    def _export_module(cls, hf_model, config) -> torch.nn.Module:
        quantization = Quantization.parse(config.quantization)
        if quantization is not None:   # on a copy: from_model's model is the caller's
            hf_model = quantize_convolutions_(copy.deepcopy(hf_model), quantization, PROGRAM_DTYPES[config.dtype])
        return _LogitsGraph(hf_model)

    def forward(self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs):
        unused = sorted(k for k, v in kwargs.items() if v is not None and k not in ("output_hidden_states",
                                                                                  "output_attentions"))
        if unused or kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            raise TypeError(f"{type(self).__name__}.forward() takes pixel_values only; got {unused or 'output_*'}")
        self._check_pixels(pixel_values)
        (logits,) = self._run_graph(self.graph_name, [pixel_values.float()])
        result = self.output_class(logits=logits)
        return result if return_dict is not False else result.to_tuple()

    def _check_pixels(self, pixel_values) -> None:
        (spec,) = self.rbln_config.graphs[self.graph_name]
        channels, height, width = spec[1][1:]
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point() or pixel_values.dim() != 4:
            got = (f"{pixel_values.dtype} {tuple(pixel_values.shape)}" if isinstance(pixel_values, torch.Tensor)
                   else type(pixel_values).__name__)
            raise ValueError(f"pixel_values must be a float tensor [batch, {channels}, {height}, {width}]; got {got}")
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values holds no image (batch of 0)")
        if tuple(pixel_values.shape[1:]) != (channels, height, width):
            _, c, h, w = pixel_values.shape
            raise ValueError(
                f"pixel_values holds {c}-channel images of {h}x{w} (height x width), but the model was compiled for "
                f"{channels}-channel images of {height}x{width} (rbln_image_size=({height}, {width})). Resize the "
                f"images to {height}x{width} (the image processor does), or recompile with rbln_image_size=({h}, {w})."
            )


class RBLNResNetForImageClassification(RBLNModelForImageClassification):
    hf_class = ResNetForImageClassification


class RBLNConvNextForImageClassification(RBLNModelForImageClassification):
    hf_class = ConvNextForImageClassification


class RBLNViTForImageClassification(RBLNModelForImageClassification):
    hf_class = ViTForImageClassification
    output_class = ImageClassifierOutput


class RBLNMobileNetV2ForImageClassification(RBLNModelForImageClassification):
    hf_class = MobileNetV2ForImageClassification


class RBLNConvNextV2ForImageClassification(RBLNModelForImageClassification):
    hf_class = ConvNextV2ForImageClassification


class RBLNRegNetForImageClassification(RBLNModelForImageClassification):
    hf_class = RegNetForImageClassification


class RBLNMobileNetV1ForImageClassification(RBLNModelForImageClassification):
    hf_class = MobileNetV1ForImageClassification


class RBLNDeiTForImageClassification(RBLNModelForImageClassification):
    hf_class = DeiTForImageClassification
    output_class = ImageClassifierOutput


class RBLNDinov2ForImageClassification(RBLNModelForImageClassification):
    hf_class = Dinov2ForImageClassification
    output_class = ImageClassifierOutput


class RBLNSwinForImageClassification(RBLNModelForImageClassification):
    hf_class = SwinForImageClassification
    output_class = SwinImageClassifierOutput


list_for_pipelines("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING",
                   [c for c in list(globals().values()) if isinstance(c, type) and c is not RBLNModelForImageClassification
                    and issubclass(c, RBLNModelForImageClassification)])
