"""The device's attention kernels against a naive fp32 reference on contiguous K/V."""

import math

import pytest
import torch

from optimum_npu.sim_device.kernels import KERNEL_OPS, attention_cost

HEAD_DIM = 16
NUM_HEADS, NUM_KV_HEADS = 8, 2  # GQA: 4 query heads per KV head


# --------------------------------------------------------------------------- reference


def reference_attention(q, k, v, start_pos, scale, sliding_window=0, key_mask=None):
    """Naive fp32 attention: repeated KV, explicit causal/sliding mask, torch.softmax.

    q [B, Hq, T, D]; k, v: contiguous [B, Hkv, S, D] (position p of sequence b at [b, :, p]).
    """
    batch, num_heads, num_tokens, _ = q.shape
    group = num_heads // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    out = torch.empty(q.shape)
    for b in range(batch):
        query_pos = int(start_pos[b]) + torch.arange(num_tokens)
        length = int(query_pos[-1]) + 1
        key_pos = torch.arange(length)
        allowed = key_pos[None, :] <= query_pos[:, None]
        if sliding_window > 0:
            allowed &= key_pos[None, :] > query_pos[:, None] - sliding_window
        if key_mask is not None:
            allowed &= key_mask[b, :length].bool()[None, :]
        scores = q[b].float() @ k[b, :, :length].transpose(-1, -2) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[b] = torch.softmax(scores, dim=-1) @ v[b, :, :length]
    return out


def shuffled_block_tables(batch, max_blocks, num_blocks, generator):
    """Each sequence gets distinct, non-contiguous physical blocks."""
    return torch.randperm(num_blocks, generator=generator)[: batch * max_blocks].reshape(batch, max_blocks).int()


