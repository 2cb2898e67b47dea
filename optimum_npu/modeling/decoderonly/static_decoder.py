"""The decoder in the device's static form: fixed shapes, a paged KV cache as device state.

One `StaticDecoder` is one compiled graph. Prefill takes one sequence's chunk of
`prefill_chunk_size` tokens; decode takes one token for each of `batch` sequences. Both
reuse the Hugging Face model's own modules (embeddings, norms, projections, LM head; Q/K/V
and gate/up merged into one matmul each), so a family whose layers look like Llama's
(Llama, Qwen2, Mistral, ...) needs no code of its own. What changes is attention: K/V are written into the paged cache and attention
runs over it with the device's kernels (`torch.ops.rbln.*`), and RoPE uses cos/sin
tables precomputed by the HF model's rotary embedding (so every RoPE variant it
implements - default, llama3, linear, dynamic, yarn - comes for free).

Inputs of a graph:
    input_ids    int64 [batch, T]     (or inputs_embeds [batch, T, hidden])
    start_pos    int32 [batch]         position of the first token; < 0 marks a padding row
    block_tables int32 [batch, max_blocks_per_seq]
    query_position int64 [1]           prefill only: which token of the chunk to return logits for
    attention_mask int32 [batch, max_seq_len]   with use_attention_mask only: 1 = key position visible
    adapter_slots int32 [batch]        with LoRA adapters only: each row's adapter (0 = none; lora_layers.py)
Output: logits [batch, 1, vocab].
"""

from __future__ import annotations

import torch
from torch import nn

from ...sim_device import kernels  # noqa: F401  (registers torch.ops.rbln.*)
from ..quantization import QuantizedLinear
from .kv_cache import KVCacheLayout


def make_kv_caches(layout: KVCacheLayout, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (K, V) pair per layer, zeros, shared by every graph of a model."""
    return [
        (torch.zeros(layout.block_shape, dtype=dtype), torch.zeros(layout.block_shape, dtype=dtype))
        for _ in range(layout.num_layers)
    ]


def rope_tables(causal_lm: nn.Module, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, head_dim] from the HF model's own rotary embedding, in fp32."""
    rotary = causal_lm.model.rotary_emb
    positions = torch.arange(max_seq_len)[None, :]
    probe = torch.zeros(1, 1, dtype=torch.float32)  # only its dtype and device are read
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    return cos[0].float(), sin[0].float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def layer_sliding_windows(config) -> list[int]:
    """Per-layer sliding window (0 = full attention), from the HF config."""
    window = getattr(config, "sliding_window", None) or 0
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return [window] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else 0 for kind in layer_types]


def _merge_linears(*linears: nn.Linear, copy_weights: bool = True) -> nn.Linear:
    """One Linear computing the given ones side by side (outputs concatenated): its weight (and
    bias) the HF ones end to end, never initialised on its own (left on the meta device without
    `copy_weights`)."""
    if isinstance(linears[0], QuantizedLinear):  # a pre-quantised checkpoint's packed projections
        return QuantizedLinear.concatenated(linears)
    weight = linears[0].weight
    with torch.device("meta"):
        merged = nn.Linear(weight.shape[1], sum(lin.out_features for lin in linears),
                           bias=any(lin.bias is not None for lin in linears))
    if not copy_weights:
        return merged.requires_grad_(False)
    with torch.no_grad():
        merged.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]), requires_grad=False)
        if merged.bias is not None:
            merged.bias = nn.Parameter(torch.cat([
                lin.bias if lin.bias is not None else torch.zeros(lin.out_features, dtype=weight.dtype,
                                                                  device=weight.device)
                for lin in linears
            ]), requires_grad=False)
    return merged


class DecoderLayer(nn.Module):
    """A Llama-style HF decoder layer with Q/K/V and gate/up projections merged into one matmul each.

    The same math with fewer, larger matmuls, as vLLM and NPU compilers lay it out. The norms,
    output projection and activation are the HF modules themselves.
    """

    # Object ids of this process, never read by forward: not part of a compile cache key.
    cache_key_ignores = ("merged_parameter_ids",)

    def __init__(self, hf_layer: nn.Module, copy_weights: bool = True):
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.input_layernorm = hf_layer.input_layernorm
        self.post_attention_layernorm = hf_layer.post_attention_layernorm
        self.qkv_proj = _merge_linears(attn.q_proj, attn.k_proj, attn.v_proj, copy_weights=copy_weights)
        self.qkv_sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        self.o_proj = attn.o_proj
        self.q_norm = getattr(attn, "q_norm", None)  # Qwen3-style per-head norms
        self.k_norm = getattr(attn, "k_norm", None)
        self.gate_up_proj = _merge_linears(mlp.gate_proj, mlp.up_proj, copy_weights=copy_weights)
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn
        # The HF parameters copied into the merged matmuls (ids only: no second reference to them).
        merged = (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)
        self.merged_parameter_ids = frozenset(id(p) for linear in merged for p in linear.parameters())
        self.lora = None  # matmul name -> LoRADelta, when compiled with adapters (lora_layers.attach_lora)

    def project(self, name: str, hidden: torch.Tensor, adapter_slots: torch.Tensor | None) -> torch.Tensor:
        """The matmul `name` (qkv_proj, o_proj, gate_up_proj, down_proj), plus its adapters' delta."""
        out = getattr(self, name)(hidden)
        if self.lora is not None and name in self.lora:
            out = out + self.lora[name](hidden, adapter_slots)
        return out

    def mlp(self, hidden: torch.Tensor, adapter_slots: torch.Tensor | None = None) -> torch.Tensor:
        gate, up = self.project("gate_up_proj", hidden, adapter_slots).chunk(2, dim=-1)
        return self.project("down_proj", self.act_fn(gate) * up, adapter_slots)


