"""Tensor parallelism: split a graph over N devices, Megatron style, from the graph alone.

The pass walks the exported graph once, in program order, tracking for every value how it is
laid out over the ranks (`Split`: a dimension and, per rank, the index ranges of it the rank
holds; or replicated; or a partial sum still to be reduced). A linear layer whose input is
replicated becomes column-parallel (its output split by features); one whose input is split
along its features becomes row-parallel (its output a partial sum, followed by an all-reduce).
Every other op either carries the layout through (views, transposes, element-wise math,
norms over unsplit dimensions, the attention kernels per head), or, when it cannot, gets its
split inputs all-gathered first. So any graph is split correctly; a transformer block is split
the way Megatron-LM / gpt-fast `tp.py` / nano-vllm split it:

- Q/K/V (fused into one matmul by the decoder) and gate/up: column-parallel. The split sizes
  of a fused projection are read from the `split` / `chunk` that follows it in the graph, and
  the head size from the `reshape` into heads, so each rank gets whole heads of every part
  (vLLM's `QKVParallelLinear`). KV heads are split when the device count divides them and
  shared (each rank holds the one KV head its query heads use) when there are fewer KV heads
  than devices; other sizes leave the layer replicated.
- the output projection and down projection: row-parallel, then an all-reduce, which the pass
  fuses with the residual add that follows (`rbln.all_reduce(x, residual)`).
- the paged KV cache: split by KV heads like the K/V it stores.
- the LM head: split by vocabulary, logits all-gathered.
- the token embedding, tied to the LM head or not: split by vocabulary, 1/N of the table per
  device; each rank looks up the ids of its slice (zero rows for the others) and the rows are
  all-reduced, as Megatron-LM's `VocabParallelEmbedding` does. A small table (no more rows than
  columns: positions, relative-position buckets) stays whole.
- a column split whose output would be all-gathered (no row-parallel layer takes it) is kept
  only where its weights outweigh the gathered activation: an LM head over a few positions
  is split by vocabulary, a patch embedding or a final projection over many tokens is not.
- norms and everything on the residual stream: replicated.

The result is the program one device runs (values in local shapes) plus `tensor_shards`, and
a `ShardingPlan` you can print. Nothing here knows a model: it reads ops and shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ..sim_device.collectives import ALL_GATHER, ALL_REDUCE
from ..sim_device.ops import DEVICE_OPS, op_packet, resolve_op
from ..sim_device.program import PROGRAM_DTYPES, Ref, TensorShard, TensorSpec, decode_arg, resident_bytes
from ..sim_device.specs import NPUSpec
from .frontend import Graph, Node
from .op_support import Category, Work, count_work

Ranges = tuple[tuple[tuple[int, int], ...], ...]   # per rank: ((start, length), ...)


@dataclass(frozen=True)
class Split:
    """A value split along `dim`: rank r holds the concatenation of `ranges[r]` of that dimension."""

    dim: int
    ranges: Ranges

    @property
    def local_size(self) -> int:
        return sum(length for _, length in self.ranges[0])

    def indices(self, rank: int) -> list[int]:
        return [i for start, length in self.ranges[rank] for i in range(start, start + length)]

    def is_partition_of(self, size: int) -> bool:
        """Every index of the dimension on exactly one rank (what a row-parallel sum needs)."""
        return sorted(i for rank in range(len(self.ranges)) for i in self.indices(rank)) == list(range(size))


PARTIAL = "partial"   # a row-parallel result: the sum over ranks is still to be taken


class _CannotSplit(Exception):
    """This op cannot work on its inputs' layout: they are all-gathered first."""


# --- the plan, as data you can print ------------------------------------------------------


@dataclass
class TensorPlan:
    """How one weight or buffer is split: `style` is column / row / vocab (a column-parallel
    output projection whose logits are gathered) / kv-heads / replicated."""

    name: str
    shape: tuple[int, ...]
    style: str
    dim: int | None = None
    split_sizes: tuple[int, ...] = ()      # the parts of a fused projection (Q/K/V, gate/up)
    note: str = ""
    shard: TensorShard | None = None

    def __str__(self) -> str:
        where = "" if self.dim is None else f" dim {self.dim}"
        local = "" if self.shard is None else f" -> {list(self.shard.local_shape(self.shape, 0))} per device"
        parts = f" parts {list(self.split_sizes)}" if len(self.split_sizes) > 1 else ""
        note = f"  ({self.note})" if self.note else ""
        return f"{self.name:<40} {str(list(self.shape)):<16} {self.style:<10}{where}{parts}{local}{note}"


@dataclass
class ShardingPlan:
    tensor_parallel_size: int
    tensors: list[TensorPlan] = field(default_factory=list)
    collectives: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"tensor parallel over {self.tensor_parallel_size} devices:"]
        lines += [f"  {t}" for t in self.tensors]
        lines.append(f"  collectives: {len(self.collectives)} ({', '.join(sorted(set(self.collectives)))})")
        return "\n".join(lines)

    def by_name(self) -> dict[str, TensorPlan]:
        return {t.name: t for t in self.tensors}


# --- ranges ---------------------------------------------------------------------------------


def _even_ranges(offset: int, size: int, n: int) -> Ranges:
    step = size // n
    return tuple(((offset + r * step, step),) for r in range(n))


