"""Which ops the NPU runs, what kind of kernel each is, and how much work it does.

An op missing from `DEVICE_OPS` is a host fallback: it runs on the CPU between device
segments, with the copies that implies. The category drives fusion:

- MATMUL   matrix-engine ops (linear, matmul, conv): a kernel of their own, with an epilogue
- NORM     normalisations and softmax: one kernel each
- POINTWISE element-wise math and casts: fused into the kernel producing their input
- REDUCTION sums, means, max: fused like pointwise ops
- LAYOUT   views, reshapes, concatenation: data movement, fused where they touch a kernel
- OTHER    everything else the device runs (embedding, gather, pooling, tensor creation, copies)
- ATTENTION the device's attention kernels (`rbln::*`): always a kernel of their own, priced
           from the KV length in use at run time
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Category(Enum):
    MATMUL = "matmul"
    NORM = "norm"
    POINTWISE = "pointwise"
    REDUCTION = "reduction"
    LAYOUT = "layout"
    OTHER = "other"
    ATTENTION = "attention"
    HOST = "host"


FUSABLE_INTO_PRODUCER = (Category.POINTWISE, Category.REDUCTION, Category.LAYOUT)

_POINTWISE = """
abs add addcmul addcdiv bitwise_and bitwise_not bitwise_or bitwise_xor ceil clamp clamp_max clamp_min clone
contiguous cos detach div elu eq erf exp expm1 fill floor floor_divide fmod ge gelu gt hardsigmoid hardswish
hardtanh isinf isnan le leaky_relu lift_fresh_copy log log1p log2 logical_and logical_not logical_or lt
masked_fill maximum minimum mish mul ne neg pow reciprocal relu relu6 remainder round rsqrt rsub sigmoid sign
silu sin softplus sqrt square sub tanh to _to_copy trunc type_as where dropout alias zeros_like ones_like
full_like bitwise_left_shift bitwise_right_shift
"""
_REDUCTION = "all amax amin any argmax argmin cumsum linalg_vector_norm logsumexp max mean min prod std sum var"
_LAYOUT = """
view reshape _unsafe_view permute transpose t unsqueeze squeeze expand expand_as slice select flatten unflatten
split split_with_sizes chunk unbind cat stack narrow repeat flip roll constant_pad_nd pad movedim
"""
_NORM = """
layer_norm group_norm batch_norm rms_norm instance_norm softmax _softmax log_softmax
_native_batch_norm_legit_no_training native_layer_norm native_group_norm
"""
_MATMUL = "linear matmul mm bmm addmm baddbmm conv1d conv2d conv3d convolution conv_transpose1d conv_transpose2d " \
    "scaled_dot_product_attention outer einsum"
_OTHER = """
embedding index index_select gather scatter index_put copy copy_ arange zeros ones full empty new_zeros
new_ones new_full new_empty scalar_tensor tril triu max_pool1d max_pool2d avg_pool1d avg_pool2d
adaptive_avg_pool1d adaptive_avg_pool2d upsample_nearest2d upsample_bilinear2d slice_scatter select_scatter
masked_fill_ index_copy
"""

DEVICE_OPS: dict[str, Category] = {}
for _names, _cat in (
    (_POINTWISE, Category.POINTWISE), (_REDUCTION, Category.REDUCTION), (_LAYOUT, Category.LAYOUT),
    (_NORM, Category.NORM), (_MATMUL, Category.MATMUL), (_OTHER, Category.OTHER),
):
    for _name in _names.split():
        DEVICE_OPS[f"aten.{_name}"] = _cat

# Graph bookkeeping that does no work on any device.
IGNORED_OPS = {
    "aten._assert_tensor_metadata.default", "aten._assert_scalar.default", "aten.sym_constrain_range_for_size.default",
    "aten._assert_async.msg",
}


def op_packet(target: str) -> str:
    """'aten.linear.default' -> 'aten.linear'."""
    return target.rsplit(".", 1)[0]


def categorize(target: str) -> Category:
    if target.startswith("rbln."):
        return Category.ATTENTION
    return DEVICE_OPS.get(op_packet(target), Category.HOST)


@dataclass(frozen=True)
class Work:
    flops: float = 0.0          # matrix-engine FLOPs
    vector_flops: float = 0.0   # element-wise / reduction work


def _numel(t) -> int:
    return math.prod(t.shape) if hasattr(t, "shape") else 1


def count_work(target: str, category: Category, args: tuple, out) -> Work:
    """FLOPs of one op from its (fake) argument and output tensors."""
    outs = out if isinstance(out, (list, tuple)) else [out]
    out_numel = sum(_numel(o) for o in outs if hasattr(o, "shape"))
    name = op_packet(target).removeprefix("aten.")
    if category is Category.MATMUL:
        if name == "linear":
            bias = out_numel if len(args) > 2 and args[2] is not None else 0
            return Work(2.0 * out_numel * args[1].shape[1], bias)
        if name in ("matmul", "mm", "bmm"):
            return Work(2.0 * out_numel * args[0].shape[-1])
        if name in ("addmm", "baddbmm"):
            return Work(2.0 * out_numel * args[1].shape[-1], out_numel)
        if name.startswith("conv"):
            weight = args[1]
            # weight [Cout, Cin/groups, *kernel]: each output element is a dot product of that size
            per_output = math.prod(weight.shape[1:]) if not name.startswith("conv_transpose") else math.prod(
                weight.shape[1:]) * weight.shape[0] / max(1, outs[0].shape[1])
            return Work(2.0 * out_numel * per_output)
        if name == "scaled_dot_product_attention":
            q, k = args[0], args[1]
            return Work(4.0 * _numel(q) * k.shape[-2], 5.0 * _numel(q) / q.shape[-1] * k.shape[-2])
        return Work(2.0 * out_numel)  # outer, einsum: lower bound
    if category is Category.NORM:
        return Work(0.0, 5.0 * out_numel)
    if category is Category.REDUCTION:
        return Work(0.0, float(sum(_numel(a) for a in args if hasattr(a, "shape"))))
    if category in (Category.POINTWISE, Category.HOST):
        return Work(0.0, float(out_numel))
    return Work()
