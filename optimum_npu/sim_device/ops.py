"""The operators a device program may name: one allowlist, shared by compiler and runtime.

A `.rbln` file may come from anywhere, so its op names are data to check, not code to
look up. The runtime executes only:

- the aten op packets the device runs (`DEVICE_OP_PACKETS`, by kernel category; the
  compiler's `op_support.py` builds its fusion table from this same list),
- the aten op packets the compiler may leave on the host (`HOST_FALLBACK_OP_PACKETS`):
  pure math on tensors, nothing that reads or writes files, allocates from a size it
  does not check, or draws random numbers,
- the device's own kernels (`kernels.KERNEL_OPS`, the `rbln` namespace) and the collectives
  between devices (`collectives.COLLECTIVE_OPS`, `rbln` too).

`resolve_op` turns a name into a `torch._ops.OpOverload` only through this list: the
packet name must be on it, the overload must be one torch lists for that packet, and
no name part may start with `_` unless the whole packet is listed (`aten._to_copy`,
which the compiler's dtype lowering emits). `check_op_arguments` then checks every
argument against the op's schema (`OpOverload._schema`), so only typed data reaches a
call: tensor references, numbers, bools, None, lists of those, dtype / layout / device /
memory-format encodings, and strings only where the schema takes a string.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from .program import DEVICE_FLOAT, LAYOUTS, MEMORY_FORMATS, PROGRAM_DTYPES, ArtifactError

# Category (the compiler's `op_support.Category` values) -> aten packets the device runs.
# `_to_copy` is the only `_`-prefixed op: the scheduler emits it for dtype casts. torch.export's
# training IR (what the compiler traces) keeps ops like softmax, view and batch_norm whole, so
# `_softmax`, `_unsafe_view` and `_native_batch_norm_legit_no_training` are never emitted.
DEVICE_OP_PACKETS: dict[str, str] = {
    "pointwise": """
        abs add addcmul addcdiv bitwise_and bitwise_not bitwise_or bitwise_xor ceil clamp clamp_max clamp_min clone
        contiguous cos detach div elu eq erf exp expm1 fill floor floor_divide fmod ge gelu gt hardsigmoid hardswish
        hardtanh isinf isnan le leaky_relu lift_fresh_copy log log1p log2 logical_and logical_not logical_or lt
        masked_fill maximum minimum mish mul ne neg pow reciprocal relu relu6 remainder round rsqrt rsub sigmoid sign
        silu sin softplus sqrt square sub tanh to _to_copy trunc type_as where dropout alias zeros_like ones_like
        full_like bitwise_left_shift bitwise_right_shift
    """,
    "reduction": "all amax amin any argmax argmin cumsum linalg_vector_norm logsumexp max mean min prod std sum var",
    "layout": """
        view reshape permute transpose t unsqueeze squeeze expand expand_as slice select flatten unflatten
        split split_with_sizes chunk unbind cat concat concatenate stack narrow repeat repeat_interleave flip roll constant_pad_nd pad movedim
    """,
    "norm": """
        layer_norm group_norm batch_norm rms_norm instance_norm softmax log_softmax native_layer_norm
        native_group_norm
    """,
    "matmul": """
        linear matmul mm bmm addmm baddbmm conv1d conv2d conv3d convolution conv_transpose1d conv_transpose2d conv_transpose3d
        scaled_dot_product_attention outer einsum
    """,
    "other": """
        embedding index index_select gather scatter index_put copy copy_ arange zeros ones full empty new_zeros
        new_ones new_full new_empty scalar_tensor tril triu max_pool1d max_pool2d avg_pool1d avg_pool2d
        adaptive_avg_pool1d adaptive_avg_pool2d upsample_nearest2d upsample_bilinear2d slice_scatter select_scatter
        masked_fill_ index_copy
    """,
}

# Ops the device has no kernel for that the compiler may run on the host, in fp32, between
# device segments: element-wise special functions, sorts and scans, padding and resampling
# modes the device lacks. All are pure functions of their tensor arguments.
HOST_FALLBACK_OP_PACKETS = frozenset(f"aten.{name}" for name in """
    acos acosh asin asinh atan atan2 atanh cosh sinh tan arccos arccosh arcsin arcsinh arctan arctan2 arctanh
    exp2 logit xlogy logaddexp logaddexp2 sinc hypot float_power true_divide copysign heaviside nextafter
    digamma lgamma polygamma mvlgamma erfc erfinv i0 igamma igammac special_erfcx special_i0 special_i0e
    special_i1 special_i1e special_ndtr special_ndtri special_log_ndtr special_entr special_xlog1py
    special_bessel_j0 special_bessel_j1 special_zeta
    frac sgn signbit fix nan_to_num fmax fmin lerp clip
    celu selu glu log_sigmoid prelu hardshrink softshrink threshold
    cumprod cummax cummin logcumsumexp sort argsort topk kthvalue median nanmedian mode var_mean std_mean norm
    nansum nanmean aminmax cross linalg_cross diag diagonal diag_embed trace cdist dist renorm
    scatter_add scatter_reduce index_add index_fill take take_along_dim bucketize searchsorted
    pixel_shuffle pixel_unshuffle reflection_pad1d reflection_pad2d replication_pad1d replication_pad2d
    upsample_bicubic2d upsample_nearest1d upsample_linear1d upsample_nearest3d upsample_trilinear3d
    grid_sampler_2d max_pool3d avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_avg_pool3d
    unfold im2col col2im
