"""Which ops the NPU runs, what kind of kernel each is, and how much work it does.

The lists live in `sim_device/ops.py`, the runtime's allowlist: the compiler emits exactly
what the runtime accepts. An op of `ops.DEVICE_OP_PACKETS` runs on the device; one of
`ops.HOST_FALLBACK_OP_PACKETS` runs on the CPU between device segments, with the copies
that implies; any other op is refused at compile time. The category drives fusion:

- MATMUL   matrix-engine ops (linear, matmul, conv, `rbln::dequant_linear` on packed low-precision
           weights): a kernel of their own, with an epilogue
- NORM     normalisations and softmax: one kernel each
- POINTWISE element-wise math and casts: fused into the kernel producing their input
- REDUCTION sums, means, max: fused like pointwise ops
- LAYOUT   views, reshapes, concatenation: data movement, fused where they touch a kernel
- OTHER    everything else the device runs (embedding, gather, pooling, tensor creation, copies)
- ATTENTION the device's attention kernels (`rbln::*`): always a kernel of their own, priced
           from the KV length in use at run time
- COLLECTIVE communication between tensor-parallel devices (`rbln::all_reduce`, `all_gather`):
           a step of its own, inserted by the tensor-parallel pass
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from ..sim_device import ops as device_ops
from ..sim_device.ops import op_packet


class Category(Enum):
    MATMUL = "matmul"
    NORM = "norm"
    POINTWISE = "pointwise"
    REDUCTION = "reduction"
    LAYOUT = "layout"
    OTHER = "other"
    ATTENTION = "attention"
    COLLECTIVE = "collective"
    HOST = "host"


FUSABLE_INTO_PRODUCER = (Category.POINTWISE, Category.REDUCTION, Category.LAYOUT)

DEVICE_OPS: dict[str, Category] = {packet: Category(category) for packet, category in device_ops.DEVICE_OPS.items()}

# Graph bookkeeping that does no work on any device.
IGNORED_OPS = {
    "aten._assert_tensor_metadata.default", "aten._assert_scalar.default", "aten.sym_constrain_range_for_size.default",
    "aten._assert_async.msg",
}


def categorize(target: str) -> Category:
    """The category of op `target`; ValueError for an op the runtime would refuse to run."""
    if target in device_ops.collective_ops():
        return Category.COLLECTIVE
    if target in device_ops.quant_ops():
        return Category.MATMUL
    if target in device_ops.kernel_ops():
        return Category.ATTENTION
    packet = op_packet(target)
    if packet in DEVICE_OPS:
        return DEVICE_OPS[packet]
    if packet in device_ops.HOST_FALLBACK_OP_PACKETS:
        return Category.HOST
    raise ValueError(
        f"cannot compile a call to {target}: it is neither an op the device runs nor an allowed host fallback "
        "(pure math ops; see HOST_FALLBACK_OP_PACKETS in optimum_npu/sim_device/ops.py). Rewrite the module "
        "without it, or compute it outside the compiled module."
    )


@dataclass(frozen=True)
class Work:
    flops: float = 0.0          # matrix-engine FLOPs
    vector_flops: float = 0.0   # element-wise / reduction work
    # A gather (embedding lookup, indexing) reads only this many elements of its first
    # argument, the table, not the whole table: the rows it picks (0: not a gather).
    gathered_elements: int = 0
    # Rows (M) of a matrix product [M, K] x [K, N]: the output's elements over N (0: not a matmul).
    rows: int = 0
    # The matrix engines' number format of `flops`: "16bit", or "int8" / "fp8" (W8A8), each at its rate.
    matmul_format: str = "16bit"


# Ops that read rows of their first argument picked by an index tensor, one output element each.
GATHER_OPS = ("embedding", "index", "index_select", "gather")


def _numel(t) -> int:
    return math.prod(t.shape) if hasattr(t, "shape") else 1


def count_work(target: str, category: Category, args: tuple, out) -> Work:
    """FLOPs of one op from its (fake) argument and output tensors."""
    outs = out if isinstance(out, (list, tuple)) else [out]
    out_numel = sum(_numel(o) for o in outs if hasattr(o, "shape"))
    name = op_packet(target).removeprefix("aten.")
    if category is Category.MATMUL:
        if name == "rbln.dequant_linear":
            # the matmul, plus one multiply per weight to dequantise it on chip (the scales' work)
            rows_out = args[2].shape[0]
            features = args[0].shape[-1]
            return Work(2.0 * out_numel * features, float(rows_out * features), rows=out_numel // rows_out)
        if name == "rbln.quant_linear":
            # 8-bit products; quantising the input (a max and a divide per element) and rescaling the output
            rows_out, features = args[1].shape[0], args[0].shape[-1]
            return Work(2.0 * out_numel * features, 3.0 * _numel(args[0]) + 2.0 * out_numel,
                        rows=out_numel // rows_out, matmul_format=args[4])
        if name == "rbln.quant_conv2d":
            weight = args[1]   # [Cout, Cin / groups, kh, kw]: each output element a dot product of that size
            return Work(2.0 * out_numel * math.prod(weight.shape[1:]), 3.0 * _numel(args[0]) + 2.0 * out_numel,
                        rows=out_numel // max(1, outs[0].shape[1]), matmul_format=args[8])
        if name == "linear":
            bias = out_numel if len(args) > 2 and args[2] is not None else 0
            return Work(2.0 * out_numel * args[1].shape[1], bias, rows=out_numel // args[1].shape[0])
        if name in ("matmul", "mm", "bmm"):
            return Work(2.0 * out_numel * args[0].shape[-1], rows=outs[0].shape[-2] if len(outs[0].shape) > 1 else 1)
        if name in ("addmm", "baddbmm"):
            return Work(2.0 * out_numel * args[1].shape[-1], out_numel, rows=outs[0].shape[-2])
        if name.startswith("conv"):
            weight = args[1]
            # weight [Cout, Cin/groups, *kernel]: each output element is a dot product of that size
            per_output = math.prod(weight.shape[1:]) if not name.startswith("conv_transpose") else math.prod(
                weight.shape[1:]) * weight.shape[0] / max(1, outs[0].shape[1])
            return Work(2.0 * out_numel * per_output, rows=out_numel // max(1, outs[0].shape[1]))
        if name == "scaled_dot_product_attention":
            q, k = args[0], args[1]
            return Work(4.0 * _numel(q) * k.shape[-2], 5.0 * _numel(q) / q.shape[-1] * k.shape[-2], rows=q.shape[-2])
        return Work(2.0 * out_numel)  # outer, einsum: lower bound
    if name.startswith(("max_pool", "avg_pool")):
        # Pooling runs on the vector units: one compare / add per window element of each output.
        kernel = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
        dims = int(name[-2])  # max_pool2d -> 2; a single size stands for every dimension
        window = math.prod(kernel) if len(kernel) == dims else kernel[0] ** dims
        return Work(0.0, float(out_numel * window))
    if name.startswith("adaptive_avg_pool"):
        return Work(0.0, float(_numel(args[0])))  # every input element is summed once
    if category is Category.NORM:
        return Work(0.0, 5.0 * out_numel)
    if category is Category.REDUCTION:
        return Work(0.0, float(sum(_numel(a) for a in args if hasattr(a, "shape"))))
    if category in (Category.POINTWISE, Category.HOST):
        return Work(0.0, float(out_numel))
    if name in GATHER_OPS:
        return Work(gathered_elements=out_numel)
    return Work()
