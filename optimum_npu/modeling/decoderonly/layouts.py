"""Where each family keeps its modules: the mapping from a Hugging Face causal LM onto the parts
the static decoder runs (`DecoderParts`).

The static decoder runs one layer shape for every family:

    h = h + post_attn_norm(attention(attn_norm(h)))      (norms after the residual with norm_after)
    h = h + post_mlp_norm(mlp(mlp_norm(h)))

with Q/K/V as one matmul, RoPE (one table per kind of layer) or learned absolute positions added
to the embeddings, an optional per-head Q/K norm, an optional attention-score and final-logit soft
cap, and an MLP that is gated (gate/up as one matmul), plain (fc_in, act, fc_out) or a mixture of
experts (router, top-k and experts as one device kernel). A layout says where a family keeps each of these; the modules themselves are the HF
model's (norms, projections, activations), or, where HF stores a weight another way (GPT-2's
Conv1D, fused or split projections), a Linear built from it once. Llama, Qwen2/3, Mistral, Phi-3,
Gemma 2/3 and the MoE families read the same names (`LlamaLayout`); GPT-2 and OPT name theirs
differently (`GPT2Layout`, `OPTLayout`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

# model_type -> layout; families not listed use the Llama one.
_LAYOUTS: dict[str, DecoderLayout] = {}


def layer_sliding_windows(config) -> list[int]:
    """Per-layer sliding window (0 = full attention), from the HF config."""
    window = getattr(config, "sliding_window", None) or 0
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return [window] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else 0 for kind in layer_types]


def layout_for(config) -> DecoderLayout:
    return _LAYOUTS.get(getattr(config, "model_type", None), LLAMA_LAYOUT)


def linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    """GPT-2's Conv1D (y = x @ W + b, W stored [in, out]) as the Linear it is (W transposed, a copy)."""
    weight = conv.weight
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=conv.bias is not None)
    linear.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=False)
    if conv.bias is not None:
        linear.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
    return linear


def merge_linears(*linears: nn.Module, copy_weights: bool = True) -> nn.Linear:
    """One Linear computing the given ones side by side (outputs concatenated): its weight (and
    bias) the HF ones end to end, never initialised on its own (left on the meta device without
    `copy_weights`)."""
    from ..quantization import QuantizedLinear

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


def _copied(*modules: nn.Module) -> set[int]:
    return {id(p) for module in modules for p in module.parameters()}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up as one matmul (gate's outputs first)."""

    def __init__(self, gate_up_proj: nn.Linear, down_proj: nn.Module, act_fn: nn.Module):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up_proj, down_proj, act_fn

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class PlainMLP(nn.Module):
    """fc_out(act(fc_in(x))): GPT-2, OPT."""

    def __init__(self, fc_in: nn.Module, fc_out: nn.Module, act_fn: nn.Module):
        super().__init__()
        self.fc_in, self.fc_out, self.act_fn = fc_in, fc_out, act_fn

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act_fn(self.fc_in(hidden)))


