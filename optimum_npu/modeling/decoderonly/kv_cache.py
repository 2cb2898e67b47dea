"""The paged KV cache: its geometry (`KVCacheLayout`, the one place block sizes and counts are
derived) and the host-side bookkeeping of which blocks each batch slot owns (`BlockManager`).

The device holds `num_blocks` KV blocks of `block_size` positions per layer. A batch slot
(one row of the compiled decode/prefill graphs) owns a list of blocks; its block table row
maps logical block i (positions i*block_size ..) to a physical block. Blocks are handed
out as a sequence grows and returned when it finishes (nano-vllm style, without prefix
caching). A serving engine (vLLM) allocates blocks with its own manager and passes its block
ids to the runner instead.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from .layouts import layout_for


def is_kv_cache(name: str) -> bool:
    """The per-layer K / V cache buffers of a compiled decoder graph (StaticDecoder's names)."""
    return name.startswith(("k_cache_", "v_cache_"))


def blocks_per_sequence(max_seq_len: int, block_size: int) -> int:
    """Width of a block table: the blocks one sequence of max_seq_len positions spans (the config's
    rules make max_seq_len a multiple of the block size)."""
    return max_seq_len // block_size


@dataclass(frozen=True)
class KVCacheLayout:
    """Geometry of the KV pool: per layer, K and V tensors of `block_shape`."""

    num_layers: int
    num_blocks: int
    num_kv_heads: int
    block_size: int
    head_dim: int
    max_seq_len: int
    ring_layers: tuple[int, ...] = ()   # layers whose K/V live in a per-sequence ring (cache_impl sliding_window / hybrid)
    ring_len: int = 0

    @classmethod
    def from_config(cls, hf_config, config) -> KVCacheLayout:
        """From the HF model config and a finalized decoder config."""
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        return cls(num_layers=hf_config.num_hidden_layers, num_blocks=config.kvcache_num_blocks,
                   num_kv_heads=layout_for(hf_config).num_kv_heads(hf_config),
                   block_size=config.kvcache_block_size,
                   head_dim=head_dim, max_seq_len=config.max_seq_len, ring_layers=config.ring_layers,
                   ring_len=config.ring_len if config.ring_layers else 0)

    @property
    def max_blocks_per_seq(self) -> int:
        return blocks_per_sequence(self.max_seq_len, self.block_size)

    @property
    def block_shape(self) -> tuple[int, int, int, int]:
        return (self.num_blocks, self.num_kv_heads, self.block_size, self.head_dim)

    def layer_shape(self, layer: int) -> tuple[int, int, int, int]:
        """Layer `layer`'s K (and V) cache: the paged block shape, or [num_blocks, kv_heads, ring, head_dim]
        for a ring layer (the ring of a sequence is the row of its first block)."""
        if layer in self.ring_layers:
            return (self.num_blocks, self.num_kv_heads, self.ring_len, self.head_dim)
        return self.block_shape

    def bytes_per_block(self, dtype_bytes: int = 2) -> int:
        """One block of every layer, K and V (all devices together)."""
        positions = sum(self.layer_shape(i)[2] for i in range(self.num_layers))
        return 2 * self.num_kv_heads * positions * self.head_dim * dtype_bytes

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold positions 0..num_tokens-1."""
        return math.ceil(num_tokens / self.block_size)

    @property
    def pool_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def full_length_sequences(self) -> int:
        """How many sequences of max_seq_len positions the pool holds at once."""
        return self.num_blocks // self.max_blocks_per_seq

    def describe(self) -> str:
        """What the pool holds, for a user deciding how to size it."""
        return (f"{self.num_blocks} blocks of {self.block_size} positions = {self.pool_tokens} tokens, "
                f"{self.full_length_sequences} sequence(s) of max_seq_len={self.max_seq_len} at once "
                f"({self.max_blocks_per_seq} block(s) each)")


class KVCacheExhaustedError(RuntimeError):
    """No free KV blocks left for a sequence that needs to grow (or a request the pool cannot hold)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, max_blocks_per_seq: int, num_slots: int, pad_block: int = 0):
        if min(num_blocks, block_size, max_blocks_per_seq, num_slots) <= 0:
            raise ValueError(
                "BlockManager sizes must be positive, got "
                f"num_blocks={num_blocks}, block_size={block_size}, "
                f"max_blocks_per_seq={max_blocks_per_seq}, num_slots={num_slots}"
            )
        if not 0 <= pad_block < num_blocks:
            raise ValueError(f"pad_block must be a valid block index in [0, {num_blocks}), got {pad_block}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.num_slots = num_slots
        # Block tables are fixed-width tensors; unused entries need *some* in-range index
        # because the kernels gather whole rows. They are masked out (never attended), and
        # callers never write past what they allocated, so the filler is never touched.
        self.pad_block = pad_block
        # A min-heap: the lowest free block first, so a batch that starts from an empty cache gets
        # consecutive blocks, which the kernels read as one contiguous slice.
        self._free_blocks: list[int] = list(range(num_blocks))
        self._slot_blocks: list[list[int]] = [[] for _ in range(num_slots)]

    @classmethod
    def for_layout(cls, layout: KVCacheLayout, num_slots: int) -> BlockManager:
        return cls(num_blocks=layout.num_blocks, block_size=layout.block_size,
                   max_blocks_per_seq=layout.max_blocks_per_seq, num_slots=num_slots)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold positions 0..num_tokens-1."""
        return math.ceil(num_tokens / self.block_size)

    def allocate(self, slot: int, num_tokens: int) -> None:
        """Make `slot` own enough blocks for `num_tokens` positions (grows, never shrinks).

        All-or-nothing: if the blocks are not available, nothing is allocated.
        """
        self._check_slot(slot)
        needed = self.blocks_for(num_tokens)
        if needed > self.max_blocks_per_seq:
            max_tokens = self.max_blocks_per_seq * self.block_size
            raise ValueError(
                f"slot {slot}: {num_tokens} tokens exceed the per-sequence KV capacity of {max_tokens} "
                f"({self.max_blocks_per_seq} blocks x {self.block_size}); raise rbln_max_seq_len"
            )
        owned = self._slot_blocks[slot]
        missing = needed - len(owned)
        if missing <= 0:
            return
        if missing > len(self._free_blocks):
            raise KVCacheExhaustedError(
                f"KV cache exhausted: slot {slot} needs {missing} more block(s) to hold {num_tokens} tokens, "
                f"but only {len(self._free_blocks)} of {self.num_blocks} blocks are free. "
                "Increase rbln_kvcache_num_blocks or reduce rbln_batch_size (fewer concurrent sequences)."
            )
        owned.extend(heapq.heappop(self._free_blocks) for _ in range(missing))

    def free(self, slot: int) -> None:
        """Return all blocks of `slot` to the pool."""
        self._check_slot(slot)
        for block in self._slot_blocks[slot]:
            heapq.heappush(self._free_blocks, block)
        self._slot_blocks[slot] = []

    def free_all(self) -> None:
        for slot in range(self.num_slots):
            self.free(slot)

    def block_table(self, slot: int) -> list[int]:
        """Physical blocks owned by `slot`, in logical order (a copy)."""
        self._check_slot(slot)
        return list(self._slot_blocks[slot])

    def block_tables(self, slots: list[int]) -> torch.Tensor:
        """int32 [len(slots), max_blocks_per_seq] rows for the kernels, padded with pad_block."""
        table = torch.full((len(slots), self.max_blocks_per_seq), self.pad_block, dtype=torch.int32)
        for row, slot in enumerate(slots):
            blocks = self.block_table(slot)
            table[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return table

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.num_slots})")
