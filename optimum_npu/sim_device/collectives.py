"""Collectives between the devices of a tensor-parallel group.

Two ops, registered as torch custom ops in the `rbln` namespace so that a program names them
like the device kernels (and `ops.resolve_op` / `check_op_arguments` check them the same way):

- ``rbln.all_reduce(x, residual=None)``: the sum of every rank's `x`, plus `residual` if given.
  The compiler fuses the residual add that follows a row-parallel projection into the
  reduction (the last pass of the ring adds it), saving a kernel and a round trip to DRAM.
- ``rbln.all_gather(x, dim, sources)``: every rank's `x` concatenated along `dim` in rank
  order, then (if `sources` is not empty) the positions `sources` of that concatenation,
  which puts slices back in their original order (e.g. logits split by vocabulary).

How ranks combine, in the device's numerics: partial sums are added in rank order, each sum
rounded to the device's 16-bit type (`round`), as a device adding in 16 bits does. So TP 4
differs from TP 1 by the rounding of the partial sums, as on real hardware, and in exact
numerics (fp32) only by summation order. In one process the runtime hands these functions
every rank's tensor; under torchrun each process holds one rank and `ProcessGroupCollectives`
exchanges them through `torch.distributed` first, then combines them the same way, so both
give the same bits.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

COLLECTIVE_OPS = ("rbln.all_reduce.default", "rbln.all_gather.default")
ALL_REDUCE, ALL_GATHER = COLLECTIVE_OPS


def reduce(parts: list[Tensor], residual: Tensor | None, round: Callable[[Tensor], Tensor]) -> Tensor:
    """Sum of `parts` in rank order (+ residual), rounding after each addition."""
    total = parts[0]
    for part in parts[1:]:
        total = round(total + part)
    return total if residual is None else round(total + residual)


def gather(parts: list[Tensor], dim: int, sources: list[int]) -> Tensor:
    joined = torch.cat(parts, dim=dim)
    if sources:
        joined = joined.index_select(dim, torch.tensor(sources, dtype=torch.long))
    return joined


@torch.library.custom_op("rbln::all_reduce", mutates_args=())
def all_reduce(x: Tensor, residual: Tensor | None = None) -> Tensor:
    """A group of one device: nothing to add but the residual."""
    return x.clone() if residual is None else x + residual


@all_reduce.register_fake
def _(x, residual=None):
    return torch.empty_like(x)


@torch.library.custom_op("rbln::all_gather", mutates_args=())
def all_gather(x: Tensor, dim: int, sources: list[int]) -> Tensor:
    """A group of one device: its own tensor (reordered by `sources`)."""
    return gather([x], dim, sources)


@all_gather.register_fake
def _(x, dim, sources):
    # The fake shape assumes one rank; the compiler builds the gathered shape itself.
    shape = list(x.shape)
    if sources:
        shape[dim] = len(sources)
    return x.new_empty(shape)


class InProcessCollectives:
    """All ranks in this process: each collective gets every rank's tensor."""

    def __init__(self, round: Callable[[Tensor], Tensor]):
        self.round = round

    def all_reduce(self, parts: list[Tensor], residual: Tensor | None) -> Tensor:
        return reduce(parts, residual, self.round)

    def all_gather(self, parts: list[Tensor], dim: int, sources: list[int]) -> Tensor:
        return gather(parts, dim, sources)


class ProcessGroupCollectives:
    """One rank per process (torchrun): tensors are exchanged with `torch.distributed`, then
    combined in rank order exactly as in one process. Sent as fp32 (exact for 16-bit values),
    which any backend (gloo included) carries."""

    def __init__(self, round: Callable[[Tensor], Tensor], group=None):
        import torch.distributed as dist

        self.dist = dist
        self.group = group
        self.round = round
        self.world_size = dist.get_world_size(group)

    def _exchange(self, local: Tensor) -> list[Tensor]:
        wide = local.float().contiguous()
        parts = [torch.empty_like(wide) for _ in range(self.world_size)]
        self.dist.all_gather(parts, wide, group=self.group)
        return [p.to(local.dtype) for p in parts]

    def all_reduce(self, parts: list[Tensor], residual: Tensor | None) -> Tensor:
        (local,) = parts
        return reduce(self._exchange(local), residual, self.round)

    def all_gather(self, parts: list[Tensor], dim: int, sources: list[int]) -> Tensor:
        (local,) = parts
        return gather(self._exchange(local), dim, sources)
