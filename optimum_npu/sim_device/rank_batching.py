"""Every rank's shard in one host call, for the ops that carry a tensor-parallel step's work.

All ranks of a program running in one process, op by op, issue N calls where one device issues
one: N matmuls of 1/N the width, N attention calls over 1/N of the heads. On a CPU each call
has a fixed cost (dispatch, waking the intra-op threads; much more when the cores are busy)
comparable to its math at decode sizes, so the host time would grow with N though the work
does not. For the matmuls and the attention kernels, the executor calls these instead, once
for all ranks:

- a column-parallel linear (input shared, weight split by output features): one matmul over
  the rank-stacked weight (the shards end to end, so whole heads stay together), its output
  cut back into each rank's features;
- a row-parallel linear (input and weight split by input features): each rank's partial sum of
  its rows with its shard, kept apart; at decode sizes from one matmul of all ranks' rows with
  all ranks' weights, each rank keeping its block (see `ROWS_FOR_ONE_MATMUL`); the all-reduce
  then adds them in rank order, rounding each sum to the device's type;
- the matmuls run with the op's own callable, so they use the host's packed weights
  (`host_linear.py`) as one device would;
- the attention kernels: the ranks' KV cache shards, stacked, are one cache with N times the
  blocks; each rank's sequences become rows of one batch whose block tables point into that
  rank's blocks. Attention is independent per (sequence, head), so each row gets what its rank
  alone computes.

Each form is called with the op's per-rank callable first, then the op's arguments, which come
in three forms: a tensor every rank shares, a split value held rank-stacked (`Stacked`: a
weight / buffer's storage [N, *shard shape], or an activation an earlier all-rank call returned
stacked), or a list of the ranks' tensors. Each returns the ranks' outputs (as `AllRankForm`
says: rank-stacked or a list), or None when its arguments are not in the form it handles (the
executor then calls the op once per rank).
The host's CPU kernels may pick their blocking from the shapes, so a wide matmul is not
guaranteed the bits of its slices; tests compare the in-process outputs with one process per
rank (torchrun), bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .fast_path import VerifiedFastPath
from .kernels import FLASH_ATTENTION, KV_CACHE_UPDATE, PAGED_ATTENTION

LINEAR = "aten.linear.default"
ENV = "OPTIMUM_NPU_RANK_BATCHING"


def enabled() -> bool:
    """Whether runtimes use these all-rank calls unless told (`Runtime(rank_batching=...)`):
    OPTIMUM_NPU_RANK_BATCHING=1 (the default) or 0 (every op once per rank, as the ranks alone)."""
    value = os.environ.get(ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ENV} must be '0' or '1'; got {os.environ[ENV]!r}")
    return value == "1"


class Stacked:
    """A split value held rank-stacked: `tensor[r]` is rank r's part. A split weight or buffer's
    storage, or a per-rank activation that an all-rank call returned stacked.

    `shards` are the ranks' views of it and `flat` the parts end to end (for a weight, one matrix
    of every rank's output features; for an activation, every rank's rows as one batch), each
    made once, on first use: the host's packed-weight cache (`host_linear.py`) knows a weight by
    its tensor object. `one_matmul` knows where a row-parallel linear may run as one matmul
    (`row_linear`)."""

    __slots__ = ("tensor", "_shards", "_flat", "one_matmul")

    def __init__(self, tensor: Tensor, shards: list[Tensor] | None = None) -> None:
        self.tensor = tensor
        self._shards = shards
        self._flat = None
        self.one_matmul = VerifiedFastPath()

    @property
    def shards(self) -> list[Tensor]:
        if self._shards is None:
            self._shards = list(self.tensor.unbind())
        return self._shards

    @property
    def flat(self) -> Tensor:
        if self._flat is None:
            self._flat = self.tensor.flatten(0, 1) if self.tensor.dim() > 1 else self.tensor
        return self._flat


def _parts(x) -> list[Tensor]:
    """The ranks' tensors of a per-rank argument (a list of them, or `Stacked`)."""
    return x.shards if isinstance(x, Stacked) else x


def _rows(x) -> Tensor:
    """Every rank's tensor end to end along the first dimension, contiguous."""
    return x.flat.contiguous() if isinstance(x, Stacked) else torch.cat(x)


