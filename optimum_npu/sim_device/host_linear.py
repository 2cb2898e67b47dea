"""The host's fast path for the device's bf16 matmuls with weights: weights pre-packed for oneDNN.

`torch.nn.functional.linear` in bf16 on CPU hands the weight to oneDNN in its plain layout,
and oneDNN reorders it into its blocked layout on every call. For a decode step (a few rows
per matmul) that reorder is a third of the matmul's time. The weights of a program never
change, so the host reorders each once (`torch.ops.mkldnn._reorder_linear_weight`, what
PyTorch's own CPU inference freezing uses) and calls oneDNN with the packed copy.

The numerics stay those of `linear`: each call site compares the packed result with
`linear`'s on its first call, and keeps the packed weight only if the two agree bit for
bit (the same oneDNN kernel with the same blocking does); otherwise it stays on `linear`.
A packed copy costs host RAM as large as the weight, so weights are packed only while the
copies fit in half of the RAM available.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .fast_path import VerifiedFastPath
from .host_math import available_ram_bytes

_linear = torch.ops.aten.linear.default


def packing_available(dtype: torch.dtype) -> bool:
    """bf16 weights on a torch with oneDNN (the only case where the packed result was seen to match)."""
    return (dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedWeights:
    """Packed copies of weights, one per weight, shared by the runtimes that share those weights."""

    def __init__(self) -> None:
        self._copies: dict[int, tuple[Tensor, Tensor | None]] = {}   # id(weight) -> (weight, packed or None)

    def get(self, weight: Tensor, rows: int) -> Tensor | None:
        """The packed copy of `weight` (packed for calls of `rows` rows the first time), or None when
        the weight cannot or should not be packed."""
        entry = self._copies.get(id(weight))
        if entry is None or entry[0] is not weight:
            packed = None
            if (weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.is_contiguous()
                    and 2 * weight.nbytes < available_ram_bytes()):
                try:
                    packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
                except RuntimeError:  # a CPU or build without oneDNN's bf16 matmul
                    packed = None
            entry = self._copies[id(weight)] = (weight, packed)
        return entry[1]


class PackedLinear:
    """`aten.linear` at one call site of a program, with the weight packed when that gives the same result.

    The choice is made per weight (a call site of a tensor-parallel program runs with each rank's
    shard) and host thread count (oneDNN splits the work by threads) on the first such call and
    kept (`fast_path.VerifiedFastPath`): a program's call site always sees the same shapes.
    """

    def __init__(self, weights: PackedWeights) -> None:
        self._weights = weights
        self._fast_path = VerifiedFastPath()

    def __call__(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        return self._fast_path((id(weight), torch.get_num_threads()), self._packed, _linear, x, weight, bias)

    def _packed(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor | None:
        """The linear with the packed weight; None where there is none (or oneDNN refuses it)."""
        if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
            return None
        packed = self._weights.get(weight, max(1, x.numel() // max(1, x.shape[-1])))
        if packed is None:
            return None
        try:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")
        except RuntimeError:
            return None
