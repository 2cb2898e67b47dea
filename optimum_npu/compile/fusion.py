"""Fusion: group consecutive ops into kernels.

Walking the ops in program order, an op joins the kernel being built when it is cheap
data work on that kernel's result: a pointwise epilogue (ReLU, GELU, SiLU, bias or
residual add, a cast), a reduction, or a view. Everything heavier (matmul, conv, a
normalisation, an attention kernel, a gather) starts a kernel of its own, except that a
kernel made only of views is absorbed by the heavy op consuming them. Host-fallback ops
never fuse with device ops; consecutive ones form one host segment. A collective (inserted by
the tensor-parallel pass) is a step of its own.

With batch norms folded into the convolutions before them (graph_rewrites.py), a CNN block
conv + BN + ReLU becomes one `conv2d+relu` kernel and a residual block's last conv + BN + add +
ReLU one `conv2d+add+relu` kernel.

Groups are contiguous runs of the program order, so the schedule stays valid as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..sim_device.program import StepKind
from .frontend import Node
from .op_support import FUSABLE_INTO_PRODUCER, Category


@dataclass
class Group:
    on_host: bool
    nodes: list[Node] = field(default_factory=list)
    produced: set[str] = field(default_factory=set)

    def add(self, node: Node) -> None:
        self.nodes.append(node)
        self.produced.update(o for o in node.outputs if o)

    @property
    def kind(self) -> StepKind:
        if self.on_host:
            return StepKind.HOST
        if any(n.category is Category.COLLECTIVE for n in self.nodes):
            return StepKind.COLLECTIVE
        return StepKind.KERNEL

    @property
    def only_views(self) -> bool:
        return all(n.category is Category.LAYOUT for n in self.nodes)

    def consumes_own(self, node: Node) -> bool:
        return any(name in self.produced for name in node.inputs)

    @property
    def name(self) -> str:
        ops = [_label(n) for n in self.nodes if n.category is not Category.LAYOUT] or [_label(n) for n in self.nodes]
        return "+".join(ops) if len(ops) <= 4 else "+".join(ops[:3]) + f"+...({len(ops)} ops)"


def _label(node: Node) -> str:
    """'linear' for aten.linear.default; an all-reduce fused with the residual add is 'all_reduce+add'."""
    name = node.target.split(".")[1]
    return name + "+add" if node.category is Category.COLLECTIVE and len(node.args) == 2 and name == "all_reduce" else name


def _joins(group: Group | None, node: Node) -> bool:
    if group is None or not group.nodes:
        return False
    on_host = node.category is Category.HOST
    if on_host or group.on_host:
        return on_host and group.on_host
    alone = (Category.ATTENTION, Category.COLLECTIVE)
    if node.category in alone or any(n.category in alone for n in group.nodes):
        return False
    if not group.consumes_own(node):
        return False
    if node.category in FUSABLE_INTO_PRODUCER:
        return True
    return group.only_views  # a heavy op absorbs the views feeding it (e.g. transpose -> matmul)


def fuse(nodes: list[Node]) -> list[Group]:
    groups: list[Group] = []
    for node in nodes:
        current = groups[-1] if groups else None
        if not _joins(current, node):
            current = Group(on_host=node.category is Category.HOST)
            groups.append(current)
        current.add(node)
    return groups
