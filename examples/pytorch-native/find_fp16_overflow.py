"""The numerics debugger on a model with a planted fp16 overflow: one MLP channel carries a large
activation (its weights scaled by 3000, as outlier features do in real LLMs); squaring it passes
fp16's largest value (65504). Compiled for fp16 the output is NaN / inf; the debugger says which
op first breaks, and `run_until` returns the tensors up to it.

    python examples/pytorch-native/find_fp16_overflow.py
"""

from __future__ import annotations

import torch

from optimum_npu.torch_backend.numerics_debugger import compare_numerics, run_until


class OutlierMLP(torch.nn.Module):
    def __init__(self, hidden: int = 16, inner: int = 64, outlier_scale: float = 3000.0):
        super().__init__()
        self.up = torch.nn.Linear(hidden, inner)
        self.down = torch.nn.Linear(inner, hidden)
        self.norm = torch.nn.LayerNorm(hidden)
        with torch.no_grad():
            self.up.weight[7] *= outlier_scale  # one channel with a huge activation

    def forward(self, x):
        h = torch.nn.functional.gelu(self.up(x))
        return self.norm(self.down(h * h) + x)


def main(dtype: str = "float16", tolerance: float = 0.01):
    torch.manual_seed(0)
    model, x = OutlierMLP().eval(), torch.randn(4, 16)
    report = compare_numerics(model, [x], dtype=dtype, tolerance=tolerance)
    print(report)
    first = report.first_failure
    if first is not None:
        values = run_until(model, [x], first.value, dtype=dtype)
        print(f"\nvalues up to {first.value}: " + ", ".join(
            f"{name} max|v| {v.float().abs().max().item():.4g}" for name, v in values.items()))
    return report


if __name__ == "__main__":
    main()