def write_paged(contiguous, block_tables, num_blocks, block_size):
    """Lay out contiguous [B, H, S, D] into a paged cache by hand (independent of the kernel)."""
    batch, heads, seq_len, head_dim = contiguous.shape
    cache = torch.zeros(num_blocks, heads, block_size, head_dim, dtype=contiguous.dtype)
    for b in range(batch):
        for p in range(seq_len):
            cache[block_tables[b, p // block_size], :, p % block_size] = contiguous[b, :, p]
    return cache


class Case:
    """A batch of sequences whose KV is already in a paged cache."""

    def __init__(self, start_pos, num_tokens, block_size=16, max_blocks=6, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.batch = len(start_pos)
        self.block_size = block_size
        self.num_blocks = self.batch * max_blocks + 3  # a few blocks owned by nobody
        self.start_pos = torch.tensor(start_pos, dtype=torch.int32)
        self.block_tables = shuffled_block_tables(self.batch, max_blocks, self.num_blocks, g)
        seq_len = max_blocks * block_size
        self.k = torch.randn(self.batch, NUM_KV_HEADS, seq_len, HEAD_DIM, generator=g).to(dtype)
        self.v = torch.randn(self.batch, NUM_KV_HEADS, seq_len, HEAD_DIM, generator=g).to(dtype)
        self.q = torch.randn(self.batch, NUM_HEADS, num_tokens, HEAD_DIM, generator=g).to(dtype)
        self.k_cache = write_paged(self.k, self.block_tables, self.num_blocks, block_size)
        self.v_cache = write_paged(self.v, self.block_tables, self.num_blocks, block_size)
        self.scale = 1.0 / math.sqrt(HEAD_DIM)

    def paged(self, sliding_window=0):
        return torch.ops.rbln.paged_attention(
            self.q, self.k_cache, self.v_cache, self.block_tables, self.start_pos, self.scale, sliding_window
        )

    def flash(self, sliding_window=0):
        return torch.ops.rbln.flash_attention(
            self.q, self.k_cache, self.v_cache, self.block_tables, self.start_pos,
            self.scale, sliding_window, self.block_size,
        )

    def reference(self, sliding_window=0):
        return reference_attention(self.q, self.k, self.v, self.start_pos, self.scale, sliding_window)


# --------------------------------------------------------------------------- attention numerics


@pytest.mark.parametrize("kernel", ["paged", "flash"])
@pytest.mark.parametrize(
    "start_pos, num_tokens",
    [
        ([0, 37, 70], 5),  # prefill chunk: first chunk for one sequence, mid-sequence for others
        ([3, 50, 90], 1),  # decode, sequences of different lengths
        ([0, 0, 0], 16),   # whole first block at once
    ],
)
def test_attention_matches_reference_fp32(kernel, start_pos, num_tokens):
    case = Case(start_pos, num_tokens)
    out = getattr(case, kernel)()
    assert out.shape == case.q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, case.reference(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["paged", "flash"])
@pytest.mark.parametrize("sliding_window", [1, 7, 20, 40])
def test_sliding_window(kernel, sliding_window):
    case = Case([5, 37, 70], num_tokens=4)
    out = getattr(case, kernel)(sliding_window)
    torch.testing.assert_close(out, case.reference(sliding_window), atol=1e-5, rtol=1e-5)
    # A window shorter than the context really changes the result.
    assert not torch.allclose(out[1:], case.reference(0)[1:], atol=1e-3)


@pytest.mark.parametrize("partition_len", [64, 128])
@pytest.mark.parametrize("sliding_window", [0, 100])
def test_flash_equals_paged_across_partitions(partition_len, sliding_window):
    # max_blocks=4 partitions; the longest sequence reaches into the 4th partition,
    # the shortest stays in the first (so later partitions are masked rows for it).
    length = 4 * partition_len
    case = Case([10, length // 2 + 3, length - 6], num_tokens=3, block_size=partition_len, max_blocks=4, seed=1)
    paged, flash = case.paged(sliding_window), case.flash(sliding_window)
    torch.testing.assert_close(flash, paged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flash, case.reference(sliding_window), atol=1e-5, rtol=1e-5)


# bf16 has an 8-bit mantissa (eps 2^-8 ~ 0.004): scores, probabilities and the output are
# each rounded once, so outputs (weighted means of N(0,1) values) land within ~2e-2.
BF16_ATOL = 2e-2


@pytest.mark.parametrize("kernel", ["paged", "flash"])
def test_bf16_inputs_against_fp32_reference(kernel):
    case = Case([0, 37, 70], num_tokens=5, dtype=torch.bfloat16, seed=2)
    out = getattr(case, kernel)()
    assert out.dtype == torch.bfloat16
    # The reference sees the same bf16-rounded inputs, computed in fp32.
    reference = case.reference()
    torch.testing.assert_close(out.float(), reference, atol=BF16_ATOL, rtol=0)
    assert (out.float() - reference).abs().mean() < 2e-3  # typically ~7e-4


@pytest.mark.parametrize("kernel", ["paged", "flash"])
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, BF16_ATOL)])
def test_prompt_chunk_after_a_cached_prefix(kernel, dtype, atol):
    """Rows at the same position with several queries (a prompt chunk after earlier chunks, here
    straddling blocks): the prefix and the chunk are attended apart and combined by log-sum-exp."""
    case = Case([37, 37], num_tokens=9, dtype=dtype, seed=3)
    out = getattr(case, kernel)()
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), case.reference(), atol=atol, rtol=1e-5 if dtype == torch.float32 else 0)


