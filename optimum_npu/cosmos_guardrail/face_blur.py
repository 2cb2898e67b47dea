"""Face blur: a RetinaFace detector (on the NPU) finds faces, the host blurs them in every frame.

The network is RetinaFace with a ResNet backbone (Deng et al., "RetinaFace: Single-stage Dense
Face Localisation in the Wild", 2019), written here in plain torch (no torchvision): a
bottleneck ResNet whose stages 2-4 feed a three-level feature pyramid (FPN), an SSH context
module per level, and 1x1-conv heads giving, for 2 anchors per position, a face score, a box
offset and 5 landmarks. Parameter names follow the public Pytorch_Retinaface checkpoint
(`Resnet50_Final.pth`, which the upstream Cosmos guardrail ships as
`face_blur_filter/Resnet50_Final.pth`): `body.layer1.0.conv1.weight`, `fpn.output1.0.weight`,
`ssh1.conv5X5_1.0.weight`, `ClassHead.0.conv1x1.weight`, ... so that checkpoint loads as is.

On the host, around the compiled graph: anchors ("priors") per feature-map cell, box decoding
with the SSD variances, confidence filtering, non-maximum suppression (NMS, numpy: no
torchvision), and the blur: pixelation (the upstream default: each face becomes a 5 x 5 grid of
flat colour blocks) or a Gaussian blur.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from ..configuration import RBLNModelConfig
from ..modeling.base import RBLNModel
from ..modeling.image_classification import normalize_image_size
from .upstream_checkpoints import load_exact_state_dict, load_torch_checkpoint

logger = logging.getLogger(__name__)

UPSTREAM_CHECKPOINT = "Resnet50_Final.pth"   # the file name in the Cosmos guardrail checkpoint
# Input normalisation of the Pytorch_Retinaface checkpoint: BGR channel order, these means subtracted.
BGR_MEANS = (104.0, 117.0, 123.0)
# Detection post-processing constants of the reference detector (Pytorch_Retinaface detect.py,
# used unchanged by the upstream Cosmos guardrail).
CONFIDENCE_THRESHOLD = 0.7
NMS_THRESHOLD = 0.4
TOP_K = 5000
KEEP_TOP_K = 750
MIN_FACE_SIZE = (20, 20)   # boxes smaller than this (pixels, w x h) are left alone, as upstream
BLUR_METHODS = ("pixelate", "gaussian")
DEFAULT_IMAGE_SIZE = (704, 1280)   # Cosmos-1.0 videos are 1280 x 704 (width x height)


class RetinaFaceConfig(PretrainedConfig):
    """Architecture of the detector. The defaults are the ResNet-50 RetinaFace of the checkpoint."""

    model_type = "cosmos_retinaface"

    def __init__(self, backbone_depths=(3, 4, 6, 3), backbone_width: int = 64, fpn_channels: int = 256,
                 anchor_min_sizes=((16, 32), (64, 128), (256, 512)), anchor_steps=(8, 16, 32),
                 variances=(0.1, 0.2), initializer_range: float = 0.02, **kwargs):
        self.backbone_depths = list(backbone_depths)
        self.backbone_width = backbone_width
        self.fpn_channels = fpn_channels
        self.anchor_min_sizes = [list(sizes) for sizes in anchor_min_sizes]
        self.anchor_steps = list(anchor_steps)
        self.variances = list(variances)
        self.initializer_range = initializer_range
        super().__init__(**kwargs)

    @property
    def anchors_per_position(self) -> int:
        return len(self.anchor_min_sizes[0])


AutoConfig.register(RetinaFaceConfig.model_type, RetinaFaceConfig, exist_ok=True)


# ---- the network -------------------------------------------------------------------------


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, leaky: float | None = None) -> nn.Sequential:
    """Conv (no bias) + batch norm [+ leaky ReLU]: the checkpoint's `conv_bn*` blocks (keys .0 / .1)."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    if leaky is not None:
        layers.append(nn.LeakyReLU(leaky))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), torchvision's parameter names."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNetBody(nn.Module):
    """The ResNet trunk up to stage 4; returns the outputs of stages 2, 3 and 4 (strides 8, 16, 32)."""

    def __init__(self, depths, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for stage, depth in enumerate(depths):
            stage_width = width * 2 ** stage
            blocks = []
            for i in range(depth):
                blocks.append(Bottleneck(cin, stage_width, stride=2 if (i == 0 and stage > 0) else 1))
                cin = stage_width * Bottleneck.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        return c3, c4, self.layer4(c4)

    @staticmethod
    def channels(width: int) -> list[int]:
        """Channels of the stage 2, 3 and 4 outputs."""
        return [width * Bottleneck.expansion * 2 ** s for s in (1, 2, 3)]


class FPN(nn.Module):
    """Top-down feature pyramid: 1x1 lateral convs, nearest upsampling, a 3x3 merge conv."""

    def __init__(self, in_channels: list[int], out: int):
        super().__init__()
        leaky = 0.1 if out <= 64 else 0.0   # the reference network's rule
        self.output1, self.output2, self.output3 = (conv_bn(c, out, 1, leaky=leaky) for c in in_channels)
        self.merge1, self.merge2 = conv_bn(out, out, leaky=leaky), conv_bn(out, out, leaky=leaky)

    def forward(self, c3, c4, c5):
        p3, p4, p5 = self.output1(c3), self.output2(c4), self.output3(c5)
        p4 = self.merge2(p4 + F.interpolate(p5, size=p4.shape[-2:], mode="nearest"))
        p3 = self.merge1(p3 + F.interpolate(p4, size=p3.shape[-2:], mode="nearest"))
        return p3, p4, p5


class SSH(nn.Module):
    """Single-stage context module: 3x3, 5x5 and 7x7 receptive fields (stacked 3x3 convs), concatenated."""

    def __init__(self, channels: int):
        super().__init__()
        leaky = 0.1 if channels <= 64 else 0.0
        half, quarter = channels // 2, channels // 4
        self.conv3X3 = conv_bn(channels, half)
        self.conv5X5_1 = conv_bn(channels, quarter, leaky=leaky)
        self.conv5X5_2 = conv_bn(quarter, quarter)
        self.conv7X7_2 = conv_bn(quarter, quarter, leaky=leaky)
        self.conv7x7_3 = conv_bn(quarter, quarter)

    def forward(self, x):
        branch5 = self.conv5X5_1(x)
        branch7 = self.conv7X7_2(branch5)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(branch5), self.conv7x7_3(branch7)], dim=1))