class SparseMoE(nn.Module):
    """A mixture of experts (Mixtral, Qwen3-MoE): the router, top-k and the experts the tokens pick
    as one device kernel (`rbln.moe_experts`, sim_device/moe.py), on the HF router's and experts'
    own weights; `expert_ids` names the experts, so that tensor parallelism can split them."""

    def __init__(self, hf_moe: nn.Module, activation: str, renormalize: bool):
        super().__init__()
        from ...sim_device.moe import ACTIVATIONS

        if activation not in ACTIVATIONS:
            raise ValueError(f"the MoE kernel runs the activations {sorted(ACTIVATIONS)}; this model's hidden_act is "
                             f"{activation!r}")
        self.gate, self.experts = hf_moe.gate, hf_moe.experts
        self.top_k, self.renormalize, self.activation = int(hf_moe.gate.top_k), bool(renormalize), activation
        self.register_buffer("expert_ids", torch.arange(hf_moe.experts.gate_up_proj.shape[0]), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = torch.ops.rbln.moe_experts(hidden.reshape(-1, hidden.shape[-1]), self.gate.weight, self.expert_ids,
                                         self.experts.gate_up_proj, self.experts.down_proj, self.top_k,
                                         self.renormalize, self.activation)
        return out.reshape(hidden.shape)


class MoEMLP(nn.Module):
    """The MLP slot of a layer holding a `SparseMoE` (as `moe`)."""

    def __init__(self, moe: SparseMoE):
        super().__init__()
        self.moe = moe

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.moe(hidden)


class LearnedPositions(nn.Module):
    """Absolute position embeddings, a table row per position (OPT's start at row `offset`)."""

    def __init__(self, table: nn.Embedding, offset: int = 0):
        super().__init__()
        self.table, self.offset = table, offset

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(positions + self.offset, self.table.weight)


class EmbedThenProject(nn.Module):
    """OPT with word_embed_proj_dim != hidden_size: token embeddings, then project_in."""

    def __init__(self, embed: nn.Module, project: nn.Module):
        super().__init__()
        self.embed, self.project = embed, project

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.project(self.embed(ids))


@dataclass
class LayerParts:
    """One decoder layer, as the static decoder runs it (see the module docstring)."""

    attn_norm: nn.Module
    qkv_proj: nn.Linear
    qkv_sizes: list[int]
    o_proj: nn.Module
    mlp_norm: nn.Module
    mlp: nn.Module
    scale: float
    post_attn_norm: nn.Module | None = None
    post_mlp_norm: nn.Module | None = None
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None
    norm_after: bool = False            # OPT-350m: post-LN (norm after the residual add)
    softcap: float = 0.0                # attention-score soft cap (Gemma 2)
    rope_kind: str | None = "default"   # which RoPE table (None: learned positions, no RoPE)
    copied: set[int] = field(default_factory=set)  # ids of HF parameters copied into new modules


@dataclass
class DecoderParts:
    embed: nn.Module                    # ids -> hidden (scaling and input projection included)
    final_norm: nn.Module
    lm_head: nn.Module                  # hidden -> logits (output projection included)
    layers: list[LayerParts]
    positions: nn.Module | None = None  # learned absolute positions
    logit_softcap: float = 0.0          # final-logit soft cap (Gemma 2)
    copied: set[int] = field(default_factory=set)

    @property
    def all_tokens(self) -> bool:
        """A headless model: the hidden states of every token are the output, not one token's logits."""
        return isinstance(self.lm_head, nn.Identity)


class DecoderLayout:
    """How to read the parts of one family's HF causal LM (`parts(causal_lm)`), and its RoPE tables."""

    def decoder(self, causal_lm: nn.Module) -> nn.Module:
        """The HF base model (a headless checkpoint, e.g. Qwen3Model, is its own)."""
        return getattr(causal_lm, "model", causal_lm)

    def head(self, causal_lm: nn.Module) -> nn.Module:
        """What turns the final hidden states into the output: the LM head, a classifier's score
        (sequence classification), or nothing (a headless model outputs the hidden states)."""
        for name in ("lm_head", "score"):
            if isinstance(getattr(causal_lm, name, None), nn.Module):
                return getattr(causal_lm, name)
        return nn.Identity()

    def num_kv_heads(self, config) -> int:
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    def hf_layers(self, causal_lm: nn.Module) -> nn.ModuleList:
        return self.decoder(causal_lm).layers

    def parts(self, causal_lm: nn.Module, copy_weights: bool = True) -> DecoderParts:
        raise NotImplementedError

    # ---- RoPE ----

    def rope_kinds(self, config) -> list[str | None]:
        """The RoPE table each layer uses (None: no RoPE)."""
        return ["default"] * config.num_hidden_layers

    def rope_tables(self, causal_lm: nn.Module, max_seq_len: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """kind -> (cos, sin) [max_seq_len, rotary_dim] from the HF model's own rotary embedding, fp32
        (on the meta device for a meta model: shapes only)."""
        kinds = [k for k in self.rope_kinds(causal_lm.config) if k is not None]
        if not kinds:
            return {}
        rotary = self.decoder(causal_lm).rotary_emb
        _warn_length_dependent_rope(causal_lm.config, max_seq_len)
        device = next(iter(rotary.buffers())).device
        positions = torch.arange(max_seq_len, device=device)[None, :]
        probe = torch.zeros(1, 1, dtype=torch.float32, device=device)  # only its dtype and device are read
        tables = {}
        with torch.no_grad():
            for kind in dict.fromkeys(kinds):
                cos, sin = rotary(probe, positions) if kind == "default" else rotary(probe, positions, kind)
                tables[kind] = (cos[0].float(), sin[0].float())
        return tables


def _warn_length_dependent_rope(config, max_seq_len: int) -> None:
    """transformers recomputes longrope / dynamic RoPE per forward from the sequence's length; the
    device's tables are computed once for max_seq_len positions, so past the original context they
    hold the long-context frequencies for every position, as vLLM uses them."""
    rope = getattr(config, "rope_parameters", None) or {}
    original = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
    if rope.get("rope_type") in ("longrope", "dynamic") and original and max_seq_len > original:
        logger.warning("%s RoPE with rbln_max_seq_len=%d above original_max_position_embeddings=%d: the tables hold "
                       "the long-context frequencies for every position, whereas transformers uses the original "
                       "ones for sequences up to %d tokens (outputs of such sequences differ from transformers'); "
                       "compile with rbln_max_seq_len=%d to match it there", rope["rope_type"], max_seq_len, original,
                       original, original)


class LlamaLayout(DecoderLayout):
    """Llama's names, which Qwen2/3, Mistral, Phi-3 (qkv_proj / gate_up_proj fused already), Gemma 2/3
    (embedding scaled by its module, pre/post feed-forward norms, soft caps, per-layer-type RoPE) share."""

    def parts(self, causal_lm: nn.Module, copy_weights: bool = True) -> DecoderParts:
        config, decoder = causal_lm.config, self.decoder(causal_lm)
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError(f"{type(causal_lm).__name__} with use_bidirectional_attention=True (an encoder such as "
                             "EmbeddingGemma) attends to later tokens; the NPU decoder is causal")
        kinds = self.rope_kinds(config)
        layers = [self.layer(hf_layer, config, kinds[i], copy_weights)
                  for i, hf_layer in enumerate(self.hf_layers(causal_lm))]
        return DecoderParts(embed=decoder.embed_tokens, final_norm=decoder.norm, lm_head=self.head(causal_lm),
                            layers=layers, logit_softcap=float(getattr(config, "final_logit_softcapping", None) or 0.0))

    def rope_kinds(self, config) -> list[str | None]:
        types = getattr(config, "layer_types", None)
        # Gemma 3 keeps one RoPE per layer type (a local base frequency for the sliding layers).
        if types is not None and isinstance(getattr(config, "rope_parameters", None), dict) and all(
                t in config.rope_parameters for t in set(types)):
            return list(types)
        return ["default"] * config.num_hidden_layers

    def layer(self, hf_layer: nn.Module, config, rope_kind, copy_weights: bool) -> LayerParts:
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        copied: set[int] = set()
        head_dim = getattr(attn, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if hasattr(attn, "qkv_proj"):  # Phi-3: fused already
            qkv = attn.qkv_proj
        else:
            qkv = merge_linears(attn.q_proj, attn.k_proj, attn.v_proj, copy_weights=copy_weights)
            copied |= _copied(attn.q_proj, attn.k_proj, attn.v_proj)
        q_size = config.num_attention_heads * head_dim
        kv_size = config.num_key_value_heads * head_dim
        pre_ff = getattr(hf_layer, "pre_feedforward_layernorm", None)
        return LayerParts(
            attn_norm=hf_layer.input_layernorm, qkv_proj=qkv, qkv_sizes=[q_size, kv_size, kv_size],
            o_proj=attn.o_proj,
            # Gemma: post_attention_layernorm normalises the attention output, pre_feedforward the MLP input.
            mlp_norm=pre_ff if pre_ff is not None else hf_layer.post_attention_layernorm,
            post_attn_norm=hf_layer.post_attention_layernorm if pre_ff is not None else None,
            post_mlp_norm=getattr(hf_layer, "post_feedforward_layernorm", None),
            mlp=self.mlp(mlp, config, copy_weights, copied),
            scale=float(getattr(attn, "scaling", head_dim**-0.5)),
            q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
            softcap=float(getattr(attn, "attn_logit_softcapping", None) or 0.0), rope_kind=rope_kind, copied=copied)

    def mlp(self, mlp: nn.Module, config, copy_weights: bool, copied: set[int]) -> nn.Module:
        if hasattr(mlp, "experts"):  # Mixtral, Qwen3-MoE (whose dense layers fall through to the gated MLP)
            if getattr(mlp, "shared_expert", None) is not None:
                raise ValueError(f"{type(mlp).__name__} has a shared expert, which the MoE kernel does not run")
            return MoEMLP(SparseMoE(mlp, config.hidden_act, getattr(mlp.gate, "norm_topk_prob", True)))
        if hasattr(mlp, "gate_up_proj") and isinstance(mlp.gate_up_proj, nn.Linear):  # Phi-3: fused already
            return GatedMLP(mlp.gate_up_proj, mlp.down_proj, mlp.activation_fn)
        copied |= _copied(mlp.gate_proj, mlp.up_proj)
        return GatedMLP(merge_linears(mlp.gate_proj, mlp.up_proj, copy_weights=copy_weights), mlp.down_proj, mlp.act_fn)


class LearnedPositionsLayout(DecoderLayout):
    """The older families: absolute positions learned in a table (no RoPE), multi-head attention (as
    many K/V heads as query heads)."""

    def num_kv_heads(self, config) -> int:
        return config.num_attention_heads

    def rope_kinds(self, config):
        return [None] * config.num_hidden_layers


class GPT2Layout(LearnedPositionsLayout):
    """GPT-2: transformer.wte / wpe / h / ln_f; Conv1D projections (c_attn, c_proj, c_fc); LayerNorm, GELU."""

    def decoder(self, causal_lm):
        return causal_lm.transformer

    def hf_layers(self, causal_lm):
        return causal_lm.transformer.h

    def parts(self, causal_lm, copy_weights: bool = True) -> DecoderParts:
        config, decoder = causal_lm.config, causal_lm.transformer
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is an encoder-decoder part, "
                             "not a decoder-only LM; it is not supported")
        layers, copied = [], set()
        for block in decoder.h:
            attn, mlp = block.attn, block.mlp
            convert = linear_from_conv1d if copy_weights else _meta_linear_from_conv1d
            copied |= _copied(attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
            size = attn.embed_dim
            layers.append(LayerParts(
                attn_norm=block.ln_1, qkv_proj=convert(attn.c_attn), qkv_sizes=[size, size, size],
                o_proj=convert(attn.c_proj), mlp_norm=block.ln_2,
                mlp=PlainMLP(convert(mlp.c_fc), convert(mlp.c_proj), mlp.act), scale=float(attn.scaling),
                rope_kind=None))
        return DecoderParts(embed=decoder.wte, final_norm=decoder.ln_f, lm_head=causal_lm.lm_head, layers=layers,
                            positions=LearnedPositions(decoder.wpe), copied=copied)


def _meta_linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    with torch.device("meta"):
        return nn.Linear(conv.weight.shape[0], conv.weight.shape[1], bias=conv.bias is not None).requires_grad_(False)


class OPTLayout(LearnedPositionsLayout):
    """OPT: model.decoder.embed_tokens / embed_positions (rows from 2) / layers / final_layer_norm, optional
    project_in / project_out; LayerNorm before (or, for OPT-350m, after) each block; ReLU MLP fc1 / fc2."""

    def decoder(self, causal_lm):
        return causal_lm.model.decoder

    def parts(self, causal_lm, copy_weights: bool = True) -> DecoderParts:
        config, decoder = causal_lm.config, causal_lm.model.decoder
        layers, copied = [], set()
        for hf_layer in decoder.layers:
            attn = hf_layer.self_attn
            copied |= _copied(attn.q_proj, attn.k_proj, attn.v_proj)
            size = attn.embed_dim
            layers.append(LayerParts(
                attn_norm=hf_layer.self_attn_layer_norm,
                qkv_proj=merge_linears(attn.q_proj, attn.k_proj, attn.v_proj, copy_weights=copy_weights),
                qkv_sizes=[size, size, size], o_proj=attn.out_proj, mlp_norm=hf_layer.final_layer_norm,
                mlp=PlainMLP(hf_layer.fc1, hf_layer.fc2, hf_layer.activation_fn), scale=float(attn.scaling),
                norm_after=not config.do_layer_norm_before, rope_kind=None))
        embed = decoder.embed_tokens if decoder.project_in is None else EmbedThenProject(decoder.embed_tokens,
                                                                                        decoder.project_in)
        head = causal_lm.lm_head if decoder.project_out is None else nn.Sequential(decoder.project_out,
                                                                                  causal_lm.lm_head)
        final_norm = decoder.final_layer_norm if decoder.final_layer_norm is not None else nn.Identity()
        return DecoderParts(embed=embed, final_norm=final_norm, lm_head=head, layers=layers,
                            positions=LearnedPositions(decoder.embed_positions, decoder.embed_positions.offset),
                            copied=copied)


LLAMA_LAYOUT = LlamaLayout()
_LAYOUTS.update({"gpt2": GPT2Layout(), "opt": OPTLayout()})
