"""Low precision of a compiled model: the `rbln_quantization` option, round-to-nearest
quantisation at export, and the linear layer that holds packed weights.

The option follows optimum-rbln 0.12's `RBLNQuantizationConfig`:

    rbln_quantization={"format": "rbln", "weights": "int4", "activations": "fp16",
                       "kv_caches": "fp8", "group_size": 128}

- weights: "int8" (w8a16, one scale per output channel unless a group is given), "int4"
  (w4a16, one scale per `group_size` input features; default 128, as GPTQ / AWQ "g128"),
  "fp8" (float8 e4m3 with one scale per output channel; on an NPU with fp8 arithmetic), or "fp16"
  (the model's 16 bits);
- activations: "fp16" (the 16-bit compute type), or "int8" / "fp8" (W8A8: with weights of the same
  format, per channel; each projection's input quantised per token on the fly, the products at the
  preset's int8 / fp8 rate: `rbln::quant_linear`; fp8 only on an NPU with fp8 arithmetic);
- kv_caches: "fp16", or "fp8" (float8 e4m3: half the KV bytes);
- the older `{"precision": "w4a16"}` (also "w8a16", "w8a8") names weights and activations at once.

"fp16" means "the 16-bit type the model is compiled for" (`rbln_dtype`, bf16 or fp16), as on
the vendor's stack. Quantised weights are those of the decoder layers' projections (Q, K, V, O,
gate, up, down: optimum-rbln's targets); embeddings, norms and the LM head stay 16-bit.

Scales are rounded to the 16-bit device type at export, before the weights are rounded against
them, so the model the device holds is exactly `dequantize(q, scales)`: the fp32 reference of
the exact numerics mode is the Hugging Face model with those dequantised weights
(`fake_quantize_`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..configuration import OPTION_PREFIX
from ..sim_device.quant_kernels import FP8, QMAX, STORAGE, dequantize, pack_int4

OPTION = f"{OPTION_PREFIX}quantization"
FORMATS = ("rbln",)
WEIGHTS = ("int4", "int8", "fp8", "fp16")
ACTIVATIONS = ("int8", "fp8", "fp16")
KV_CACHES = ("fp8", "fp16")
PRECISIONS = {"w4a16": ("int4", "fp16"), "w8a16": ("int8", "fp16"), "w8a8": ("int8", "int8")}
DEFAULT_INT4_GROUP = 128
KEYS = ("format", "weights", "activations", "kv_caches", "group_size", "precision")
# The decoder layers' projections a quantised model holds in low precision (optimum-rbln's targets).
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{OPTION}[{key!r}] must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


@dataclass(frozen=True)
class Quantization:
    """A checked `rbln_quantization`: what is low precision, and how."""

    weights: str = "fp16"
    activations: str = "fp16"
    kv_caches: str = "fp16"
    group_size: int = 0      # input features per weight scale; 0: one scale per output channel

    @classmethod
    def parse(cls, value: Any) -> Quantization | None:
        """From the option's value (a dict, or None); ValueError naming the allowed values."""
        if value is None:
            return None
        if isinstance(value, Quantization):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"{OPTION} must be a dict such as {{'weights': 'int4', 'group_size': 128}}; got {value!r}")
        unknown = [key for key in value if key not in KEYS]
        if unknown:
            raise ValueError(f"{OPTION} has unknown key(s) {unknown}; allowed: {', '.join(KEYS)}")
        _choice("format", value.get("format", "rbln"), FORMATS)
        weights, activations = value.get("weights"), value.get("activations")
        precision = value.get("precision")
        if precision is not None:
            if weights is not None or activations is not None:
                raise ValueError(f"{OPTION}: give either 'precision' or 'weights' / 'activations', not both")
            weights, activations = PRECISIONS[_choice("precision", precision, tuple(PRECISIONS))]
        weights = _choice("weights", weights or "fp16", WEIGHTS)
        activations = _choice("activations", activations or "fp16", ACTIVATIONS)
        kv_caches = _choice("kv_caches", value.get("kv_caches") or "fp16", KV_CACHES)
        if weights == activations == kv_caches == "fp16":
            raise ValueError(f"{OPTION}: weights, activations and kv_caches are all 'fp16', which quantises nothing; "
                             f"set one of them (weights: {', '.join(WEIGHTS[:3])}; kv_caches: 'fp8') or drop the option")
        group = value.get("group_size")
        if group is None:
            group = DEFAULT_INT4_GROUP if weights == "int4" else 0
        if isinstance(group, bool) or not isinstance(group, int) or group < 0 or group % 2:
            raise ValueError(f"{OPTION}['group_size'] must be an even int >= 2 (input features per scale, e.g. 32, 64, "
                             f"128), or 0 for one scale per output channel; got {group!r}")
        if weights == "int4" and group == 0:
            raise ValueError(f"{OPTION}: int4 weights need a group: set 'group_size' (e.g. 128) to a divisor of the "
                             "model's hidden and intermediate sizes")
        if weights in ("fp8", "fp16") and group:
            raise ValueError(f"{OPTION}['group_size'] applies to int4 / int8 weights; {weights!r} weights take one "
                             "scale per output channel (drop group_size)")
        if activations != "fp16" and (weights, group) != (activations, 0):
            raise ValueError(f"{OPTION}: {activations} activations (W8A8) multiply {activations} weights with one scale "
                             f"per output channel in the 8-bit matrix engines: set 'weights': {activations!r} without "
                             f"a group_size (got weights {weights!r}, group_size {group})")
        return cls(weights, activations, kv_caches, group)

    def to_json(self) -> dict[str, Any]:
        return {"format": "rbln", "weights": self.weights, "activations": self.activations,
                "kv_caches": self.kv_caches, "group_size": self.group_size}

    @property
    def quantizes_weights(self) -> bool:
        return self.weights != "fp16"

    @property
    def weight_bits(self) -> int:
        """Bits of a quantised projection's weight (16: not quantised)."""
        return {"int4": 4, "int8": 8, "fp8": 8, "fp16": 16}[self.weights]

    def check_in_features(self, sizes: Mapping[str, int]) -> None:
        """ValueError unless the group divides every quantised layer's input size (`sizes`: what
        each is, e.g. {"hidden_size": 4096, "intermediate_size": 14336})."""
        if not self.quantizes_weights or not self.group_size:
            return
        bad = {name: size for name, size in sizes.items() if size % self.group_size}
        if bad:
            fits = [g for g in (32, 64, 128, 256) if all(size % g == 0 for size in sizes.values())]
            raise ValueError(
                f"{OPTION}['group_size']={self.group_size} does not divide "
                + ", ".join(f"{name}={size}" for name, size in bad.items())
                + f" (each quantised layer's input features are cut into whole groups); allowed here: "
                + (", ".join(map(str, fits)) if fits else "0 (per channel, int8 only)"))

    def describe(self) -> str:
        group = f" g{self.group_size}" if self.group_size else ""
        return f"weights {self.weights}{group}, activations {self.activations}, kv_caches {self.kv_caches}"


