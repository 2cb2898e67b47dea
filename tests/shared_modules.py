"""Small torch modules and a trace reader shared by the compiler / runtime test files (no tests here)."""

import json

import torch.nn.functional as F
from torch import nn


class PreNormBlock(nn.Module):
    """A GPT-style block: pre-norm causal MHA via scaled_dot_product_attention, GELU MLP."""

    def __init__(self, d=64, heads=4):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        batch, seq, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (t.view(batch, seq, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, seq, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def load_trace(path):
    """The X slices of a Chrome trace file by start time, each with its track (thread) name and end."""
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    slices = [{**e, "track": threads[(e["pid"], e["tid"])], "end": e["ts"] + e["dur"]} for e in events if e["ph"] == "X"]
    return sorted(slices, key=lambda s: s["ts"])