def column_linear(matmul: Callable, x, weight, bias=None) -> Tensor | None:
    """Input shared, weight split by output features: every rank's features from one matmul,
    returned rank-stacked ([N, ..., features per rank], a view of the matmul's output).
    `matmul`: the op's own per-rank callable (`aten.linear`, or the packed-weight linear)."""
    if not (isinstance(weight, Stacked) and weight.tensor.dim() == 3 and isinstance(x, Tensor)
            and x.shape[-1] == weight.tensor.shape[2] and (bias is None or isinstance(bias, Stacked))):
        return None
    out = matmul(x, weight.flat, None if bias is None else bias.flat)
    return out.view(*out.shape[:-1], weight.tensor.shape[0], -1).movedim(-2, 0)


ROWS_FOR_ONE_MATMUL = 32
"""Up to this many rows (ranks x rows per rank), a row-parallel linear may be one matmul of every
rank's rows against every rank's weights, of which each rank keeps its own block: N times the
multiply-adds, but the weights are read once and the host call's fixed cost is paid once, which
at decode sizes is what the time is (measured on the 125M benchmark's shapes: 52-73 us for one
call vs 110-170 us for four). Above it, the wasted arithmetic costs more: one call per rank."""


def row_linear(matmul: Callable, x, weight, bias=None) -> list[Tensor] | None:
    """Input and weight split by input features: each rank's partial sum of its own rows with its
    own shard (kept apart: the all-reduce adds them in the device's precision).

    The one-matmul form is kept only where it gives each rank's bits: the host's matmul may pick
    another kernel for more rows (fp32 at one row does), so each row count and thread count is
    checked on its first call (`Stacked.one_matmul`, a `VerifiedFastPath` of the weight)."""
    if not (isinstance(weight, Stacked) and weight.tensor.dim() == 3 and isinstance(x, (list, Stacked))
            and bias is None):
        return None
    ranks, _, in_features = weight.tensor.shape
    shape = x.tensor.shape[1:] if isinstance(x, Stacked) else x[0].shape
    if len(shape) < 2 or shape[-1] != in_features:
        return None
    rows = shape.numel() // in_features
    if rows * ranks > ROWS_FOR_ONE_MATMUL:
        return _rank_by_rank(matmul, x, weight)
    return weight.one_matmul((rows, weight.tensor.dtype, torch.get_num_threads()), _one_matmul, _rank_by_rank,
                             matmul, x, weight)


def _rank_by_rank(matmul: Callable, x, weight: Stacked) -> list[Tensor]:
    return [matmul(part, shard) for part, shard in zip(_parts(x), weight.shards)]


def _one_matmul(matmul: Callable, x, weight: Stacked) -> tuple[Tensor, ...]:
    """Every rank's rows against every rank's weights in one matmul; each rank keeps its block."""
    ranks, out_features, in_features = weight.tensor.shape
    shape = x.tensor.shape[1:] if isinstance(x, Stacked) else x[0].shape
    rows = shape.numel() // in_features
    every_row = x.tensor.reshape(ranks * rows, in_features) if isinstance(x, Stacked) else torch.cat(
        [part.reshape(rows, in_features) for part in x])
    every = matmul(every_row.contiguous(), weight.flat)
    # rank r's block: rows r*rows.., columns r*out_features..; the diagonal of the rank x rank grid
    grid = every.view(ranks, rows, ranks, out_features).diagonal(dim1=0, dim2=2)   # [rows, out, ranks]
    return grid.movedim(-1, 0).view(ranks, *shape[:-1], out_features).unbind()


class RowsCache:
    """The rows `_ranks_as_rows` built last, for the inputs they were built from: every layer of a
    run passes the same batch inputs, so they are built once per run. One per executable, emptied
    after each run (`Runtime`), so it never holds a run's tensors past it."""

    __slots__ = ("key", "inputs", "rows")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.key = self.inputs = self.rows = None


def _ranks_as_rows(k_cache: Stacked, block_tables, start_pos, attention_mask, cache: RowsCache | None):
    """The stacked caches as one cache of N x blocks, and the batch inputs repeated per rank with
    each rank's block tables shifted to its blocks. None if the batch inputs are not shared
    tensors, or some table entry is outside a rank's blocks (the per-rank kernels then say which)."""
    if not all(isinstance(t, Tensor) for t in (block_tables, start_pos)) or not (
            attention_mask is None or isinstance(attention_mask, Tensor)):
        return None
    ranks, blocks = k_cache.tensor.shape[:2]
    # The key holds the tensors' ids and in-place version counters; the cache holds the tensors
    # themselves (so their ids stay theirs). Tensors made under torch.inference_mode have no
    # version counter: those are not cached.
    try:
        key = (ranks, blocks, *((id(t), t._version) for t in (block_tables, start_pos, attention_mask) if t is not None))
    except RuntimeError:
        key = None
    if cache is not None and key is not None and cache.key == key:
        return cache.rows
    if block_tables.numel() and (int(block_tables.min()) < 0 or int(block_tables.max()) >= blocks):
        rows = None
    else:
        offsets = torch.arange(0, ranks * blocks, blocks, dtype=block_tables.dtype)
        tables = (block_tables.unsqueeze(0) + offsets.view(-1, 1, 1)).flatten(0, 1)
        mask = None if attention_mask is None else attention_mask.repeat(ranks, 1)
        rows = tables, start_pos.repeat(ranks), mask
    if cache is not None and key is not None:
        cache.key, cache.inputs, cache.rows = key, (block_tables, start_pos, attention_mask), rows
    return rows


