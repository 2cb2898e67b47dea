"""W8A8 convolutions for the image classifiers (`rbln_quantization={"weights": "int8",
"activations": "int8"}` on e.g. a ResNet-50).

Each convolution becomes a `QuantizedConv2d` (`rbln::quant_conv2d`): its weight rounded to
nearest per output channel (scales rounded to the device's 16 bits first, as for the decoders),
each image quantised by its own largest magnitude on the fly, the products at the preset's
int8 (fp8) rate. An inference batch norm right after a convolution (HF's ResNet / RegNet /
MobileNet layers: `convolution` then `normalization`) is folded into it first, as the compiler
folds it for 16-bit models, so the rounded weight is the one the device multiplies by. The
classifier head stays 16-bit (as a decoder's LM head).
"""

from __future__ import annotations

import torch
from torch import nn

from .quantization import Quantization, quantize_rtn


class QuantizedConv2d(nn.Module):
    """A Conv2d with an 8-bit weight [Cout, Cin / groups, kh, kw] and one scale per output channel."""

    def __init__(self, conv: nn.Conv2d, fmt: str, scale_dtype: torch.dtype):
        super().__init__()
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            raise ValueError(f"a W8A8 convolution needs explicit zero padding; got padding={conv.padding!r}, "
                             f"padding_mode={conv.padding_mode!r}")
        self.fmt, self.groups = fmt, conv.groups
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        shape = conv.weight.shape
        if conv.weight.is_meta:   # shapes only (compiling on the meta device)
            with torch.device("meta"):
                qweight, scales = torch.empty(shape, dtype=torch.int8 if fmt == "int8" else torch.uint8), \
                    torch.empty(shape[0], 1)
        else:
            packed, scales = quantize_rtn(conv.weight.flatten(1), fmt, 0, scale_dtype)
            qweight = packed.reshape(shape)
        self.qweight = nn.Parameter(qweight, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.rbln.quant_conv2d(x, self.qweight, self.scales, self.bias, self.stride, self.padding,
                                           self.dilation, self.groups, self.fmt)


def fold_batch_norm_(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """Fold an inference batch norm into the convolution before it (in place)."""
    with torch.no_grad():
        factor = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
        bias = norm.bias - norm.running_mean * factor + (0 if conv.bias is None else conv.bias * factor)
        conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)


def quantize_convolutions_(model: nn.Module, quantization: Quantization, scale_dtype: torch.dtype) -> nn.Module:
    """`model` (an HF image classifier) with its batch norms folded and every Conv2d a QuantizedConv2d."""
    for module in list(model.modules()):
        conv, norm = getattr(module, "convolution", None), getattr(module, "normalization", None)
        if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and not conv.weight.is_meta:
            fold_batch_norm_(conv, norm)
            module.normalization = nn.Identity()
        elif isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):   # meta: the shapes of a fold
            conv.bias = nn.Parameter(torch.empty(conv.out_channels, device="meta"), requires_grad=False)
            module.normalization = nn.Identity()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Conv2d):
                setattr(module, child_name, QuantizedConv2d(child, quantization.activations, scale_dtype))
    return model
