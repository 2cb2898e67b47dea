"""Attention kernels the simulated NPU executes natively, as torch custom ops.

The LLM decoder is exported with `torch.export` (training IR) and its graph is then
interpreted op by op on the host. These three ops are what the device runs for
attention, so they are registered in the `rbln` namespace with:

- a real CPU implementation (the numerics the device produces), and
- a fake implementation, so `torch.export` can trace them with fake/meta tensors.

KV cache layout, per layer:
    k_cache, v_cache: [num_blocks, num_kv_heads, block_size, head_dim]
    block_tables:     int32 [batch, max_blocks_per_seq]; logical block i of sequence b
                      lives in physical block block_tables[b, i]
    start_pos:        int32 [batch]; token t of the current chunk of sequence b sits at
                      absolute position start_pos[b] + t

Position p of sequence b is stored at block block_tables[b, p // block_size], offset
p % block_size.

Numerics: matmuls run in the input dtype (bf16 in -> bf16 matmuls), softmax statistics
(max, sum, normalisation) in fp32, as the device does.

This module imports only torch and the standard library (the sim_device layer knows
nothing of the rest of the package).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

# Canonical names of the ops, as `str(torch.ops.rbln.<op>.default)` spells them (and as
# FX nodes of an exported graph show them).
KERNEL_OPS = (
    "rbln.kv_cache_update.default",
    "rbln.paged_attention.default",
    "rbln.flash_attention.default",
)
KV_CACHE_UPDATE, PAGED_ATTENTION, FLASH_ATTENTION = KERNEL_OPS


# --------------------------------------------------------------------------- helpers


def _chunk_positions(start_pos: Tensor, num_tokens: int) -> Tensor:
    """Absolute positions [batch, T] of the tokens of the current chunk."""
    offsets = torch.arange(num_tokens, device=start_pos.device)
    return start_pos.long()[:, None] + offsets[None, :]


def _check_positions_fit(positions: Tensor, block_tables: Tensor, block_size: int, what: str) -> None:
    """Refuse positions the block table cannot address (they would land out of bounds)."""
    if positions.numel() == 0:
        return
    if int(positions.min()) < 0:
        raise ValueError(f"{what}: start_pos must be >= 0, got a position {int(positions.min())}")
    capacity = block_tables.shape[1] * block_size
    highest = int(positions.max())
    if highest >= capacity:
        raise ValueError(
            f"{what}: position {highest} is beyond the KV cache of a sequence "
            f"({block_tables.shape[1]} blocks x {block_size} tokens = {capacity} positions)"
        )


def _check_physical_blocks(block_tables: Tensor, num_blocks: int, what: str) -> None:
    if block_tables.numel() and (int(block_tables.min()) < 0 or int(block_tables.max()) >= num_blocks):
        raise ValueError(
            f"{what}: block_tables holds indices outside [0, {num_blocks}) "
            f"(min {int(block_tables.min())}, max {int(block_tables.max())})"
        )


def _gather_kv(cache: Tensor, block_tables: Tensor, length: int) -> Tensor:
    """Contiguous KV [batch, kv_heads, length, head_dim] of the first `length` positions.

    Only the blocks covering `length` positions are gathered, not the whole table.
    """
    block_size = cache.shape[2]
    num_needed = math.ceil(length / block_size)
    blocks = cache[block_tables[:, :num_needed].long()]  # [B, n, H, bs, D]
    batch, _, heads, _, head_dim = blocks.shape
    kv = blocks.permute(0, 2, 1, 3, 4).reshape(batch, heads, num_needed * block_size, head_dim)
    return kv[:, :, :length]


def _allowed_keys(query_pos: Tensor, key_pos: Tensor, sliding_window: int) -> Tensor:
    """Boolean mask [B, 1, 1, T, L]: query at query_pos [B, T] may see key at key_pos [L]."""
    q = query_pos[:, None, None, :, None]
    k = key_pos[None, None, None, None, :]
    allowed = k <= q
    if sliding_window > 0:
        allowed = allowed & (k > q - sliding_window)
    return allowed


def _zero_unwritten(v: Tensor, query_pos: Tensor, key_pos: Tensor) -> Tensor:
    """Zero V at positions past each sequence's last query (never written, or stale).

    Their attention weight is 0, but 0 * NaN is NaN: uninitialised cache memory must not
    leak into the output through the PV matmul. v: [B, Hkv, L, D] or [B, Hkv, 1, L, D].
    """
    unwritten = key_pos[None, :] > query_pos[:, -1:]  # [B, L]
    shape = (v.shape[0],) + (1,) * (v.dim() - 3) + (key_pos.shape[0], 1)
    return v.masked_fill(unwritten.reshape(shape), 0)


def _group_queries(q: Tensor, num_kv_heads: int) -> Tensor:
    """[B, Hq, T, D] -> [B, Hkv, group, T, D]: GQA by broadcasting, never repeating KV."""
    batch, num_heads, num_tokens, head_dim = q.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    return q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, num_tokens, head_dim)


# --------------------------------------------------------------------------- kv_cache_update


@torch.library.custom_op("rbln::kv_cache_update", mutates_args=("k_cache", "v_cache"))
def kv_cache_update(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, block_tables: Tensor, start_pos: Tensor
) -> None:
    """Write k, v [batch, kv_heads, T, head_dim] at positions start_pos[b] + t of each sequence."""
    block_size = k_cache.shape[2]
    positions = _chunk_positions(start_pos, k.shape[2])  # [B, T]
    _check_positions_fit(positions, block_tables, block_size, "kv_cache_update")
    physical = block_tables.long().gather(1, positions // block_size)  # [B, T]
    _check_physical_blocks(physical, k_cache.shape[0], "kv_cache_update")
    offset = positions % block_size
    # The two index tensors are separated by a slice, so the indexed view is [B, T, H, D].
    k_cache[physical, :, offset] = k.transpose(1, 2).to(k_cache.dtype)
    v_cache[physical, :, offset] = v.transpose(1, 2).to(v_cache.dtype)


@kv_cache_update.register_fake
def _(k_cache, v_cache, k, v, block_tables, start_pos) -> None:
    return None


# --------------------------------------------------------------------------- paged_attention


@torch.library.custom_op("rbln::paged_attention", mutates_args=())
def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    start_pos: Tensor,
    scale: float,
    sliding_window: int,
) -> Tensor:
    """Causal (optionally sliding-window) attention of q [B, Hq, T, D] over the paged cache."""
    batch, _, num_tokens, head_dim = q.shape
    block_size = k_cache.shape[2]
    query_pos = _chunk_positions(start_pos, num_tokens)  # [B, T]
    _check_positions_fit(query_pos, block_tables, block_size, "paged_attention")
    # Every sequence is read up to the longest one in the batch; shorter ones are masked.
    length = int(query_pos.max()) + 1
    _check_physical_blocks(block_tables[:, : math.ceil(length / block_size)], k_cache.shape[0], "paged_attention")

    k = _gather_kv(k_cache, block_tables, length).to(q.dtype)  # [B, Hkv, L, D]
    v = _gather_kv(v_cache, block_tables, length).to(q.dtype)
    grouped_q = _group_queries(q, k.shape[1])  # [B, Hkv, G, T, D]

    scores = (grouped_q @ k[:, :, None].transpose(-1, -2)).float() * scale  # [B, Hkv, G, T, L]
    key_pos = torch.arange(length, device=q.device)
    v = _zero_unwritten(v, query_pos, key_pos)
    scores = scores.masked_fill(~_allowed_keys(query_pos, key_pos, sliding_window), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = probs @ v[:, :, None]  # [B, Hkv, G, T, D]
    return out.reshape(batch, -1, num_tokens, head_dim)


@paged_attention.register_fake
def _(q, k_cache, v_cache, block_tables, start_pos, scale, sliding_window):
    return torch.empty_like(q)


# --------------------------------------------------------------------------- flash_attention


@torch.library.custom_op("rbln::flash_attention", mutates_args=())
def flash_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    start_pos: Tensor,
    scale: float,
    sliding_window: int,
    partition_len: int,
) -> Tensor:
    """paged_attention computed partition by partition with an online softmax.

    One KV partition is one cache block (block_size == partition_len). The running max,
    running sum and un-normalised output are kept in fp32 and rescaled as each new
    partition raises the max, so the whole KV never has to be resident at once.
    """
    batch, _, num_tokens, head_dim = q.shape
    block_size = k_cache.shape[2]
    if block_size != partition_len:
        raise ValueError(
            f"flash_attention: partition_len ({partition_len}) must equal the KV cache block size ({block_size})"
        )
    query_pos = _chunk_positions(start_pos, num_tokens)  # [B, T]
    _check_positions_fit(query_pos, block_tables, block_size, "flash_attention")
    num_kv_heads = k_cache.shape[1]
    grouped_q = _group_queries(q, num_kv_heads)  # [B, Hkv, G, T, D]

    # Partitions entirely after the longest query, or entirely before every sliding
    # window, contribute nothing: never read them.
    last_partition = int(query_pos.max()) // partition_len
    first_partition = 0
    if sliding_window > 0:
        first_partition = max(0, int(query_pos.min()) - sliding_window + 1) // partition_len

    stats_shape = (*grouped_q.shape[:-1], 1)  # [B, Hkv, G, T, 1]
    running_max = torch.full(stats_shape, float("-inf"), device=q.device)
    running_sum = torch.zeros(stats_shape, device=q.device)
    running_out = torch.zeros(grouped_q.shape, device=q.device)  # fp32 accumulator

    for partition in range(first_partition, last_partition + 1):
        physical = block_tables[:, partition].long()
        _check_physical_blocks(physical, k_cache.shape[0], "flash_attention")
        k = k_cache[physical].to(q.dtype)[:, :, None]  # [B, Hkv, 1, bs, D]
        v = v_cache[physical].to(q.dtype)[:, :, None]

        scores = (grouped_q @ k.transpose(-1, -2)).float() * scale  # [B, Hkv, G, T, bs]
        key_pos = torch.arange(partition * partition_len, (partition + 1) * partition_len, device=q.device)
        v = _zero_unwritten(v, query_pos, key_pos)
        scores = scores.masked_fill(~_allowed_keys(query_pos, key_pos, sliding_window), float("-inf"))

        new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
        # A row that has seen no allowed key yet keeps max -inf; subtract 0 instead so
        # exp() gives 0 rather than nan (-inf - -inf).
        safe_max = torch.where(new_max == float("-inf"), 0.0, new_max)
        correction = torch.exp(running_max - safe_max)
        weights = torch.exp(scores - safe_max)
        running_sum = running_sum * correction + weights.sum(dim=-1, keepdim=True)
        running_out = running_out * correction + (weights.to(q.dtype) @ v).float()
        running_max = new_max

    out = (running_out / running_sum).to(q.dtype)
    return out.reshape(batch, -1, num_tokens, head_dim)


@flash_attention.register_fake
def _(q, k_cache, v_cache, block_tables, start_pos, scale, sliding_window, partition_len):
    return torch.empty_like(q)


# --------------------------------------------------------------------------- cost


def _has_values(tensor: Tensor) -> bool:
    """False for meta / fake tensors (shapes only, as during export or planning)."""
    return not (tensor.is_meta or isinstance(tensor, FakeTensor))


def _kv_lengths_read(start_pos: Tensor, block_tables: Tensor, block_size: int, num_tokens: int, sliding_window: int) -> list[int]:
    """KV positions each sequence reads for a chunk of num_tokens queries.

    Real tensors: positions 0..start_pos+T-1 (only the window when sliding). Fake/meta
    tensors: worst case, every sequence at the full length the block table can address.
    """
    if _has_values(start_pos):
        lengths = [int(p) + num_tokens for p in start_pos.tolist()]
    else:
        lengths = [block_tables.shape[1] * block_size] * block_tables.shape[0]
    if sliding_window > 0:
        # The chunk's queries see (start_pos - window, start_pos + T - 1].
        lengths = [min(length, sliding_window + num_tokens - 1) for length in lengths]
    return lengths


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def attention_cost(op_name: str, args: tuple) -> tuple[float, int, int]:
    """(flops, bytes_read, bytes_written) of one call of a kernel op with these args.

    `op_name` is one of KERNEL_OPS (an OpOverload is accepted too, via str()); `args`
    are the op's positional arguments (real, fake or meta tensors).

    Attention FLOPs are those the kernel performs: the two matmuls (QK^T and PV) over
    the T x L rectangle of each sequence (masked entries are computed too), 4*Hq*T*L*D.
    Softmax work is not counted as FLOPs (it runs on the vector units alongside).
    """
    name = str(op_name)
    if name == KV_CACHE_UPDATE:
        k_cache, v_cache, k, v, block_tables, start_pos = args[:6]
        bytes_read = _nbytes(k) + _nbytes(v) + _nbytes(block_tables) + _nbytes(start_pos)
        bytes_written = (k.numel() * k_cache.element_size()) + (v.numel() * v_cache.element_size())
        return 0.0, bytes_read, bytes_written

    if name in (PAGED_ATTENTION, FLASH_ATTENTION):
        q, k_cache, v_cache, block_tables, start_pos, _scale, sliding_window = args[:7]
        _, num_heads, num_tokens, head_dim = q.shape
        _, num_kv_heads, block_size, _ = k_cache.shape
        lengths = _kv_lengths_read(start_pos, block_tables, block_size, num_tokens, int(sliding_window))
        total_kv_positions = sum(lengths)

        flops = 4.0 * num_heads * num_tokens * head_dim * total_kv_positions
        kv_bytes = total_kv_positions * num_kv_heads * head_dim * (k_cache.element_size() + v_cache.element_size())
        bytes_read = _nbytes(q) + kv_bytes + _nbytes(block_tables) + _nbytes(start_pos)
        bytes_written = _nbytes(q)  # the output has q's shape and dtype
        return flops, bytes_read, bytes_written

    raise ValueError(f"attention_cost: unknown op {name!r}; expected one of {KERNEL_OPS}")