class AnchorHead(nn.Module):
    """A 1x1 conv giving `values` numbers per anchor, flattened to [batch, positions * anchors, values]."""

    def __init__(self, channels: int, anchors: int, values: int):
        super().__init__()
        self.values = values
        self.conv1x1 = nn.Conv2d(channels, anchors * values, 1)

    def forward(self, x):
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.values)


class RetinaFaceModel(PreTrainedModel):
    """RetinaFace. Input: BGR images minus `BGR_MEANS`, [batch, 3, H, W] float. Output: box offsets
    [batch, anchors, 4], face probabilities [batch, anchors] and landmark offsets [batch, anchors, 10]."""

    config_class = RetinaFaceConfig
    base_model_prefix = "retinaface"
    main_input_name = "pixel_values"

    def __init__(self, config: RetinaFaceConfig):
        super().__init__(config)
        if config.fpn_channels % 4:
            raise ValueError(f"fpn_channels must be a multiple of 4 (the SSH module splits it); "
                             f"got {config.fpn_channels}")
        channels, anchors = config.fpn_channels, config.anchors_per_position
        self.body = ResNetBody(config.backbone_depths, config.backbone_width)
        self.fpn = FPN(ResNetBody.channels(config.backbone_width), channels)
        self.ssh1, self.ssh2, self.ssh3 = SSH(channels), SSH(channels), SSH(channels)
        self.ClassHead = nn.ModuleList(AnchorHead(channels, anchors, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(AnchorHead(channels, anchors, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(AnchorHead(channels, anchors, 10) for _ in range(3))
        self.post_init()

    def forward(self, pixel_values: torch.Tensor):
        p3, p4, p5 = self.fpn(*self.body(pixel_values))
        features = [self.ssh1(p3), self.ssh2(p4), self.ssh3(p5)]
        boxes = torch.cat([head(f) for head, f in zip(self.BboxHead, features)], dim=1)
        logits = torch.cat([head(f) for head, f in zip(self.ClassHead, features)], dim=1)
        landmarks = torch.cat([head(f) for head, f in zip(self.LandmarkHead, features)], dim=1)
        return boxes, logits.softmax(dim=-1)[..., 1], landmarks


def load_retinaface(folder: str | os.PathLike) -> RetinaFaceModel:
    """The detector in `folder`: ours (config.json + model.safetensors), or the upstream
    `Resnet50_Final.pth` (the ResNet-50 architecture, or the one a config.json beside it gives)."""
    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return RetinaFaceModel.from_pretrained(folder).eval()
    path = folder / UPSTREAM_CHECKPOINT
    if not path.is_file():
        raise ValueError(f"{folder} holds no face detector: expected config.json + model.safetensors, "
                         f"or the upstream {UPSTREAM_CHECKPOINT}")
    state = load_torch_checkpoint(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if isinstance(state, dict):
        # Checkpoints saved from nn.DataParallel prefix every name with "module.".
        state = {k.removeprefix("module.") if isinstance(k, str) else k: v for k, v in state.items()}
    config = RetinaFaceConfig.from_pretrained(folder) if (folder / "config.json").is_file() else RetinaFaceConfig()
    return load_exact_state_dict(RetinaFaceModel(config).eval(), state, path)


# ---- host post-processing ------------------------------------------------------------------


def anchor_priors(config: RetinaFaceConfig, height: int, width: int) -> torch.Tensor:
    """Anchors [N, 4] as (cx, cy, w, h), relative to the image, in the order the heads emit them:
    level by level, row by row, column by column, anchor size by size."""
    priors = []
    for step, sizes in zip(config.anchor_steps, config.anchor_min_sizes):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy = (torch.arange(rows, dtype=torch.float64) + 0.5) * step / height
        cx = (torch.arange(cols, dtype=torch.float64) + 0.5) * step / width
        grid_y, grid_x = torch.meshgrid(cy, cx, indexing="ij")
        for_size = [torch.stack([grid_x, grid_y, torch.full_like(grid_x, s / width),
                                 torch.full_like(grid_y, s / height)], dim=-1) for s in sizes]
        priors.append(torch.stack(for_size, dim=2).reshape(-1, 4))
    return torch.cat(priors).float()


def decode_boxes(offsets: torch.Tensor, priors: torch.Tensor, variances) -> torch.Tensor:
    """Box offsets [..., N, 4] -> corners (x1, y1, x2, y2) relative to the image (SSD encoding:
    centre shift scaled by variance[0] and the anchor size, log size scaled by variance[1])."""
    centre = priors[:, :2] + offsets[..., :2] * variances[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(offsets[..., 2:] * variances[1])
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first."""
    x1, y1, x2, y2 = boxes.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        width = np.clip(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0, None)
        height = np.clip(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0, None)
        overlap = width * height
        iou = overlap / np.maximum(areas[best] + areas[rest] - overlap, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def select_faces(boxes: np.ndarray, scores: np.ndarray, confidence: float = CONFIDENCE_THRESHOLD,
                 iou_threshold: float = NMS_THRESHOLD, top_k: int = TOP_K, keep_top_k: int = KEEP_TOP_K) -> np.ndarray:
    """Boxes [k, 4] of one image: above `confidence`, the `top_k` best, NMS, at most `keep_top_k`."""
    above = scores > confidence
    boxes, scores = boxes[above], scores[above]
    best = np.argsort(-scores, kind="stable")[:top_k]
    boxes, scores = boxes[best], scores[best]
    return boxes[nms(boxes, scores, iou_threshold)][:keep_top_k]


def pixelate(region: np.ndarray, blocks: int = 5) -> np.ndarray:
    """`region` [h, w, c] as a blocks x blocks grid of flat cells, each its cell's mean colour."""
    h, w = region.shape[:2]
    out = np.empty_like(region)
    rows = np.linspace(0, h, min(blocks, h) + 1).round().astype(int)
    cols = np.linspace(0, w, min(blocks, w) + 1).round().astype(int)
    for top, bottom in zip(rows[:-1], rows[1:]):
        for left, right in zip(cols[:-1], cols[1:]):
            cell = region[top:bottom, left:right]
            out[top:bottom, left:right] = cell.reshape(-1, region.shape[2]).mean(axis=0).round().astype(region.dtype)
    return out


def gaussian_blur(region: np.ndarray, sigma: float | None = None) -> np.ndarray:
    """`region` [h, w, c] blurred by a separable Gaussian (default sigma: a tenth of the smaller side,
    strong enough to hide a face), edges reflected."""
    h, w = region.shape[:2]
    sigma = sigma if sigma is not None else max(1.0, min(h, w) / 10)
    radius = max(1, min(int(3 * sigma), (min(h, w) - 1)))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    x = torch.from_numpy(region.astype(np.float32)).permute(2, 0, 1)[:, None]     # [c, 1, h, w]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    out = x[:, 0].permute(1, 2, 0).numpy()
    if np.issubdtype(region.dtype, np.integer):
        out = np.clip(out.round(), np.iinfo(region.dtype).min, np.iinfo(region.dtype).max)
    return out.astype(region.dtype)


def blur_boxes(frame: np.ndarray, boxes: np.ndarray, method: str = "pixelate",
               min_size: tuple[int, int] = MIN_FACE_SIZE) -> np.ndarray:
    """A copy of `frame` [H, W, C] with each box (pixel corners) blurred; boxes smaller than
    `min_size` are skipped, boxes crossing the border are clipped to the frame."""
    if method not in BLUR_METHODS:
        raise ValueError(f"blur method must be one of {', '.join(map(repr, BLUR_METHODS))}; got {method!r}")
    frame = frame.copy()
    height, width = frame.shape[:2]
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        x1, y1, x2, y2 = int(x1), int(y1), int(x2), int(y2)
        if x2 - x1 < min_size[0] or y2 - y1 < min_size[1]:
            continue
        x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
        if x2 <= x1 or y2 <= y1:
            continue
        region = frame[y1:y2, x1:x2]
        frame[y1:y2, x1:x2] = pixelate(region) if method == "pixelate" else gaussian_blur(region)
    return frame


def frames_to_detector_input(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """RGB uint8 frames [T, H, W, 3] -> the detector's input [T, 3, height, width]: resized
    (bilinear) to the compiled size when needed, BGR, means subtracted."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    x = x[:, [2, 1, 0]]
    return x - torch.tensor(BGR_MEANS).view(1, 3, 1, 1)


# ---- on the NPU ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RBLNRetinaFaceConfig(RBLNModelConfig):
    """Options of the compiled detector: frames per run (`batch_size`) and the frame size it takes."""

    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE   # (height, width); other frames are resized to it

    def _validate(self) -> None:
        super()._validate()
        self._set("image_size", normalize_image_size(self.image_size))


class RBLNRetinaFace(RBLNModel):
    """RetinaFace compiled to the NPU: `forward(pixel_values)` -> (box offsets, face scores, landmarks)."""

    hf_class = RetinaFaceModel
    config_class = RBLNRetinaFaceConfig
    main_input_name = "pixel_values"
    stats_unit = "frames"

    @classmethod
    def _load_hf_model(cls, model_id, hf_kwargs: dict, config):
        return load_retinaface(model_id)

    @classmethod
    def _input_info(cls, hf_config, config):
        return [("pixel_values", (config.batch_size, 3, *config.image_size), "float32")]

    @classmethod
    def _export_module(cls, hf_model, config) -> torch.nn.Module:
        return hf_model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._run_graph(self.graph_name, [pixel_values.float()])


class RetinaFaceFilter:
    """The face-blur guardrail: detect faces in every frame (on the NPU), blur them (on the host)."""

    name = "RetinaFaceFilter"

    def __init__(self, detector: RBLNRetinaFace, confidence_threshold: float = CONFIDENCE_THRESHOLD,
                 blur_method: str = "pixelate", min_size: tuple[int, int] = MIN_FACE_SIZE):
        if blur_method not in BLUR_METHODS:
            raise ValueError(f"blur_method must be one of {', '.join(map(repr, BLUR_METHODS))}; got {blur_method!r}")
        if not 0.0 <= confidence_threshold < 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1); got {confidence_threshold!r}")
        self.detector = detector
        self.confidence_threshold = confidence_threshold
        self.blur_method = blur_method
        self.min_size = min_size
        height, width = detector.rbln_config.image_size
        self._priors = anchor_priors(detector.config, height, width)
        self.faces_found = 0          # over every call, for reports
        self.simulated_s = 0.0

    def detect(self, frames: np.ndarray) -> list[np.ndarray]:
        """Face boxes [k, 4] in pixels of `frames` (RGB uint8 [T, H, W, 3]), one array per frame."""
        height, width = self.detector.rbln_config.image_size
        offsets, scores, _ = self.detector(frames_to_detector_input(frames, height, width))
        self.simulated_s += self.detector.inference_stats.device_s
        boxes = decode_boxes(offsets.float(), self._priors, self.detector.config.variances)
        frame_height, frame_width = frames.shape[1:3]
        boxes = (boxes * torch.tensor([frame_width, frame_height, frame_width, frame_height])).numpy()
        scores = scores.float().numpy()
        return [select_faces(boxes[i], scores[i], self.confidence_threshold) for i in range(len(frames))]

    def postprocess(self, frames: np.ndarray) -> np.ndarray:
        detections = self.detect(frames)
        self.faces_found += sum(len(d) for d in detections)
        return np.stack([blur_boxes(frame, boxes, self.blur_method, self.min_size)
                         for frame, boxes in zip(frames, detections)])
