"""The rules: how each op carries its inputs' placements to its outputs, or says it cannot.

A rule gets the splitter (`splitter.Splitter`: placements, shapes, uses of every value so far),
the node and its arguments (value references are `{"ref": name}`, read with `ref` / `refs`),
and either emits the node with its outputs' placements (`s.emit`), possibly splitting a weight
(`s.shard_resident`) or adding a collective (`s.collective`), or raises `CannotSplit`: the
splitter then all-gathers the node's sharded inputs and runs it replicated.

- linear: column-parallel on a replicated input (by whole heads of each part of a fused
  projection), row-parallel on an input sharded by features (a Partial result, all-reduced);
  a packed low-precision linear (`rbln.dequant_linear`) alike, its scales split with its weight;
- embedding: by vocabulary (Megatron-LM's `VocabParallelEmbedding`);
- views, transposes, cuts, slices, reductions and norms over unsharded dimensions,
  element-wise math: the placement carried through;
- the KV cache and attention: by heads;
- the mixture-of-experts kernel: by experts (partial sums all-reduced).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ...sim_device.collectives import ALL_REDUCE
from ...sim_device.ops import DEVICE_OPS, op_packet
from ...sim_device.program import TensorSpec
from ...sim_device.quant_kernels import STORAGE
from ..frontend import Node
from ..op_support import Category, Work
from .placement import (
    PARTIAL, REPLICATE, CannotSplit, Ranges, Shard, even_ranges, head_ranges, join_ranges, scale_ranges,
    segment_ranges,
)
from .plan import TensorPlan

if TYPE_CHECKING:
    from .splitter import Splitter


# ---- reading the graph's argument encoding ---------------------------------------------------


def ref(arg) -> str | None:
    """The name of the value an argument refers to; None for a constant."""
    return arg["ref"] if isinstance(arg, dict) and "ref" in arg else None


def refs(arg) -> list[str]:
    """Every value an argument (possibly nested lists / dicts) refers to."""
    if isinstance(arg, list):
        return [n for a in arg for n in refs(a)]
    if isinstance(arg, dict):
        return [arg["ref"]] if "ref" in arg else [n for v in arg.values() for n in refs(v)]
    return []


def rename_refs(arg, rename: dict[str, str]):
    """`arg` with its references renamed."""
    if isinstance(arg, list):
        return [rename_refs(a, rename) for a in arg]
    if isinstance(arg, dict) and "ref" in arg:
        return {"ref": rename.get(arg["ref"], arg["ref"])}
    return arg


def normalize_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


# ---- the rules -------------------------------------------------------------------------------


def _linear_operands(node: Node, args: list) -> tuple[str | None, str | None, str | None, int, int]:
    """(weight, scales, bias, weights per stored element, group) of a linear layer: `aten.linear`
    (x, weight, bias), or `rbln.dequant_linear` (x, packed weight, scales, bias, format, group) whose
    packed weight splits like a weight (int4: two input features per stored byte) and whose scales
    follow it (by output rows; by input groups, whole groups only, for a row-parallel split)."""
    if op_packet(node.target) == "rbln.dequant_linear":
        per_element = STORAGE[args[4]][1]
        return ref(args[1]), ref(args[2]), ref(args[3]) if len(args) > 3 else None, per_element, args[5]
    if op_packet(node.target) == "rbln.quant_linear":   # W8A8: 8-bit weights, one scale per output row
        return ref(args[1]), ref(args[2]), ref(args[3]) if len(args) > 3 else None, 1, 0
    return ref(args[1]), None, ref(args[2]) if len(args) > 2 else None, 1, 0


def _linear(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    x = ref(args[0])
    weight, scales, bias, per_element, group = _linear_operands(node, args)
    layout = s.layout[x]
    ndim = len(s.shape(x))
    (out,) = node.outputs
    weight_layout = s.placement(weight) if weight is not None else REPLICATE
    if layout == REPLICATE and isinstance(weight_layout, Shard) and weight_layout.dim == 0 and not bias and not scales:
        s.emit(node, args, kwargs, [Shard(ndim - 1, weight_layout.ranges)])  # a tied LM head: logits by vocabulary
        return
    if weight is None or layout == PARTIAL or weight_layout != REPLICATE or (scales and s.placement(scales) != REPLICATE):
        raise CannotSplit("linear")
    if layout == REPLICATE:
        ranges, sizes, note = _column_plan(s, out)
        if weight in s.keep_whole:
            ranges, note = None, s.keep_whole[weight]
        if ranges is None or s.uses.get(weight) != 1 or (bias and s.uses.get(bias) != 1) or (
                scales and s.uses.get(scales) != 1):
            if s.uses.get(weight) == 1 and weight not in s.planned:
                s.planned[weight] = TensorPlan(weight, s.shape(weight), "replicated", note=note or "used elsewhere")
            s.emit(node, args, kwargs, [REPLICATE])
            return
        s.shard_resident(weight, 0, ranges, "column", split_sizes=sizes, note=note)
        for companion in (scales, bias):
            if companion:
                s.shard_resident(companion, 0, ranges, "column")
        s.emit(node, args, kwargs, [Shard(ndim - 1, ranges)])
        s.origin[out] = frozenset({weight} | ({bias} if bias else set()) | ({scales} if scales else set()))
        return
    if layout.dim != ndim - 1:  # split rows of the input (batch / tokens): each rank its rows
        s.emit(node, args, kwargs, [layout])
        return
    in_features = s.shape(weight)[1] * per_element
    if s.uses.get(weight) != 1 or not layout.is_partition_of(in_features):
        raise CannotSplit("row-parallel needs each input feature on exactly one rank")
    weight_ranges = scale_ranges(layout.ranges, 1, per_element)     # CannotSplit through a packed byte
    scale_ranges_ = scale_ranges(layout.ranges, 1, group) if scales and group else None  # ... or a group
    s.shard_resident(weight, 1, weight_ranges, "row", note="partial sums all-reduced")
    if scale_ranges_ is not None:
        s.shard_resident(scales, 1, scale_ranges_, "row", note="the scales of each rank's input groups")
    elif scales:  # one scale per output row: every rank scales its partial sums alike
        s.planned.setdefault(scales, TensorPlan(scales, s.shape(scales), "replicated", note="per-row scales"))
    partial_args = args[:2] if scales is None else [*args[:3], None, *args[4:]]
    s.emit(node, partial_args, kwargs, [PARTIAL])
    full = tuple(s.meta[out].shape)
    reduced = s.collective(ALL_REDUCE, out, [], f"{out}@all_reduce", full,
                           (s.n - 1) * math.prod(full), "all_reduce")
    if bias:  # added once, after the sum
        s.planned.setdefault(bias, TensorPlan(bias, s.shape(bias), "replicated", note="bias of a row-parallel layer"))
        biased = f"{out}@bias"
        s.values[biased] = TensorSpec(biased, full, s.values[out].dtype)
        s.emit(Node("aten.add.Tensor", [], {}, [], [biased], Category.POINTWISE, Work(), [], ()),
               [{"ref": reduced}, {"ref": bias}], {}, [REPLICATE])
        reduced = biased
    s.rename[out] = reduced


def _embedding(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    """A table lookup, vocabulary-parallel as Megatron-LM's `VocabParallelEmbedding`: rank r
    holds rows [r*V/N, (r+1)*V/N); it looks up the ids in that range (id - start, zero rows for
    ids outside) and the rows are all-reduced. Exactly one rank contributes each row, so the sum
    is exact. A tied table (also the LM head's weight) is then stored once as 1/N per device; an
    untied one too when it is a vocabulary, more rows than columns (32k-128k rows of 4096 save
    GiBs per device for one all-reduce of the looked-up rows per run); a small table (position
    rows, T5's relative-position buckets), often looked up many times per run, stays whole. The
    rule reads the table's shape alone, so every graph of a model (prefill and decode, sharing
    their weights) splits the table the same way."""
    weight = ref(args[0])
    ids = ref(args[1]) if len(args) > 1 else None
    # (padding_idx, scale_grad_by_freq and sparse, if given, only change gradients)
    if weight is None or ids is None or s.placement(ids) != REPLICATE or len(s.shape(weight)) != 2:
        raise CannotSplit("embedding")
    vocab, width = s.shape(weight)
    tied = s.uses.get(weight, 0) > 1
    whole = (f"{vocab} rows do not divide over {s.n} devices" if vocab % s.n else
             None if tied or vocab > width else
             f"{vocab} rows of {width}: too small a table for a split to pay its all-reduce")
    if whole:
        s.planned.setdefault(weight, TensorPlan(weight, s.shape(weight), "replicated", note=whole))
        raise CannotSplit("embedding")
    ranges = even_ranges(0, vocab, s.n)
    start = f"{weight}@vocab_start"
    if start not in s.added:
        spec = TensorSpec(start, (s.n,), "int64")
        s.added[start] = (spec, torch.arange(0, vocab, vocab // s.n, dtype=torch.int64))
        s.resident.add(start)
        s.values[start] = spec
        s.meta[start] = torch.empty(spec.shape, dtype=torch.int64, device="meta")
        s.layout[start] = REPLICATE
        s.shard_resident(start, 0, tuple(((r, 1),) for r in range(s.n)), "vocab", note="each rank's first id")
    note = ("tied: lookup and LM head split by vocabulary" if tied else
            f"lookup split by vocabulary: {vocab // s.n} of {vocab} rows per device, the rows all-reduced")
    if not s.shard_resident(weight, 0, ranges, "vocab", note=note):
        raise CannotSplit("embedding")
    (out,) = node.outputs
    ids_shape = s.shape(ids)

    def step(target: str, operands: list, name: str, shape, dtype: str, category: Category, options=None) -> str:
        value = f"{out}@{name}"
        s.values[value] = TensorSpec(value, tuple(shape), dtype)
        s.emit(Node(target, [], {}, [], [value], category, Work(), [], ()), operands, options or {}, [REPLICATE])
        return value

    local = step("aten.sub.Tensor", [{"ref": ids}, {"ref": start}], "local_ids", ids_shape, "int64",
                 Category.POINTWISE)
    above = step("aten.ge.Scalar", [{"ref": local}, 0], "above", ids_shape, "bool", Category.POINTWISE)
    below = step("aten.lt.Scalar", [{"ref": local}, vocab // s.n], "below", ids_shape, "bool", Category.POINTWISE)
    mine = step("aten.bitwise_and.Tensor", [{"ref": above}, {"ref": below}], "mine", ids_shape, "bool",
                Category.POINTWISE)
    safe = step("aten.mul.Tensor", [{"ref": local}, {"ref": mine}], "safe_ids", ids_shape, "int64", Category.POINTWISE)
    full = s.shape(out)
    rows = step("aten.embedding.default", [{"ref": weight}, {"ref": safe}, *args[2:]], "rows", full,
                s.values[out].dtype, Category.OTHER, kwargs)
    keep = step("aten.unsqueeze.default", [{"ref": mine}, -1], "keep", (*ids_shape, 1), "bool", Category.LAYOUT)
    s.emit(replace(node, target="aten.mul.Tensor", category=Category.POINTWISE), [{"ref": rows}, {"ref": keep}], {},
           [PARTIAL])
    s.rename[out] = s.collective(ALL_REDUCE, out, [], f"{out}@all_reduce", full, (s.n - 1) * math.prod(full),
                                 "all_reduce")


def _column_plan(s: Splitter, out: str) -> tuple[Ranges | None, tuple[int, ...], str]:
    """How to split the output features of a linear layer whose output is `out`: the parts a
    following split / chunk cuts it into, each split by whole heads (the reshape after it tells
    the head size). (None, ..., reason) when some part does not divide."""
    features = s.shape(out)[-1]
    consumers = s.consumers.get(out, [])
    parts, part_values = [features], [out]
    if len(consumers) == 1 and op_packet(consumers[0].target) in ("aten.split_with_sizes", "aten.split", "aten.chunk"):
        cut = consumers[0]
        dim = normalize_dim(cut.args[2] if len(cut.args) > 2 else cut.kwargs.get("dim", 0), len(s.shape(out)))
        if dim == len(s.shape(out)) - 1:
            parts = [s.graph.values[o].shape[-1] for o in cut.outputs if o]
            part_values = list(cut.outputs)
            if len(parts) != len(cut.outputs) or sum(parts) != features:
                return None, (), "split not understood"
    ranges, offset = [], 0
    for size, value in zip(parts, part_values):
        heads, head_size = size, 1
        for consumer in s.consumers.get(value, []):
            if op_packet(consumer.target) in ("aten.reshape", "aten.view", "aten.unflatten"):
                shape = s.graph.values[consumer.outputs[0]].shape
                if len(shape) == len(s.shape(value)) + 1 and shape[-2] * shape[-1] == size:
                    heads, head_size = shape[-2], shape[-1]
                    break
        part = head_ranges(offset, heads, head_size, s.n)
        if part is None:
            return None, (), f"{heads} heads of {head_size} do not divide over {s.n} devices"
        ranges.append(part)
        offset += size
    return join_ranges(ranges), tuple(parts), ""


def _reshape(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    x, layout = ref(args[0]), s.layout[ref(args[0])]
    in_shape, out_shape = s.shape(x), s.graph.values[node.outputs[0]].shape
    outer = math.prod(in_shape[: layout.dim])
    inner_in = math.prod(in_shape[layout.dim + 1:])
    for e in range(len(out_shape)):
        if math.prod(out_shape[:e]) == outer and out_shape[e] > 1:
            inner_out = math.prod(out_shape[e + 1:])
            split = Shard(e, scale_ranges(layout.ranges, inner_in, inner_out))
            local = list(out_shape)
            local[e] = split.local_size
            s.emit(node, [args[0], local, *args[2:]], kwargs, [split])
            return
    raise CannotSplit("reshape")


def _flatten_like(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    """flatten / unflatten (heads in and out of the feature dimension): a reshape to the output's shape."""
    out_shape = list(s.graph.values[node.outputs[0]].shape)
    _reshape(s, replace(node, target="aten.reshape.default"), [args[0], out_shape], {})


def _permuting(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    x, layout = ref(args[0]), s.layout[ref(args[0])]
    ndim, packet = len(s.shape(x)), op_packet(node.target)
    d = layout.dim
    if packet in ("aten.transpose", "aten.swapaxes"):
        a, b = normalize_dim(args[1], ndim), normalize_dim(args[2], ndim)
        new = b if d == a else a if d == b else d
    elif packet == "aten.permute":
        new = [normalize_dim(p, ndim) for p in args[1]].index(d)
    elif packet == "aten.unsqueeze":
        new = d + (1 if normalize_dim(args[1], ndim + 1) <= d else 0)
    elif packet == "aten.squeeze" and len(args) > 1 and not isinstance(args[1], list):
        gone = normalize_dim(args[1], ndim)
        if gone == d:
            raise CannotSplit("squeeze")
        new = d - (1 if gone < d else 0)
    else:
        raise CannotSplit(packet)
    s.emit(node, args, kwargs, [Shard(new, layout.ranges)])


def _expand(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    x, layout = ref(args[0]), s.layout[ref(args[0])]
    size = list(args[1])
    e = layout.dim + len(size) - len(s.shape(x))
    if size[e] != -1:
        size[e] = layout.local_size
    s.emit(node, [args[0], size, *args[2:]], kwargs, [Shard(e, layout.ranges)])


def _cut(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    """split / split_with_sizes / chunk: across the split dimension, each part keeps its ranks' share."""
    x, layout = ref(args[0]), s.layout[ref(args[0])]
    ndim = len(s.shape(x))
    dim = normalize_dim(args[2] if len(args) > 2 else kwargs.get("dim", 0), ndim)
    outputs = [o for o in node.outputs]
    if dim != layout.dim:
        s.emit(node, args, kwargs, [layout] * len(outputs))
        return
    sizes = [s.graph.values[o].shape[dim] for o in outputs if o]
    if len(sizes) != len(outputs):
        raise CannotSplit("unused parts")
    parts, offset, local = [], 0, []
    for size in sizes:
        part = segment_ranges(layout.ranges, offset, size)
        lengths = {sum(length for _, length in rank) for rank in part}
        if len(lengths) != 1 or 0 in lengths:
            raise CannotSplit("a part is not split evenly")
        parts.append(Shard(dim, part))
        local.append(lengths.pop())
        offset += size
    node = replace(node, target="aten.split_with_sizes.default")
    s.emit(node, [args[0], local, dim], {}, parts)


def _unbind(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    """unbind along an unsplit dimension (RoPE's halves): every part keeps the split."""
    x, layout = ref(args[0]), s.layout[ref(args[0])]
    dim = normalize_dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), len(s.shape(x)))
    if dim == layout.dim:
        raise CannotSplit("unbinding the split dimension")
    s.emit(node, args, kwargs, [Shard(layout.dim - (dim < layout.dim), layout.ranges)] * len(node.outputs))


def _repeat_interleave(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    """repeat_interleave(x, int, dim) along an unsplit dimension (GQA's KV repeat per head)."""
    x, layout = ref(args[0]), s.layout[ref(args[0])]
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    dim = args[2] if len(args) > 2 else kwargs.get("dim")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or not isinstance(dim, int) \
            or normalize_dim(dim, len(s.shape(x))) == layout.dim:
        raise CannotSplit("repeat_interleave")
    s.emit(node, args, kwargs, [layout])


def _type_as(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    """type_as(x, other): `other` only gives the dtype, so the result is laid out as `x`."""
    s.emit(node, args, kwargs, [s.layout[ref(args[0])]])


def _slice_like(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    """slice / select / index_select / narrow along a dimension that is not split."""
    x, layout = ref(args[0]), s.layout[ref(args[0])]
    ndim = len(s.shape(x))
    dim = normalize_dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), ndim)
    if dim == layout.dim or any(s.placement(r) != REPLICATE for r in refs(args[2:])):
        raise CannotSplit("slicing the split dimension")
    new = layout.dim - (1 if op_packet(node.target) == "aten.select" and dim < layout.dim else 0)
    s.emit(node, args, kwargs, [Shard(new, layout.ranges)])


def _cat(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    tensors = [ref(t) for t in args[0]]
    layouts = {s.layout[t] for t in tensors}
    dim = normalize_dim(args[1] if len(args) > 1 else 0, len(s.shape(tensors[0])))
    if len(layouts) != 1 or REPLICATE in layouts or PARTIAL in layouts or dim == next(iter(layouts)).dim:
        raise CannotSplit("cat")
    s.emit(node, args, kwargs, [next(iter(layouts))])


def _elementwise(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    """Broadcasting math: split operands must agree; a replicated operand must be of size 1
    along the split dimension (or be a weight, which is then split the same way)."""
    operands = [r for r in refs([args, kwargs])]
    out_ndim = len(s.graph.values[node.outputs[0]].shape)
    layout = None   # the Shard the split operands agree on
    for name in operands:
        lay = s.layout[name]
        if lay == REPLICATE:
            continue
        if lay == PARTIAL:
            raise CannotSplit("partial")
        aligned = Shard(lay.dim + out_ndim - len(s.shape(name)), lay.ranges)
        if layout is not None and aligned != layout:
            raise CannotSplit("operands split differently")
        layout = aligned
    for name in operands:
        if s.layout[name] != REPLICATE:
            continue
        shape = s.shape(name)
        d = layout.dim - (out_ndim - len(shape))
        if d >= 0 and shape[d] != 1 and not s.shard_resident(name, d, layout.ranges, "column"):
            raise CannotSplit("a replicated operand spans the split dimension")
    s.emit(node, args, kwargs, [layout] * len(node.outputs))


def _reduction(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    x, layout = ref(args[0]), s.layout[ref(args[0])]
    ndim = len(s.shape(x))
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    if dims is None or isinstance(dims, dict):
        raise CannotSplit("reduction over every dimension")
    dims = [normalize_dim(d, ndim) for d in (dims if isinstance(dims, list) else [dims])]
    if layout.dim in dims:
        raise CannotSplit("reduction over the split dimension")
    keepdim = (args[2] if len(args) > 2 else kwargs.get("keepdim", False)) is True
    new = layout.dim if keepdim else layout.dim - sum(d < layout.dim for d in dims)
    s.emit(node, args, kwargs, [Shard(new, layout.ranges)] * len(node.outputs))


def _norm(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    x, layout = ref(args[0]), s.layout[ref(args[0])]
    ndim, packet = len(s.shape(x)), op_packet(node.target)
    if packet in ("aten.softmax", "aten.log_softmax"):
        if normalize_dim(args[1], ndim) == layout.dim:
            raise CannotSplit("softmax over the split dimension")
    elif packet in ("aten.layer_norm", "aten.rms_norm", "aten.native_layer_norm"):
        if layout.dim >= ndim - len(args[1]) or any(s.placement(r) != REPLICATE for r in refs(args[2:])):
            raise CannotSplit("normalising over the split dimension")
    else:
        raise CannotSplit(packet)
    s.emit(node, args, kwargs, [layout] * len(node.outputs))


def _heads(s: Splitter, name: str) -> Shard:
    layout = s.layout[name]
    if not isinstance(layout, Shard) or layout.dim != 1:
        raise CannotSplit("attention needs its inputs split by heads")
    return layout


def _check_grouping(q: Shard, kv: Shard, q_heads: int, kv_heads: int) -> None:
    """Each rank's query heads must use, in order, the KV heads that rank holds."""
    group = q_heads // kv_heads
    for rank in range(len(q.ranges)):
        local_q, local_kv = q.indices(rank), kv.indices(rank)
        local_group = max(1, len(local_q) // len(local_kv))
        if any(local_kv[j // local_group] != head // group for j, head in enumerate(local_q)):
            raise ValueError("internal error: query heads and KV heads split inconsistently")


def _kv_cache_update(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    k_cache, v_cache, k, v = (ref(a) for a in args[:4])
    layout = _heads(s, k)
    if s.layout[v] != layout:
        raise CannotSplit("K and V split differently")
    for cache in (k_cache, v_cache):
        if not s.shard_resident(cache, 1, layout.ranges, "kv-heads", note="paged KV cache by KV heads"):
            raise CannotSplit("the KV cache is read unsplit elsewhere")
    s.emit(node, args, kwargs, [REPLICATE] * len(node.outputs))


def _paged_attention(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    q, k_cache, v_cache = (ref(a) for a in args[:3])
    q_layout, kv_layout = _heads(s, q), _heads(s, k_cache)
    if s.layout[v_cache] != kv_layout or any(s.placement(r) != REPLICATE for r in refs(args[3:])):
        raise CannotSplit("attention inputs")
    _check_grouping(q_layout, kv_layout, s.shape(q)[1], s.shape(k_cache)[1])
    s.emit(node, args, kwargs, [q_layout])


def _moe_experts(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    """Expert parallelism: rank r holds experts [r*E/N, (r+1)*E/N) (their weights and ids split
    alike), routes every token with the whole router, computes the tokens routed to its own
    experts, and the partial sums are all-reduced."""
    hidden, router, expert_ids, gate_up, down = (ref(a) for a in args[:5])
    (out,) = node.outputs
    if any(s.placement(name) != REPLICATE for name in (hidden, router)):
        raise CannotSplit("the MoE kernel routes the whole hidden state with the whole router")
    experts = s.shape(gate_up)[0]
    if experts % s.n:
        raise CannotSplit(f"{experts} experts do not split evenly over {s.n} devices")
    ranges = even_ranges(0, experts, s.n)
    for name in (expert_ids, gate_up, down):
        if not s.shard_resident(name, 0, ranges, "experts", note="experts split across devices, partial sums all-reduced"):
            raise CannotSplit("expert weights are read unsplit elsewhere")
    s.emit(node, args, kwargs, [PARTIAL])
    full = tuple(s.meta[out].shape)
    s.rename[out] = s.collective(ALL_REDUCE, out, [], f"{out}@all_reduce", full, (s.n - 1) * math.prod(full),
                                 "all_reduce")


def _sdpa(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    q, k, v = (ref(a) for a in args[:3])
    q_layout, kv_layout = _heads(s, q), _heads(s, k)
    if s.layout[v] != kv_layout or len(s.shape(q)) != 4:
        raise CannotSplit("sdpa inputs")
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    if ref(mask) is not None and (s.layout[ref(mask)] != REPLICATE or s.shape(ref(mask))[-3] != 1):
        raise CannotSplit("a per-head mask")
    _check_grouping(q_layout, kv_layout, s.shape(q)[1], s.shape(k)[1])
    s.emit(node, args, kwargs, [q_layout])


def _batched_matmul(s: Splitter, node: Node, args: list, kwargs: dict) -> None:
    """matmul / bmm of two operands split alike along a batch dimension (attention by hand)."""
    a, b = ref(args[0]), ref(args[1])
    la, lb = s.layout[a], s.layout[b]
    if not (isinstance(la, Shard) and isinstance(lb, Shard) and la.ranges == lb.ranges):
        raise CannotSplit("matmul")
    na, nb = len(s.shape(a)), len(s.shape(b))
    out_ndim = len(s.graph.values[node.outputs[0]].shape)
    if la.dim >= na - 2 or lb.dim >= nb - 2 or la.dim - na != lb.dim - nb:
        raise CannotSplit("matmul over the split dimension")
    s.emit(node, args, kwargs, [Shard(la.dim + out_ndim - na, la.ranges)])


RULES = {
    "aten.linear": _linear, "rbln.dequant_linear": _linear, "rbln.quant_linear": _linear,
    "aten.embedding": _embedding,
    "aten.view": _reshape, "aten.reshape": _reshape,
    "aten.flatten": _flatten_like, "aten.unflatten": _flatten_like,
    "aten.transpose": _permuting, "aten.swapaxes": _permuting, "aten.permute": _permuting,
    "aten.unsqueeze": _permuting, "aten.squeeze": _permuting,
    "aten.expand": _expand,
    "aten.split": _cut, "aten.split_with_sizes": _cut, "aten.chunk": _cut,
    "aten.slice": _slice_like, "aten.select": _slice_like, "aten.index_select": _slice_like,
    "aten.narrow": _slice_like,
    "aten.cat": _cat, "aten.concat": _cat, "aten.concatenate": _cat,   # torch.concat / concatenate: cat's aliases
    "aten.unbind": _unbind,
    "aten.repeat_interleave": _repeat_interleave,
    "aten.mean": _reduction, "aten.sum": _reduction, "aten.amax": _reduction, "aten.amin": _reduction,
    "aten.softmax": _norm, "aten.log_softmax": _norm, "aten.layer_norm": _norm, "aten.rms_norm": _norm,
    "rbln.kv_cache_update": _kv_cache_update,
    "rbln.paged_attention": _paged_attention, "rbln.flash_attention": _paged_attention,
    "rbln.moe_experts": _moe_experts,
    "rbln.local_kv_cache_update": _kv_cache_update, "rbln.local_attention": _paged_attention,
    "aten.scaled_dot_product_attention": _sdpa,
    "aten.matmul": _batched_matmul, "aten.bmm": _batched_matmul,
}
RULES.update({packet: _elementwise for packet, category in DEVICE_OPS.items() if category == "pointwise"})
RULES["aten.type_as"] = _type_as

# Rules that may shard a replicated input's consumer (they split weights): tried on every node.
CREATES_SHARDS = (_linear, _embedding, _moe_experts)
