"""One prefill or one decode step of a compiled decoder, with vLLM's blocks.

vLLM owns the KV blocks (its KV-cache manager hands them out); the compiled model's own block
manager is not used. The model's `DecoderRunner` (modeling/decoderonly/runner.py) runs the
steps; this adds what vLLM's scheduling needs on top of it.

A prefill window is always `prefill_chunk_size` tokens and writes K/V at all its positions
(the padding too), so a window must lie inside the blocks the sequence owns. vLLM splits a
prompt wherever its token budget ends, so a window can reach past them: it then starts earlier
and recomputes tokens already in the cache (the same K/V written again), which is why
`prefill` takes the sequence's tokens from position 0.
"""

from __future__ import annotations

import torch


def prefill_windows(start: int, end: int, chunk: int, owned_end: int) -> list[int]:
    """Start positions of the prefill windows that compute positions start..end-1, each window
    `chunk` long and inside positions 0..owned_end-1 (the sequence's blocks)."""
    if not 0 <= start < end <= owned_end:
        raise ValueError(f"prefill of positions {start}..{end - 1} outside the owned positions 0..{owned_end - 1}")
    if chunk > owned_end:
        raise ValueError(f"a prefill window of {chunk} tokens does not fit the {owned_end} positions owned")
    return [min(s, owned_end - chunk) for s in range(start, end, chunk)]


class CompiledDecoderSteps:
    """Prefill / decode steps of a loaded `RBLNDecoderOnlyModelForCausalLM` with caller-given
    blocks (ids of the compiled pool, 0 .. kvcache_num_blocks - 1)."""

    def __init__(self, model):
        c = model.rbln_config
        if c.use_inputs_embeds or c.use_attention_mask:
            raise ValueError("the NPU vLLM runner serves decoders compiled with token ids and no explicit "
                             "attention mask (rbln_use_inputs_embeds=False, rbln_use_attention_mask=False)")
        self.model = model
        self.runner = model.runner
        self.block_size = self.runner.layout.block_size
        self.max_seq_len = self.runner.max_seq_len
        self.prefill_chunk_size = self.runner.prefill_chunk_size
        self.decoder_batch_sizes = tuple(sorted(self.runner.decoder_batch_sizes))

    def adapter_slot(self, lora_request) -> int:
        """The compiled slot of a request's LoRA adapter (vLLM's LoRARequest; None: the base model).
        ValueError naming the compiled adapters for one the folder does not have."""
        if lora_request is None:
            return 0
        lora = self.model.rbln_config.lora_config
        if lora is None:
            raise ValueError(f"LoRARequest {lora_request.lora_name!r} (lora_int_id {lora_request.lora_int_id}), but "
                             "the served folder has no LoRA adapters compiled in (rbln_lora_config)")
        return lora.slot_of(lora_request.lora_int_id)

    def clock_s(self) -> float:
        """The simulated devices' clock (seconds of device time since the runtimes were created)."""
        return self.runner.clock_s

    def prefill(self, tokens: torch.Tensor, blocks: list[int], start: int, adapter_slot: int = 0) -> torch.Tensor:
        """Logits [vocab] of the last token after computing positions start..len(tokens)-1;
        `tokens` is the whole sequence so far (positions 0..)."""
        end = tokens.shape[0]
        owned_end = min(len(blocks) * self.block_size, self.max_seq_len)
        first = prefill_windows(start, end, self.prefill_chunk_size, owned_end)[0]
        with self.model._lock:  # the model's runtimes serve one caller at a time
            return self.runner.prefill(tokens[first:], torch.tensor(blocks, dtype=torch.int32), start=first,
                                       adapter_slot=adapter_slot)

    def decode(self, tokens: list[int], positions: list[int], blocks: list[list[int]],
               adapter_slots: list[int] | None = None) -> torch.Tensor:
        """Logits [B, vocab]: token b at positions[b] of the sequence owning blocks[b], with the
        LoRA adapter of slot adapter_slots[b] (None: none)."""
        width = max(len(row) for row in blocks)
        tables = torch.zeros((len(blocks), width), dtype=torch.int32)
        for row, row_blocks in enumerate(blocks):
            tables[row, : len(row_blocks)] = torch.tensor(row_blocks, dtype=torch.int32)
        with self.model._lock:
            return self.runner.decode(torch.tensor(tokens, dtype=torch.int64),
                                      torch.tensor(positions, dtype=torch.int64), tables, adapter_slots=adapter_slots)
