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
- a row-parallel linear (input and weight split by input features): one batched matmul over
  the ranks, giving each rank's partial sum separately; the all-reduce then adds them in rank
  order, rounding each sum to the device's type, exactly as before;
- the attention kernels: the ranks' KV cache shards, stacked, are one cache with N times the
  blocks; each rank's sequences become rows of one batch whose block tables point into that
  rank's blocks. Attention is independent per (sequence, head), so each row gets what its rank
  alone computes.

Arguments come in three forms: a tensor every rank shares, the rank-stacked storage of a split
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

from .kernels import FLASH_ATTENTION, IMPLEMENTATIONS, KV_CACHE_UPDATE, PAGED_ATTENTION

LINEAR = "aten.linear.default"


class Stacked:
    """The rank-stacked storage of a split weight or buffer: `tensor[r]` is rank r's shard."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


def linear(x, weight, bias=None) -> list[Tensor] | None:
    if not (isinstance(weight, Stacked) and weight.tensor.dim() == 3):
        return None
    w = weight.tensor
    ranks, _, in_features = w.shape
    if isinstance(x, Tensor) and x.shape[-1] == in_features and (bias is None or isinstance(bias, Stacked)):
        # column-parallel: every rank's output features from one matmul
        out = F.linear(x, w.flatten(0, 1), None if bias is None else bias.tensor.flatten())
        return list(out.chunk(ranks, dim=-1))
    if isinstance(x, list) and x[0].dim() >= 2 and x[0].shape[-1] == in_features and bias is None:
        # row-parallel: each rank's partial sum
        rows = torch.stack(x).flatten(1, -2)
        out = torch.bmm(rows, w.transpose(1, 2))
        return list(out.view(ranks, *x[0].shape[:-1], w.shape[1]).unbind())
    return None


def _ranks_as_rows(k_cache: Stacked, block_tables, start_pos, attention_mask):
    """The stacked caches as one cache of N x blocks, and the batch inputs repeated per rank with
    each rank's block tables shifted to its blocks. None if the batch inputs are not shared
    tensors, or some table entry is outside a rank's blocks (the per-rank kernels then say which)."""
    if not all(isinstance(t, Tensor) for t in (block_tables, start_pos)) or not (
            attention_mask is None or isinstance(attention_mask, Tensor)):
        return None
    ranks, blocks = k_cache.tensor.shape[:2]
    if block_tables.numel() and (int(block_tables.min()) < 0 or int(block_tables.max()) >= blocks):
        return None
    offsets = torch.arange(0, ranks * blocks, blocks, dtype=block_tables.dtype)
    tables = (block_tables.unsqueeze(0) + offsets.view(-1, 1, 1)).flatten(0, 1)
    mask = None if attention_mask is None else attention_mask.repeat(ranks, 1)
    return tables, start_pos.repeat(ranks), mask


def _is_rank_form(per_rank: list, *stacked) -> bool:
    return all(isinstance(x, list) for x in per_rank) and all(isinstance(s, Stacked) for s in stacked)


def kv_cache_update(k_cache, v_cache, k, v, block_tables, start_pos) -> list[None] | None:
    if not _is_rank_form([k, v], k_cache, v_cache):
        return None
    rows = _ranks_as_rows(k_cache, block_tables, start_pos, None)
    if rows is None:
        return None
    tables, starts, _ = rows
    IMPLEMENTATIONS[KV_CACHE_UPDATE](k_cache.tensor.flatten(0, 1), v_cache.tensor.flatten(0, 1), torch.cat(k),
                                     torch.cat(v), tables, starts)
    return [None] * len(k)


def _attention(target: str) -> Callable:
    """paged_attention / flash_attention over every rank's heads: the ranks as rows of one batch."""
    kernel = IMPLEMENTATIONS[target]
    scalars = 3 if target == FLASH_ATTENTION else 2   # scale, sliding_window (, partition_len)

    def over_ranks(q, k_cache, v_cache, block_tables, start_pos, *rest, attention_mask=None):
        if len(rest) > scalars:  # the mask given by position
            *rest, attention_mask = rest
        if not _is_rank_form([q], k_cache, v_cache):
            return None
        rows = _ranks_as_rows(k_cache, block_tables, start_pos, attention_mask)
        if rows is None:
            return None
        tables, starts, mask = rows
        out = kernel(torch.cat(q), k_cache.tensor.flatten(0, 1), v_cache.tensor.flatten(0, 1), tables, starts, *rest,
                     attention_mask=mask)
        return list(out.chunk(len(q)))

    return over_ranks


OVER_RANKS: dict[str, Callable] = {
    LINEAR: linear,
    KV_CACHE_UPDATE: kv_cache_update,
    PAGED_ATTENTION: _attention(PAGED_ATTENTION),
    FLASH_ATTENTION: _attention(FLASH_ATTENTION),
}
