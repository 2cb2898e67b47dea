"""Tensor parallelism (placeholder until the splitting pass lands)."""

from __future__ import annotations

from dataclasses import dataclass

from ..sim_device.program import dtype_size
from .frontend import Graph


@dataclass
class ShardingPlan:
    tensor_parallel_size: int


def split_graph(graph: Graph, tensor_parallel_size: int):
    raise ValueError(
        "tensor_parallel_size > 1 needs the compiler's tensor-parallel pass, which is not implemented yet; "
        "use tensor_parallel_size=1"
    )


def resident_bytes_per_rank(graph: Graph, tensor_parallel_size: int, device_dtype: str) -> list[int]:
    float_bytes = dtype_size(device_dtype)
    total = sum(s.numel * (float_bytes if s.dtype.startswith(("float", "bfloat")) else dtype_size(s.dtype))
                for s in graph.weights + graph.buffers)
    return [total] * tensor_parallel_size