def _is_rank_form(per_rank: list, *stacked) -> bool:
    return all(isinstance(x, (list, Stacked)) for x in per_rank) and all(isinstance(s, Stacked) for s in stacked)


def kv_cache_update(update: Callable, k_cache, v_cache, k, v, block_tables, start_pos,
                    rows_cache: RowsCache | None = None) -> list[None] | None:
    if not _is_rank_form([k, v], k_cache, v_cache):
        return None
    rows = _ranks_as_rows(k_cache, block_tables, start_pos, None, rows_cache)
    if rows is None:
        return None
    tables, starts, _ = rows
    update(k_cache.flat, v_cache.flat, _rows(k), _rows(v), tables, starts)
    return [None] * k_cache.tensor.shape[0]


def _attention(scalars: int) -> Callable:
    """paged_attention / flash_attention over every rank's heads: the ranks as rows of one batch.
    `scalars`: how many scalar arguments follow start_pos (scale, sliding_window (, partition_len)); then
    come the mask and the soft cap, if given by position."""

    def over_ranks(kernel: Callable, q, k_cache, v_cache, block_tables, start_pos, *rest, attention_mask=None,
                   softcap=0.0, rows_cache: RowsCache | None = None):
        rest, tail = list(rest[:scalars]), list(rest[scalars:])
        if tail:
            attention_mask = tail.pop(0)
        if tail:
            softcap = tail.pop(0)
        if not _is_rank_form([q], k_cache, v_cache):
            return None
        rows = _ranks_as_rows(k_cache, block_tables, start_pos, attention_mask, rows_cache)
        if rows is None:
            return None
        tables, starts, mask = rows
        out = kernel(_rows(q), k_cache.flat, v_cache.flat, tables, starts, *rest, attention_mask=mask, softcap=softcap)
        return out.reshape(k_cache.tensor.shape[0], -1, *out.shape[1:])

    return over_ranks


@dataclass(frozen=True)
class AllRankForm:
    """How an op runs for all ranks in one call: `run(fn, *args, **kwargs)`, where `fn` is the
    callable the op runs per rank (so the all-rank call computes with the same kernel). It returns
    None when the arguments are not in the form it handles, else the ranks' results: one
    rank-stacked tensor ([N, ...]) if `stacked_result`, else a list. A form that `reads_rows` takes
    a `rows_cache=` (`RowsCache`) to build the batch inputs once per run."""

    run: Callable
    stacked_result: bool
    reads_rows: bool = False


_FORMS = {
    KV_CACHE_UPDATE: AllRankForm(kv_cache_update, stacked_result=False, reads_rows=True),
    PAGED_ATTENTION: AllRankForm(_attention(scalars=2), stacked_result=True, reads_rows=True),
    FLASH_ATTENTION: AllRankForm(_attention(scalars=3), stacked_result=True, reads_rows=True),
}
_COLUMN = AllRankForm(column_linear, stacked_result=True)
_ROW = AllRankForm(row_linear, stacked_result=False)


def all_rank_form(target: str, input_per_rank: bool) -> AllRankForm | None:
    """The all-rank form of op `target`, None if it has none. `input_per_rank`: whether the op's
    first argument differs per rank (for a linear: row- rather than column-parallel)."""
    if target == LINEAR:
        return _ROW if input_per_rank else _COLUMN
    return _FORMS.get(target)


# ---- ops on rank-stacked activations -----------------------------------------------------------
#
# Between the matmuls and attention, each rank runs the same short chains of small ops on its
# slice (split Q/K/V, reshape into heads, rotary embedding, split gate/up). Per rank, each is a
# separate host call whose fixed cost dwarfs its math. An activation that comes out of an
# all-rank call rank-stacked stays stacked, and these ops run once on it: the same op with the
# rank as an extra leading dimension (shape arguments get it prepended, dimension arguments are
# shifted past it; both rewritten once, in the generated code). Only ops whose every output
# element is a copy or one correctly rounded IEEE operation of its inputs qualify, so the result
# cannot depend on how the host vectorises the larger tensor: each rank's slice has the bits the
# rank computes alone. Transcendentals are checked at each call site instead (`CheckedElementwise`).