# Names the planner and the command line take for a quantisation (`optimum-npu plan --quantization`).
NAMED = {"16bit": None, "w8a16": {"weights": "int8"}, "w4a16": {"weights": "int4"}, "fp8": {"weights": "fp8"},
         "w8a8": {"weights": "int8", "activations": "int8"}, "fp8-w8a8": {"weights": "fp8", "activations": "fp8"},
         "kv-fp8": {"kv_caches": "fp8"}, "w4a16-kv-fp8": {"weights": "int4", "kv_caches": "fp8"}}


def named(value: Any) -> Quantization | None:
    """A quantisation from a name of `NAMED` ("w4a16", "16bit", ...), an option dict or None."""
    if isinstance(value, str):
        if value not in NAMED:
            raise ValueError(f"quantization {value!r} is not one of {', '.join(NAMED)} (or an {OPTION} dict)")
        value = NAMED[value]
    return Quantization.parse(value)


def label(quantization: Quantization | None) -> str:
    """A short name of a quantisation for tables: "16bit", "w4a16 g128", "w8a16 kv-fp8", ..."""
    if quantization is None:
        return "16bit"
    weights = {"int4": "w4", "int8": "w8", "fp8": "wfp8", "fp16": "w16"}[quantization.weights]
    activations = {"int8": "a8", "fp8": "afp8", "fp16": "a16"}[quantization.activations]
    group = f" g{quantization.group_size}" if quantization.group_size else ""
    kv = " kv-fp8" if quantization.kv_caches == "fp8" else ""
    return f"{weights}{activations}{group}{kv}"


def check_fp8_support(option: Mapping[str, Any] | None, npu: str) -> None:
    """ValueError unless `npu` has fp8 arithmetic when the (normalized) option puts weights or activations
    in fp8: the ATOM briefs list 16-bit and int8 rates only, so fp8 runs on REBEL (the issue's "fp8
    weights where the preset has fp8"). An fp8 KV cache is a storage format and is allowed everywhere."""
    from ..sim_device.specs import get_npu_spec

    if option is None or "fp8" not in (option["weights"], option["activations"]):
        return
    spec = get_npu_spec(npu)
    if spec.peak_flops_fp8 is None:
        what = "weights" if option["weights"] == "fp8" else "activations"
        raise ValueError(f"{OPTION}: fp8 {what} need a device with fp8 arithmetic, and {npu} has none (its rates: "
                         f"16-bit and int8); use int8 / int4 {what}, or an npu with fp8 (RBLN-CR03)")


def normalize_option(value: Any) -> dict[str, Any] | None:
    """The option as stored in a config and rbln_config.json: the canonical dict (or None)."""
    parsed = Quantization.parse(value)
    return None if parsed is None else parsed.to_json()


# ---- round-to-nearest quantisation -------------------------------------------------------------


