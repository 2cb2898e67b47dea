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
(max, sum, normalisation) in fp32, as the device does. A cache may be float8 e4m3
(rbln_quantization kv_caches="fp8"): K and V are rounded to it when written (saturating at
+-448, as torch's cast does) and widened to the query's dtype when read.

This module imports only torch and the standard library (the sim_device layer knows
nothing of the rest of the package).
"""

from __future__ import annotations


import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from .moe import MOE_EXPERTS, moe_cost, moe_experts

# Canonical names of the ops, as `str(torch.ops.rbln.<op>.default)` spells them (and as
# FX nodes of an exported graph show them).
KV_CACHE_UPDATE, PAGED_ATTENTION, FLASH_ATTENTION, LOCAL_KV_CACHE_UPDATE, LOCAL_ATTENTION = (
    "rbln.kv_cache_update.default",
    "rbln.paged_attention.default",
    "rbln.flash_attention.default",
    "rbln.local_kv_cache_update.default",
    "rbln.local_attention.default",
)
# The mixture-of-experts kernel lives in moe.py; it is a device kernel like these (priced per run).
KERNEL_OPS = (KV_CACHE_UPDATE, PAGED_ATTENTION, FLASH_ATTENTION, LOCAL_KV_CACHE_UPDATE, LOCAL_ATTENTION, MOE_EXPERTS)
ATTENTION_OPS = (PAGED_ATTENTION, FLASH_ATTENTION, LOCAL_ATTENTION)
CACHE_UPDATE_OPS = (KV_CACHE_UPDATE, LOCAL_KV_CACHE_UPDATE)


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


def _zero_unwritten_(v: Tensor, query_pos: Tensor, first_key_pos: int) -> Tensor:
    """Zero (in place) K or V [B, Hkv, L, D], holding positions first_key_pos.., past each
    sequence's last query.

    Those positions were never written (or hold a previous sequence's values). Their
    attention weight is 0, but 0 * NaN is NaN: uninitialised cache memory must not leak
    into the output. Only that tail of each sequence is touched.
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


def _read_positions(cache: Tensor, block_tables: Tensor, first: int, end: int) -> Tensor:
    """K or V [batch, kv_heads, end - first, head_dim]: positions first..end-1 of each sequence.

    Read block by block, exactly the positions asked for (not whole blocks, which may be much
    longer than what is in use). A block that the batch holds in consecutive physical blocks
    is a view of the cache (no copy: the eager layout, and any batch started on an empty
    cache); otherwise its slice of each row's block is gathered.
    """
    batch, block_size = block_tables.shape[0], cache.shape[2]
    pieces = []
    for logical in range(first // block_size, (end - 1) // block_size + 1):
        lo = max(first - logical * block_size, 0)
        hi = min(end - logical * block_size, block_size)
        blocks = block_tables[:, logical].tolist()
        _check_block_indices(blocks, cache.shape[0], "attention")
        if _consecutive(blocks):
            pieces.append(cache[blocks[0] : blocks[0] + batch, :, lo:hi])
        else:
            pieces.append(cache[:, :, lo:hi].index_select(0, block_tables[:, logical].long()))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


def _attend(q: Tensor, k: Tensor, v: Tensor, start_pos: Tensor, first_key: int, scale: float, sliding_window: int,
            attention_mask: Tensor | None, softcap: float = 0.0) -> Tensor:
    """Attention of q [B, Hq, T, D] over k, v [B, Hkv, L, D] holding key positions first_key..first_key+L-1.

    The math is torch's scaled_dot_product_attention with GQA: on CPU it is itself a flash
    attention (online softmax over blocks of keys, statistics in fp32, matmuls in the input
    dtype), i.e. the numerics the device's kernels produce, at the host's best speed. The
    mask (causality, sliding window, explicit attention mask) is built only when some key is
    hidden from some query; the first chunk of a prompt is plain causal.
    """
    batch, _, num_tokens, _ = q.shape
    length = k.shape[2]
    starts = start_pos.tolist()
    same_start = min(starts) == max(starts)
    k, v = k.to(q.dtype), v.to(q.dtype)
    if (num_tokens > 1 and same_start and first_key < starts[0] and first_key + length == starts[0] + num_tokens
            and sliding_window == 0 and attention_mask is None and not softcap):
        return _attend_prefix_then_chunk(q, k, v, starts[0] - first_key, scale)
    mask, causal = None, False
    every_key_visible = same_start and first_key + length == starts[0] + 1 and num_tokens == 1
    if sliding_window > 0 or attention_mask is not None or not every_key_visible:
        if same_start and first_key == starts[0] and length == num_tokens and sliding_window == 0 and attention_mask is None:
            causal = True  # the chunk attends to itself only: the plain causal triangle
        else:
            query_pos = _chunk_positions(start_pos, num_tokens)  # [B, T]
            key_pos = torch.arange(first_key, first_key + length)
            allowed = key_pos[None, None, :] <= query_pos[:, :, None]
            if sliding_window > 0:
                allowed &= key_pos[None, None, :] > query_pos[:, :, None] - sliding_window
            if attention_mask is not None:
                allowed &= attention_mask[:, None, first_key : first_key + length].bool()
            mask = allowed[:, None]  # [B, 1, T, L]
            if not same_start:  # keys past a shorter row's end may hold garbage (even NaN): a hidden
                # key must weigh exactly 0, and an additive -inf mask or a 0 weight does not
                # cancel a NaN, so zero them (k and v may be views of the cache: copies)
                k = _zero_unwritten_(k.clone(), query_pos, first_key)
                v = _zero_unwritten_(v.clone(), query_pos, first_key)
    if softcap:
        return _attend_softcapped(q, k, v, mask, causal, scale, softcap)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def _attend_softcapped(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float,
                       softcap: float) -> Tensor:
    """Attention with logit soft-capping (Gemma 2): scores become softcap * tanh(scores / softcap)
    before the mask and the softmax. The cap acts on each score, so no flash kernel's running
    statistics apply: the scores are formed whole (a softmax in fp32, as the device's kernel does)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if causal:
        tokens, length = scores.shape[-2:]
        mask = torch.ones(tokens, length, dtype=torch.bool).tril(length - tokens)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


def _attend_prefix_then_chunk(q: Tensor, k: Tensor, v: Tensor, prefix: int, scale: float) -> Tensor:
    """A prompt chunk after `prefix` cached positions: every query sees the whole prefix and the
    chunk causally. Attending to the two parts apart needs no mask (the fast path of the host's
    flash attention) and skips the chunk's upper triangle; the parts are combined by their
    log-sum-exp, as a flash kernel combines KV partitions.
    """
    batch, num_heads, num_tokens, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    # The prefix hides nothing, so the queries sharing a KV head can be stacked as rows (no KV copy).
    q_rows = q.reshape(batch, num_kv_heads, group * num_tokens, head_dim)
    out_prefix, lse_prefix = _flash_with_lse(q_rows, k[:, :, :prefix], v[:, :, :prefix], False, scale)
    chunk_k = k[:, :, prefix:].repeat_interleave(group, dim=1)  # the chunk's own keys: a small copy
    chunk_v = v[:, :, prefix:].repeat_interleave(group, dim=1)
    out_chunk, lse_chunk = _flash_with_lse(q, chunk_k, chunk_v, True, scale)
    lse_prefix = lse_prefix.reshape(batch, num_heads, num_tokens, 1)
    lse_chunk = lse_chunk.reshape(batch, num_heads, num_tokens, 1)
    top = torch.maximum(lse_prefix, lse_chunk)
    w_prefix, w_chunk = (lse_prefix - top).exp_(), (lse_chunk - top).exp_()
    out = out_prefix.reshape(q.shape).float() * w_prefix + out_chunk.float() * w_chunk
    return out.div_(w_prefix + w_chunk).to(q.dtype)


def _flash_with_lse(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """torch's CPU flash attention (the kernel behind scaled_dot_product_attention on CPU), which
    also returns each query's log-sum-exp of scores (fp32)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)


def _first_visible_key(start_pos: Tensor, sliding_window: int) -> int:
    """The lowest key position any query of the chunk can see (0 without a sliding window)."""
    if sliding_window <= 0:
        return 0
    return max(0, int(start_pos.min()) - sliding_window + 1)


def _attention_over_cache(q, k_cache, v_cache, block_tables, start_pos, scale, sliding_window, attention_mask,
                          what: str, softcap: float = 0.0) -> Tensor:
    """Both attention kernels: read the KV positions the chunk can see, then `_attend`.

    Every sequence is read up to the longest one in the batch (shorter ones are masked), so
    the host's work follows the tokens in the cache, never the cache's capacity.
    """
    rows = _valid_rows(start_pos)
    if rows is not None:
        out = torch.zeros_like(q)
        if rows.numel():
            out[rows] = _attention_over_cache(q[rows], k_cache, v_cache, block_tables[rows], start_pos[rows], scale,
                                              sliding_window, None if attention_mask is None else attention_mask[rows],
                                              what, softcap)
        return out
    num_tokens = q.shape[2]
    query_pos = _chunk_positions(start_pos, num_tokens)  # [B, T]
    _check_positions_fit(query_pos, block_tables, k_cache.shape[2], what)
    first, end = _first_visible_key(start_pos, sliding_window), int(query_pos.max()) + 1
    k = _read_positions(k_cache, block_tables, first, end)
    v = _read_positions(v_cache, block_tables, first, end)
    return _attend(q, k, v, start_pos, first, scale, sliding_window, attention_mask, softcap)


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
    block_size, tokens = k_cache.shape[2], k.shape[2]
    starts = start_pos.tolist()
    if starts and all(s // block_size == (s + tokens - 1) // block_size < block_tables.shape[1] for s in starts):
        # Every row writes inside one block (always so with eager attention, where a block is a
        # whole sequence, and for flash chunks that do not straddle a partition): plain slice
        # copies, no index tensors.
        blocks = [int(block_tables[row, s // block_size]) for row, s in enumerate(starts)]
        offsets = [s % block_size for s in starts]
        _check_block_indices(blocks, k_cache.shape[0], "kv_cache_update")
        if _consecutive(blocks) and min(offsets) == max(offsets):  # one copy for the whole batch
            first, offset = blocks[0], offsets[0]
            k_cache[first : first + len(blocks), :, offset : offset + tokens] = k
            v_cache[first : first + len(blocks), :, offset : offset + tokens] = v
            return
        for row, (block, offset) in enumerate(zip(blocks, offsets)):
            k_cache[block, :, offset : offset + tokens] = k[row]
            v_cache[block, :, offset : offset + tokens] = v[row]
        return
    positions = _chunk_positions(start_pos, k.shape[2])  # [B, T]
    _check_positions_fit(positions, block_tables, block_size, "kv_cache_update")
    physical = block_tables.long().gather(1, positions // block_size)  # [B, T]
    _check_physical_blocks(physical, k_cache.shape[0], "kv_cache_update")
    _write_at(k_cache, v_cache, physical, positions % block_size, k, v)


def _write_at(k_cache: Tensor, v_cache: Tensor, blocks: Tensor, offsets: Tensor, k: Tensor, v: Tensor) -> None:
    """k, v [B, H, T, D] into cache[blocks, :, offsets] (blocks [B, T] or [B, 1], offsets [B, T]).
    The two index tensors are separated by a slice, so the indexed view is [B, T, H, D]."""
    k_cache[blocks, :, offsets] = k.transpose(1, 2).to(k_cache.dtype)
    v_cache[blocks, :, offsets] = v.transpose(1, 2).to(v_cache.dtype)


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
    softcap: float = 0.0,
) -> Tensor:
    """Causal (optionally sliding-window) attention of q [B, Hq, T, D] over the paged cache.

    `attention_mask` [B, max positions], if given, additionally hides the keys where it is 0
    (graphs compiled with rbln_use_attention_mask take it as an input). `softcap` > 0 caps
    each score at softcap * tanh(score / softcap) before the softmax (Gemma 2's
    attn_logit_softcapping). Rows with start_pos < 0 are padding: they read nothing and output zeros.
    """
    return _attention_over_cache(q, k_cache, v_cache, block_tables, start_pos, scale, sliding_window, attention_mask,
                                 "paged_attention", softcap)


@paged_attention.register_fake
def _(q, k_cache, v_cache, block_tables, start_pos, scale, sliding_window, attention_mask=None, softcap=0.0):
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
    softcap: float = 0.0,
) -> Tensor:
    """paged_attention over KV partitions: one partition is one cache block (block_size ==
    partition_len), and the softmax is combined across partitions online (running max and
    sum in fp32), so the whole KV never has to be resident at once on the device.

    The host computes the same math with one flash-attention call over the positions in use
    (`_attend`): partitions after the longest query, or before every sliding window, are
    never read. Rows with start_pos < 0 are padding: they read nothing and output zeros.
    """
    if k_cache.shape[2] != partition_len:
        raise ValueError(
            f"flash_attention: partition_len ({partition_len}) must equal the KV cache block size ({k_cache.shape[2]})"
        )
    return _attention_over_cache(q, k_cache, v_cache, block_tables, start_pos, scale, sliding_window, attention_mask,
                                 "flash_attention", softcap)


@flash_attention.register_fake
def _(q, k_cache, v_cache, block_tables, start_pos, scale, sliding_window, partition_len, attention_mask=None,
      softcap=0.0):
    return torch.empty_like(q)


# --------------------------------------------------------------------------- the sliding-window (local) cache


@torch.library.custom_op("rbln::local_kv_cache_update", mutates_args=("k_cache", "v_cache"))
def local_kv_cache_update(
    k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, block_tables: Tensor, start_pos: Tensor
) -> None:
    """Write k, v [batch, kv_heads, T, head_dim] at positions start_pos[b] + t into the ring of the
    sliding-window cache [num_blocks, kv_heads, ring, head_dim] that sequence b owns: the row of its
    first block (block_tables[b, 0]), position p at p % ring. A layer that sees only the last
    `window` positions needs no more: with ring >= window + T - 1 a chunk's writes never overwrite
    a position any of its queries (or a later one) still sees. Rows with start_pos < 0 write nothing."""
    rows = _valid_rows(start_pos)
    if rows is not None:
        k, v, block_tables, start_pos = k[rows], v[rows], block_tables[rows], start_pos[rows]
    if start_pos.numel() == 0:
        return
    ring, tokens = k_cache.shape[2], k.shape[2]
    if tokens > ring:
        raise ValueError(f"local_kv_cache_update: a chunk of {tokens} tokens does not fit a ring of {ring} positions")
    owners = block_tables[:, 0].long()
    _check_physical_blocks(owners, k_cache.shape[0], "local_kv_cache_update")
    _write_at(k_cache, v_cache, owners[:, None], _chunk_positions(start_pos, tokens) % ring, k, v)


@local_kv_cache_update.register_fake
def _(k_cache, v_cache, k, v, block_tables, start_pos) -> None:
    return None


@torch.library.custom_op("rbln::local_attention", mutates_args=())
def local_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    start_pos: Tensor,
    scale: float,
    sliding_window: int,
    softcap: float = 0.0,
) -> Tensor:
    """Sliding-window attention of q [B, Hq, T, D] over each sequence's ring (`local_kv_cache_update`):
    a query at position p sees keys p - sliding_window + 1 .. p, read from the ring (the
    window + T - 1 positions the chunk's queries see). Rows with start_pos < 0 output zeros."""
    rows = _valid_rows(start_pos)
    if rows is not None:
        out = torch.zeros_like(q)
        if rows.numel():
            out[rows] = local_attention(q[rows], k_cache, v_cache, block_tables[rows], start_pos[rows], scale,
                                        sliding_window, softcap)
        return out
    ring, tokens = k_cache.shape[2], q.shape[2]
    span = sliding_window + tokens - 1
    if sliding_window <= 0 or span > ring:
        raise ValueError(f"local_attention: a window of {sliding_window} with chunks of {tokens} tokens needs a ring of "
                         f"at least {span} positions; the cache has {ring}")
    owners = block_tables[:, 0].long()
    _check_physical_blocks(owners, k_cache.shape[0], "local_attention")
    query_pos = _chunk_positions(start_pos, tokens)                                                 # [B, T]
    key_pos = start_pos.long()[:, None] - sliding_window + 1 + torch.arange(span)[None, :]         # [B, span]
    slots = key_pos % ring
    k = k_cache[owners[:, None], :, slots].transpose(1, 2).to(q.dtype)  # [B, Hkv, span, D]
    v = v_cache[owners[:, None], :, slots].transpose(1, 2).to(q.dtype)
    keys, queries = key_pos[:, None, :], query_pos[:, :, None]
    mask = ((keys <= queries) & (keys > queries - sliding_window) & (keys >= 0))[:, None]  # [B, 1, T, span]
    if softcap:
        return _attend_softcapped(q, k, v, mask, False, scale, softcap)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                            enable_gqa=q.shape[1] != k.shape[1])


@local_attention.register_fake
def _(q, k_cache, v_cache, block_tables, start_pos, scale, sliding_window, softcap=0.0):
    return torch.empty_like(q)


IMPLEMENTATIONS = {
    KV_CACHE_UPDATE: kv_cache_update._init_fn,
    PAGED_ATTENTION: paged_attention._init_fn,
    FLASH_ATTENTION: flash_attention._init_fn,
    LOCAL_KV_CACHE_UPDATE: local_kv_cache_update._init_fn,
    LOCAL_ATTENTION: local_attention._init_fn,
    MOE_EXPERTS: moe_experts._init_fn,
}


# --------------------------------------------------------------------------- cost


def _has_values(tensor: Tensor) -> bool:
    """False for meta / fake tensors (shapes only, as during export or planning)."""
    return not (tensor.is_meta or isinstance(tensor, FakeTensor))


def _kv_lengths_read(start_pos: Tensor, block_tables: Tensor, block_size: int, num_tokens: int, sliding_window: int,
                     kv_lengths: list[int] | None) -> list[int]:
    """KV positions each sequence reads for a chunk of num_tokens queries.

    `kv_lengths` given (the planner, the compile-time estimate): those, each the context of a
    sequence including this chunk. Else from the tensors: real ones give positions
    0..start_pos+T-1; fake/meta ones the worst case, every sequence at the full length its
    block table can address.
    """
    if kv_lengths is not None:
        lengths = list(kv_lengths)
    elif _has_values(start_pos):
        lengths = [int(p) + num_tokens if p >= 0 else 0 for p in start_pos.tolist()]
    else:
        lengths = [block_tables.shape[1] * block_size] * block_tables.shape[0]
    if sliding_window > 0:
        # The chunk's queries see (start_pos - window, start_pos + T - 1].
        lengths = [min(length, sliding_window + num_tokens - 1) for length in lengths]
    return lengths


def attention_cost(op_name: str, args: tuple, float_bytes: int | None = None,
                   kv_lengths: list[int] | None = None) -> tuple[float, int, int]:
    """(flops, bytes_read, bytes_written) of one call of a kernel op with these args.

    `op_name` is one of KERNEL_OPS (an OpOverload is accepted too, via str()); `args`
    are the op's positional arguments (real, fake or meta tensors).

    Attention FLOPs are those the kernel performs: the two matmuls (QK^T and PV) over
    the T x L rectangle of each sequence (masked entries are computed too), 4*Hq*T*L*D.
    Softmax work is not counted as FLOPs (it runs on the vector units alongside).

    `float_bytes` prices float tensors at the device's width (2) when the host emulates
    the device in fp32; by default each tensor's own element size is used. `kv_lengths`
    (one per sequence) replaces the lengths read from `start_pos`.
    """

    def _nbytes(tensor: Tensor) -> int:
        return tensor.numel() * _element_size(tensor)

    def _element_size(tensor: Tensor) -> int:
        # an fp8 KV cache is one byte on the device and on the host alike
        wide = tensor.is_floating_point() and tensor.element_size() > 1
        return float_bytes if float_bytes and wide else tensor.element_size()

    name = str(op_name)
    if name == MOE_EXPERTS:
        return moe_cost(args, float_bytes)
    if name in CACHE_UPDATE_OPS:
        k_cache, v_cache, k, v, block_tables, start_pos = args[:6]
        bytes_read = _nbytes(k) + _nbytes(v) + _nbytes(block_tables) + _nbytes(start_pos)
        bytes_written = (k.numel() * _element_size(k_cache)) + (v.numel() * _element_size(v_cache))
        return 0.0, bytes_read, bytes_written

    if name in ATTENTION_OPS:
        q, k_cache, v_cache, block_tables, start_pos, _scale, sliding_window = args[:7]
        _, num_heads, num_tokens, head_dim = q.shape
        _, num_kv_heads, block_size, _ = k_cache.shape
        lengths = _kv_lengths_read(start_pos, block_tables, block_size, num_tokens, int(sliding_window), kv_lengths)
        total_kv_positions = sum(lengths)

        flops = 4.0 * num_heads * num_tokens * head_dim * total_kv_positions
        kv_bytes = total_kv_positions * num_kv_heads * head_dim * (_element_size(k_cache) + _element_size(v_cache))
        bytes_read = _nbytes(q) + kv_bytes + _nbytes(block_tables) + _nbytes(start_pos)
        bytes_written = _nbytes(q)  # the output has q's shape and dtype
        return flops, bytes_read, bytes_written

    raise ValueError(f"attention_cost: unknown op {name!r}; expected one of {KERNEL_OPS}")