""".split())

DEVICE_OPS: dict[str, str] = {
    f"aten.{name}": category for category, names in DEVICE_OP_PACKETS.items() for name in names.split()
}


def op_packet(target: str) -> str:
    """'aten.linear.default' -> 'aten.linear'."""
    return target.rsplit(".", 1)[0]


def kernel_ops() -> tuple[str, ...]:
    """The device's own ops ('rbln.*'): attention kernels, the dequantising matmul and
    collectives; importing their modules registers them with torch."""
    from .collectives import COLLECTIVE_OPS
    from .kernels import KERNEL_OPS
    from .quant_kernels import QUANT_OPS

    return KERNEL_OPS + QUANT_OPS + COLLECTIVE_OPS


def quant_ops() -> tuple[str, ...]:
    """The device's matmul kernels on packed low-precision weights ('rbln.dequant_linear')."""
    from .quant_kernels import QUANT_OPS

    return QUANT_OPS


def collective_ops() -> tuple[str, ...]:
    from .collectives import COLLECTIVE_OPS

    return COLLECTIVE_OPS


def is_allowed_packet(packet: str) -> bool:
    """Whether a program may call ops of `packet` ('aten.atan'), on the device or the host."""
    if packet.startswith("rbln."):
        return packet in {op_packet(k) for k in kernel_ops()}
    return packet in DEVICE_OPS or packet in HOST_FALLBACK_OP_PACKETS


def _writes_an_argument(op: torch._ops.OpOverload) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments)


@functools.lru_cache(maxsize=None)
def resolve_op(target: str) -> torch._ops.OpOverload:
    """'aten.linear.default' -> torch.ops.aten.linear.default, for allowlisted ops only (else ArtifactError)."""
    parts = target.split(".")
    if len(parts) != 3 or not all(part.isidentifier() for part in parts):
        raise ArtifactError(f"the program names a malformed op {target!r} (expected 'namespace.op.overload')")
    namespace, name, overload = parts
    packet_name = f"{namespace}.{name}"
    if namespace == "rbln":
        if target not in kernel_ops():
            raise ArtifactError(f"the program names op {target!r}, not one of the device kernels {kernel_ops()}")
    elif not is_allowed_packet(packet_name):
        raise ArtifactError(
            f"the program names op {target!r}, which is not an operator the compiler emits (the allowed namespaces "
            "are aten, for listed device ops and host fallbacks, and rbln for the device kernels)"
        )
    if overload.startswith("_"):
        raise ArtifactError(f"the program names op {target!r}: overload names never start with '_'")
    # `name` is on the list, so this looks up a real operator packet, never an arbitrary attribute.
    packet = getattr(getattr(torch.ops, namespace), name)
    if overload not in packet.overloads():
        raise ArtifactError(f"the program names op {target!r}: {packet_name} has no overload {overload!r} "
                            f"in torch {torch.__version__}")
    op = getattr(packet, overload)
    if not isinstance(op, torch._ops.OpOverload):
        raise ArtifactError(f"the program names {target!r}, which is not a torch operator")
    if _writes_an_argument(op) and not name.endswith("_") and namespace != "rbln":
        # out= variants: training-IR graphs never contain them; in-place ops end with '_'.
        raise ArtifactError(f"the program names {target!r}, an out= variant the compiler never emits")
    return op


# --- op arguments -----------------------------------------------------------------------