def _head_ranges(offset: int, heads: int, head_size: int, n: int) -> Ranges | None:
    """Ranges of whole heads per rank: an even split, or (fewer heads than ranks) the head
    each rank's share of the work belongs to; None if neither divides."""
    if heads % n == 0:
        return _even_ranges(offset, heads * head_size, n)
    if n % heads == 0:
        return tuple(((offset + (r * heads // n) * head_size, head_size),) for r in range(n))
    return None


def _join(parts: list[Ranges]) -> Ranges:
    return tuple(tuple(r for part in parts for r in part[rank]) for rank in range(len(parts[0])))


def _scale(ranges: Ranges, numerator: int, denominator: int) -> Ranges:
    out = []
    for rank_ranges in ranges:
        scaled = []
        for start, length in rank_ranges:
            if start * numerator % denominator or length * numerator % denominator:
                raise _CannotSplit("a reshape cuts through the split")
            scaled.append((start * numerator // denominator, length * numerator // denominator))
        out.append(tuple(scaled))
    return tuple(out)


def _segment(ranges: Ranges, start: int, size: int) -> Ranges:
    """The part of each rank's ranges inside [start, start + size), shifted to start at 0."""
    out = []
    for rank_ranges in ranges:
        part = []
        for s, length in rank_ranges:
            lo, hi = max(s, start), min(s + length, start + size)
            if lo < hi:
                part.append((lo - start, hi - lo))
        out.append(tuple(part))
    return tuple(out)


def _gather_sources(split: Split, size: int) -> list[int]:
    """Positions, in the rank-order concatenation of the shards, of global indices 0..size-1
    (empty when that concatenation is already the full dimension in order)."""
    local = split.local_size
    if _in_order(split, local) == size:  # the usual even split: no index list to build (a vocab is 100k+)
        return []
    position: dict[int, int] = {}
    for rank in range(len(split.ranges)):
        for offset, index in enumerate(split.indices(rank)):
            position.setdefault(index, rank * local + offset)
    if sorted(position) != list(range(size)):
        raise ValueError("internal error: a split value does not cover its dimension")
    sources = [position[i] for i in range(size)]
    return [] if sources == list(range(len(split.ranges) * local)) else sources


def _in_order(split: Split, local: int) -> int:
    """How far the rank-order concatenation of the shards runs 0, 1, 2, ... in order with every
    rank holding `local` indices (-1 where it breaks)."""
    cursor = 0
    for rank_ranges in split.ranges:
        if sum(length for _, length in rank_ranges) != local:
            return -1
        for start, length in rank_ranges:
            if start != cursor:
                return -1
            cursor += length
    return cursor


# --- the pass -------------------------------------------------------------------------------


def _refs(arg) -> list[str]:
    if isinstance(arg, list):
        return [n for a in arg for n in _refs(a)]
    if isinstance(arg, dict):
        return [arg["ref"]] if "ref" in arg else [n for v in arg.values() for n in _refs(v)]
    return []


def _rename(arg, rename: dict[str, str]):
    if isinstance(arg, list):
        return [_rename(a, rename) for a in arg]
    if isinstance(arg, dict) and "ref" in arg:
        return {"ref": rename.get(arg["ref"], arg["ref"])}
    return arg


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


class _Splitter:
    def __init__(self, graph: Graph, n: int, fuse_residual: bool, keep_whole: dict[str, str] | None = None):
        self.graph, self.n, self.fuse_residual = graph, n, fuse_residual
        self.keep_whole = keep_whole or {}             # weights a column split would not pay for: why
        self.origin: dict[str, frozenset[str]] = {}    # split value -> the column-parallel weights it comes from
        self.gathered_elements: dict[frozenset[str], int] = {}   # those weights -> elements all-gathered per run
        self.layout: dict[str, Split | str | None] = {}
        self.meta: dict[str, torch.Tensor] = {}        # local (one rank's) shapes, on the meta device
        self.values = dict(graph.values)
        self.shards: dict[str, TensorShard] = {}
        self.plan = ShardingPlan(n)
        self.planned: dict[str, TensorPlan] = {}
        self.rename: dict[str, str] = {}
        self.nodes: list[Node] = []
        self.resident = {s.name for s in graph.weights + graph.buffers}
        self.read_whole: set[str] = set()              # weights / buffers some op reads unsplit
        self.gathered: dict[str, str] = {}
        self.added: dict[str, tuple[TensorSpec, torch.Tensor]] = {}   # constants the pass adds (full)
        self.uses: dict[str, int] = {}
        self.consumers: dict[str, list[Node]] = {}
        for node in graph.nodes:
            for name in node.inputs:
                self.uses[name] = self.uses.get(name, 0) + 1
                self.consumers.setdefault(name, []).append(node)
        for spec in graph.inputs + graph.weights + graph.buffers:
            self.layout[spec.name] = None
            self.meta[spec.name] = torch.empty(spec.shape, dtype=PROGRAM_DTYPES[spec.dtype], device="meta")

    # ---- helpers ----------------------------------------------------------------------

    def shape(self, name: str) -> tuple[int, ...]:
        """The full (unsplit) shape of a value (values the pass adds are whole)."""
        return tuple((self.graph.values.get(name) or self.values[name]).shape)

    def shard_resident(self, name: str, dim: int, ranges: Ranges, style: str, **plan) -> bool:
        """Split weight / buffer `name` (False if it is read unsplit elsewhere, or split otherwise)."""
        if name not in self.resident or name in self.read_whole:
            return False
        shard = TensorShard(dim, [[list(r) for r in rank] for rank in ranges])
        if name in self.shards:
            return self.shards[name] == shard
        self.shards[name] = shard
        self.layout[name] = Split(dim, ranges)
        full = self.meta[name]
        self.meta[name] = torch.empty(shard.local_shape(tuple(full.shape), 0), dtype=full.dtype, device="meta")
        self.planned[name] = TensorPlan(name, self.shape(name), style, dim, shard=shard, **plan)
        return True

    def emit(self, node: Node, args: list, kwargs: dict, layouts: list) -> None:
        """Record `node` with rewritten arguments; its outputs take `layouts` and local shapes."""
        inputs = list(dict.fromkeys(_refs([args, kwargs])))
        for name in inputs:
            if name in self.resident and self.layout[name] is None:
                self.read_whole.add(name)
        fake = decode_arg(args, torch.float32)
        fake_kwargs = {k: decode_arg(v, torch.float32) for k, v in kwargs.items()}
        fake, fake_kwargs = self._on_meta(fake), {k: self._on_meta(v) for k, v in fake_kwargs.items()}
        with torch.device("meta"):  # ops creating tensors (arange, zeros) create them on meta too
            result = resolve_op(node.target)(*fake, **fake_kwargs)
        results = list(result) if isinstance(result, (list, tuple)) else [result]
        origin = frozenset().union(*(self.origin.get(i, ()) for i in inputs if isinstance(self.layout.get(i), Split)))
        for name, value, layout in zip(node.outputs, results, layouts):
            if name and isinstance(value, torch.Tensor):
                self.meta[name] = value
                self.layout[name] = layout
                if isinstance(layout, Split) and origin:
                    self.origin[name] = origin
                self.values[name] = TensorSpec(name, tuple(value.shape), self.values[name].dtype)
        out = result if len(node.outputs) == 1 else results
        work = count_work(node.target, node.category, tuple(fake), out)
        self.nodes.append(replace(node, args=args, kwargs=kwargs, inputs=inputs, work=work, fake_args=tuple(fake)))

    def _on_meta(self, value):
        """Decoded op arguments with value references as local meta tensors."""
        if isinstance(value, Ref):
            return self.meta[value.name]
        if isinstance(value, list):
            return [self._on_meta(v) for v in value]
        return torch.device("meta") if isinstance(value, torch.device) else value

    def collective(self, target: str, source: str, args: list, output: str, layout_shape: tuple[int, ...],
                   vector_flops: float, label: str) -> str:
        node = Node(target=target, args=[{"ref": source}, *args], kwargs={}, inputs=[source], outputs=[output],
                    category=Category.COLLECTIVE, work=Work(0.0, vector_flops), mutates=[],
                    fake_args=(self.meta[source],))
        self.meta[output] = torch.empty(layout_shape, dtype=self.meta[source].dtype, device="meta")
        self.values[output] = TensorSpec(output, layout_shape, self.values[source].dtype)
        self.layout[output] = None
        self.nodes.append(node)
        self.plan.collectives.append(label)
        return output

    def gather(self, name: str) -> str:
        """A replicated copy of split value `name` (all-gathered once, reused)."""
        if name not in self.gathered:
            split = self.layout[name]
            full = self.shape(name)
            if name in self.origin:
                self.gathered_elements[self.origin[name]] = self.gathered_elements.get(self.origin[name], 0) + math.prod(full)
            sources = _gather_sources(split, full[split.dim])
            self.gathered[name] = self.collective(
                ALL_GATHER, name, [split.dim, sources], f"{name}@all_gather", full, 0.0, "all_gather")
        return self.gathered[name]

    # ---- walking the graph -------------------------------------------------------------

    def run(self) -> None:
        for node in self.graph.nodes:
            args = _rename(node.args, self.rename)
            kwargs = {k: _rename(v, self.rename) for k, v in node.kwargs.items()}
            node = replace(node, args=args, kwargs=kwargs)
            split_inputs = [r for r in _refs([args, kwargs]) if self.layout.get(r) is not None]
            rule = RULES.get(op_packet(node.target))
            if rule in (_linear, _embedding) or split_inputs:
                try:
                    if rule is None:
                        raise _CannotSplit(node.target)
                    rule(self, node, args, kwargs)
                    continue
                except _CannotSplit:
                    pass
                if any(m in self.shards for m in node.mutates):
                    raise ValueError(f"tensor parallelism: {node.target} writes a split buffer "
                                     f"{node.mutates} in a way the pass cannot split")
                gathered = {r: self.gather(r) for r in split_inputs}
                args = _rename(args, gathered)
                kwargs = {k: _rename(v, gathered) for k, v in kwargs.items()}
            self.emit(node, args, kwargs, [None] * len(node.outputs))
        outputs = []
        for name in self.graph.outputs:
            name = self.rename.get(name, name)
            if self.layout.get(name) is not None:
                self._label_vocab_parallel(name)
                name = self.gather(name)
            outputs.append(name)
        self.outputs = outputs
        if self.fuse_residual:
            self._fuse_all_reduce_with_residual_add()

    def _label_vocab_parallel(self, name: str) -> None:
        producer = next((n for n in reversed(self.nodes) if name in n.outputs), None)
        if producer is not None and op_packet(producer.target) == "aten.linear":
            weight = _refs(producer.args[1])[0]
            if weight in self.planned and self.planned[weight].style == "column":
                self.planned[weight].style = "vocab"
                self.planned[weight].note = "output logits all-gathered"

    def _fuse_all_reduce_with_residual_add(self) -> None:
        """all_reduce(x) then add(residual, reduced) -> all_reduce(x, residual): the add happens in
        the reduction's last pass, saving a kernel and a round trip of the hidden state to DRAM."""
        position = {out: i for i, node in enumerate(self.nodes) for out in node.outputs if out}
        graph_outputs = set(self.outputs)
        readers: dict[str, list[int]] = {}
        for i, node in enumerate(self.nodes):
            for name in node.inputs:
                readers.setdefault(name, []).append(i)
        dropped = set()
        for i, node in enumerate(self.nodes):
            if node.target != ALL_REDUCE or len(node.args) != 1:
                continue
            (reduced,) = node.outputs
            users = readers.get(reduced, [])
            if len(users) != 1 or reduced in graph_outputs:
                continue
            add = self.nodes[users[0]]
            if add.target != "aten.add.Tensor" or add.kwargs or len(add.args) != 2 or \
                    not all(isinstance(a, dict) and "ref" in a for a in add.args):
                continue
            (other,) = [a["ref"] for a in add.args if a["ref"] != reduced] or [None]
            if other is None or position.get(other, -1) > i or self.layout.get(other) is not None \
                    or tuple(self.meta[other].shape) != tuple(self.meta[reduced].shape) \
                    or self.meta[other].dtype != self.meta[reduced].dtype:
                continue
            source = node.inputs[0]
            self.nodes[i] = replace(node, args=[{"ref": source}, {"ref": other}], inputs=[source, other],
                                    outputs=list(add.outputs),
                                    work=Work(0.0, node.work.vector_flops + self.meta[other].numel()),
                                    fake_args=(self.meta[source], self.meta[other]))
            dropped.add(users[0])
            self.plan.collectives[self.plan.collectives.index("all_reduce")] = "all_reduce+add"
        self.nodes = [n for i, n in enumerate(self.nodes) if i not in dropped]


# --- rules: how each op carries a layout ------------------------------------------------------


def _linear(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    x = args[0]["ref"]
    weight = args[1].get("ref") if isinstance(args[1], dict) else None
    bias = args[2]["ref"] if len(args) > 2 and isinstance(args[2], dict) else None
    layout = s.layout[x]
    ndim = len(s.shape(x))
    (out,) = node.outputs
    weight_layout = s.layout.get(weight) if weight is not None else None
    if layout is None and isinstance(weight_layout, Split) and weight_layout.dim == 0 and not bias:
        s.emit(node, args, kwargs, [Split(ndim - 1, weight_layout.ranges)])  # a tied LM head: logits by vocabulary
        return
    if weight is None or layout == PARTIAL or weight_layout is not None:
        raise _CannotSplit("linear")
    if layout is None:
        ranges, sizes, note = _column_plan(s, out)
        if weight in s.keep_whole:
            ranges, note = None, s.keep_whole[weight]
        if ranges is None or s.uses.get(weight) != 1 or (bias and s.uses.get(bias) != 1):
            if s.uses.get(weight) == 1 and weight not in s.planned:
                s.planned[weight] = TensorPlan(weight, s.shape(weight), "replicated", note=note or "used elsewhere")
            s.emit(node, args, kwargs, [None])
            return
        s.shard_resident(weight, 0, ranges, "column", split_sizes=sizes, note=note)
        if bias:
            s.shard_resident(bias, 0, ranges, "column")
        s.emit(node, args, kwargs, [Split(ndim - 1, ranges)])
        s.origin[out] = frozenset({weight} | ({bias} if bias else set()))
        return
    if layout.dim != ndim - 1:  # split rows of the input (batch / tokens): each rank its rows
        s.emit(node, args, kwargs, [layout])
        return
    in_features = s.shape(weight)[1]
    if s.uses.get(weight) != 1 or not layout.is_partition_of(in_features):
        raise _CannotSplit("row-parallel needs each input feature on exactly one rank")
    s.shard_resident(weight, 1, layout.ranges, "row", note="partial sums all-reduced")
    s.emit(node, args[:2], kwargs, [PARTIAL])
    full = tuple(s.meta[out].shape)
    reduced = s.collective(ALL_REDUCE, out, [], f"{out}@all_reduce", full,
                           (s.n - 1) * math.prod(full), "all_reduce")
    if bias:  # added once, after the sum
        s.planned.setdefault(bias, TensorPlan(bias, s.shape(bias), "replicated", note="bias of a row-parallel layer"))
        biased = f"{out}@bias"
        s.values[biased] = TensorSpec(biased, full, s.values[out].dtype)
        s.emit(Node("aten.add.Tensor", [], {}, [], [biased], Category.POINTWISE, Work(), [], ()),
               [{"ref": reduced}, {"ref": bias}], {}, [None])
        reduced = biased
    s.rename[out] = reduced


def _embedding(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    """A table lookup, vocabulary-parallel as Megatron-LM's `VocabParallelEmbedding`: rank r
    holds rows [r*V/N, (r+1)*V/N); it looks up the ids in that range (id - start, zero rows for
    ids outside) and the rows are all-reduced. Exactly one rank contributes each row, so the sum
    is exact. A tied table (also the LM head's weight) is then stored once as 1/N per device; an
    untied one too when it is a vocabulary, more rows than columns (32k-128k rows of 4096 save
    GiBs per device for one all-reduce of the looked-up rows per run); a small table (position
    rows, T5's relative-position buckets), often looked up many times per run, stays whole. The
    rule reads the table's shape alone, so every graph of a model (prefill and decode, sharing
    their weights) splits the table the same way."""
    weight = args[0].get("ref") if isinstance(args[0], dict) else None
    ids = args[1].get("ref") if len(args) > 1 and isinstance(args[1], dict) else None
    # (padding_idx, scale_grad_by_freq and sparse, if given, only change gradients)
    if weight is None or ids is None or s.layout.get(ids) is not None or len(s.shape(weight)) != 2:
        raise _CannotSplit("embedding")
    vocab, width = s.shape(weight)
    tied = s.uses.get(weight, 0) > 1
    whole = (f"{vocab} rows do not divide over {s.n} devices" if vocab % s.n else
             None if tied or vocab > width else
             f"{vocab} rows of {width}: too small a table for a split to pay its all-reduce")
    if whole:
        s.planned.setdefault(weight, TensorPlan(weight, s.shape(weight), "replicated", note=whole))
        raise _CannotSplit("embedding")
    ranges = _even_ranges(0, vocab, s.n)
    start = f"{weight}@vocab_start"
    if start not in s.added:
        spec = TensorSpec(start, (s.n,), "int64")
        s.added[start] = (spec, torch.arange(0, vocab, vocab // s.n, dtype=torch.int64))
        s.resident.add(start)
        s.values[start] = spec
        s.meta[start] = torch.empty(spec.shape, dtype=torch.int64, device="meta")
        s.layout[start] = None
        s.shard_resident(start, 0, tuple(((r, 1),) for r in range(s.n)), "vocab", note="each rank's first id")
    note = ("tied: lookup and LM head split by vocabulary" if tied else
            f"lookup split by vocabulary: {vocab // s.n} of {vocab} rows per device, the rows all-reduced")
    if not s.shard_resident(weight, 0, ranges, "vocab", note=note):
        raise _CannotSplit("embedding")
    (out,) = node.outputs
    ids_shape = s.shape(ids)

    def step(target: str, operands: list, name: str, shape, dtype: str, category: Category, options=None) -> str:
        value = f"{out}@{name}"
        s.values[value] = TensorSpec(value, tuple(shape), dtype)
        s.emit(Node(target, [], {}, [], [value], category, Work(), [], ()), operands, options or {}, [None])
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


def _column_plan(s: _Splitter, out: str) -> tuple[Ranges | None, tuple[int, ...], str]:
    """How to split the output features of a linear layer whose output is `out`: the parts a
    following split / chunk cuts it into, each split by whole heads (the reshape after it tells
    the head size). (None, ..., reason) when some part does not divide."""
    features = s.shape(out)[-1]
    consumers = s.consumers.get(out, [])
    parts, part_values = [features], [out]
    if len(consumers) == 1 and op_packet(consumers[0].target) in ("aten.split_with_sizes", "aten.split", "aten.chunk"):
        cut = consumers[0]
        dim = _dim(cut.args[2] if len(cut.args) > 2 else cut.kwargs.get("dim", 0), len(s.shape(out)))
        if dim == len(s.shape(out)) - 1:
            parts = [s.graph.values[o].shape[-1] for o in cut.outputs if o]
            part_values = list(cut.outputs)
            if len(parts) != len(cut.outputs) or sum(parts) != features:
                return None, (), "split not understood"
    ranges, offset = [], 0
    for size, value in zip(parts, part_values):
        heads, head_size = size, 1
        for consumer in s.consumers.get(value, []):
            if op_packet(consumer.target) in ("aten.reshape", "aten.view", "aten._unsafe_view", "aten.unflatten"):
                shape = s.graph.values[consumer.outputs[0]].shape
                if len(shape) == len(s.shape(value)) + 1 and shape[-2] * shape[-1] == size:
                    heads, head_size = shape[-2], shape[-1]
                    break
        part = _head_ranges(offset, heads, head_size, s.n)
        if part is None:
            return None, (), f"{heads} heads of {head_size} do not divide over {s.n} devices"
        ranges.append(part)
        offset += size
    return _join(ranges), tuple(parts), ""


def _reshape(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    x, layout = args[0]["ref"], s.layout[args[0]["ref"]]
    in_shape, out_shape = s.shape(x), s.graph.values[node.outputs[0]].shape
    outer = math.prod(in_shape[: layout.dim])
    inner_in = math.prod(in_shape[layout.dim + 1:])
    for e in range(len(out_shape)):
        if math.prod(out_shape[:e]) == outer and out_shape[e] > 1:
            inner_out = math.prod(out_shape[e + 1:])
            split = Split(e, _scale(layout.ranges, inner_in, inner_out))
            local = list(out_shape)
            local[e] = split.local_size
            s.emit(node, [args[0], local, *args[2:]], kwargs, [split])
            return
    raise _CannotSplit("reshape")


def _flatten_like(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    """flatten / unflatten (heads in and out of the feature dimension): a reshape to the output's shape."""
    out_shape = list(s.graph.values[node.outputs[0]].shape)
    _reshape(s, replace(node, target="aten.reshape.default"), [args[0], out_shape], {})


def _permuting(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    x, layout = args[0]["ref"], s.layout[args[0]["ref"]]
    ndim, packet = len(s.shape(x)), op_packet(node.target)
    d = layout.dim
    if packet in ("aten.transpose", "aten.swapaxes"):
        a, b = _dim(args[1], ndim), _dim(args[2], ndim)
        new = b if d == a else a if d == b else d
    elif packet == "aten.permute":
        new = [_dim(p, ndim) for p in args[1]].index(d)
    elif packet == "aten.unsqueeze":
        new = d + (1 if _dim(args[1], ndim + 1) <= d else 0)
    elif packet == "aten.squeeze" and len(args) > 1 and not isinstance(args[1], list):
        gone = _dim(args[1], ndim)
        if gone == d:
            raise _CannotSplit("squeeze")
        new = d - (1 if gone < d else 0)
    else:
        raise _CannotSplit(packet)
    s.emit(node, args, kwargs, [Split(new, layout.ranges)])


def _expand(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    x, layout = args[0]["ref"], s.layout[args[0]["ref"]]
    size = list(args[1])
    e = layout.dim + len(size) - len(s.shape(x))
    if size[e] != -1:
        size[e] = layout.local_size
    s.emit(node, [args[0], size, *args[2:]], kwargs, [Split(e, layout.ranges)])


def _cut(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    """split / split_with_sizes / chunk: across the split dimension, each part keeps its ranks' share."""
    x, layout = args[0]["ref"], s.layout[args[0]["ref"]]
    ndim = len(s.shape(x))
    dim = _dim(args[2] if len(args) > 2 else kwargs.get("dim", 0), ndim)
    outputs = [o for o in node.outputs]
    if dim != layout.dim:
        s.emit(node, args, kwargs, [layout] * len(outputs))
        return
    sizes = [s.graph.values[o].shape[dim] for o in outputs if o]
    if len(sizes) != len(outputs):
        raise _CannotSplit("unused parts")
    parts, offset, local = [], 0, []
    for size in sizes:
        part = _segment(layout.ranges, offset, size)
        lengths = {sum(length for _, length in rank) for rank in part}
        if len(lengths) != 1 or 0 in lengths:
            raise _CannotSplit("a part is not split evenly")
        parts.append(Split(dim, part))
        local.append(lengths.pop())
        offset += size
    node = replace(node, target="aten.split_with_sizes.default")
    s.emit(node, [args[0], local, dim], {}, parts)


def _unbind(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    """unbind along an unsplit dimension (RoPE's halves): every part keeps the split."""
    x, layout = args[0]["ref"], s.layout[args[0]["ref"]]
    dim = _dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), len(s.shape(x)))
    if dim == layout.dim:
        raise _CannotSplit("unbinding the split dimension")
    s.emit(node, args, kwargs, [Split(layout.dim - (dim < layout.dim), layout.ranges)] * len(node.outputs))


def _repeat_interleave(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    """repeat_interleave(x, int, dim) along an unsplit dimension (GQA's KV repeat per head)."""
    x, layout = args[0]["ref"], s.layout[args[0]["ref"]]
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    dim = args[2] if len(args) > 2 else kwargs.get("dim")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or not isinstance(dim, int) \
            or _dim(dim, len(s.shape(x))) == layout.dim:
        raise _CannotSplit("repeat_interleave")
    s.emit(node, args, kwargs, [layout])


def _type_as(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    """type_as(x, other): `other` only gives the dtype, so the result is laid out as `x`."""
    s.emit(node, args, kwargs, [s.layout[args[0]["ref"]]])


def _slice_like(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    """slice / select / index_select / narrow along a dimension that is not split."""
    x, layout = args[0]["ref"], s.layout[args[0]["ref"]]
    ndim = len(s.shape(x))
    dim = _dim(args[1] if len(args) > 1 else kwargs.get("dim", 0), ndim)
    if dim == layout.dim or any(s.layout.get(r) is not None for r in _refs(args[2:])):
        raise _CannotSplit("slicing the split dimension")
    new = layout.dim - (1 if op_packet(node.target) == "aten.select" and dim < layout.dim else 0)
    s.emit(node, args, kwargs, [Split(new, layout.ranges)])


def _cat(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    tensors = [t["ref"] for t in args[0]]
    layouts = {s.layout[t] for t in tensors}
    dim = _dim(args[1] if len(args) > 1 else 0, len(s.shape(tensors[0])))
    if len(layouts) != 1 or None in layouts or PARTIAL in layouts or dim == next(iter(layouts)).dim:
        raise _CannotSplit("cat")
    s.emit(node, args, kwargs, [next(iter(layouts))])


def _elementwise(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    """Broadcasting math: split operands must agree; a replicated operand must be of size 1
    along the split dimension (or be a weight, which is then split the same way)."""
    operands = [r for r in _refs([args, kwargs])]
    out_ndim = len(s.graph.values[node.outputs[0]].shape)
    layout = None
    for name in operands:
        lay = s.layout[name]
        if lay is None:
            continue
        if lay == PARTIAL:
            raise _CannotSplit("partial")
        aligned = Split(lay.dim + out_ndim - len(s.shape(name)), lay.ranges)
        if layout is not None and aligned != layout:
            raise _CannotSplit("operands split differently")
        layout = aligned
    for name in operands:
        if s.layout[name] is not None:
            continue
        shape = s.shape(name)
        d = layout.dim - (out_ndim - len(shape))
        if d >= 0 and shape[d] != 1 and not s.shard_resident(name, d, layout.ranges, "column"):
            raise _CannotSplit("a replicated operand spans the split dimension")
    s.emit(node, args, kwargs, [layout] * len(node.outputs))


def _reduction(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    x, layout = args[0]["ref"], s.layout[args[0]["ref"]]
    ndim = len(s.shape(x))
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    if dims is None or isinstance(dims, dict):
        raise _CannotSplit("reduction over every dimension")
    dims = [_dim(d, ndim) for d in (dims if isinstance(dims, list) else [dims])]
    if layout.dim in dims:
        raise _CannotSplit("reduction over the split dimension")
    keepdim = (args[2] if len(args) > 2 else kwargs.get("keepdim", False)) is True
    new = layout.dim if keepdim else layout.dim - sum(d < layout.dim for d in dims)
    s.emit(node, args, kwargs, [Split(new, layout.ranges)] * len(node.outputs))


def _norm(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    x, layout = args[0]["ref"], s.layout[args[0]["ref"]]
    ndim, packet = len(s.shape(x)), op_packet(node.target)
    if packet in ("aten.softmax", "aten.log_softmax"):
        if _dim(args[1], ndim) == layout.dim:
            raise _CannotSplit("softmax over the split dimension")
    elif packet in ("aten.layer_norm", "aten.rms_norm", "aten.native_layer_norm"):
        if layout.dim >= ndim - len(args[1]) or any(s.layout.get(r) is not None for r in _refs(args[2:])):
            raise _CannotSplit("normalising over the split dimension")
    else:
        raise _CannotSplit(packet)
    s.emit(node, args, kwargs, [layout] * len(node.outputs))


def _heads(s: _Splitter, name: str) -> Split:
    layout = s.layout[name]
    if not isinstance(layout, Split) or layout.dim != 1:
        raise _CannotSplit("attention needs its inputs split by heads")
    return layout


def _check_grouping(q: Split, kv: Split, q_heads: int, kv_heads: int) -> None:
    """Each rank's query heads must use, in order, the KV heads that rank holds."""
    group = q_heads // kv_heads
    for rank in range(len(q.ranges)):
        local_q, local_kv = q.indices(rank), kv.indices(rank)
        local_group = max(1, len(local_q) // len(local_kv))
        if any(local_kv[j // local_group] != head // group for j, head in enumerate(local_q)):
            raise ValueError("internal error: query heads and KV heads split inconsistently")


def _kv_cache_update(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    k_cache, v_cache, k, v = (a["ref"] for a in args[:4])
    layout = _heads(s, k)
    if s.layout[v] != layout:
        raise _CannotSplit("K and V split differently")
    for cache in (k_cache, v_cache):
        if not s.shard_resident(cache, 1, layout.ranges, "kv-heads", note="paged KV cache by KV heads"):
            raise _CannotSplit("the KV cache is read unsplit elsewhere")
    s.emit(node, args, kwargs, [None] * len(node.outputs))


def _paged_attention(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    q, k_cache, v_cache = (a["ref"] for a in args[:3])
    q_layout, kv_layout = _heads(s, q), _heads(s, k_cache)
    if s.layout[v_cache] != kv_layout or any(s.layout.get(r) is not None for r in _refs(args[3:])):
        raise _CannotSplit("attention inputs")
    _check_grouping(q_layout, kv_layout, s.shape(q)[1], s.shape(k_cache)[1])
    s.emit(node, args, kwargs, [q_layout])


def _sdpa(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    q, k, v = (a["ref"] for a in args[:3])
    q_layout, kv_layout = _heads(s, q), _heads(s, k)
    if s.layout[v] != kv_layout or len(s.shape(q)) != 4:
        raise _CannotSplit("sdpa inputs")
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    if isinstance(mask, dict) and (s.layout[mask["ref"]] is not None or s.shape(mask["ref"])[-3] != 1):
        raise _CannotSplit("a per-head mask")
    _check_grouping(q_layout, kv_layout, s.shape(q)[1], s.shape(k)[1])
    s.emit(node, args, kwargs, [q_layout])


def _batched_matmul(s: _Splitter, node: Node, args: list, kwargs: dict) -> None:
    """matmul / bmm of two operands split alike along a batch dimension (attention by hand)."""
    a, b = args[0]["ref"], args[1]["ref"]
    la, lb = s.layout[a], s.layout[b]
    if not (isinstance(la, Split) and isinstance(lb, Split) and la.ranges == lb.ranges):
        raise _CannotSplit("matmul")
    na, nb = len(s.shape(a)), len(s.shape(b))
    out_ndim = len(s.graph.values[node.outputs[0]].shape)
    if la.dim >= na - 2 or lb.dim >= nb - 2 or la.dim - na != lb.dim - nb:
        raise _CannotSplit("matmul over the split dimension")
    s.emit(node, args, kwargs, [Split(la.dim + out_ndim - na, la.ranges)])


RULES = {
    "aten.linear": _linear,
    "aten.embedding": _embedding,
    "aten.view": _reshape, "aten.reshape": _reshape, "aten._unsafe_view": _reshape,
    "aten.flatten": _flatten_like, "aten.unflatten": _flatten_like,
    "aten.transpose": _permuting, "aten.swapaxes": _permuting, "aten.permute": _permuting,
    "aten.unsqueeze": _permuting, "aten.squeeze": _permuting,
    "aten.expand": _expand,
    "aten.split": _cut, "aten.split_with_sizes": _cut, "aten.chunk": _cut,
    "aten.slice": _slice_like, "aten.select": _slice_like, "aten.index_select": _slice_like,
    "aten.narrow": _slice_like,
    "aten.cat": _cat,
    "aten.unbind": _unbind,
    "aten.repeat_interleave": _repeat_interleave,
    "aten.mean": _reduction, "aten.sum": _reduction, "aten.amax": _reduction, "aten.amin": _reduction,
    "aten.softmax": _norm, "aten.log_softmax": _norm, "aten.layer_norm": _norm, "aten.rms_norm": _norm,
    "rbln.kv_cache_update": _kv_cache_update,
    "rbln.paged_attention": _paged_attention, "rbln.flash_attention": _paged_attention,
    "aten.scaled_dot_product_attention": _sdpa,
    "aten.matmul": _batched_matmul, "aten.bmm": _batched_matmul,
}
RULES.update({packet: _elementwise for packet, category in DEVICE_OPS.items() if category == "pointwise"})
RULES["aten.type_as"] = _type_as


def _splits_not_worth_their_gather(s: _Splitter) -> dict[str, str]:
    """Column-parallel weights whose split output is all-gathered (no row-parallel layer takes
    it) and whose gather moves more than the split saves: every run, each device receives
    (N-1)/N of the gathered activation over the device link, while the split spares it reading
    (N-1)/N of the weights from DRAM (and holding them). Both scale alike with N, so the
    comparison is of the two sizes. A patch embedding or a final projection over many tokens is
    then kept whole on every device; an LM head over a few positions stays split by vocabulary."""
    unpaid = {}
    for weights, gathered in s.gathered_elements.items():
        weight_elements = sum(math.prod(s.shape(w)) for w in weights)
        if gathered > weight_elements:
            for w in weights:
                unpaid[w] = (f"a split would all-gather {gathered} output elements per run to save "
                             f"{weight_elements} weight elements")
    return unpaid


def split_graph(graph: Graph, tensor_parallel_size: int, fuse_residual: bool = True) -> tuple[Graph, ShardingPlan]:
    """The graph one of `tensor_parallel_size` devices runs, and the plan that says how."""
    keep_whole: dict[str, str] = {}
    while True:
        splitter = _Splitter(graph, tensor_parallel_size, fuse_residual, keep_whole)
        splitter.run()
        unpaid = _splits_not_worth_their_gather(splitter)
        if not unpaid.keys() - keep_whole.keys():
            break
        keep_whole.update(unpaid)
    added = [spec for spec, _ in splitter.added.values()]
    weights = graph.weights + added
    tensors = graph.tensors if graph.tensors is None else {
        **graph.tensors, **{spec.name: tensor for spec, tensor in splitter.added.values()}}
    names = [s.name for s in weights + graph.buffers]
    for name in names:
        dtype = (graph.values.get(name) or splitter.values[name]).dtype
        splitter.values[name] = TensorSpec(name, tuple(splitter.meta[name].shape), dtype)
    plan = splitter.plan
    plan.tensors = [
        splitter.planned.get(name) or TensorPlan(name, splitter.shape(name), "replicated", note=(
            f"read by {splitter.uses[name]} ops (e.g. tied embeddings)" if splitter.uses.get(name, 0) > 1 else ""))
        for name in names
    ]
    split = replace(graph, outputs=splitter.outputs, values=splitter.values, nodes=splitter.nodes,
                    tensor_shards=dict(splitter.shards), weights=weights, tensors=tensors)
    return split, plan


def plan_tensor_parallel(graph: Graph, tensor_parallel_size: int) -> ShardingPlan:
    """The sharding plan alone (e.g. to print it)."""
    return split_graph(graph, tensor_parallel_size)[1]


def resident_bytes_per_rank(graph: Graph, tensor_parallel_size: int, device_dtype: str, npu: NPUSpec) -> list[int]:
    """Weights + buffers each rank would hold at `tensor_parallel_size` (from that size's plan), in
    whole DRAM pages as the memory plan counts them (floating tensors in `device_dtype`)."""
    shards = split_graph(graph, tensor_parallel_size)[0].tensor_shards if tensor_parallel_size > 1 else {}
    on_device = [TensorSpec(spec.name, spec.shape, device_dtype if PROGRAM_DTYPES[spec.dtype].is_floating_point
                            else spec.dtype) for spec in graph.weights + graph.buffers]
    return [sum(resident_bytes(spec, shards.get(spec.name), rank, npu) for spec in on_device)
            for rank in range(tensor_parallel_size)]
