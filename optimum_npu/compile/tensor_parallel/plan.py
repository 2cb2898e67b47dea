"""The sharding plan, as data you can print: how each weight and buffer is split, and the collectives."""

from __future__ import annotations

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
