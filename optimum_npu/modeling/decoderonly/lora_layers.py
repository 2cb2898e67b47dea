"""The adapters in the compiled graph: a low-rank delta beside each targeted matmul, per batch row.

For a projection y = x W^T of the decoder layer, row b of the batch adds
    delta_b = (x_b A[s_b]^T) B[s_b]^T
where s_b is the row's adapter slot (an input of the graph, 0 = the base model, whose A and B
are zeros, so its rows get exactly the base output) and B already carries the adapter's scaling.
Gathering the row's A and B (index_select over the slot axis) reads only the adapters in use;
the two batched matmuls are the extra work the cost model prices, 2 * R * (in + out) FLOPs per
token and projection. The decoder merges q/k/v and gate/up into one matmul each; their
adapters stay per projection (as PEFT trains them) and their deltas are concatenated.
"""

from __future__ import annotations

import torch
from torch import nn

# The decoder layer's matmuls (static_decoder.DecoderLayer) and the PEFT projections each computes.
MERGED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
          "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class LoRADelta(nn.Module):
    """The adapters' delta of one (possibly merged) matmul: one (A, B) stack per part, None for a
    part no adapter targets (its delta is zero)."""

    def __init__(self, parts: list[tuple[torch.Tensor, torch.Tensor] | int]):
        """parts: per projection of the matmul, (A [slots, R, in], B [slots, out, R]) or, for an
        untargeted one, its out_features."""
        super().__init__()
        self.widths = []
        for i, part in enumerate(parts):
            if isinstance(part, int):
                self.widths.append(part)
                continue
            a, b = part
            self.register_parameter(f"lora_a_{i}", nn.Parameter(a, requires_grad=False))
            self.register_parameter(f"lora_b_{i}", nn.Parameter(b, requires_grad=False))
            self.widths.append(None)

    def forward(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        deltas = []
        for i, width in enumerate(self.widths):
            if width is not None:  # no adapter targets this part
                deltas.append(x.new_zeros((*x.shape[:-1], width)))
                continue
            a = getattr(self, f"lora_a_{i}").index_select(0, slots)       # [batch, R, in]
            b = getattr(self, f"lora_b_{i}").index_select(0, slots)       # [batch, out, R]
            deltas.append(torch.matmul(torch.matmul(x, a.transpose(1, 2)), b.transpose(1, 2)))
        return deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=-1)


def attach_lora(layers: nn.ModuleList, stacks: dict, shapes: dict[str, tuple[int, int]]) -> None:
    """Give each decoder layer a `lora` ModuleDict: matmul name -> LoRADelta, for the matmuls some
    adapter targets. stacks: {(layer, projection): (A, B)} (lora_weights.stacked_weights);
    shapes: projection -> (in, out)."""
    for index, layer in enumerate(layers):
        deltas = {}
        for matmul, projections in MERGED.items():
            if any((index, p) in stacks for p in projections):
                deltas[matmul] = LoRADelta([stacks.get((index, p), shapes[p][1]) for p in projections])
        layer.lora = nn.ModuleDict(deltas)
