"""Headless decoders: the decoder's hidden states (an embedding model) or a classifier on its last
token (sequence classification, e.g. a reranker), with transformers' own output classes.

They compile the causal LM's prefill graph with another head (none, or the classifier's `score`)
and no decode graph; a sequence longer than the prefill chunk is run chunk by chunk through the
paged KV cache, as a causal LM's prompt is. Rows of a batch run one after the other, each
without its padding (so each gets what transformers gives it on its own).

    model = RBLNQwen3Model.from_pretrained("Qwen/Qwen3-Embedding-0.6B", export=True, rbln_max_seq_len=8192)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    hidden = model(**batch).last_hidden_state                              # transformers' output
    embeddings = model.encode(**batch, pooling="last_token", normalize=True)   # [batch, hidden]
"""

from __future__ import annotations

import torch
from transformers import Qwen3ForSequenceClassification, Qwen3Model
from transformers.modeling_outputs import BaseModelOutputWithPast, SequenceClassifierOutputWithPast

from .configuration_decoderonly import (
    RBLNDecoderOnlyModelConfig,
    RBLNQwen3ForSequenceClassificationConfig,
    RBLNQwen3ModelConfig,
)
from .generation import RBLNDecoderOnlyGenerationMixin
from .modeling_decoderonly import RBLNDecoderOnlyModelBase

POOLINGS = ("last_token", "mean")


def pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """[batch, hidden] from [batch, tokens, hidden]: the last real token's state (the last position whose
    mask is 1: left or right padding alike), or the mean over the real tokens."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
    batch, tokens, _ = last_hidden_state.shape
    mask = torch.ones(batch, tokens) if attention_mask is None else attention_mask.to(last_hidden_state.dtype)
    if pooling == "mean":
        return (last_hidden_state * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    last = (torch.arange(tokens)[None, :] * mask).argmax(dim=1)
    return last_hidden_state[torch.arange(batch), last]


class _HeadlessDecoder(RBLNDecoderOnlyModelBase):
    """One prefill of each row (its padding stripped), through the KV slot 0."""

    config_class = RBLNDecoderOnlyModelConfig

    def _rows(self, input_ids, attention_mask, inputs_embeds):
        """Per row: (the positions it keeps, its token ids or None, its embeddings or None)."""
        input_ids = RBLNDecoderOnlyGenerationMixin._check_inputs(self, input_ids, attention_mask, inputs_embeds)
        if inputs_embeds is not None and not self.rbln_config.use_inputs_embeds:
            raise ValueError("inputs_embeds needs a model compiled with rbln_use_inputs_embeds=True")
        source = inputs_embeds if inputs_embeds is not None else input_ids
        rows = []
        for row in range(source.shape[0]):
            keep = attention_mask[row].bool() if attention_mask is not None else torch.ones(source.shape[1], dtype=torch.bool)
            if not keep.any():
                raise ValueError(f"row {row} is empty (its attention_mask is all zeros)")
            rows.append((keep, input_ids[row][keep] if inputs_embeds is None else None,
                         inputs_embeds[row][keep].float() if inputs_embeds is not None else None))
        return rows

    def _run_rows(self, input_ids, attention_mask, inputs_embeds, run):
        """`run(tokens, block_table, embeds)` on each row, under the model's lock; the results."""
        results = []
        with self._lock:
            try:
                for keep, tokens, embeds in self._rows(input_ids, attention_mask, inputs_embeds):
                    length = int(keep.sum())
                    if length > self.rbln_config.max_seq_len:
                        raise ValueError(f"a row has {length} tokens, more than rbln_max_seq_len="
                                         f"{self.rbln_config.max_seq_len}")
                    self.block_manager.free_all()
                    # the blocks the padded chunks write, as for a causal LM's prompt
                    self.block_manager.allocate(0, self.runner.prefill_starts(0, length)[-1] +
                                                self.rbln_config.prefill_chunk_size)
                    table = torch.tensor(self.block_manager.block_table(0), dtype=torch.int32)
                    results.append((keep, run(tokens, table, embeds)))
            finally:
                self.block_manager.free_all()
        return results


class RBLNDecoderOnlyModel(_HeadlessDecoder):
    """A headless decoder: transformers' BaseModelOutputWithPast (last_hidden_state [batch, tokens,
    hidden]; zeros at padding positions, which transformers fills with states no one reads), and
    pooled embeddings with `encode`."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs) -> BaseModelOutputWithPast:
        source = inputs_embeds if inputs_embeds is not None else input_ids
        results = self._run_rows(input_ids, attention_mask, inputs_embeds, self.runner.prefill_hidden)
        hidden = torch.zeros(source.shape[0], source.shape[1], self.config.hidden_size)
        for row, (keep, states) in enumerate(results):
            hidden[row, keep] = states
        return BaseModelOutputWithPast(last_hidden_state=hidden)

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, pooling: str = "last_token",
               normalize: bool = False) -> torch.Tensor:
        """Sentence embeddings [batch, hidden]: `pooling` "last_token" (Qwen3-Embedding's) or "mean", L2
        normalised if asked."""
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
        hidden = self.forward(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)
        pooled = pool(hidden.last_hidden_state, attention_mask, pooling)
        return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


class RBLNDecoderOnlyModelForSequenceClassification(_HeadlessDecoder):
    """A decoder with a classifier on its last token (transformers' GenericForSequenceClassification:
    the last non-padding token's score): SequenceClassifierOutputWithPast(logits [batch, num_labels])."""

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
        results = self._run_rows(input_ids, attention_mask, inputs_embeds,
                                 lambda tokens, table, embeds: self.runner.prefill(tokens, table, 0, embeds))
        return SequenceClassifierOutputWithPast(logits=torch.stack([scores for _, scores in results]))


class RBLNQwen3Model(RBLNDecoderOnlyModel):
    """Qwen3's decoder without the LM head (Qwen3-Embedding)."""

    hf_class = Qwen3Model
    config_class = RBLNQwen3ModelConfig


class RBLNQwen3ForSequenceClassification(RBLNDecoderOnlyModelForSequenceClassification):
    """Qwen3 with a classification head on its last token (a reranker's relevance score)."""

    hf_class = Qwen3ForSequenceClassification
    config_class = RBLNQwen3ForSequenceClassificationConfig
