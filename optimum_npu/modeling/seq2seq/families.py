"""The encoder-decoder families: where each keeps its parts, mapped onto `graphs.py`.

A family gives its HF class, its config class and `_graph_modules`: its encoder (the HF
encoder module itself), and per decoder layer the HF projections, norms and feed-forward
(`DecoderLayer`), its decoder embedding and its head. Everything else (compiling, caches,
generation, folders) is `RBLNModelForSeq2SeqLM`'s.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BartForConditionalGeneration, T5ForConditionalGeneration

from ..transformers_pipelines import list_for_pipelines
from .configuration_seq2seq import RBLNBartForConditionalGenerationConfig, RBLNT5ForConditionalGenerationConfig
from .graphs import AttentionParts, DecoderGraph, DecoderLayer, EncoderGraph, EncoderLayerKV
from .modeling_seq2seq import RBLNModelForSeq2SeqLM, Seq2SeqShape


class TextEncoder(nn.Module):
    """(input_ids, attention_mask) -> the HF text encoder's last hidden state."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state


class FeedForward(nn.Module):
    """fc2(act(fc1(x))): BART's and Whisper's feed-forward, from the layer's own modules."""

    def __init__(self, fc1: nn.Module, act: nn.Module, fc2: nn.Module):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, act, fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TokenAndPositionEmbedding(nn.Module):
    """token embedding (scaled as the HF module scales it) + learned position embedding at
    `position + offset`, then an optional norm (BART's layernorm_embedding)."""

    def __init__(self, tokens: nn.Module, positions: nn.Module, offset: int, norm: nn.Module | None = None):
        super().__init__()
        self.tokens, self.positions, self.offset, self.norm = tokens, positions, offset, norm

    def forward(self, ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        hidden = self.tokens(ids) + nn.functional.embedding(position[:, None] + self.offset, self.positions.weight)
        return self.norm(hidden) if self.norm is not None else hidden


def bart_attention(attn: nn.Module) -> AttentionParts:
    """A BART / Whisper attention block (q_proj, k_proj, v_proj, out_proj, scaling)."""
    return AttentionParts(attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, attn.num_heads, attn.head_dim,
                          float(attn.scaling))


def bart_style_layer(layer: nn.Module, pre_norm: bool) -> DecoderLayer:
    """A BART / Whisper decoder layer (self_attn, encoder_attn, fc1 / fc2 and their norms)."""
    return DecoderLayer(bart_attention(layer.self_attn), bart_attention(layer.encoder_attn), layer.self_attn_layer_norm,
                        layer.encoder_attn_layer_norm, layer.final_layer_norm,
                        FeedForward(layer.fc1, layer.activation_fn, layer.fc2), pre_norm)


def bart_style_shape(hf_config) -> Seq2SeqShape:
    return Seq2SeqShape(hf_config.decoder_layers, hf_config.decoder_attention_heads,
                        hf_config.d_model // hf_config.decoder_attention_heads)


def bart_style_graphs(cls, hf_model, config, encode: nn.Module, embed: nn.Module, head: nn.Module, pre_norm: bool,
                      encoder_shared: nn.Module | None, decoder_shared: nn.Module | None):
    """The two graphs of a BART-style model (`hf_model.model.decoder.layers` of BART / Whisper layers)."""
    self_caches, cross_caches = cls._caches(hf_model.config, config)
    shape = cls._shape(hf_model.config)
    hf_layers = list(hf_model.model.decoder.layers)
    encoder = EncoderGraph(encoder_shared, encode, [EncoderLayerKV(bart_attention(l.encoder_attn)) for l in hf_layers],
                           cross_caches, shape.num_heads, shape.head_dim, config.batch_size)
    decoder = DecoderGraph(decoder_shared, embed, [bart_style_layer(l, pre_norm) for l in hf_layers], head, None,
                           {**self_caches, **cross_caches}, config.batch_size, config.dec_max_seq_len)
    return encoder, decoder


# ---- T5 ------------------------------------------------------------------------------------


class T5SelfBias(nn.Module):
    """T5's relative position bias of a decoder query at `position` over every cache position
    [B, heads, 1, dec_max_seq_len], from the HF bias embedding and the buckets HF computes
    (a table of positions x keys, built on the host once)."""

    def __init__(self, attention: nn.Module, dec_max_seq_len: int):
        super().__init__()
        self.relative_attention_bias = attention.relative_attention_bias
        positions = torch.arange(dec_max_seq_len)
        buckets = attention._relative_position_bucket(
            positions[None, :] - positions[:, None], bidirectional=False,
            num_buckets=attention.relative_attention_num_buckets, max_distance=attention.relative_attention_max_distance)
        self.register_buffer("buckets", buckets, persistent=False)

    def forward(self, position: torch.Tensor) -> torch.Tensor:
        return self.relative_attention_bias(self.buckets[position]).permute(0, 2, 1)[:, :, None, :]


class T5Head(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Module, scale: float):
        super().__init__()
        self.norm, self.lm_head, self.scale = norm, lm_head, scale

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden) * self.scale)


