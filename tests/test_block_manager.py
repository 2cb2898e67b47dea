"""BlockManager: physical KV blocks per batch slot; growth, freeing, exhaustion."""

import pytest
import torch

import optimum_npu.sim_device.kernels  # noqa: F401  (registers torch.ops.rbln)
from optimum_npu.modeling.decoderonly.kv_cache import BlockManager, KVCacheExhaustedError


def snapshot(manager: BlockManager):
    return manager.num_free_blocks, [manager.block_table(slot) for slot in range(manager.num_slots)]


def test_allocate_grows_with_the_sequence():
    manager = BlockManager(num_blocks=8, block_size=4, max_blocks_per_seq=3, num_slots=2)
    manager.allocate(0, 0)
    assert manager.block_table(0) == [] and manager.num_free_blocks == 8
    manager.allocate(0, 1)
    assert len(manager.block_table(0)) == 1
    manager.allocate(0, 4)  # still fits the first block
    assert len(manager.block_table(0)) == 1
    first = manager.block_table(0)[0]
    manager.allocate(0, 5)  # position 4 opens a second block; the first stays put
    assert len(manager.block_table(0)) == 2 and manager.block_table(0)[0] == first
    manager.allocate(0, 2)  # never shrinks
    assert len(manager.block_table(0)) == 2
    assert manager.num_free_blocks == 6


def test_slots_own_distinct_blocks_and_free_returns_them():
    manager = BlockManager(num_blocks=6, block_size=4, max_blocks_per_seq=3, num_slots=3)
    manager.allocate(0, 12)
    manager.allocate(1, 5)
    owned = manager.block_table(0) + manager.block_table(1)
    assert len(set(owned)) == 5 and manager.num_free_blocks == 1

    manager.free(0)
    assert manager.block_table(0) == [] and manager.num_free_blocks == 4
    manager.allocate(2, 12)  # reuses the freed blocks
    assert set(manager.block_table(2)) | set(manager.block_table(1)) <= set(range(6))
    assert not set(manager.block_table(2)) & set(manager.block_table(1))
    manager.free(1)
    manager.free(1)  # freeing an empty slot is a no-op
    assert manager.num_free_blocks == 3


def test_block_tables_tensor_is_padded_int32():
    manager = BlockManager(num_blocks=8, block_size=4, max_blocks_per_seq=3, num_slots=3, pad_block=7)
    manager.allocate(0, 9)
    manager.allocate(2, 1)
    tables = manager.block_tables([2, 0, 1])
    assert tables.dtype == torch.int32 and tables.shape == (3, 3)
    assert tables[0].tolist() == manager.block_table(2) + [7, 7]
    assert tables[1].tolist() == manager.block_table(0)
    assert tables[2].tolist() == [7, 7, 7]


def test_exhaustion_raises_and_changes_nothing():
    manager = BlockManager(num_blocks=4, block_size=4, max_blocks_per_seq=3, num_slots=2)
    manager.allocate(0, 9)  # 3 blocks
    manager.allocate(1, 1)  # the last one
    before = snapshot(manager)
    with pytest.raises(KVCacheExhaustedError) as excinfo:
        manager.allocate(1, 9)  # needs 2 more, 0 free
    message = str(excinfo.value)
    assert "needs 2 more block" in message and "0 of 4 blocks are free" in message
    assert "rbln_kvcache_num_blocks" in message and "rbln_batch_size" in message
    assert isinstance(excinfo.value, RuntimeError)
    assert snapshot(manager) == before

    manager.free(0)
    manager.allocate(1, 9)  # succeeds once blocks come back
    assert len(manager.block_table(1)) == 3


def test_partial_availability_allocates_nothing():
    manager = BlockManager(num_blocks=3, block_size=4, max_blocks_per_seq=3, num_slots=2)
    manager.allocate(0, 4)
    before = snapshot(manager)
    with pytest.raises(KVCacheExhaustedError):
        manager.allocate(1, 12)  # needs 3, only 2 free: must not take the 2
    assert snapshot(manager) == before


def test_invalid_requests():
    manager = BlockManager(num_blocks=8, block_size=4, max_blocks_per_seq=2, num_slots=2)
    with pytest.raises(ValueError, match="rbln_max_seq_len"):
        manager.allocate(0, 9)  # more than max_blocks_per_seq * block_size positions
    with pytest.raises(IndexError):
        manager.allocate(2, 1)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4, max_blocks_per_seq=2, num_slots=1)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=4, block_size=4, max_blocks_per_seq=2, num_slots=1, pad_block=4)
    assert manager.num_free_blocks == 8


def test_manager_tables_drive_the_kernels():
    """Two sequences growing in turn (interleaved, non-contiguous blocks) attend correctly."""
    g = torch.Generator().manual_seed(0)
    heads, head_dim, block_size, total = 2, 8, 4, 11
    manager = BlockManager(num_blocks=8, block_size=block_size, max_blocks_per_seq=3, num_slots=2)
    k_cache = torch.zeros(8, heads, block_size, head_dim)
    v_cache = torch.zeros_like(k_cache)
    k, v, q = (torch.randn(2, heads, total, head_dim, generator=g) for _ in range(3))
    scale = head_dim**-0.5

    for pos in range(total):  # one token per step: both slots grow block by block, interleaved
        for slot in (0, 1):
            manager.allocate(slot, pos + 1)
        tables = manager.block_tables([0, 1])
        start_pos = torch.full((2,), pos, dtype=torch.int32)
        step = slice(pos, pos + 1)
        torch.ops.rbln.kv_cache_update(k_cache, v_cache, k[:, :, step], v[:, :, step], tables, start_pos)
        out = torch.ops.rbln.paged_attention(q[:, :, step], k_cache, v_cache, tables, start_pos, scale, 0)

        scores = (q[:, :, step] @ k[:, :, : pos + 1].transpose(-1, -2)) * scale
        expected = torch.softmax(scores, dim=-1) @ v[:, :, : pos + 1]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    assert manager.block_table(0) != [0, 1, 2]  # the interleaving really made tables non-contiguous
