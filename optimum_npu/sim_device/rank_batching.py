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
- a row-parallel linear (input and weight split by input features): each rank's partial sum
  from its own shard (one batched matmul would read the weights unpacked, slower than N packed
  calls); the all-reduce then adds them in rank order, rounding each sum to the device's type;
- the matmuls run with the op's own callable, so they use the host's packed weights
  (`host_linear.py`) as one device would;
- the attention kernels: the ranks' KV cache shards, stacked, are one cache with N times the
  blocks; each rank's sequences become rows of one batch whose block tables point into that
  rank's blocks. Attention is independent per (sequence, head), so each row gets what its rank
  alone computes.

Each form is called with the op's per-rank callable first, then the op's arguments, which come
in three forms: a tensor every rank shares, the rank-stacked storage of a split
weight / buffer ([N, *shard shape], each rank's shard a view of it), or a list of the ranks'
tensors (activations). Each function returns the list of the ranks' outputs, or None when its
arguments are not in the form it handles (the executor then calls the op once per rank).
The host's CPU kernels may pick their blocking from the shapes, so a wide matmul is not
guaranteed the bits of its slices; tests compare the in-process outputs with one process per
rank (torchrun), bit for bit.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernels import FLASH_ATTENTION, KV_CACHE_UPDATE, PAGED_ATTENTION

LINEAR = "aten.linear.default"


class Stacked:
    """The rank-stacked storage of a split weight or buffer: `tensor[r]` is rank r's shard.

    `shards` are the ranks' views of it and `flat` the shards end to end (for a weight, one
    matrix of every rank's output features), each made once: the host's packed-weight cache
    (`host_linear.py`) knows a weight by its tensor object."""

    __slots__ = ("tensor", "shards", "flat")

    def __init__(self, tensor: Tensor, shards: list[Tensor] | None = None) -> None:
        self.tensor = tensor
        self.shards = list(tensor.unbind()) if shards is None else shards
        self.flat = tensor.flatten(0, 1) if tensor.dim() > 1 else tensor


def linear(matmul: Callable, x, weight, bias=None) -> list[Tensor] | None:
    """`matmul`: the op's own per-rank callable (`aten.linear`, or the packed-weight linear)."""
    if not (isinstance(weight, Stacked) and weight.tensor.dim() == 3):
        return None
    ranks, _, in_features = weight.tensor.shape
    if isinstance(x, Tensor) and x.shape[-1] == in_features and (bias is None or isinstance(bias, Stacked)):
        # column-parallel: every rank's output features from one matmul
        out = matmul(x, weight.flat, None if bias is None else bias.flat)
        return list(out.chunk(ranks, dim=-1))
    if isinstance(x, list) and x[0].dim() >= 2 and x[0].shape[-1] == in_features and bias is None:
        # row-parallel: each rank's partial sum
        return [matmul(part, shard) for part, shard in zip(x, weight.shards)]
    return None


def _ranks_as_rows(k_cache: Stacked, block_tables, start_pos, attention_mask):
    """The stacked caches as one cache of N x blocks, and the batch inputs repeated per rank with
    each rank's block tables shifted to its blocks. None if the batch inputs are not shared
    tensors, or some table entry is outside a rank's blocks (the per-rank kernels then say which)."""
    if not all(isinstance(t, Tensor) for t in (block_tables, start_pos)) or not (
            attention_mask is None or isinstance(attention_mask, Tensor)):
        return None
    ranks, blocks = k_cache.tensor.shape[:2]
    # Every layer of a step passes the same batch inputs: build the rows once per step. The key
    # holds the tensors themselves (so their ids stay theirs) and their in-place version counters.
    # (Tensors made under torch.inference_mode have no version counter: those are not cached.)
    global _last_rows
    try:
        key = (ranks, blocks, *((id(t), t._version) for t in (block_tables, start_pos, attention_mask) if t is not None))
    except RuntimeError:
        key = None
    last_key, _, rows = _last_rows
    if key is not None and last_key == key:
        return rows
    if block_tables.numel() and (int(block_tables.min()) < 0 or int(block_tables.max()) >= blocks):
        rows = None
    else:
        offsets = torch.arange(0, ranks * blocks, blocks, dtype=block_tables.dtype)
        tables = (block_tables.unsqueeze(0) + offsets.view(-1, 1, 1)).flatten(0, 1)
        mask = None if attention_mask is None else attention_mask.repeat(ranks, 1)
        rows = tables, start_pos.repeat(ranks), mask
    if key is not None:
        _last_rows = key, (block_tables, start_pos, attention_mask), rows
    return rows


_last_rows: tuple = (None, None, None)   # (key, the inputs it was built from, rows)


def _is_rank_form(per_rank: list, *stacked) -> bool:
    return all(isinstance(x, list) for x in per_rank) and all(isinstance(s, Stacked) for s in stacked)


def kv_cache_update(update: Callable, k_cache, v_cache, k, v, block_tables, start_pos) -> list[None] | None:
    if not _is_rank_form([k, v], k_cache, v_cache):
        return None
    rows = _ranks_as_rows(k_cache, block_tables, start_pos, None)
    if rows is None:
        return None
    tables, starts, _ = rows
    update(k_cache.flat, v_cache.flat, torch.cat(k), torch.cat(v), tables, starts)
    return [None] * len(k)


def _attention(scalars: int) -> Callable:
    """paged_attention / flash_attention over every rank's heads: the ranks as rows of one batch.
    `scalars`: how many scalar arguments follow start_pos (scale, sliding_window (, partition_len))."""

    def over_ranks(kernel: Callable, q, k_cache, v_cache, block_tables, start_pos, *rest, attention_mask=None):
        if len(rest) > scalars:  # the mask given by position
            *rest, attention_mask = rest
        if not _is_rank_form([q], k_cache, v_cache):
            return None
        rows = _ranks_as_rows(k_cache, block_tables, start_pos, attention_mask)
        if rows is None:
            return None
        tables, starts, mask = rows
        out = kernel(torch.cat(q), k_cache.flat, v_cache.flat, tables, starts, *rest, attention_mask=mask)
        return list(out.chunk(len(q)))

    return over_ranks


OVER_RANKS: dict[str, Callable] = {
    LINEAR: linear,
    KV_CACHE_UPDATE: kv_cache_update,
    PAGED_ATTENTION: _attention(scalars=2),
    FLASH_ATTENTION: _attention(scalars=3),
}
"""Each op's all-rank form, called as `form(fn, *args, **kwargs)` where `fn` is the callable the op
runs per rank (so the all-rank call computes with the same kernel)."""
