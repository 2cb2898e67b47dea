"""The decoder in the device's static form: fixed shapes, a paged KV cache as device state.

One `StaticDecoder` is one compiled graph. Prefill takes one sequence's chunk of
`prefill_chunk_size` tokens; decode takes one token for each of `batch` sequences. Both
reuse the Hugging Face model's own modules (embeddings, norms, projections, LM head; Q/K/V
and gate/up merged into one matmul each), found through the family's layout (`layouts.py`:
Llama's names, shared by most families, GPT-2's and OPT's), so a family needs no code of its
own. What changes is attention: K/V are written into the paged cache and attention
runs over it with the device's kernels (`torch.ops.rbln.*`), and RoPE uses cos/sin
tables precomputed by the HF model's rotary embedding (every RoPE variant it implements with
fixed tables - default, llama3, linear, yarn - and one table per layer type for Gemma 3);
families with learned absolute positions add their table's rows to the embeddings instead.

Inputs of a graph:
    input_ids    int64 [batch, T]     (or inputs_embeds [batch, T, hidden])
    start_pos    int32 [batch]         position of the first token; < 0 marks a padding row
    block_tables int32 [batch, max_blocks_per_seq]
    query_position int64 [1]           prefill only: which token of the chunk to return logits for
    attention_mask int32 [batch, max_seq_len]   with use_attention_mask only: 1 = key position visible
    adapter_slots int32 [batch]        with LoRA adapters only: each row's adapter (0 = none; lora_layers.py)
Output: logits [batch, 1, vocab] (a sequence classifier: its scores; a headless model: the
hidden states of every token of the chunk, [1, T, hidden]).
"""

from __future__ import annotations

import torch
from torch import nn

from ...sim_device import kernels  # noqa: F401  (registers torch.ops.rbln.*)
from .kv_cache import KVCacheLayout
from .layouts import DecoderParts, GatedMLP, LayerParts, layer_sliding_windows, layout_for


