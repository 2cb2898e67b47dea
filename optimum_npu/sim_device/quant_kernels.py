"""Low-precision weights on the device: the packed layouts and the dequantising matmul kernel.

A weight-only quantised linear layer (w8a16, w4a16, fp8 weights) keeps in device DRAM its
packed weight and its scales; the kernel streams those (so its DMA is priced by packed bytes),
dequantises each weight tile to the 16-bit compute type on chip and multiplies at the 16-bit
rate, as the hardware does. `rbln::dequant_linear` is that kernel, with real CPU semantics:

    qweight  [N, K]    int8 ("int8": one signed byte per weight)
             [N, K/2]  uint8 ("int4": two signed 4-bit weights per byte, the even column of
                       each pair in the low nibble, two's complement)
             [N, K]    uint8 ("fp8": the bits of float8_e4m3fn values)
    scales   [N, K / group_size] in the device float type (group_size 0: one scale per
             output channel, i.e. a group of the whole local row)
    weight[n, k] = q[n, k] * scales[n, k // group_size]

The dequantised weight is computed in the scales' dtype (the device's 16-bit type; fp32 in
exact numerics, where the scales are exact 16-bit values, so the result is exactly the fp32
product), then the matmul runs in the input's dtype.

This module imports only torch (the sim_device layer knows nothing of the rest of the package).
"""

from __future__ import annotations

import torch
from torch import Tensor

DEQUANT_LINEAR = "rbln.dequant_linear.default"
QUANT_LINEAR = "rbln.quant_linear.default"
QUANT_CONV2D = "rbln.quant_conv2d.default"
QUANT_OPS = (DEQUANT_LINEAR, QUANT_LINEAR, QUANT_CONV2D)

# Packed weight formats, and the storage dtype and number of weights per stored element of each.
WEIGHT_FORMATS = ("int8", "int4", "fp8")
STORAGE = {"int8": (torch.int8, 1), "int4": (torch.uint8, 2), "fp8": (torch.uint8, 1)}
QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}   # largest magnitude each format holds (e4m3: 448)
FP8 = torch.float8_e4m3fn


def pack_int4(q: Tensor) -> Tensor:
    """int8 [..., K] holding values in [-8, 7] (K even) -> uint8 [..., K/2], two per byte."""
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [..., K/2] -> int8 [..., K] in [-8, 7] (inverse of `pack_int4`)."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    both = torch.stack((low, high), dim=-1).flatten(-2)
    return torch.where(both > 7, both - 16, both)


def unpacked_values(qweight: Tensor, fmt: str) -> Tensor:
    """The quantised values [N, K] of a packed weight: int8 for int8 / int4, float8 for fp8."""
    if fmt == "int4":
        return unpack_int4(qweight)
    if fmt == "fp8":
        return qweight.view(FP8)
    if fmt == "int8":
        return qweight
    raise ValueError(f"dequant_linear: format must be one of {WEIGHT_FORMATS}, got {fmt!r}")


