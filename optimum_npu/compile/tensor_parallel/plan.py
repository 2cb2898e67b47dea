"""The sharding plan, as data you can print: how each weight and buffer is split, and the collectives."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ...sim_device.program import TensorShard


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

    def to_json(self) -> str:
        """The plan without what the program already holds (shapes, shards): for the compile cache."""
        tensors = [[t.name, t.style, t.dim, list(t.split_sizes), t.note] for t in self.tensors]
        return json.dumps({"tensor_parallel_size": self.tensor_parallel_size, "tensors": tensors,
                           "collectives": self.collectives}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, shapes: dict[str, tuple[int, ...]], shards: dict[str, TensorShard]) -> ShardingPlan:
        """Undo `to_json`, taking shapes and shards from the program; text from disk, so every field is
        checked (ValueError naming what is wrong)."""
        data = json.loads(text)
        if not (isinstance(data, dict) and set(data) == {"tensor_parallel_size", "tensors", "collectives"}):
            raise ValueError("sharding plan: not an object of tensor_parallel_size, tensors, collectives")
        tp, rows, collectives = data["tensor_parallel_size"], data["tensors"], data["collectives"]
        if type(tp) is not int or tp < 1:
            raise ValueError(f"sharding plan: tensor_parallel_size {tp!r} is not a positive integer")
        if not (isinstance(collectives, list) and all(isinstance(c, str) for c in collectives)):
            raise ValueError("sharding plan: collectives is not a list of names")
        if not isinstance(rows, list):
            raise ValueError("sharding plan: tensors is not a list")
        tensors = []
        for row in rows:
            ok = isinstance(row, list) and len(row) == 5
            name, style, dim, parts, note = row if ok else (None,) * 5
            ok = ok and isinstance(name, str) and name in shapes and isinstance(style, str) and isinstance(note, str)
            ok = ok and (dim is None or type(dim) is int) and isinstance(parts, list)
            if not (ok and all(type(p) is int for p in parts)):
                raise ValueError(f"sharding plan: tensor entry {row!r} is malformed or names no tensor of the program")
            tensors.append(TensorPlan(name, tuple(shapes[name]), style, dim, tuple(parts), note, shards.get(name)))
        return cls(tp, tensors, list(collectives))