def merge_layers(causal_lm: nn.Module, copy_weights: bool = True) -> nn.ModuleList:
    """The model's layers in device form, built once and shared by every graph of a model
    (without `copy_weights`, the merged matmuls on the meta device: only to check the model).

    Raises ValueError if the HF model has a parameter the static decoder would not use (a
    family with a module the decoder layer does not know would otherwise compile without it
    and silently give wrong tokens).
    """
    layers = nn.ModuleList(DecoderLayer(layer, copy_weights) for layer in causal_lm.model.layers)
    decoder = causal_lm.model
    # Exactly the modules StaticDecoder holds, plus what the merged matmuls were built from.
    used = {id(p) for module in (decoder.embed_tokens, decoder.norm, causal_lm.lm_head, layers)
            for p in module.parameters()}
    for layer in layers:
        used |= layer.merged_parameter_ids
    unused = [name for name, p in causal_lm.named_parameters() if id(p) not in used]
    if unused:
        shown = ", ".join(unused[:8]) + (f" and {len(unused) - 8} more" if len(unused) > 8 else "")
        raise ValueError(
            f"{type(causal_lm).__name__} has parameters the NPU decoder would not use: {shown}. "
            "Its architecture is not the Llama-style layout this decoder compiles; compiling it would drop "
            "these weights and give wrong tokens."
        )
    return layers


class StaticDecoder(nn.Module):
    def __init__(
        self,
        causal_lm: nn.Module,
        layers: nn.ModuleList,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        rope: tuple[torch.Tensor, torch.Tensor],
        phase: str,
        attn_impl: str,
        partition_len: int | None = None,
        use_inputs_embeds: bool = False,
        use_attention_mask: bool = False,
        use_lora: bool = False,
    ):
        super().__init__()
        if phase not in ("prefill", "decode"):
            raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
        config = causal_lm.config
        decoder = causal_lm.model
        self.phase = phase
        self.attn_impl = attn_impl
        self.partition_len = partition_len
        self.use_inputs_embeds = use_inputs_embeds
        self.use_attention_mask = use_attention_mask
        self.use_lora = use_lora
        self.embed_tokens = decoder.embed_tokens
        self.layers = layers
        self.norm = decoder.norm
        self.lm_head = causal_lm.lm_head
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scale = float(getattr(decoder.layers[0].self_attn, "scaling", self.head_dim**-0.5))
        self.sliding_windows = layer_sliding_windows(config)
        # Registered under the same names in every graph, so graphs share them on the device.
        self.register_buffer("rope_cos", rope[0], persistent=False)
        self.register_buffer("rope_sin", rope[1], persistent=False)
        for i, (k_cache, v_cache) in enumerate(kv_caches):
            self.register_buffer(f"k_cache_{i}", k_cache, persistent=False)
            self.register_buffer(f"v_cache_{i}", v_cache, persistent=False)

    def _attention(self, layer_index: int, layer: DecoderLayer, hidden, cos, sin, start_pos, block_tables, mask,
                   adapter_slots=None):
        batch, tokens, _ = hidden.shape
        q, k, v = layer.project("qkv_proj", hidden, adapter_slots).split(layer.qkv_sizes, dim=-1)
        q = q.reshape(batch, tokens, self.num_heads, self.head_dim)
        k = k.reshape(batch, tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(batch, tokens, self.num_kv_heads, self.head_dim)
        if layer.q_norm is not None:  # before RoPE
            q, k = layer.q_norm(q), layer.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k_cache = getattr(self, f"k_cache_{layer_index}")
        v_cache = getattr(self, f"v_cache_{layer_index}")
        torch.ops.rbln.kv_cache_update(k_cache, v_cache, k, v, block_tables, start_pos)
        window = self.sliding_windows[layer_index]
        if self.attn_impl == "flash_attn":
            out = torch.ops.rbln.flash_attention(
                q, k_cache, v_cache, block_tables, start_pos, self.scale, window, self.partition_len, mask
            )
        else:
            out = torch.ops.rbln.paged_attention(q, k_cache, v_cache, block_tables, start_pos, self.scale, window, mask)
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
        cos = self.rope_cos[positions].unsqueeze(1).to(hidden.dtype)  # [batch, 1, T, head_dim]
        sin = self.rope_sin[positions].unsqueeze(1).to(hidden.dtype)
        for i, layer in enumerate(self.layers):
            residual = hidden
            hidden = layer.input_layernorm(hidden)
            hidden = residual + self._attention(i, layer, hidden, cos, sin, start_pos, block_tables, attention_mask,
                                                adapter_slots)
            residual = hidden
            hidden = residual + layer.mlp(layer.post_attention_layernorm(hidden), adapter_slots)
        if query_position is not None:  # prefill: only the last prompt token's logits are needed
            hidden = hidden.index_select(1, query_position)
        return self.lm_head(self.norm(hidden))