def quantize_rtn(weight: torch.Tensor, fmt: str, group_size: int,
                 scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scales in fp32) of a [N, K] weight, symmetric round-to-nearest: each group's
    scale is its largest magnitude over the format's (127, 7, 448), rounded to `scale_dtype`
    (the device's 16-bit type) first, so dequantising on the device is exact in that type's scale."""
    w = weight.detach().float()
    rows, cols = w.shape
    group = cols if group_size == 0 else group_size
    grouped = w.reshape(rows, cols // group, group)
    scales = (grouped.abs().amax(-1) / QMAX[fmt]).to(scale_dtype).float()
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero group is 0 at any scale
    ratio = grouped / scales.unsqueeze(-1)
    if fmt == "fp8":
        packed = ratio.clamp(-QMAX[fmt], QMAX[fmt]).to(FP8).view(torch.uint8)
    else:
        q = ratio.round().clamp(-QMAX[fmt] - 1, QMAX[fmt]).to(torch.int8)
        packed = pack_int4(q) if fmt == "int4" else q
    return packed.reshape(rows, -1).contiguous(), scales


class QuantizedLinear(nn.Module):
    """A Linear whose weight the device holds packed (`rbln::dequant_linear`): built from a
    16-bit Linear by round-to-nearest, or from a pre-quantised checkpoint's tensors (`from_packed`)."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, fmt: str,
                 group_size: int, activations: str = "fp16"):
        super().__init__()
        self.fmt, self.group_size, self.activations = fmt, group_size, activations
        self.qweight = nn.Parameter(qweight, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.out_features, self.in_features = scales.shape[0], qweight.shape[1] * STORAGE[fmt][1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group_size: int, scale_dtype: torch.dtype,
                    activations: str = "fp16") -> QuantizedLinear:
        rows, cols = linear.weight.shape
        if linear.weight.is_meta:  # shapes only (the planner's and the memory probe's graphs)
            storage, per_element = STORAGE[fmt]
            with torch.device("meta"):
                qweight = torch.empty(rows, cols // per_element, dtype=storage)
                scales = torch.empty(rows, 1 if group_size == 0 else cols // group_size)
        else:
            qweight, scales = quantize_rtn(linear.weight, fmt, group_size, scale_dtype)
        return cls(qweight, scales, linear.bias, fmt, group_size, activations)

    @classmethod
    def concatenated(cls, linears) -> QuantizedLinear:
        """One packed linear computing the given ones side by side (Q/K/V, gate/up): their packed rows
        and scales end to end (each row has its own scales, so rows concatenate as they are)."""
        kinds = {(q.fmt, q.group_size, q.in_features) for q in linears}
        if len(kinds) != 1 or not all(isinstance(q, QuantizedLinear) for q in linears):
            raise ValueError(f"cannot merge projections of different quantisations: {sorted(kinds)}")
        biases = [q.bias if q.bias is not None else torch.zeros(q.out_features) for q in linears]
        bias = torch.cat(biases) if any(q.bias is not None for q in linears) else None
        return cls(torch.cat([q.qweight for q in linears]), torch.cat([q.scales for q in linears]), bias,
                   linears[0].fmt, linears[0].group_size, linears[0].activations)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the device computes with, in fp32."""
        return dequantize(self.qweight, self.scales.float(), self.fmt, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations != "fp16":   # W8A8: the input quantised per token, 8-bit products
            return torch.ops.rbln.quant_linear(x, self.qweight, self.scales, self.bias, self.fmt)
        return torch.ops.rbln.dequant_linear(x, self.qweight, self.scales, self.bias, self.fmt, self.group_size)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, weights={self.fmt}{group}, "
                f"activations={self.activations}")


# the device decoder layer's projections (fc_in / fc_out: the plain MLP of GPT-2 and OPT; a family's layer
# has those of its layout)
DEVICE_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "fc_in", "fc_out")


def quantize_layers(layers: nn.ModuleList, quantization: Quantization | None, scale_dtype: torch.dtype) -> nn.ModuleList:
    """The device decoder layers (`static_decoder.DecoderLayer`) with their projections replaced
    by `QuantizedLinear`s (in place; the HF model's own modules are not touched)."""
    if quantization is None or not quantization.quantizes_weights:
        return layers
    for layer in layers:
        for name in DEVICE_LINEARS:
            linear = getattr(layer, name, None)
            if isinstance(linear, nn.Linear):
                setattr(layer, name, QuantizedLinear.from_linear(linear, quantization.weights, quantization.group_size,
                                                                 scale_dtype, quantization.activations))
    return layers


def fake_quantize_(hf_model: nn.Module, quantization: Quantization | dict, scale_dtype: torch.dtype) -> nn.Module:
    """`hf_model` (a transformers causal LM) with each targeted projection's weight replaced, in
    place, by what the device computes with: dequantize(quantize_rtn(weight)), in the weight's dtype.
    The reference of the exact numerics mode, and of the quality benchmark's quantised column."""
    quantization = Quantization.parse(quantization)
    for name, module in hf_model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGET_MODULES and isinstance(module, nn.Linear):
            q = QuantizedLinear.from_linear(module, quantization.weights, quantization.group_size, scale_dtype)
            with torch.no_grad():
                module.weight.copy_(q.dequantized_weight().to(module.weight.dtype))
    return hf_model