class T5Embedding(nn.Module):
    def __init__(self, tokens: nn.Module):
        super().__init__()
        self.tokens = tokens

    def forward(self, ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids)   # T5 has no absolute positions: its self-attention bias is relative


def _t5_attention(attn: nn.Module) -> AttentionParts:
    return AttentionParts(attn.q, attn.k, attn.v, attn.o, attn.n_heads, attn.key_value_proj_dim, 1.0)


class RBLNT5ForConditionalGeneration(RBLNModelForSeq2SeqLM):
    """T5 (and T5 v1.1 / Flan-T5: gated feed-forward) text-to-text generation."""

    hf_class = T5ForConditionalGeneration
    config_class = RBLNT5ForConditionalGenerationConfig

    @classmethod
    def _shape(cls, hf_config) -> Seq2SeqShape:
        return Seq2SeqShape(hf_config.num_decoder_layers, hf_config.num_heads, hf_config.d_kv)

    @classmethod
    def _position_limits(cls, hf_config):
        return None, None   # relative positions: any length

    @classmethod
    def _graph_modules(cls, hf_model, config):
        self_caches, cross_caches = cls._caches(hf_model.config, config)
        shape = cls._shape(hf_model.config)
        blocks = list(hf_model.decoder.block)
        encoder = EncoderGraph(hf_model.shared, TextEncoder(hf_model.encoder),
                               [EncoderLayerKV(_t5_attention(b.layer[1].EncDecAttention)) for b in blocks],
                               cross_caches, shape.num_heads, shape.head_dim, config.batch_size)
        layers = [DecoderLayer(_t5_attention(b.layer[0].SelfAttention), _t5_attention(b.layer[1].EncDecAttention),
                               b.layer[0].layer_norm, b.layer[1].layer_norm, b.layer[2].layer_norm,
                               b.layer[2].DenseReluDense, pre_norm=True) for b in blocks]
        hf_config = hf_model.config
        scaled = getattr(hf_config, "scale_decoder_outputs", hf_config.tie_word_embeddings)
        head = T5Head(hf_model.decoder.final_layer_norm, hf_model.lm_head, hf_config.d_model ** -0.5 if scaled else 1.0)
        decoder = DecoderGraph(hf_model.shared, T5Embedding(hf_model.decoder.embed_tokens), layers, head,
                               T5SelfBias(blocks[0].layer[0].SelfAttention, config.dec_max_seq_len),
                               {**self_caches, **cross_caches}, config.batch_size, config.dec_max_seq_len)
        return encoder, decoder


# ---- BART ----------------------------------------------------------------------------------


class BartHead(nn.Module):
    def __init__(self, lm_head: nn.Module, final_logits_bias: torch.Tensor):
        super().__init__()
        self.lm_head = lm_head
        # A constant of the checkpoint (a buffer of the HF model): a weight here, not device state.
        self.final_logits_bias = nn.Parameter(final_logits_bias.detach().clone(), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden) + self.final_logits_bias


class RBLNBartForConditionalGeneration(RBLNModelForSeq2SeqLM):
    """BART (post-norm layers, learned positions offset by 2, final_logits_bias) text generation."""

    hf_class = BartForConditionalGeneration
    config_class = RBLNBartForConditionalGenerationConfig

    @classmethod
    def _shape(cls, hf_config) -> Seq2SeqShape:
        return bart_style_shape(hf_config)

    @classmethod
    def _position_limits(cls, hf_config):
        return hf_config.max_position_embeddings, hf_config.max_position_embeddings

    @classmethod
    def _graph_modules(cls, hf_model, config):
        model, stack = hf_model.model, hf_model.model.decoder
        embed = TokenAndPositionEmbedding(stack.embed_tokens, stack.embed_positions, stack.embed_positions.offset,
                                          stack.layernorm_embedding)
        return bart_style_graphs(cls, hf_model, config, TextEncoder(model.encoder), embed,
                                 BartHead(hf_model.lm_head, hf_model.final_logits_bias), pre_norm=False,
                                 encoder_shared=model.shared, decoder_shared=model.shared)


list_for_pipelines("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING",
                   [RBLNT5ForConditionalGeneration, RBLNBartForConditionalGeneration])
