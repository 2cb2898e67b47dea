"""Pre-quantised checkpoints: the compressed-tensors layout transformers reads
(`quantization_config.quant_method == "compressed-tensors"`, what llm-compressor writes).

transformers loads such a checkpoint with its `CompressedTensorsHfQuantizer`: each quantised
Linear keeps the checkpoint's tensors and a `quantization_scheme` (compressed-tensors'
`QuantizationScheme`) until its first forward decompresses it. Before that, `take_packed_linears`
turns each such module into a `QuantizedLinear` holding the very integers and scales of the
checkpoint (no re-quantisation), so the device computes what the checkpoint says:

- "pack-quantized": int4 (or int8) values offset to unsigned and packed eight (four) per int32
  along the input features, `weight_packed` [N, K * bits / 32], with `weight_scale` [N, K / group]
  ("group" strategy) or [N, 1] ("channel") and `weight_shape`;
- "int-quantized": int8 `weight` [N, K] and `weight_scale`;
- "float-quantized": float8 e4m3 `weight` [N, K] and a per-channel `weight_scale`.

Only what the device runs is accepted: symmetric weights (no zero points), no activation
reordering (`actorder`), int4 with a group or int8 / fp8 per channel; anything else is a
ValueError naming what the checkpoint holds.
"""

from __future__ import annotations

import torch
from torch import nn

from .quantization import QuantizedLinear, Quantization, TARGET_MODULES, pack_int4
from ..sim_device.quant_kernels import FP8


def _unpack_int32(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """compressed-tensors' pack-quantized layout -> int8 [N, columns]: each int32 holds 32 / bits
    values, the first in the lowest bits, each stored plus 2 ** (bits - 1) (unsigned)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    values = values.reshape(packed.shape[0], -1)[:, :columns]
    return (values - (1 << (bits - 1))).to(torch.int8)


def _describe(args) -> str:
    return (f"{args.type} {args.num_bits}-bit, strategy {args.strategy}, group_size {args.group_size}, "
            f"symmetric {args.symmetric}, actorder {args.actorder}")


def _packed(name: str, module: nn.Module) -> QuantizedLinear:
    """The QuantizedLinear of one compressed-tensors module (see the module docstring)."""
    scheme = module.quantization_scheme
    args = scheme.weights
    refuse = (f"{name}: the checkpoint's weights are {_describe(args)}; the device runs symmetric int4 with a "
              "group, int8 or float8 e4m3 per channel, without activation reordering")
    if not args.symmetric or args.actorder is not None:
        raise ValueError(refuse)
    if scheme.input_activations is not None:
        raise ValueError(f"{name}: the checkpoint also quantises input activations ({_describe(scheme.input_activations)}),"
                         " which the compressed-tensors reader does not take; use a weight-only checkpoint")
    strategy = str(getattr(args.strategy, "value", args.strategy))
    group = 0 if strategy == "channel" else args.group_size if strategy == "group" else None
    kind = str(getattr(args.type, "value", args.type))
    scales = module.weight_scale.detach().float()
    if kind == "float" and args.num_bits == 8 and group == 0:
        fmt, values = "fp8", module.weight.detach()
        if values.dtype != FP8:
            raise ValueError(refuse)
        packed = values.view(torch.uint8)
    elif kind == "int" and args.num_bits in (4, 8) and group is not None and not (args.num_bits == 4 and group == 0):
        fmt = "int4" if args.num_bits == 4 else "int8"
        if hasattr(module, "weight_packed"):
            columns = int(module.weight_shape[1])
            values = _unpack_int32(module.weight_packed.detach(), args.num_bits, columns)
        else:
            values = module.weight.detach().to(torch.int8)
        packed = pack_int4(values) if fmt == "int4" else values
    else:
        raise ValueError(refuse)
    rows = scales.shape[0]
    scales = scales.reshape(rows, -1)
    return QuantizedLinear(packed.contiguous(), scales, module.bias, fmt, group)


def take_packed_linears(hf_model: nn.Module) -> Quantization | None:
    """Replace, in place, each compressed-tensors quantised projection of `hf_model` (a causal LM
    just loaded by transformers, not yet run) by a `QuantizedLinear` of the checkpoint's own
    integers and scales. Returns the weight quantisation the checkpoint holds (None: not a
    compressed-tensors model). ValueError if the projections differ in format or group."""
    found: dict[str, QuantizedLinear] = {}
    for name, module in hf_model.named_modules():
        if getattr(module, "quantization_scheme", None) is not None and getattr(module.quantization_scheme,
                                                                                "weights", None) is not None:
            if name.rsplit(".", 1)[-1] not in TARGET_MODULES:
                raise ValueError(f"{name}: the checkpoint quantises a module the device keeps in 16 bits "
                                 f"(only {', '.join(TARGET_MODULES)} are quantised); add it to the checkpoint's ignore list")
            found[name] = _packed(name, module)
    if not found:
        return None
    kinds = {(q.fmt, q.group_size) for q in found.values()}
    if len(kinds) > 1:
        raise ValueError(f"the checkpoint mixes weight formats {sorted(kinds)}; the device takes one per model")
    for name, linear in found.items():
        parent, _, child = name.rpartition(".")
        setattr(hf_model.get_submodule(parent), child, linear)
    (fmt, group), = kinds
    return Quantization(weights=fmt, group_size=group)


def with_checkpoint_quantization(config, hf_model: nn.Module):
    """`config` (a decoder config) with the weight quantisation the loaded model's `QuantizedLinear`s
    hold (a pre-quantised checkpoint), its activations / KV cache options kept; ValueError if
    rbln_quantization asks for other weights than the checkpoint holds."""
    import dataclasses

    held = {(m.fmt, m.group_size) for m in hf_model.modules() if isinstance(m, QuantizedLinear)}
    if not held:
        return config
    (fmt, group), = held
    asked = config.quantization_spec
    if asked is not None and asked.quantizes_weights and (asked.weights, asked.group_size) != (fmt, group):
        raise ValueError(f"the checkpoint holds {fmt} weights (group_size {group}, compressed-tensors), but "
                         f"rbln_quantization asks for {asked.weights} (group_size {asked.group_size}); leave "
                         "'weights' and 'group_size' out to compile the checkpoint's own")
    chosen = Quantization(fmt, "fp16", "fp16", group) if asked is None else dataclasses.replace(
        asked, weights=fmt, group_size=group)
    return dataclasses.replace(config, quantization=chosen.to_json())
