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
                      absolute position start_pos[b] + t; start_pos[b] < 0 marks a padding
                      row (a compiled batch larger than the live one): it neither writes
                      nor reads the cache, and its attention output is zeros

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


def _gather_positions(cache: Tensor, block_tables: Tensor, key_pos: Tensor) -> Tensor:
    """Contiguous KV [batch, kv_heads, L, head_dim] of positions key_pos [L] of each sequence.

    Exactly the L positions are read (not whole blocks, which may be much longer), in one
    gather whose index layout [B, H, L] directly gives the layout the matmuls want.
    """
    batch = block_tables.shape[0]
    block_size, num_heads = cache.shape[2], cache.shape[1]
    physical = block_tables.long().gather(1, (key_pos // block_size).expand(batch, -1))  # [B, L]
    offset = key_pos % block_size
    heads = torch.arange(num_heads, device=cache.device)
    return cache[physical[:, None, :], heads[None, :, None], offset[None, None, :]]


def _query_rows(q: Tensor, num_kv_heads: int) -> Tensor:
    """[B, Hq, T, D] -> [B, Hkv, group*T, D]: the q heads sharing a KV head, stacked as rows.

    This is the [B, Hkv, group, T, D] GQA view with group and T merged, so QK^T and PV are
    plain batched matmuls against the un-repeated KV (a broadcast matmul would copy KV
    `group` times internally).
    """
    batch, num_heads, num_tokens, head_dim = q.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    return q.reshape(batch, num_kv_heads, num_heads // num_kv_heads * num_tokens, head_dim)


def _masked_scores(
    q_rows: Tensor, k: Tensor, query_pos: Tensor, key_pos: Tensor, scale: float, sliding_window: int,
    key_mask: Tensor | None = None,
) -> Tensor:
    """fp32 scores [B, Hkv, group*T, L] of q_rows against k, -inf where a key is not visible.

    The matmul runs in the input dtype (as on the device); scaling and masking in fp32.
    """
    scores = (q_rows @ k.transpose(-1, -2)).float().mul_(scale)
    batch, num_kv_heads, rows, length = scores.shape
    num_tokens = query_pos.shape[1]
    q = query_pos[:, None, None, :, None]  # [B, 1, 1, T, 1]
    kp = key_pos[None, None, None, None, :]  # [1, 1, 1, 1, L]
    allowed = kp <= q
    if sliding_window > 0:
        allowed &= kp > q - sliding_window
    if key_mask is not None:  # [B, L]: an explicit attention mask over key positions
        allowed = allowed & key_mask[:, None, None, None, :]
    grouped = scores.view(batch, num_kv_heads, rows // num_tokens, num_tokens, length)
    grouped.masked_fill_(~allowed, float("-inf"))
    return scores


def _zero_unwritten_(v: Tensor, query_pos: Tensor, first_key_pos: int) -> Tensor:
    """Zero (in place) V [B, Hkv, L, D], holding positions first_key_pos.., past each
    sequence's last query.

    Those positions were never written (or hold a previous sequence's values). Their
    attention weight is 0, but 0 * NaN is NaN: uninitialised cache memory must not leak
    into the output through the PV matmul. Only that tail of each sequence is touched.
    """
    for b, last_pos in enumerate(query_pos[:, -1].tolist()):
        first_unwritten = max(0, last_pos + 1 - first_key_pos)
        v[b, :, first_unwritten:] = 0
    return v


def _valid_rows(start_pos: Tensor) -> Tensor | None:
    """Indices of the real sequences when some rows are padding (start_pos < 0), else None.

    A decode graph compiled for batch 4 runs a batch of 3 with one padding row: it must
    neither write the cache nor read it (its block table row points at someone's block).
    """
    valid = start_pos >= 0
    if bool(valid.all()):
        return None
    return valid.nonzero().flatten()


def _consecutive(blocks: list[int]) -> bool:
    return blocks == list(range(blocks[0], blocks[0] + len(blocks)))


def _check_block_indices(blocks: list[int], num_blocks: int, what: str) -> None:
    if blocks and (min(blocks) < 0 or max(blocks) >= num_blocks):
        raise ValueError(f"{what}: block_tables holds indices outside [0, {num_blocks}) (min {min(blocks)}, max {max(blocks)})")


def _attention_within_first_block(q, k_cache, v_cache, block_tables, start_pos, starts, scale, sliding_window,
                                   attention_mask=None):
    """paged_attention when every row reads only its first block (eager attention, short sequences).

    K/V are contiguous slices of one block, so no gather is needed; the math is torch's
    SDPA with GQA (16-bit matmuls, fp32 softmax statistics, as the device does).
    """
    batch, _, num_tokens, _ = q.shape
    length = max(starts) + num_tokens
    blocks = block_tables[:, 0].tolist()
    _check_block_indices(blocks, k_cache.shape[0], "paged_attention")
    if _consecutive(blocks):  # the batch's blocks are one slice of the cache: a view, no copy
        k = k_cache[blocks[0] : blocks[0] + batch, :, :length]
        v = v_cache[blocks[0] : blocks[0] + batch, :, :length]
    else:
        index = block_tables[:, 0].long()
        k = k_cache[:, :, :length].index_select(0, index)
        v = v_cache[:, :, :length].index_select(0, index)
    k, v = k.to(q.dtype), v.to(q.dtype)
    mask = None
    same_start = min(starts) == max(starts)
    if num_tokens > 1 or not same_start or sliding_window > 0 or attention_mask is not None:
        query_pos = _chunk_positions(start_pos, num_tokens)  # [B, T]
        key_pos = torch.arange(length)
        allowed = key_pos[None, None, :] <= query_pos[:, :, None]
        if sliding_window > 0:
            allowed &= key_pos[None, None, :] > query_pos[:, :, None] - sliding_window
        if attention_mask is not None:
            allowed &= attention_mask[:, None, :length].bool()
        mask = allowed[:, None]  # [B, 1, T, L]
        if not same_start:  # keys past a shorter row's end must not leak NaN through 0 * NaN
            v = _zero_unwritten_(v.clone(), query_pos, 0)  # v may be a view of the cache
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


# The Python implementations behind the custom ops. The runtime calls these directly: the
# custom-op wrapper (needed for torch.export) costs tens of microseconds per call.
# --------------------------------------------------------------------------- kv_cache_update


@torch.library.custom_op("rbln::kv_cache_update", mutates_args=("k_cache", "v_cache"))
def kv_cache_update(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, block_tables: Tensor, start_pos: Tensor
) -> None:
    """Write k, v [batch, kv_heads, T, head_dim] at positions start_pos[b] + t of each sequence.

    Rows with start_pos < 0 are padding and write nothing.
    """
    rows = _valid_rows(start_pos)
    if rows is not None:
        k, v, block_tables, start_pos = k[rows], v[rows], block_tables[rows], start_pos[rows]
    block_size = k_cache.shape[2]
    starts = start_pos.tolist()
    if starts and max(starts) + k.shape[2] <= block_size:
        # Every row writes inside its first block (always so with eager attention, where a
        # block is a whole sequence): plain slice copies, no index tensors.
        blocks = block_tables[:, 0].tolist()
        _check_block_indices(blocks, k_cache.shape[0], "kv_cache_update")
        tokens = k.shape[2]
        if _consecutive(blocks) and min(starts) == max(starts):  # one copy for the whole batch
            first, start = blocks[0], starts[0]
            k_cache[first : first + len(blocks), :, start : start + tokens] = k
            v_cache[first : first + len(blocks), :, start : start + tokens] = v
            return
        for row, (block, start) in enumerate(zip(blocks, starts)):
            k_cache[block, :, start : start + tokens] = k[row]
            v_cache[block, :, start : start + tokens] = v[row]
        return
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
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Causal (optionally sliding-window) attention of q [B, Hq, T, D] over the paged cache.

    `attention_mask` [B, max positions], if given, additionally hides the keys where it is 0
    (graphs compiled with rbln_use_attention_mask take it as an input).
    Rows with start_pos < 0 are padding: they read nothing and output zeros.
    """
    rows = _valid_rows(start_pos)
    if rows is not None:
        out = torch.zeros_like(q)
        if rows.numel():
            out[rows] = paged_attention(q[rows], k_cache, v_cache, block_tables[rows], start_pos[rows], scale,
                                        sliding_window, None if attention_mask is None else attention_mask[rows])
        return out
    batch, _, num_tokens, head_dim = q.shape
    block_size = k_cache.shape[2]
    starts = start_pos.tolist()
    if starts and max(starts) + num_tokens <= block_size:
        return _attention_within_first_block(q, k_cache, v_cache, block_tables, start_pos, starts, scale, sliding_window,
                                             attention_mask)
    query_pos = _chunk_positions(start_pos, num_tokens)  # [B, T]
    _check_positions_fit(query_pos, block_tables, block_size, "paged_attention")
    # Every sequence is read up to the longest one in the batch; shorter ones are masked.
    length = int(query_pos.max()) + 1
    _check_physical_blocks(block_tables[:, : math.ceil(length / block_size)], k_cache.shape[0], "paged_attention")

    key_pos = torch.arange(length, device=q.device)
    k = _gather_positions(k_cache, block_tables, key_pos).to(q.dtype)  # [B, Hkv, L, D]
    v = _zero_unwritten_(_gather_positions(v_cache, block_tables, key_pos).to(q.dtype), query_pos, 0)
    q_rows = _query_rows(q, k.shape[1])  # [B, Hkv, G*T, D]

    key_mask = None if attention_mask is None else attention_mask[:, :length].bool()
    scores = _masked_scores(q_rows, k, query_pos, key_pos, scale, sliding_window, key_mask)
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = probs @ v  # [B, Hkv, G*T, D]
    return out.reshape(batch, -1, num_tokens, head_dim)


@paged_attention.register_fake
def _(q, k_cache, v_cache, block_tables, start_pos, scale, sliding_window, attention_mask=None):
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
    attention_mask: Tensor | None = None,
) -> Tensor:
    """paged_attention computed partition by partition with an online softmax.

    One KV partition is one cache block (block_size == partition_len). The running max,
    running sum and un-normalised output are kept in fp32 and rescaled as each new
    partition raises the max, so the whole KV never has to be resident at once.

    Rows with start_pos < 0 are padding: they read nothing and output zeros.
    """
    rows = _valid_rows(start_pos)
    if rows is not None:
        out = torch.zeros_like(q)
        if rows.numel():
            out[rows] = flash_attention(
                q[rows], k_cache, v_cache, block_tables[rows], start_pos[rows], scale, sliding_window, partition_len,
                None if attention_mask is None else attention_mask[rows],
            )
        return out
    batch, _, num_tokens, head_dim = q.shape
    block_size = k_cache.shape[2]
    if block_size != partition_len:
        raise ValueError(
            f"flash_attention: partition_len ({partition_len}) must equal the KV cache block size ({block_size})"
        )
    query_pos = _chunk_positions(start_pos, num_tokens)  # [B, T]
    _check_positions_fit(query_pos, block_tables, block_size, "flash_attention")
    q_rows = _query_rows(q, k_cache.shape[1])  # [B, Hkv, G*T, D]

    # Partitions entirely after the longest query, or entirely before every sliding
    # window, contribute nothing: never read them.
    last_partition = int(query_pos.max()) // partition_len
    first_partition = 0
    if sliding_window > 0:
        first_partition = max(0, int(query_pos.min()) - sliding_window + 1) // partition_len

    stats_shape = (*q_rows.shape[:-1], 1)  # [B, Hkv, G*T, 1]
    running_max = torch.full(stats_shape, float("-inf"), device=q.device)
    running_sum = torch.zeros(stats_shape, device=q.device)
    running_out = torch.zeros(q_rows.shape, device=q.device)  # fp32 accumulator

    for partition in range(first_partition, last_partition + 1):
        physical = block_tables[:, partition].long()
        _check_physical_blocks(physical, k_cache.shape[0], "flash_attention")
        key_pos = torch.arange(partition * partition_len, (partition + 1) * partition_len, device=q.device)
        k = k_cache[physical].to(q.dtype)  # [B, Hkv, bs, D], a fresh copy
        v = _zero_unwritten_(v_cache[physical].to(q.dtype), query_pos, partition * partition_len)

        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask[:, partition * partition_len : (partition + 1) * partition_len].bool()
        scores = _masked_scores(q_rows, k, query_pos, key_pos, scale, sliding_window, key_mask)  # [B, Hkv, G*T, bs]
        new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
        # A row that has seen no visible key yet keeps max -inf; subtract 0 instead so
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
def _(q, k_cache, v_cache, block_tables, start_pos, scale, sliding_window, partition_len, attention_mask=None):
    return torch.empty_like(q)


IMPLEMENTATIONS = {
    KV_CACHE_UPDATE: kv_cache_update._init_fn,
    PAGED_ATTENTION: paged_attention._init_fn,
    FLASH_ATTENTION: flash_attention._init_fn,
}


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
        lengths = [int(p) + num_tokens if p >= 0 else 0 for p in start_pos.tolist()]
    else:
        lengths = [block_tables.shape[1] * block_size] * block_tables.shape[0]
    if sliding_window > 0:
        # The chunk's queries see (start_pos - window, start_pos + T - 1].
        lengths = [min(length, sliding_window + num_tokens - 1) for length in lengths]
    return lengths


def attention_cost(op_name: str, args: tuple, float_bytes: int | None = None) -> tuple[float, int, int]:
    """(flops, bytes_read, bytes_written) of one call of a kernel op with these args.

    `op_name` is one of KERNEL_OPS (an OpOverload is accepted too, via str()); `args`
    are the op's positional arguments (real, fake or meta tensors).

    Attention FLOPs are those the kernel performs: the two matmuls (QK^T and PV) over
    the T x L rectangle of each sequence (masked entries are computed too), 4*Hq*T*L*D.
    Softmax work is not counted as FLOPs (it runs on the vector units alongside).

    `float_bytes` prices float tensors at the device's width (2) when the host emulates
    the device in fp32; by default each tensor's own element size is used.
    """

    def _nbytes(tensor: Tensor) -> int:
        return tensor.numel() * _element_size(tensor)

    def _element_size(tensor: Tensor) -> int:
        return float_bytes if float_bytes and tensor.is_floating_point() else tensor.element_size()

    name = str(op_name)
    if name == KV_CACHE_UPDATE:
        k_cache, v_cache, k, v, block_tables, start_pos = args[:6]
        bytes_read = _nbytes(k) + _nbytes(v) + _nbytes(block_tables) + _nbytes(start_pos)
        bytes_written = (k.numel() * _element_size(k_cache)) + (v.numel() * _element_size(v_cache))
        return 0.0, bytes_read, bytes_written

    if name in (PAGED_ATTENTION, FLASH_ATTENTION):
        q, k_cache, v_cache, block_tables, start_pos, _scale, sliding_window = args[:7]
        _, num_heads, num_tokens, head_dim = q.shape
        _, num_kv_heads, block_size, _ = k_cache.shape
        lengths = _kv_lengths_read(start_pos, block_tables, block_size, num_tokens, int(sliding_window))
        total_kv_positions = sum(lengths)

        flops = 4.0 * num_heads * num_tokens * head_dim * total_kv_positions
        kv_bytes = total_kv_positions * num_kv_heads * head_dim * (_element_size(k_cache) + _element_size(v_cache))
        bytes_read = _nbytes(q) + kv_bytes + _nbytes(block_tables) + _nbytes(start_pos)
        bytes_written = _nbytes(q)  # the output has q's shape and dtype
        return flops, bytes_read, bytes_written

    raise ValueError(f"attention_cost: unknown op {name!r}; expected one of {KERNEL_OPS}")