def _shift(dim):
    return dim + 1 if type(dim) is int and dim >= 0 else dim


def _dim_at(index: int) -> Callable:
    """An op whose argument `index` (after the tensor, default 0) is a dimension."""

    def rewrite(args: list, kwargs: dict, ranks: int):
        position = index + 1
        if "dim" in kwargs:
            return args, {**kwargs, "dim": _shift(kwargs["dim"])}
        if len(args) > position:
            return [*args[:position], _shift(args[position]), *args[position + 1:]], kwargs
        if len(args) == position:
            return [*args, 1], kwargs
        return None

    return rewrite


def _transpose(args: list, kwargs: dict, ranks: int):
    x, dim0, dim1 = args
    return [x, _shift(dim0), _shift(dim1)], kwargs


def _reshape(args: list, kwargs: dict, ranks: int):
    x, shape = args
    return [x, [ranks, *shape]], kwargs


def elementwise(fn, *args, stacked: tuple[int, ...], **kwargs):
    """Stacked arguments at positions `stacked`, shared ones broadcast against each rank's slice:
    a stacked argument with fewer dimensions per rank than another argument gets size-1 ones
    after the rank dimension, as broadcasting would give each rank's slice on its own."""
    ndim = max(a.dim() - (i in stacked) for i, a in enumerate(args) if isinstance(a, Tensor))
    args = list(args)
    for i in stacked:
        missing = ndim - (args[i].dim() - 1)
        if missing:
            args[i] = args[i].reshape(args[i].shape[0], *([1] * missing), *args[i].shape[1:])
    return fn(*args, **kwargs)


class CheckedElementwise:
    """An elementwise op whose last bit may depend on how the host vectorises it (a transcendental:
    SiLU, GELU, exp): at one call site, run on the stacked tensor only where its first call with
    those shapes gave each rank the bits the rank computes alone; elsewhere once per rank."""

    def __init__(self) -> None:
        self.fast_path = VerifiedFastPath()

    @property
    def verdicts(self) -> dict:
        return self.fast_path.verdicts

    def __call__(self, fn, *args, stacked: tuple[int, ...], **kwargs):
        key = (torch.get_num_threads(), *((a.shape, a.stride(), a.dtype) for a in args if isinstance(a, Tensor)))
        return self.fast_path(key, elementwise, _each_rank, fn, *args, stacked=stacked, **kwargs)


def _each_rank(fn, *args, stacked: tuple[int, ...], **kwargs) -> Tensor:
    """The op on each rank's slice alone, the results stacked."""
    return torch.stack([fn(*(a[r] if i in stacked else a for i, a in enumerate(args)), **kwargs)
                        for r in range(args[stacked[0]].shape[0])])


SHAPE_OPS: dict[str, Callable] = {
    "aten.view.default": _reshape,
    "aten.reshape.default": _reshape,
    "aten.transpose.int": _transpose,
    "aten.slice.Tensor": _dim_at(0),
    "aten.select.int": _dim_at(0),
    "aten.narrow.default": _dim_at(0),
    "aten.unsqueeze.default": _dim_at(0),
    "aten.squeeze.dim": _dim_at(0),
    "aten.split.Tensor": _dim_at(1),
    "aten.split_with_sizes.default": _dim_at(1),
    "aten.chunk.default": _dim_at(1),
    "aten.cat.default": _dim_at(0),   # its first argument: a list of stacked tensors
    "aten.concat.default": _dim_at(0),   # torch.concat / concatenate: cat's aliases
    "aten.concatenate.default": _dim_at(0),
}
"""Ops on one stacked tensor (or, for cat, a list of them) and non-tensor arguments: each entry
rewrites the op's arguments (`rewrite(args, kwargs, ranks)`, None if it cannot) for the same op
called on the stacked tensor. The rewrite is done once, when the program is turned into code."""

ELEMENTWISE_OPS = frozenset({
    "aten.add.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.div.Tensor", "aten.neg.default",
    "aten.to.dtype", "aten._to_copy.default", "aten.clone.default",
})
"""Elementwise ops, exact per element (IEEE add/sub/mul/div, sign, conversions, copies): any mix
of stacked and shared tensor arguments."""

CHECKED_ELEMENTWISE_OPS = frozenset({
    "aten.silu.default", "aten.gelu.default", "aten.sigmoid.default", "aten.tanh.default", "aten.exp.default",
})
"""Elementwise transcendentals: on the stacked tensor where a `CheckedElementwise` finds it exact."""