@pytest.mark.parametrize("kernel", ["paged", "flash"])
def test_unwritten_cache_memory_does_not_leak(kernel):
    """Positions past a sequence's last query hold garbage (here NaN); weight 0 must mean 0."""
    case = Case([3, 37, 70], num_tokens=4)
    reference = case.reference()
    poisoned = torch.full((case.num_blocks, case.block_size), True)  # [block, offset]
    for b in range(case.batch):
        for p in range(int(case.start_pos[b]) + 4):
            poisoned[case.block_tables[b, p // case.block_size], p % case.block_size] = False
    blocks, offsets = poisoned.nonzero(as_tuple=True)
    case.k_cache[blocks, :, offsets] = float("nan")
    case.v_cache[blocks, :, offsets] = float("nan")
    torch.testing.assert_close(getattr(case, kernel)(), reference, atol=1e-5, rtol=1e-5)


def test_flash_skips_partitions_outside_every_window():
    # Queries at 70.. and 85.. with a window of 10 never look below position 61, so
    # partitions 0-2 (positions 0-47) and 6 (96-111) must not even be read: poison them.
    case = Case([70, 85], num_tokens=2, block_size=16, max_blocks=7)
    reference = case.reference(sliding_window=10)
    skipped_blocks = case.block_tables[:, [0, 1, 2, 6]].flatten().long()
    case.k_cache[skipped_blocks] = float("nan")
    case.v_cache[skipped_blocks] = float("nan")
    torch.testing.assert_close(case.flash(sliding_window=10), reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["paged", "flash"])
def test_padding_rows_read_nothing_and_output_zeros(kernel):
    """start_pos < 0 marks a padding row of a larger compiled batch."""
    case = Case([37, 5, 70], num_tokens=1)
    reference = case.reference()
    case.start_pos[0] = -1
    case.block_tables[0] = 10_000  # would be out of bounds if the row were read at all
    out = getattr(case, kernel)()
    assert not out[0].any()
    torch.testing.assert_close(out[1:], reference[1:], atol=1e-5, rtol=1e-5)


def test_flash_requires_partition_equal_block_size():
    case = Case([0, 5], num_tokens=1)
    with pytest.raises(ValueError, match="partition_len"):
        torch.ops.rbln.flash_attention(
            case.q, case.k_cache, case.v_cache, case.block_tables, case.start_pos, case.scale, 0, 32
        )


def test_attention_position_beyond_cache_raises():
    case = Case([0, 90], num_tokens=8)  # 90 + 7 >= 6 blocks * 16
    with pytest.raises(ValueError, match="beyond the KV cache"):
        case.paged()


# --------------------------------------------------------------------------- kv_cache_update


def test_kv_cache_update_writes_positions_through_block_table():
    g = torch.Generator().manual_seed(3)
    block_size, max_blocks, num_blocks = 4, 3, 8
    block_tables = torch.tensor([[5, 1, 7], [2, 6, 0]], dtype=torch.int32)
    start_pos = torch.tensor([2, 7], dtype=torch.int32)  # chunks cross a block boundary
    k = torch.randn(2, NUM_KV_HEADS, 3, HEAD_DIM, generator=g)
    v = torch.randn(2, NUM_KV_HEADS, 3, HEAD_DIM, generator=g)
    k_cache = torch.zeros(num_blocks, NUM_KV_HEADS, block_size, HEAD_DIM, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)

    torch.ops.rbln.kv_cache_update(k_cache, v_cache, k, v, block_tables, start_pos)

    expected_k, expected_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    for b in range(2):
        for t in range(3):
            p = int(start_pos[b]) + t
            expected_k[block_tables[b, p // block_size], :, p % block_size] = k[b, :, t].bfloat16()
            expected_v[block_tables[b, p // block_size], :, p % block_size] = v[b, :, t].bfloat16()
    assert torch.equal(k_cache, expected_k)  # cast to the cache dtype; nothing else touched
    assert torch.equal(v_cache, expected_v)


def test_kv_cache_update_refuses_out_of_bounds():
    k_cache = torch.zeros(4, 1, 4, 2)
    v_cache = torch.zeros_like(k_cache)
    block_tables = torch.tensor([[0, 1]], dtype=torch.int32)  # 8 positions
    k = torch.ones(1, 1, 2, 2)
    with pytest.raises(ValueError, match="beyond the KV cache"):
        torch.ops.rbln.kv_cache_update(k_cache, v_cache, k, k, block_tables, torch.tensor([7], dtype=torch.int32))
    with pytest.raises(ValueError, match="outside"):
        torch.ops.rbln.kv_cache_update(
            k_cache, v_cache, k, k, torch.tensor([[0, 9]], dtype=torch.int32), torch.tensor([5], dtype=torch.int32)
        )
    assert not k_cache.any()  # failed calls wrote nothing


def test_kv_cache_update_skips_padding_rows():
    k_cache = torch.zeros(4, 1, 4, 2)
    v_cache = torch.zeros_like(k_cache)
    block_tables = torch.tensor([[0, 1], [0, 1]], dtype=torch.int32)  # padding row points at row 1's blocks
    k = torch.stack([torch.full((1, 1, 2), 9.0), torch.ones(1, 1, 2)])
    torch.ops.rbln.kv_cache_update(k_cache, v_cache, k, k, block_tables, torch.tensor([-1, 2], dtype=torch.int32))
    assert k_cache[0, 0, 2].tolist() == [1.0, 1.0]
    assert not (k_cache == 9.0).any()


def test_update_then_attend_prefill_chunks_and_decode():
    """Chunked prefill then decode through the two ops equals attention on the whole sequence."""
    g = torch.Generator().manual_seed(4)
    block_size, max_blocks, total = 8, 5, 29
    block_tables = shuffled_block_tables(2, max_blocks, 12, g)
    k = torch.randn(2, NUM_KV_HEADS, total, HEAD_DIM, generator=g)
    v = torch.randn(2, NUM_KV_HEADS, total, HEAD_DIM, generator=g)
    q = torch.randn(2, NUM_HEADS, total, HEAD_DIM, generator=g)
    k_cache = torch.zeros(12, NUM_KV_HEADS, block_size, HEAD_DIM)
    v_cache = torch.zeros_like(k_cache)
    scale = HEAD_DIM**-0.5
    expected = reference_attention(q, k, v, torch.zeros(2, dtype=torch.int32), scale)

    steps = [(0, 11), (11, 11), (22, 5), (27, 1), (28, 1)]  # two chunks, a short one, two decodes
    for start, num_tokens in steps:
        chunk = slice(start, start + num_tokens)
        start_pos = torch.full((2,), start, dtype=torch.int32)
        torch.ops.rbln.kv_cache_update(k_cache, v_cache, k[:, :, chunk], v[:, :, chunk], block_tables, start_pos)
        out = torch.ops.rbln.paged_attention(q[:, :, chunk], k_cache, v_cache, block_tables, start_pos, scale, 0)
        torch.testing.assert_close(out, expected[:, :, chunk], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- cost


def cost_args(start_pos, num_tokens, device="cpu", dtype=torch.bfloat16):
    batch, block_size, max_blocks = len(start_pos), 16, 8
    q = torch.zeros(batch, NUM_HEADS, num_tokens, HEAD_DIM, dtype=dtype, device=device)
    k_cache = torch.zeros(20, NUM_KV_HEADS, block_size, HEAD_DIM, dtype=dtype, device=device)
    block_tables = torch.zeros(batch, max_blocks, dtype=torch.int32, device=device)
    start = torch.tensor(start_pos, dtype=torch.int32, device=device)
    return q, k_cache, block_tables, start


def test_kernel_op_names_are_canonical():
    assert KERNEL_OPS == tuple(
        str(getattr(torch.ops.rbln, name).default) for name in ("kv_cache_update", "paged_attention", "flash_attention",
                                                                "local_kv_cache_update", "local_attention",
                                                                "moe_experts")
    )


@pytest.mark.parametrize("op", ["rbln.paged_attention.default", "rbln.flash_attention.default"])
def test_attention_cost_counts_actual_lengths(op):
    q, k_cache, block_tables, start_pos = cost_args([10, 30], num_tokens=2)
    args = (q, k_cache, k_cache, block_tables, start_pos, 0.25, 0, 16)
    flops, read, written = attention_cost(op, args)
    kv_positions = (10 + 2) + (30 + 2)
    assert flops == 4 * NUM_HEADS * 2 * HEAD_DIM * kv_positions
    kv_bytes = kv_positions * NUM_KV_HEADS * HEAD_DIM * 2 * 2  # K and V, bf16
    assert read == q.numel() * 2 + kv_bytes + block_tables.numel() * 4 + 2 * 4
    assert written == q.numel() * 2


def test_attention_cost_sliding_window_caps_kv_read():
    q, k_cache, block_tables, start_pos = cost_args([10, 100], num_tokens=2)
    args = (q, k_cache, k_cache, block_tables, start_pos, 0.25, 32)
    flops, _, _ = attention_cost(KERNEL_OPS[1], args)
    kv_positions = 12 + (32 + 2 - 1)  # the short sequence fits in its window
    assert flops == 4 * NUM_HEADS * 2 * HEAD_DIM * kv_positions


def test_attention_cost_padding_rows_and_device_width():
    q, k_cache, block_tables, start_pos = cost_args([-1, 30], num_tokens=1, dtype=torch.float32)
    args = (q, k_cache, k_cache, block_tables, start_pos, 0.25, 0)
    flops, read, written = attention_cost(KERNEL_OPS[1], args)
    assert flops == 4 * NUM_HEADS * HEAD_DIM * 31  # the padding row reads no KV
    # Host emulation in fp32, priced at the device's 16-bit width.
    flops16, read16, written16 = attention_cost(KERNEL_OPS[1], args, float_bytes=2)
    assert flops16 == flops and written16 == written // 2
    index_bytes = block_tables.numel() * 4 + 2 * 4  # integer tensors keep their width
    assert read16 - index_bytes == (read - index_bytes) // 2


def test_attention_cost_fake_tensors_assume_full_length():
    q, k_cache, block_tables, start_pos = cost_args([10, 30], num_tokens=1, device="meta")
    flops, read, _ = attention_cost(KERNEL_OPS[1], (q, k_cache, k_cache, block_tables, start_pos, 0.25, 0))
    full = 8 * 16  # max_blocks * block_size, for each of the 2 sequences
    assert flops == 4 * NUM_HEADS * 1 * HEAD_DIM * 2 * full

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake_args = cost_args([10, 30], num_tokens=1)
    fake_flops, fake_read, _ = attention_cost(KERNEL_OPS[1], (fake_args[0], fake_args[1], fake_args[1], *fake_args[2:], 0.25, 0))
    assert (fake_flops, fake_read) == (flops, read)


def test_kv_cache_update_cost():
    q, k_cache, block_tables, start_pos = cost_args([0, 5], num_tokens=3, dtype=torch.float32)
    k = torch.zeros(2, NUM_KV_HEADS, 3, HEAD_DIM)  # fp32 in, written as bf16
    bf16_cache = k_cache.bfloat16()
    flops, read, written = attention_cost(KERNEL_OPS[0], (bf16_cache, bf16_cache, k, k, block_tables, start_pos))
    assert flops == 0
    assert read == 2 * k.numel() * 4 + block_tables.numel() * 4 + 2 * 4
    assert written == 2 * k.numel() * 2
    with pytest.raises(ValueError, match="unknown op"):
        attention_cost("aten.mm.default", ())


# --------------------------------------------------------------------------- torch.export


class PagedAttentionLayer(torch.nn.Module):
    """Holds the KV cache as buffers: update it in place, then attend over it."""

    def __init__(self, num_blocks, block_size, flash=False):
        super().__init__()
        shape = (num_blocks, NUM_KV_HEADS, block_size, HEAD_DIM)
        self.register_buffer("k_cache", torch.zeros(shape))
        self.register_buffer("v_cache", torch.zeros(shape))
        self.block_size = block_size
        self.flash = flash

    def forward(self, q, k, v, block_tables, start_pos):
        torch.ops.rbln.kv_cache_update(self.k_cache, self.v_cache, k, v, block_tables, start_pos)
        if self.flash:
            return torch.ops.rbln.flash_attention(
                q, self.k_cache, self.v_cache, block_tables, start_pos, 0.25, 0, self.block_size
            )
        return torch.ops.rbln.paged_attention(q, self.k_cache, self.v_cache, block_tables, start_pos, 0.25, 0)


@pytest.mark.parametrize("flash", [False, True])
def test_export_keeps_kernels_and_in_place_cache_update(flash):
    g = torch.Generator().manual_seed(5)
    block_tables = torch.tensor([[3, 0, 5], [1, 4, 2]], dtype=torch.int32)
    start_pos = torch.tensor([6, 13], dtype=torch.int32)
    q = torch.randn(2, NUM_HEADS, 4, HEAD_DIM, generator=g)
    k = torch.randn(2, NUM_KV_HEADS, 4, HEAD_DIM, generator=g)
    v = torch.randn(2, NUM_KV_HEADS, 4, HEAD_DIM, generator=g)
    args = (q, k, v, block_tables, start_pos)

    ep = torch.export.export(PagedAttentionLayer(6, 8, flash), args)

    calls = [node for node in ep.graph.nodes if node.op == "call_function"]
    targets = [str(node.target) for node in calls]
    attention_op = KERNEL_OPS[2] if flash else KERNEL_OPS[1]
    assert targets == [KERNEL_OPS[0], attention_op]  # the ops as-is, nothing functionalized
    update = calls[0]
    buffer_inputs = ep.graph_signature.inputs_to_buffers
    assert [buffer_inputs[arg.name] for arg in update.args[:2]] == ["k_cache", "v_cache"]
    assert calls[1].args[1:3] == update.args[:2]  # attention reads the very buffers just updated
    assert not ep.graph_signature.buffers_to_mutate  # mutation happens inside the graph

    eager_layer = PagedAttentionLayer(6, 8, flash)
    expected = eager_layer(*args)
    exported = ep.module()
    torch.testing.assert_close(exported(*args), expected, rtol=0, atol=0)
    torch.testing.assert_close(exported.k_cache, eager_layer.k_cache, rtol=0, atol=0)
    assert exported.k_cache.any()


# --------------------------------------------------------------------------- explicit attention mask


@pytest.mark.parametrize("kernel", ["paged", "flash"])
@pytest.mark.parametrize("start_pos, num_tokens", [([0, 37, 70], 5), ([3, 50, 90], 1)])
def test_attention_mask_hides_the_keys_it_zeroes(kernel, start_pos, num_tokens):
    """An explicit mask [B, positions] (graphs compiled with rbln_use_attention_mask) is ANDed
    with causality: hide a few keys per row (never the query's own position)."""
    case = Case(start_pos, num_tokens)
    g = torch.Generator().manual_seed(11)
    positions = case.block_tables.shape[1] * case.block_size
    mask = (torch.rand(case.batch, positions, generator=g) > 0.3).to(torch.int32)
    for b, start in enumerate(start_pos):
        mask[b, start : start + num_tokens] = 1
    if kernel == "paged":
        out = torch.ops.rbln.paged_attention(case.q, case.k_cache, case.v_cache, case.block_tables, case.start_pos,
                                             case.scale, 0, mask)
    else:
        out = torch.ops.rbln.flash_attention(case.q, case.k_cache, case.v_cache, case.block_tables, case.start_pos,
                                             case.scale, 0, case.block_size, mask)
    expected = reference_attention(case.q, case.k, case.v, case.start_pos, case.scale, key_mask=mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # and the mask matters: without it the result differs
    assert not torch.allclose(out, reference_attention(case.q, case.k, case.v, case.start_pos, case.scale), atol=1e-3)


def test_attention_mask_on_the_single_block_fast_path():
    """Eager layout (block = whole sequence): the slice + SDPA path honours the mask too."""
    case = Case([10, 20], 1, block_size=96, max_blocks=1)
    mask = torch.ones(2, 96, dtype=torch.int32)
    mask[:, 2:6] = 0
    out = torch.ops.rbln.paged_attention(case.q, case.k_cache, case.v_cache, case.block_tables, case.start_pos,
                                         case.scale, 0, mask)
    expected = reference_attention(case.q, case.k, case.v, case.start_pos, case.scale, key_mask=mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
