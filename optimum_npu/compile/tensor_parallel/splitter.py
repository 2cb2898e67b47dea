"""The walk: the graph in program order, each node through its rule, gathers where a rule cannot
take its inputs' placements, the all-reduce fused with the residual add that follows it, and the
fixed point that keeps whole the column splits that would not pay for their all-gather."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ...sim_device.collectives import ALL_GATHER, ALL_REDUCE
from ...sim_device.ops import op_packet, resolve_op
from ...sim_device.program import PROGRAM_DTYPES, Ref, TensorShard, TensorSpec, decode_arg, resident_bytes
from ...sim_device.specs import NPUSpec
from ..frontend import Graph, Node
from ..op_support import Category, Work, count_work
from .placement import REPLICATE, CannotSplit, Placement, Ranges, Shard, gather_sources
from .plan import ShardingPlan, TensorPlan
from .rules import CREATES_SHARDS, RULES, ref, refs, rename_refs


class Splitter:
    """One walk of a graph: the placement of every value, the split weights, the program one rank runs."""

    def __init__(self, graph: Graph, n: int, fuse_residual: bool, keep_whole: dict[str, str] | None = None):
        self.graph, self.n, self.fuse_residual = graph, n, fuse_residual
        self.keep_whole = keep_whole or {}             # weights a column split would not pay for: why
        self.origin: dict[str, frozenset[str]] = {}    # split value -> the column-parallel weights it comes from
        self.gathered_elements: dict[frozenset[str], int] = {}   # those weights -> elements all-gathered per run
        self.layout: dict[str, Placement] = {}
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
            self.layout[spec.name] = REPLICATE
            self.meta[spec.name] = torch.empty(spec.shape, dtype=PROGRAM_DTYPES[spec.dtype], device="meta")

    # ---- helpers ----------------------------------------------------------------------

    def placement(self, name: str) -> Placement:
        """How value `name` is laid out over the ranks (non-tensor outputs count as replicated)."""
        return self.layout.get(name, REPLICATE)

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
        self.layout[name] = Shard(dim, ranges)
        full = self.meta[name]
        self.meta[name] = torch.empty(shard.local_shape(tuple(full.shape), 0), dtype=full.dtype, device="meta")
        self.planned[name] = TensorPlan(name, self.shape(name), style, dim, shard=shard, **plan)
        return True

    def emit(self, node: Node, args: list, kwargs: dict, layouts: list) -> None:
        """Record `node` with rewritten arguments; its outputs take `layouts` and local shapes."""
        inputs = list(dict.fromkeys(refs([args, kwargs])))
        for name in inputs:
            if name in self.resident and self.layout[name] == REPLICATE:
                self.read_whole.add(name)
        fake = decode_arg(args, torch.float32)
        fake_kwargs = {k: decode_arg(v, torch.float32) for k, v in kwargs.items()}
        fake, fake_kwargs = self._on_meta(fake), {k: self._on_meta(v) for k, v in fake_kwargs.items()}
        with torch.device("meta"):  # ops creating tensors (arange, zeros) create them on meta too
            result = resolve_op(node.target)(*fake, **fake_kwargs)
        results = list(result) if isinstance(result, (list, tuple)) else [result]
        origin = frozenset().union(*(self.origin.get(i, ()) for i in inputs if isinstance(self.layout.get(i), Shard)))
        for name, value, layout in zip(node.outputs, results, layouts):
            if name and isinstance(value, torch.Tensor):
                self.meta[name] = value
                self.layout[name] = layout
                if isinstance(layout, Shard) and origin:
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
        self.layout[output] = REPLICATE
        self.nodes.append(node)
        self.plan.collectives.append(label)
        return output

    def gather(self, name: str) -> str:
        """A replicated copy of split value `name` (all-gathered once, reused)."""
        if name not in self.gathered:
            shard = self.layout[name]
            full = self.shape(name)
            if name in self.origin:
                self.gathered_elements[self.origin[name]] = self.gathered_elements.get(self.origin[name], 0) + math.prod(full)
            sources = gather_sources(shard, full[shard.dim])
            self.gathered[name] = self.collective(
                ALL_GATHER, name, [shard.dim, sources], f"{name}@all_gather", full, 0.0, "all_gather")
        return self.gathered[name]

    # ---- walking the graph -------------------------------------------------------------

    def run(self) -> None:
        for node in self.graph.nodes:
            args = rename_refs(node.args, self.rename)
            kwargs = {k: rename_refs(v, self.rename) for k, v in node.kwargs.items()}
            node = replace(node, args=args, kwargs=kwargs)
            split_inputs = [r for r in refs([args, kwargs]) if self.placement(r) != REPLICATE]
            rule = RULES.get(op_packet(node.target))
            if rule in CREATES_SHARDS or split_inputs:
                try:
                    if rule is None:
                        raise CannotSplit(node.target)
                    rule(self, node, args, kwargs)
                    continue
                except CannotSplit:
                    pass
                if any(m in self.shards for m in node.mutates):
                    raise ValueError(f"tensor parallelism: {node.target} writes a split buffer "
                                     f"{node.mutates} in a way the pass cannot split")
                gathered = {r: self.gather(r) for r in split_inputs}
                args = rename_refs(args, gathered)
                kwargs = {k: rename_refs(v, gathered) for k, v in kwargs.items()}
            self.emit(node, args, kwargs, [REPLICATE] * len(node.outputs))
        outputs = []
        for name in self.graph.outputs:
            name = self.rename.get(name, name)
            if self.placement(name) != REPLICATE:
                self._label_vocab_parallel(name)
                name = self.gather(name)
            outputs.append(name)
        self.outputs = outputs
        if self.fuse_residual:
            self._fuse_all_reduce_with_residual_add()

    def _label_vocab_parallel(self, name: str) -> None:
        producer = next((n for n in reversed(self.nodes) if name in n.outputs), None)
        if producer is not None and op_packet(producer.target) == "aten.linear":
            weight = refs(producer.args[1])[0]
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
                    not all(ref(a) is not None for a in add.args):
                continue
            (other,) = [ref(a) for a in add.args if ref(a) != reduced] or [None]
            if other is None or position.get(other, -1) > i or self.placement(other) != REPLICATE \
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


def _splits_not_worth_their_gather(s: Splitter) -> dict[str, str]:
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
        splitter = Splitter(graph, tensor_parallel_size, fuse_residual, keep_whole)
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
