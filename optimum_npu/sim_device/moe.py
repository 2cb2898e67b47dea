"""The device's mixture-of-experts kernel, `rbln.moe_experts`, as a torch custom op.

One call routes a batch of tokens and runs the experts they pick (Mixtral, Qwen3-MoE):

    logits = hidden @ router_weight.T                      [N, E]
    top_k_weights, top_k_index = topk(softmax(logits in fp32), top_k)   (renormalised if asked)
    out[n] = sum over the picked experts e of w[n, e] * down_e(act(gate_e(hidden[n])) * up_e(hidden[n]))

with each expert's gate and up projections stored as one [2 * intermediate, hidden] matrix, as
transformers stores them. The experts run in ascending id order, each on the tokens that picked
it, accumulated by index_add: transformers' own loop, so exact numerics give its bits.

`expert_ids` names the experts whose weights this call holds: all of them on one device; under
tensor parallelism each device holds a slice of the experts (the weights and `expert_ids` split
alike along their first dimension), computes the tokens routed to its own experts, and the
partial sums are all-reduced. The router is computed whole on every device.

Priced by what the batch touches (`moe_cost`): the router matmul, the expert matmuls of the
(token, expert) pairs routed to this device's experts, and the weights of the experts at least
one token picked. At compile time (shapes only) the worst case: every pair local, every
expert touched.

This module imports only torch (the sim_device layer knows nothing of the rest of the package).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

MOE_EXPERTS = "rbln.moe_experts.default"

ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "relu": torch.nn.functional.relu,
}


def route(hidden: Tensor, router_weight: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """(top_k_weights [N, k] in hidden's dtype, top_k_index [N, k]) of each token."""
    logits = torch.nn.functional.linear(hidden, router_weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, index = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(hidden.dtype), index


@torch.library.custom_op("rbln::moe_experts", mutates_args=())
def moe_experts(hidden: Tensor, router_weight: Tensor, expert_ids: Tensor, gate_up: Tensor, down: Tensor,
                top_k: int, renormalize: bool, activation: str) -> Tensor:
    """hidden [N, H]; router_weight [E, H] (all experts); expert_ids [E_local] int64, the experts of
    gate_up [E_local, 2I, H] and down [E_local, H, I]. Returns [N, H]: the routed experts' sum
    (only the local experts' share when E_local < E)."""
    act = ACTIVATIONS[activation]
    weights, index = route(hidden, router_weight, top_k, renormalize)
    out = torch.zeros_like(hidden)
    hit = set(index.unique().tolist())
    for local, expert in enumerate(expert_ids.tolist()):
        if expert not in hit:
            continue
        token, slot = torch.where(index == expert)
        order = torch.argsort(slot * hidden.shape[0] + token)  # transformers' order: by top-k slot, then token
        token, slot = token[order], slot[order]
        gate, up = torch.nn.functional.linear(hidden[token], gate_up[local]).chunk(2, dim=-1)
        expert_out = torch.nn.functional.linear(act(gate) * up, down[local]) * weights[token, slot, None]
        out.index_add_(0, token, expert_out.to(out.dtype))
    return out


@moe_experts.register_fake
def _(hidden, router_weight, expert_ids, gate_up, down, top_k, renormalize, activation):
    return torch.empty_like(hidden)


def _has_values(tensor: Tensor) -> bool:
    return not (tensor.is_meta or isinstance(tensor, FakeTensor))


def moe_cost(args: tuple, float_bytes: int | None = None) -> tuple[float, int, int]:
    """(flops, bytes_read, bytes_written) of one call with these args (real, fake or meta tensors)."""
    hidden, router_weight, expert_ids, gate_up, down, top_k, renormalize = args[:7]
    tokens, dim = hidden.shape
    local, two_inter, _ = gate_up.shape
    inter = two_inter // 2
    element = float_bytes or hidden.element_size()
    if all(_has_values(t) for t in (hidden, router_weight, expert_ids)):
        _, index = route(hidden, router_weight, int(top_k), bool(renormalize))
        mine = torch.isin(index, expert_ids)
        pairs = int(mine.sum())                       # (token, expert) pairs this device computes
        touched = int(torch.unique(index[mine]).numel())
    else:  # compile time: the worst case
        pairs, touched = tokens * int(top_k), min(local, tokens * int(top_k))
    flops = 2.0 * tokens * dim * router_weight.shape[0] + 2.0 * pairs * dim * two_inter + 2.0 * pairs * inter * dim
    bytes_read = (tokens * dim + router_weight.numel() + touched * (two_inter * dim + dim * inter)) * element \
        + expert_ids.numel() * expert_ids.element_size()
    return flops, bytes_read, tokens * dim * element
