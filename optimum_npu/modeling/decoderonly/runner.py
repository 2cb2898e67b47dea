"""`DecoderRunner`: executes prefill and decode steps on a decoder's compiled runtimes.

Given the tokens, positions and block tables of sequences, it fills the graphs' fixed-shape
inputs (prefill chunks padded to the compiled chunk, decode batches padded to the smallest
compiled bucket, block tables padded to their compiled width) and returns fp32 logits. It owns
no KV bookkeeping: the caller allocates blocks (`generate()` with our `BlockManager`, a serving
engine such as vLLM with its own block ids) and passes their ids.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...sim_device import Runtime
from .compile_plan import PREFILL, decoder_graph_name
from .kv_cache import KVCacheLayout

EMBEDDING = "embed_tokens.weight"
EMBED_SCALE = "embed_tokens.embed_scale"  # Gemma's scaled embedding


class DecoderRunner:
    def __init__(self, runtime: Callable[[str], Runtime], layout: KVCacheLayout, config, vocab_size: int):
        """runtime: the runtime of a graph by name (the model's, which says why when it has none);
        config: the model's finalized RBLNDecoderOnlyModelForCausalLMConfig."""
        self.runtime = runtime
        self.layout = layout
        self.max_seq_len: int = config.max_seq_len
        self.prefill_chunk_size: int = config.prefill_chunk_size
        self.decoder_batch_sizes: tuple[int, ...] = tuple(config.decoder_batch_sizes)
        self.batch_size: int = config.batch_size
        self.vocab_size = vocab_size
        self.use_inputs_embeds: bool = config.use_inputs_embeds
        self.use_attention_mask: bool = config.use_attention_mask
        self.lora_config = config.lora_config   # None: compiled without adapters

    @property
    def clock_s(self) -> float:
        """Simulated device time so far (all graphs share one timeline): subtract two readings to
        time a step."""
        return self.runtime(PREFILL).timeline.clock_s

    def bucket_for(self, batch: int) -> int:
        """The smallest compiled decode batch that holds `batch` sequences."""
        fitting = [b for b in self.decoder_batch_sizes if b >= batch]
        if not fitting:
            raise ValueError(
                f"batch of {batch} sequences is larger than the compiled decode batch sizes "
                f"{sorted(self.decoder_batch_sizes)} (rbln_batch_size={self.batch_size}); "
                "recompile with a larger rbln_batch_size"
            )
        return min(fitting)

    def prefill_starts(self, start: int, num_tokens: int, covered: int | None = None) -> list[int]:
        """First position of each compiled chunk that prefills positions start .. start+num_tokens-1.

        A chunk is padded to the compiled size and the graph writes K/V for all of it, so a chunk
        that would run past `covered` positions (default max_seq_len; what the block table holds) is
        shifted back: its first tokens are recomputed, writing the same K/V again."""
        chunk = self.prefill_chunk_size
        limit = self.max_seq_len if covered is None else min(covered, self.max_seq_len)
        starts = [min(s, limit - chunk) for s in range(start, start + num_tokens, chunk)]
        if starts and starts[-1] < start:
            raise ValueError(
                f"prefill of positions {start}..{start + num_tokens - 1}: the compiled chunk of {chunk} tokens "
                f"would write K/V up to position {start + chunk - 1}, past the {limit} positions the block table "
                f"covers; pass a block table covering {start + chunk} positions, or prefill from an earlier "
                "position (the recomputed tokens)"
            )
        return starts

    def prefill(self, tokens: torch.Tensor, block_table: torch.Tensor, start: int = 0,
                embeds: torch.Tensor | None = None, adapter_slot: int = 0) -> torch.Tensor:
        """Prefill positions start .. start+n-1 of one sequence.

        tokens: [n] int64 (tokens before `start` are already in the KV cache: an earlier chunk, a
        prefix-cache hit); embeds: [n, hidden] instead of token ids for a model compiled with
        use_inputs_embeds (None: looked up on the host from the compiled embedding table);
        block_table: [k] int32 block ids, k <= max_blocks_per_seq (padded here). Runs the compiled
        prefill graph chunk by chunk; returns the fp32 logits [vocab] of the last token. adapter_slot:
        the compiled LoRA adapter to apply (`adapter_slots`; 0: none)."""
        source = self._step_input(tokens, embeds)
        length = source.shape[0]
        if length == 0:
            raise ValueError("prefill needs at least one token")
        if start < 0 or start + length > self.max_seq_len:
            raise ValueError(f"prefill of positions {start}..{start + length - 1} is outside 0..{self.max_seq_len - 1} "
                             f"(rbln_max_seq_len={self.max_seq_len})")
        table = self._pad_tables(block_table.reshape(1, -1))
        covered = block_table.numel() * self.layout.block_size
        if covered < start + length:
            raise ValueError(f"the block table of {block_table.numel()} block(s) of {self.layout.block_size} covers "
                             f"{covered} positions; prefilling up to position {start + length - 1} needs "
                             f"{self.layout.blocks_for(start + length)}")
        logits = None
        for _, _, logits in self._prefill_chunks(source, table, start, covered, adapter_slot):
            pass
        return logits[0, -1]

    def prefill_hidden(self, tokens: torch.Tensor, block_table: torch.Tensor,
                       embeds: torch.Tensor | None = None) -> torch.Tensor:
        """A headless model's prefill of one whole sequence (as `prefill` from position 0): the
        fp32 hidden states [n, hidden] of every token, chunk by chunk."""
        source = self._step_input(tokens, embeds)
        length = source.shape[0]
        if not 0 < length <= self.max_seq_len:
            raise ValueError(f"a sequence of {length} tokens: it must have 1 .. rbln_max_seq_len={self.max_seq_len}")
        table = self._pad_tables(block_table.reshape(1, -1))
        hidden = None
        covered = block_table.numel() * self.layout.block_size
        for chunk_start, valid, out in self._prefill_chunks(source, table, 0, covered):
            if hidden is None:
                hidden = torch.empty((length, out.shape[-1]), dtype=torch.float32)
            hidden[chunk_start : chunk_start + valid] = out[0, :valid].float()  # a shifted-back chunk rewrites the same
        return hidden

    def _prefill_chunks(self, source: torch.Tensor, table: torch.Tensor, start: int, covered: int,
                        adapter_slot: int = 0):
        """Run the prefill graph over positions start .. start+len(source)-1 of one sequence (with LoRA
        adapter `adapter_slot`, 0: none); yields (first position, valid tokens, output) per compiled chunk."""
        chunk = self.prefill_chunk_size
        runtime = self.runtime(PREFILL)
        lora = self._adapter_input([adapter_slot], 1)
        for chunk_start in self.prefill_starts(start, source.shape[0], covered):
            piece = source[chunk_start - start : chunk_start - start + chunk]
            valid = piece.shape[0]
            padded = torch.zeros((chunk, *piece.shape[1:]), dtype=piece.dtype)
            padded[:valid] = piece
            extra = [self._visible_keys([chunk_start + valid])] if self.use_attention_mask else []
            yield chunk_start, valid, runtime.run(padded[None], torch.tensor([chunk_start], dtype=torch.int32), table,
                                                  torch.tensor([valid - 1], dtype=torch.int64), *extra, *lora)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor,
               embeds: torch.Tensor | None = None, adapter_slots: list[int] | None = None) -> torch.Tensor:
        """One decode step of B sequences: tokens [B] int64 (or embeds [B, hidden]) at positions [B]
        (the position of each token), block_tables [B, k] int32, adapter_slots [B] each row's LoRA
        adapter (None: none). Runs the smallest compiled decode bucket >= B (padding rows write
        nothing); returns fp32 logits [B, vocab]."""
        source = self._step_input(tokens, embeds)
        batch = source.shape[0]
        positions = [int(p) for p in positions]
        if len(positions) != batch or block_tables.shape[0] != batch:
            raise ValueError(f"decode got {batch} tokens, {len(positions)} positions and {block_tables.shape[0]} "
                             "block tables; give one of each per sequence")
        if any(not 0 <= p < self.max_seq_len for p in positions):
            raise ValueError(f"decode positions {positions} must be in 0..{self.max_seq_len - 1} "
                             f"(rbln_max_seq_len={self.max_seq_len})")
        bucket = self.bucket_for(batch)
        ids = torch.zeros((bucket, 1, *source.shape[1:]), dtype=source.dtype)
        ids[:batch, 0] = source
        start = torch.full((bucket,), -1, dtype=torch.int32)
        start[:batch] = torch.tensor(positions, dtype=torch.int32)
        tables = torch.zeros((bucket, self.layout.max_blocks_per_seq), dtype=torch.int32)
        tables[:batch] = self._pad_tables(block_tables)
        extra = [self._visible_keys([p + 1 for p in positions] + [0] * (bucket - batch))] if self.use_attention_mask else []
        slots = [0] * batch if adapter_slots is None else [int(s) for s in adapter_slots]
        if len(slots) != batch:
            raise ValueError(f"decode got {batch} tokens and {len(slots)} adapter slots; give one per sequence")
        extra += self._adapter_input(slots + [0] * (bucket - batch), bucket)
        return self.runtime(decoder_graph_name(bucket)).run(ids, start, tables, *extra)[:batch, -1]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Host-side embedding lookup (fp32), for models compiled with use_inputs_embeds; scaled as the
        family's embedding module scales it (Gemma: sqrt(hidden), a buffer of the graph)."""
        embeds = torch.nn.functional.embedding(tokens, self.embedding_weight.float())
        prefill = self.runtime(PREFILL)
        if EMBED_SCALE in {s.name for s in prefill.program.buffers}:
            embeds = embeds * prefill.tensor(EMBED_SCALE).float()
        return embeds

    @property
    def embedding_weight(self) -> torch.Tensor:
        prefill = self.runtime(PREFILL)
        if EMBEDDING not in {s.name for s in prefill.program.weights}:
            raise ValueError("this model has no host embedding table; pass inputs_embeds to generate()")
        shard = prefill.program.tensor_shards.get(EMBEDDING)
        if shard is None:
            return prefill.tensor(EMBEDDING)
        # Split over tensor-parallel ranks (by vocabulary): the rows of each rank back in their places.
        shape = next(s.shape for s in prefill.program.weights if s.name == EMBEDDING)
        full = torch.empty(tuple(shape), dtype=prefill.tensor(EMBEDDING).dtype)
        for rank in range(len(shard.ranges)):
            full.index_copy_(shard.dim, torch.tensor(shard.indices(rank)), prefill.tensor(EMBEDDING, rank))
        return full

    def _step_input(self, tokens: torch.Tensor, embeds: torch.Tensor | None) -> torch.Tensor:
        """What the graph's first input takes: token ids, or embeddings with use_inputs_embeds."""
        if not self.use_inputs_embeds:
            if embeds is not None:
                raise ValueError("embeds needs a model compiled with rbln_use_inputs_embeds=True")
            return tokens.long()
        return embeds.float() if embeds is not None else self.embed(tokens.long())

    def _pad_tables(self, block_tables: torch.Tensor) -> torch.Tensor:
        """[B, k] block ids -> [B, max_blocks_per_seq]: unused entries 0, a block the kernels may
        gather but never attend (masked by position)."""
        rows, width = block_tables.shape
        if width > self.layout.max_blocks_per_seq:
            raise ValueError(f"block tables have {width} entries, more than max_blocks_per_seq="
                             f"{self.layout.max_blocks_per_seq} (max_seq_len {self.max_seq_len} / block size "
                             f"{self.layout.block_size})")
        tables = torch.zeros((rows, self.layout.max_blocks_per_seq), dtype=torch.int32)
        tables[:, :width] = block_tables
        return tables

    def _adapter_input(self, slots: list[int], rows: int) -> list[torch.Tensor]:
        """The adapter_slots input of a graph of `rows` rows ([] for a model without adapters, which
        only runs slot 0, the base model)."""
        if self.lora_config is None:
            if any(slots):
                raise ValueError("this model was compiled without LoRA adapters (rbln_lora_config); it runs the "
                                 "base model only")
            return []
        if any(not 0 <= s < self.lora_config.num_slots for s in slots):
            raise ValueError(f"adapter slots {slots} must be in 0..{self.lora_config.num_slots - 1} (the compiled "
                             "adapters; RBLNLoRAConfig.slot_of maps a lora_int_id to its slot)")
        return [torch.tensor(slots[:rows], dtype=torch.int32)]

    def _visible_keys(self, lengths: list[int]) -> torch.Tensor:
        """The attention_mask input: row b sees key positions 0 .. lengths[b]-1."""
        positions = torch.arange(self.max_seq_len)
        return (positions[None, :] < torch.tensor(lengths)[:, None]).to(torch.int32)