def dequantize(qweight: Tensor, scales: Tensor, fmt: str, group_size: int) -> Tensor:
    """The weight [N, K] in the scales' dtype (see the module docstring)."""
    q = unpacked_values(qweight, fmt)
    rows, cols = q.shape
    group = cols if group_size <= 0 else group_size
    if cols % group or scales.shape != (rows, cols // group):
        raise ValueError(f"dequant_linear: scales {list(scales.shape)} do not match a weight [{rows}, {cols}] in groups "
                         f"of {group}")
    grouped = q.to(scales.dtype).reshape(rows, cols // group, group) * scales.unsqueeze(-1)
    return grouped.reshape(rows, cols)


@torch.library.custom_op("rbln::dequant_linear", mutates_args=())
def dequant_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, fmt: str,
                   group_size: int) -> Tensor:
    """x [..., K] @ dequantize(qweight, scales).T (+ bias): a linear layer with a packed weight."""
    weight = dequantize(qweight, scales, fmt, group_size)
    return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


@dequant_linear.register_fake
def _(x, qweight, scales, bias, fmt, group_size):
    rows = scales.shape[0]
    return x.new_empty((*x.shape[:-1], rows))


ACTIVATION_FORMATS = ("int8", "fp8")


def quantize_per_token(x: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    """(values in fp32, scales [..., 1]) of x quantised per token (each row of its last dimension) by
    its largest magnitude: int8 symmetric in [-127, 127], or float8 e4m3 (saturating at 448)."""
    wide = x.float()
    scales = wide.abs().amax(-1, keepdim=True) / QMAX[fmt]
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    ratio = wide / scales
    if fmt == "int8":
        return ratio.round().clamp(-QMAX[fmt], QMAX[fmt]), scales
    return ratio.clamp(-QMAX[fmt], QMAX[fmt]).to(FP8).float(), scales


@torch.library.custom_op("rbln::quant_linear", mutates_args=())
def quant_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, fmt: str) -> Tensor:
    """W8A8: x quantised per token to `fmt` (int8 / fp8) on the fly, multiplied by the 8-bit weight
    (one scale per output channel, [N, 1]) in the 8-bit matrix engines, the products accumulated
    wide (int32 / fp32: emulated in fp32) and rescaled by both scales to the input's dtype.
    The activation scale is taken over the features this device holds (a row-parallel split
    quantises each rank's slice with its own scales, as vLLM's tensor-parallel W8A8 does)."""
    if fmt not in ACTIVATION_FORMATS:
        raise ValueError(f"quant_linear: format must be one of {ACTIVATION_FORMATS}, got {fmt!r}")
    values, x_scales = quantize_per_token(x, fmt)
    weight = unpacked_values(qweight, fmt).float()
    out = (values @ weight.T) * x_scales * scales.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@quant_linear.register_fake
def _(x, qweight, scales, bias, fmt):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("rbln::quant_conv2d", mutates_args=())
def quant_conv2d(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, stride: list[int],
                 padding: list[int], dilation: list[int], groups: int, fmt: str) -> Tensor:
    """A W8A8 convolution: each image of x quantised to `fmt` by its own largest magnitude (one scale
    per image, on the fly), convolved with the 8-bit weight [Cout, Cin / groups, kh, kw] (one scale
    per output channel, [Cout, 1]) in the 8-bit engines, accumulated wide, rescaled by both scales."""
    if fmt not in ACTIVATION_FORMATS:
        raise ValueError(f"quant_conv2d: format must be one of {ACTIVATION_FORMATS}, got {fmt!r}")
    flat = x.float().flatten(1)
    values, x_scales = quantize_per_token(flat, fmt)
    values = values.reshape(x.shape)
    weight = unpacked_values(qweight.flatten(1), fmt).float().reshape(qweight.shape)
    out = torch.nn.functional.conv2d(values, weight, None, stride, padding, dilation, groups)
    out = out * x_scales.reshape(-1, 1, 1, 1) * scales.float().reshape(1, -1, 1, 1)
    if bias is not None:
        out = out + bias.float().reshape(1, -1, 1, 1)
    return out.to(x.dtype)


@quant_conv2d.register_fake
def _(x, qweight, scales, bias, stride, padding, dilation, groups, fmt):
    weight = torch.empty(qweight.shape, dtype=x.dtype, device=x.device)
    return torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)


IMPLEMENTATIONS = {DEQUANT_LINEAR: dequant_linear._init_fn, QUANT_LINEAR: quant_linear._init_fn,
                   QUANT_CONV2D: quant_conv2d._init_fn}


def weight_elements(qweight_shape: tuple[int, ...], fmt: str) -> int:
    """Weights a packed tensor of this shape holds (int4: two per byte)."""
    count = 1
    for size in qweight_shape:
        count *= size
    return count * STORAGE[fmt][1]