_ENCODED_ENUMS = {"ScalarType": "dtype", "Layout": "layout", "Device": "device", "MemoryFormat": "memory_format"}
_NON_FINITE = ("inf", "-inf", "nan")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _is_int(value) -> bool:
    return type(value) is int and INT64_MIN <= value <= INT64_MAX


def _is_number(value) -> bool:
    if type(value) is float:
        return math.isfinite(value)
    return type(value) is bool or _is_int(value) or (
        type(value) is dict and value.keys() == {"float"} and value["float"] in _NON_FINITE
    )


def _is_encoded_enum(value, key: str) -> bool:
    if type(value) is not dict or value.keys() != {key}:
        return False
    allowed = {"dtype": (*PROGRAM_DTYPES, DEVICE_FLOAT), "layout": LAYOUTS, "memory_format": MEMORY_FORMATS,
               "device": ("cpu",)}[key]
    return type(value[key]) is str and value[key] in allowed


def _is_ref(value) -> bool:
    return type(value) is dict and value.keys() == {"ref"} and type(value["ref"]) is str


def _matches(value, jit_type) -> bool:
    """Whether the JSON-encoded `value` is data of the schema type `jit_type` (type-directed:
    the depth it walks is the schema's, never the JSON's)."""
    if isinstance(jit_type, torch._C.OptionalType):
        return value is None or _matches(value, jit_type.getElementType())
    if isinstance(jit_type, torch._C.ListType):
        element = jit_type.getElementType()
        if type(value) is list:
            return all(_matches(v, element) for v in value)
        return str(element) in ("int", "SymInt") and _is_int(value)  # int[2] stride=1 broadcasts
    kind = str(jit_type)
    if kind == "Tensor":  # a constant where a tensor goes is a wrapped number (x * 0.5)
        return _is_ref(value) or _is_number(value)
    if kind in ("int", "SymInt"):
        return type(value) is bool or _is_int(value)
    if kind in ("float", "SymFloat", "number", "Scalar"):
        return _is_number(value)
    if kind in ("bool", "SymBool"):
        return type(value) is bool
    if kind == "str":
        return type(value) is str and len(value) <= 256
    if kind in _ENCODED_ENUMS:
        return _is_encoded_enum(value, _ENCODED_ENUMS[kind])
    return False  # Generator, Storage, Dimname, ...: never in a compiled program


def check_op_arguments(target: str, args: Any, kwargs: Any) -> list[tuple[str, Any]]:
    """ArtifactError unless `args` / `kwargs` (JSON-encoded) fit the schema of op `target`;
    returns (schema argument name, value) for each argument passed."""
    schema = resolve_op(target)._schema
    if type(args) is not list or type(kwargs) is not dict:
        raise ArtifactError(f"op {target}: args must be a list and kwargs an object")
    positional = [a for a in schema.arguments if not a.kwarg_only]
    if len(args) > len(positional):
        raise ArtifactError(f"op {target} takes {len(positional)} positional arguments, the program passes {len(args)}")
    by_name = {a.name: a for a in schema.arguments}
    given = {a.name for a in positional[: len(args)]}
    for key in kwargs:
        if key not in by_name or key in given:
            raise ArtifactError(f"op {target}: unexpected or repeated argument {key!r} (schema: {schema})")
    bound = [*zip(positional, args), *((by_name[k], v) for k, v in kwargs.items())]
    for argument, value in bound:
        if not _matches(value, argument.real_type):
            raise ArtifactError(
                f"op {target}: argument {argument.name!r} must be {argument.real_type}, the program passes "
                f"{_preview(value)}"
            )
    missing = [a.name for a in schema.arguments if a.name not in given and a.name not in kwargs
               and not a.has_default_value()]
    if missing:
        raise ArtifactError(f"op {target}: missing argument(s) {missing}")
    return [(argument.name, value) for argument, value in bound]


def check_op_outputs(target: str, outputs: list[str]) -> None:
    """The number of output names matches what the op returns."""
    returns = resolve_op(target)._schema.returns
    if len(returns) == 1 and isinstance(returns[0].real_type, torch._C.ListType):
        ok = len(outputs) >= 1  # split, unbind, chunk: as many as the traced graph used
    else:
        ok = len(outputs) == max(1, len(returns)) and (len(returns) > 0 or outputs == [""])
    if not ok:
        raise ArtifactError(f"op {target} returns {len(returns)} value(s), the program names outputs {outputs}")


def _preview(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