def make_kv_caches(layout: KVCacheLayout, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (K, V) pair per layer, zeros, shared by every graph of a model."""
    return [
        (torch.zeros(layout.layer_shape(i), dtype=dtype), torch.zeros(layout.layer_shape(i), dtype=dtype))
        for i in range(layout.num_layers)
    ]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first cos.shape[-1] dims of each head (all of them unless the family rotates part
    of the head, as Phi-3's partial_rotary_factor does); the rest pass through."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    turned, kept = x[..., :rotary], x[..., rotary:]
    return torch.cat((turned * cos + _rotate_half(turned) * sin, kept), dim=-1)


class DecoderLayer(nn.Module):
    """One HF decoder layer in device form (`layouts.LayerParts`): Q/K/V as one matmul, the MLP as
    its family has it; norms, projections and activations are the HF modules themselves.

    The same math with fewer, larger matmuls, as vLLM and NPU compilers lay it out.
    """

    # Object ids of this process, never read by forward: not part of a compile cache key.
    cache_key_ignores = ("merged_parameter_ids",)

    def __init__(self, parts: LayerParts):
        super().__init__()
        self.input_layernorm = parts.attn_norm
        self.post_attention_layernorm = parts.mlp_norm  # Llama's name for the norm before the MLP
        self.post_attn_norm = parts.post_attn_norm
        self.post_mlp_norm = parts.post_mlp_norm
        self.qkv_proj = parts.qkv_proj
        self.qkv_sizes = list(parts.qkv_sizes)
        self.o_proj = parts.o_proj
        self.q_norm = parts.q_norm  # Qwen3 / Gemma 3 per-head norms
        self.k_norm = parts.k_norm
        # The MLP's modules sit on the layer itself (layers.0.gate_up_proj, layers.0.down_proj, ...: the
        # weight names of the compiled programs, which tensor-parallel plans and LoRA name), run by
        # the MLP class's forward.
        for name, child in parts.mlp.named_children():
            setattr(self, name, child)
        self.mlp_type = type(parts.mlp)
        self.scale = parts.scale
        self.softcap = parts.softcap
        self.norm_after = parts.norm_after
        self.rope_kind = parts.rope_kind
        # The HF parameters copied into new modules (ids only: no second reference to them).
        self.merged_parameter_ids = frozenset(parts.copied)
        self.lora = None  # matmul name -> LoRADelta, when compiled with adapters (lora_layers.attach_lora)

    def project(self, name: str, hidden: torch.Tensor, adapter_slots: torch.Tensor | None) -> torch.Tensor:
        """The matmul `name` (qkv_proj, o_proj, gate_up_proj, down_proj), plus its adapters' delta."""
        out = getattr(self, name)(hidden)
        if self.lora is not None and name in self.lora:
            out = out + self.lora[name](hidden, adapter_slots)
        return out

    def mlp(self, hidden: torch.Tensor, adapter_slots: torch.Tensor | None = None) -> torch.Tensor:
        if self.lora is not None and self.mlp_type is GatedMLP:  # adapters on gate_up_proj / down_proj
            gate, up = self.project("gate_up_proj", hidden, adapter_slots).chunk(2, dim=-1)
            return self.project("down_proj", self.act_fn(gate) * up, adapter_slots)
        if self.lora is not None and any(name in self.lora for name in ("gate_up_proj", "down_proj")):
            raise ValueError(f"LoRA adapters target gate/up/down projections, but this family's MLP is a "
                             f"{self.mlp_type.__name__}: the decoder applies adapters to gated MLPs only")
        return self.mlp_type.forward(self, hidden)

    def block(self, hidden: torch.Tensor, attention, adapter_slots: torch.Tensor | None = None) -> torch.Tensor:
        """The layer on `hidden`, with `attention(layer, x)` the attention sub-block."""
        if self.norm_after:  # post-LN (OPT-350m): normalise after each residual add
            hidden = self.input_layernorm(hidden + attention(self, hidden))
            return self.post_attention_layernorm(hidden + self.mlp(hidden, adapter_slots))
        out = attention(self, self.input_layernorm(hidden))
        hidden = hidden + (out if self.post_attn_norm is None else self.post_attn_norm(out))
        out = self.mlp(self.post_attention_layernorm(hidden), adapter_slots)
        return hidden + (out if self.post_mlp_norm is None else self.post_mlp_norm(out))


def merge_layers(causal_lm: nn.Module, copy_weights: bool = True) -> DecoderParts:
    """The model's parts in device form (`layouts.DecoderParts`, its layers as `DecoderLayer`s),
    built once and shared by every graph of a model (without `copy_weights`, the merged matmuls on
    the meta device: only to check the model).

    Raises ValueError if the HF model has a parameter the static decoder would not use (a
    family with a module the decoder layer does not know would otherwise compile without it
    and silently give wrong tokens).
    """
    parts = layout_for(causal_lm.config).parts(causal_lm, copy_weights=copy_weights)
    layers = nn.ModuleList(DecoderLayer(layer) for layer in parts.layers)
    parts.layers = layers
    # Exactly the modules StaticDecoder holds, plus what the new modules were copied from.
    held = [parts.embed, parts.final_norm, parts.lm_head, layers]
    if parts.positions is not None:
        held.append(parts.positions)
    used = {id(p) for module in held for p in module.parameters()} | parts.copied
    for layer in layers:
        used |= layer.merged_parameter_ids
    unused = [name for name, p in causal_lm.named_parameters() if id(p) not in used]
    if unused:
        shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        raise ValueError(
            f"{type(causal_lm).__name__} has parameters the NPU decoder would not use: {shown}. "
            "Its architecture is not a layout this decoder compiles; compiling it would drop "
            "these weights and give wrong tokens."
        )
    return parts


class StaticDecoder(nn.Module):
    def __init__(
        self,
        causal_lm: nn.Module,
        parts: DecoderParts,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]],
        phase: str,
        attn_impl: str,
        partition_len: int | None = None,
        use_inputs_embeds: bool = False,
        use_attention_mask: bool = False,
        use_lora: bool = False,
        ring_layers: tuple[int, ...] = (),
    ):
        super().__init__()
        if phase not in ("prefill", "decode"):
            raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
        config = causal_lm.config
        self.phase = phase
        self.attn_impl = attn_impl
        self.partition_len = partition_len
        self.use_inputs_embeds = use_inputs_embeds
        self.use_attention_mask = use_attention_mask
        self.use_lora = use_lora
        self.embed_tokens = parts.embed
        self.embed_positions = parts.positions
        self.layers = parts.layers
        self.norm = parts.final_norm
        self.lm_head = parts.lm_head
        self.logit_softcap = parts.logit_softcap
        self.all_tokens = parts.all_tokens
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = layout_for(config).num_kv_heads(config)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.sliding_windows = layer_sliding_windows(config)
        self.ring_layers = tuple(ring_layers)  # their K/V in a ring of the window (cache_impl sliding_window / hybrid)
        # Registered under the same names in every graph, so graphs share them on the device: the
        # first kind of table as rope_cos / rope_sin, others (Gemma 3's local RoPE) with their kind.
        self.rope_buffers: dict[str, tuple[str, str]] = {}
        for i, (kind, (cos, sin)) in enumerate(rope.items()):
            suffix = "" if i == 0 else f"_{kind}"
            self.rope_buffers[kind] = (f"rope_cos{suffix}", f"rope_sin{suffix}")
            self.register_buffer(f"rope_cos{suffix}", cos, persistent=False)
            self.register_buffer(f"rope_sin{suffix}", sin, persistent=False)
        for i, (k_cache, v_cache) in enumerate(kv_caches):
            self.register_buffer(f"k_cache_{i}", k_cache, persistent=False)
            self.register_buffer(f"v_cache_{i}", v_cache, persistent=False)

    def _attention(self, layer_index: int, layer: DecoderLayer, hidden, rope, start_pos, block_tables, mask,
                   adapter_slots=None):
        batch, tokens, _ = hidden.shape
        q, k, v = layer.project("qkv_proj", hidden, adapter_slots).split(layer.qkv_sizes, dim=-1)
        q = q.reshape(batch, tokens, self.num_heads, self.head_dim)
        k = k.reshape(batch, tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(batch, tokens, self.num_kv_heads, self.head_dim)
        if layer.q_norm is not None:  # before RoPE
            q, k = layer.q_norm(q), layer.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if layer.rope_kind is not None:
            cos, sin = rope[layer.rope_kind]
            q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        k_cache = getattr(self, f"k_cache_{layer_index}")
        v_cache = getattr(self, f"v_cache_{layer_index}")
        window = self.sliding_windows[layer_index]
        capped = (layer.softcap,) if layer.softcap else ()  # only when used: the ops' default otherwise
        if layer_index in self.ring_layers:
            torch.ops.rbln.local_kv_cache_update(k_cache, v_cache, k, v, block_tables, start_pos)
            out = torch.ops.rbln.local_attention(q, k_cache, v_cache, block_tables, start_pos, layer.scale, window, *capped)
            out = out.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
            return layer.project("o_proj", out, adapter_slots)
        torch.ops.rbln.kv_cache_update(k_cache, v_cache, k, v, block_tables, start_pos)
        if self.attn_impl == "flash_attn":
            out = torch.ops.rbln.flash_attention(
                q, k_cache, v_cache, block_tables, start_pos, layer.scale, window, self.partition_len, mask, *capped
            )
        else:
            out = torch.ops.rbln.paged_attention(q, k_cache, v_cache, block_tables, start_pos, layer.scale, window, mask,
                                                 *capped)
        out = out.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        return layer.project("o_proj", out, adapter_slots)

    def forward(self, inputs, start_pos, block_tables, *extra_inputs):
        # The graph's inputs are positional: prefill adds query_position, then the mask if used, then
        # the adapter slots with LoRA.
        extra = list(extra_inputs)
        query_position = extra.pop(0) if self.phase == "prefill" else None
        attention_mask = extra.pop(0) if self.use_attention_mask else None
        adapter_slots = extra.pop(0) if self.use_lora else None
        hidden = inputs if self.use_inputs_embeds else self.embed_tokens(inputs)
        tokens = hidden.shape[1]
        # Padding rows have start_pos < 0; any valid table index will do for them.
        positions = (start_pos[:, None].long() + torch.arange(tokens, device=start_pos.device)[None, :]).clamp(min=0)
        if self.embed_positions is not None:
            hidden = hidden + self.embed_positions(positions)
        rope = {kind: (getattr(self, cos)[positions].unsqueeze(1).to(hidden.dtype),  # [batch, 1, T, rotary_dim]
                       getattr(self, sin)[positions].unsqueeze(1).to(hidden.dtype))
                for kind, (cos, sin) in self.rope_buffers.items()}
        for i, layer in enumerate(self.layers):
            hidden = layer.block(hidden, lambda lay, x, i=i: self._attention(i, lay, x, rope, start_pos, block_tables,
                                                                              attention_mask, adapter_slots),
                                 adapter_slots)
        if query_position is not None and not self.all_tokens:  # prefill: only the last prompt token's logits
            hidden = hidden.index_select(1, query_position)
        logits = self.lm_head(self.norm(hidden))
        if self.logit_softcap:  # Gemma 2: final_logit_softcapping
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits
