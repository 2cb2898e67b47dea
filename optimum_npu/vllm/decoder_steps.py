"""One prefill or one decode step of a compiled decoder, given block tables from outside.

vLLM owns the KV blocks (its KV-cache manager hands them out); the compiled model's own block
manager is not used. This is the step interface the model runner drives: `prefill` runs the
new tokens of one sequence through the prefill graph chunk by chunk, `decode` runs one token of
each sequence through the smallest compiled decode bucket that holds them.

A prefill window is always `prefill_chunk_size` tokens and writes K/V at all its positions
(the padding too), so a window must lie inside the blocks the sequence owns: one that would
run past them starts earlier and recomputes tokens already in the cache (the same K/V written
again), as the compiled model's own generate() does at the end of its context.
"""

from __future__ import annotations

import torch

PREFILL = "prefill"


def prefill_windows(start: int, end: int, chunk: int, owned_end: int) -> list[int]:
    """Start positions of the prefill windows that compute positions start..end-1, each window
    `chunk` long and inside positions 0..owned_end-1 (the sequence's blocks)."""
    if not 0 <= start < end <= owned_end:
        raise ValueError(f"prefill of positions {start}..{end - 1} outside the owned positions 0..{owned_end - 1}")
    if chunk > owned_end:
        raise ValueError(f"a prefill window of {chunk} tokens does not fit the {owned_end} positions owned")
    return [min(s, owned_end - chunk) for s in range(start, end, chunk)]


class CompiledDecoderSteps:
    """Prefill / decode steps of a loaded `RBLNDecoderOnlyModelForCausalLM` with caller-given block tables.

    Block ids are the compiled pool's (0 .. kvcache_num_blocks - 1).
    """

    def __init__(self, model):
        c = model.rbln_config
        if c.use_inputs_embeds or c.use_attention_mask:
            raise ValueError("the NPU vLLM runner serves decoders compiled with token ids and no explicit "
                             "attention mask (rbln_use_inputs_embeds=False, rbln_use_attention_mask=False)")
        self.model = model
        # The decoder's own step runner (modeling/decoderonly/runner.py) where the model has one;
        # else the compiled runtimes are driven here the same way.
        self.runner = getattr(model, "runner", None)
        self.block_size = c.kvcache_block_size
        self.num_blocks = c.kvcache_num_blocks
        self.max_seq_len = c.max_seq_len
        self.max_blocks_per_seq = -(-c.max_seq_len // c.kvcache_block_size)
        self.prefill_chunk_size = c.prefill_chunk_size
        self.decoder_batch_sizes = tuple(sorted(c.decoder_batch_sizes))
        self.vocab_size = model.config.vocab_size

    def clock_s(self) -> float:
        """The simulated devices' clock (seconds of device time since the runtimes were created)."""
        return self.runner.clock_s if self.runner is not None else self.model._clock()

    def _table(self, blocks: list[int]) -> torch.Tensor:
        # Entries past a sequence's blocks are never read or written (see prefill_windows); any
        # valid index fills them.
        table = torch.zeros(self.max_blocks_per_seq, dtype=torch.int32)
        table[: len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return table

    def prefill(self, tokens: torch.Tensor, blocks: list[int], start: int) -> torch.Tensor:
        """Logits [vocab] of the last token after computing positions start..len(tokens)-1.

        `tokens` is the whole sequence so far (positions 0..), so that a window moved back to stay
        inside the sequence's blocks has the tokens it recomputes.
        """
        end = tokens.shape[0]
        owned_end = min(len(blocks) * self.block_size, self.max_seq_len)
        chunk = self.prefill_chunk_size
        windows = prefill_windows(start, end, chunk, owned_end)
        if self.runner is not None:
            with self.model._lock:  # from the first window: the runner recomputes what it moved back over
                return self.runner.prefill(tokens[windows[0]:], torch.tensor(blocks, dtype=torch.int32),
                                           start=windows[0]).reshape(-1)
        table = self._table(blocks)[None]
        runtime = self.model._runtime(PREFILL)
        logits = None
        with self.model._lock:
            for window in windows:
                piece = tokens[window : window + chunk]
                padded = torch.zeros(chunk, dtype=torch.int64)
                padded[: piece.shape[0]] = piece
                last = min(window + chunk, end) - 1 - window
                logits = runtime.run(padded[None], torch.tensor([window], dtype=torch.int32), table,
                                     torch.tensor([last], dtype=torch.int64))
        return logits.reshape(-1)

    def bucket_for(self, batch: int) -> int:
        fitting = [b for b in self.decoder_batch_sizes if b >= batch]
        if not fitting:
            raise ValueError(f"{batch} sequences in one decode step; the compiled decode batch sizes are "
                             f"{list(self.decoder_batch_sizes)}")
        return fitting[0]

    def decode(self, tokens: list[int], positions: list[int], blocks: list[list[int]]) -> torch.Tensor:
        """Logits [B, vocab]: token b at positions[b] of the sequence owning blocks[b]."""
        batch = len(tokens)
        if self.runner is not None:
            tables = torch.stack([self._table(row_blocks) for row_blocks in blocks])
            with self.model._lock:
                return self.runner.decode(torch.tensor(tokens, dtype=torch.int64),
                                          torch.tensor(positions, dtype=torch.int64), tables).reshape(batch, -1)
        bucket = self.bucket_for(batch)
        ids = torch.zeros((bucket, 1), dtype=torch.int64)
        ids[:batch, 0] = torch.tensor(tokens, dtype=torch.int64)
        start = torch.full((bucket,), -1, dtype=torch.int32)  # -1: a padding row
        start[:batch] = torch.tensor(positions, dtype=torch.int32)
        tables = torch.zeros((bucket, self.max_blocks_per_seq), dtype=torch.int32)
        for row, row_blocks in enumerate(blocks):
            tables[row] = self._table(row_blocks)
        from ..modeling.decoderonly.modeling_decoderonly import decoder_graph_name

        with self.model._lock:
            logits = self.model._runtime(decoder_graph_name(bucket)).run(ids, start, tables)
        return logits[:batch].reshape(batch, -1)
