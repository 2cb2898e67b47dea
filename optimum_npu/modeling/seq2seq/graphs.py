"""An encoder-decoder model in the device's static form: an encoder graph and a decoder graph
sharing weights and two caches as device state.

- The **encoder graph** runs the Hugging Face encoder on a whole batch, then projects its
  output through every decoder layer's cross-attention K / V projections and writes the
  results into the **cross-attention cache** (per layer, K and V of [batch, heads,
  enc_max_seq_len, head_dim]). It returns the encoder's last hidden state.
- The **decoder graph** takes one token per batch row at its position, writes the token's
  self-attention K / V into the **self-attention cache** (per layer, [batch, heads,
  dec_max_seq_len, head_dim]) and attends over it (keys up to the position) and over the
  precomputed cross-attention cache (keys the encoder's attention mask keeps); returns logits.

Both caches are the decoder-only model's paged KV cache (`decoderonly.kv_cache.KVCacheLayout`,
written by the device's `rbln::kv_cache_update` kernel) in its simplest layout: one block per
batch slot, as long as the sequence (block b is slot b), as optimum-rbln lays out Whisper's
self-attention cache. A row whose position is < 0 is padding and writes nothing.

Self-attention runs the device's paged attention kernel (`rbln::paged_attention`, as the
decoder-only models), priced by the positions written so far; a family with an additive position
bias (T5's relative buckets), which the kernel does not take, attends densely over the whole
compiled `dec_max_seq_len` (masked) instead. Cross-attention is dense over the encoder's
positions (masked by its attention mask): every step reads all of them.

A family says where its parts are (`Seq2SeqParts`: the encoder, each decoder layer's modules,
the embedding and the head); every module here reuses the HF modules themselves, so the
weights are the checkpoint's, never copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...sim_device import kernels  # noqa: F401  (registers torch.ops.rbln.*)
from ..decoderonly.kv_cache import KVCacheLayout


@dataclass(frozen=True)
class AttentionParts:
    """The projections of one attention block, and how it scales its scores."""

    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    num_heads: int
    head_dim: int
    scale: float


class DecoderLayer(nn.Module):
    """One HF decoder layer as the device runs it: self-attention over the self cache, cross-attention
    over the cross cache, feed-forward. `pre_norm`: norm -> sublayer -> residual add (T5, Whisper);
    else sublayer -> residual add -> norm (BART). `ffn` maps the normed hidden state to the
    feed-forward output (without the residual)."""

    def __init__(self, self_attn: AttentionParts, cross_attn: AttentionParts, self_norm: nn.Module,
                 cross_norm: nn.Module, ffn_norm: nn.Module, ffn: nn.Module, pre_norm: bool):
        super().__init__()
        self.self_q, self.self_k, self.self_v, self.self_o = self_attn.q, self_attn.k, self_attn.v, self_attn.o
        self.cross_q, self.cross_o = cross_attn.q, cross_attn.o
        self.self_norm, self.cross_norm, self.ffn_norm, self.ffn = self_norm, cross_norm, ffn_norm, ffn
        self.pre_norm = pre_norm
        self.num_heads, self.head_dim = self_attn.num_heads, self_attn.head_dim
        self.self_scale, self.cross_scale = self_attn.scale, cross_attn.scale

    def sublayer(self, hidden: torch.Tensor, norm: nn.Module, body) -> torch.Tensor:
        if self.pre_norm:
            return hidden + body(norm(hidden))
        return norm(hidden + body(hidden))


class EncoderLayerKV(nn.Module):
    """The cross-attention K / V projections of one decoder layer: the encoder graph applies them once."""

    def __init__(self, cross_attn: AttentionParts):
        super().__init__()
        self.k, self.v = cross_attn.k, cross_attn.v


def split_heads(x: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """[batch, tokens, heads * head_dim] -> [batch, heads, tokens, head_dim]."""
    batch, tokens, _ = x.shape
    return x.reshape(batch, tokens, num_heads, head_dim).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, visible: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, H, L, D]; `visible` [B, 1, T or 1, L] bool says
    which keys each query sees, `bias` [B, H, T, L] is added to the scores (T5's position bias).
    As transformers' eager attention: scores = q k^T * scale (+ bias), masked, softmax, times v."""
    scores = torch.matmul(q, k.to(q.dtype).transpose(2, 3)) * scale
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(visible.logical_not(), float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(weights, v.to(q.dtype))


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[batch, heads, tokens, head_dim] -> [batch, tokens, heads * head_dim]."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


def make_caches(layout: KVCacheLayout, dtype: torch.dtype, prefix: str) -> dict[str, torch.Tensor]:
    """Zero K / V buffers of every layer, named `<prefix>_k_<i>` / `<prefix>_v_<i>`."""
    return {f"{prefix}_{kv}_{i}": torch.zeros(layout.block_shape, dtype=dtype)
            for i in range(layout.num_layers) for kv in "kv"}


class EncoderGraph(nn.Module):
    """inputs (the family's encoder inputs) -> last hidden state; fills the cross-attention cache.

    `encode` is the family's module taking the graph's inputs positionally and returning the
    encoder's last hidden state [batch, enc_len, d_model]."""

    def __init__(self, shared: nn.Module | None, encode: nn.Module, kv: list[EncoderLayerKV],
                 cross_caches: dict[str, torch.Tensor], num_heads: int, head_dim: int, batch_size: int):
        super().__init__()
        if shared is not None:   # first, so that a tied embedding is named as in the decoder graph
            self.shared = shared
        self.encode = encode
        self.kv = nn.ModuleList(kv)
        self.num_heads, self.head_dim = num_heads, head_dim
        for name, tensor in cross_caches.items():
            self.register_buffer(name, tensor, persistent=False)
        # Slot b of the cache is batch row b: one block each.
        self.register_buffer("cross_slots", torch.arange(batch_size, dtype=torch.int32)[:, None], persistent=False)

    def forward(self, *inputs: torch.Tensor):
        hidden = self.encode(*inputs)
        start = torch.zeros(hidden.shape[0], dtype=torch.int32)
        for i, layer in enumerate(self.kv):
            k = split_heads(layer.k(hidden), self.num_heads, self.head_dim)
            v = split_heads(layer.v(hidden), self.num_heads, self.head_dim)
            torch.ops.rbln.kv_cache_update(getattr(self, f"cross_k_{i}"), getattr(self, f"cross_v_{i}"),
                                           k, v, self.cross_slots, start)
        return hidden


class DecoderGraph(nn.Module):
    """(decoder_input_ids [B, 1], positions int32 [B], encoder_attention_mask int64 [B, enc_len])
    -> logits [B, 1, vocab]. A row with position < 0 is padding (writes no cache, its logits are
    meaningless).

    `embed(ids [B, 1], positions [B] int64 >= 0)` -> [B, 1, d_model] and `head(hidden)` -> logits
    are the family's modules; `self_bias(positions)` -> [B, H, 1, dec_len] its additive
    self-attention bias, or None."""

    def __init__(self, shared: nn.Module | None, embed: nn.Module, layers: list[DecoderLayer], head: nn.Module,
                 self_bias: nn.Module | None, caches: dict[str, torch.Tensor], batch_size: int, dec_max_seq_len: int):
        super().__init__()
        if shared is not None:
            self.shared = shared
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.head = head
        self.self_bias = self_bias
        for name, tensor in caches.items():
            self.register_buffer(name, tensor, persistent=False)
        self.register_buffer("self_slots", torch.arange(batch_size, dtype=torch.int32)[:, None], persistent=False)
        self.register_buffer("key_positions", torch.arange(dec_max_seq_len, dtype=torch.int64), persistent=False)

    def forward(self, decoder_input_ids: torch.Tensor, positions: torch.Tensor, encoder_attention_mask: torch.Tensor):
        position = positions.long().clamp(min=0)   # padding rows: any valid position will do
        hidden = self.embed(decoder_input_ids, position)
        visible_cross = encoder_attention_mask.bool()[:, None, None, :]
        bias = visible_self = None
        if self.self_bias is not None:   # the dense path: the bias, and which cache positions each row sees
            bias = self.self_bias(position)
            visible_self = (self.key_positions[None, :] <= position[:, None])[:, None, None, :]   # [B, 1, 1, L]
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = getattr(self, f"self_k_{i}"), getattr(self, f"self_v_{i}")
            cross_k, cross_v = getattr(self, f"cross_k_{i}"), getattr(self, f"cross_v_{i}")
            heads, dim = layer.num_heads, layer.head_dim

            def self_attention(x, layer=layer, k_cache=k_cache, v_cache=v_cache):
                q = split_heads(layer.self_q(x), heads, dim)
                k = split_heads(layer.self_k(x), heads, dim)
                v = split_heads(layer.self_v(x), heads, dim)
                torch.ops.rbln.kv_cache_update(k_cache, v_cache, k, v, self.self_slots, positions)
                if bias is None:   # the device's paged kernel: it reads the positions written so far
                    out = torch.ops.rbln.paged_attention(q, k_cache, v_cache, self.self_slots, positions,
                                                         layer.self_scale, 0, None)
                else:   # an additive bias, which the kernel does not take: dense over the whole cache, masked
                    out = attend(q, k_cache, v_cache, layer.self_scale, visible_self, bias)
                return layer.self_o(merge_heads(out))

            def cross_attention(x, layer=layer, cross_k=cross_k, cross_v=cross_v):
                q = split_heads(layer.cross_q(x), heads, dim)
                return layer.cross_o(merge_heads(attend(q, cross_k, cross_v, layer.cross_scale, visible_cross)))

            hidden = layer.sublayer(hidden, layer.self_norm, self_attention)
            hidden = layer.sublayer(hidden, layer.cross_norm, cross_attention)
            hidden = layer.sublayer(hidden, layer.ffn_norm, layer.ffn)
        return self.head(hidden)
