"""How a value is laid out over the ranks, in PyTorch DTensor's vocabulary, and the arithmetic of index ranges.

A value is `Replicate()` (every rank holds all of it), `Partial()` (each rank holds a
partial sum; the sum over ranks, an all-reduce, is the value) or `Shard(dim, ranges)`: split
along `dim`, rank r holding the concatenation of the index ranges `ranges[r]`. DTensor's
`Shard(dim)` cuts a dimension into N even chunks; ours also names the ranges, because
attention splits by whole heads (a fused Q/K/V projection is three head-aligned parts) and,
with fewer KV heads than ranks, several ranks hold the same KV head.
"""

from __future__ import annotations

from dataclasses import dataclass

Ranges = tuple[tuple[tuple[int, int], ...], ...]   # per rank: ((start, length), ...)


@dataclass(frozen=True)
class Shard:
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


@dataclass(frozen=True)
class Replicate:
    """Every rank holds the whole value."""


@dataclass(frozen=True)
class Partial:
    """A row-parallel result: each rank holds a partial sum, the value is their sum (still to be all-reduced)."""


Placement = Shard | Replicate | Partial
REPLICATE, PARTIAL = Replicate(), Partial()


class CannotSplit(Exception):
    """An op cannot work on its inputs' placements: they are all-gathered first."""


def even_ranges(offset: int, size: int, n: int) -> Ranges:
    step = size // n
    return tuple(((offset + r * step, step),) for r in range(n))


def head_ranges(offset: int, heads: int, head_size: int, n: int) -> Ranges | None:
    """Ranges of whole heads per rank: an even split, or (fewer heads than ranks) the head
    each rank's share of the work belongs to; None if neither divides."""
    if heads % n == 0:
        return even_ranges(offset, heads * head_size, n)
    if n % heads == 0:
        return tuple(((offset + (r * heads // n) * head_size, head_size),) for r in range(n))
    return None


def join_ranges(parts: list[Ranges]) -> Ranges:
    return tuple(tuple(r for part in parts for r in part[rank]) for rank in range(len(parts[0])))


def scale_ranges(ranges: Ranges, numerator: int, denominator: int) -> Ranges:
    out = []
    for rank_ranges in ranges:
        scaled = []
        for start, length in rank_ranges:
            if start * numerator % denominator or length * numerator % denominator:
                raise CannotSplit("a reshape cuts through the split")
            scaled.append((start * numerator // denominator, length * numerator // denominator))
        out.append(tuple(scaled))
    return tuple(out)


def segment_ranges(ranges: Ranges, start: int, size: int) -> Ranges:
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


def gather_sources(shard: Shard, size: int) -> list[int]:
    """Positions, in the rank-order concatenation of the shards, of global indices 0..size-1
    (empty when that concatenation is already the full dimension in order)."""
    local = shard.local_size
    if _in_order(shard, local) == size:  # the usual even split: no index list to build (a vocab is 100k+)
        return []
    position: dict[int, int] = {}
    for rank in range(len(shard.ranges)):
        for offset, index in enumerate(shard.indices(rank)):
            position.setdefault(index, rank * local + offset)
    if sorted(position) != list(range(size)):
        raise ValueError("internal error: a split value does not cover its dimension")
    sources = [position[i] for i in range(size)]
    return [] if sources == list(range(len(shard.ranges) * local)) else sources


def _in_order(shard: Shard, local: int) -> int:
    """How far the rank-order concatenation of the shards runs 0, 1, 2, ... in order with every
    rank holding `local` indices (-1 where it breaks)."""
    cursor = 0
    for rank_ranges in shard.ranges:
        if sum(length for _, length in rank_ranges) != local:
            return -1
        for start, length in rank_ranges:
            if start != cursor:
                return -1
            cursor += length
    return cursor
