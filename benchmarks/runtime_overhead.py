"""Host overhead of the simulated-device Runtime against plain PyTorch eager.

The Runtime executes a compiled program op by op on the host with the device's numerics
(bf16 natively). Its wall time should stay close to running the same module in eager bf16
(goal: <= 1.15x). Measured here on a mid-size MLP stack: `layers` x [Linear(d, 4d) + GELU +
Linear(4d, d) + residual], `tokens` rows per run.

Variants:
- bf16 in:  compiled from the bf16 module with bf16 inputs (no cast kernels) vs eager bf16.
- fp32 in:  compiled from the fp32 module with fp32 inputs (the device casts in and out) vs
            eager bf16 with the same casts (x.bfloat16() ... .float()).

Usage: python benchmarks/runtime_overhead.py [--layers 12 --dim 1024 --tokens 64 --runs 3 --repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Layer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, layers: int, dim: int):
        super().__init__()
        self.layers = nn.ModuleList(Layer(dim) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def time_interleaved(fns: dict, runs: int, repeats: int, warmup: int = 1) -> dict:
    """Per function: the best and the median over `repeats` of the mean wall time of `runs`
    back-to-back calls ("<name>" and "<name>/median").

    The functions are timed in turns (rotating order) inside each repeat, so a load change on
    the machine hits all of them alike; the median of the paired per-repeat ratios to the
    first function is returned too ("<name>/ratio"). On a busy machine the best time is the
    steadiest estimate of what the code costs.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    samples = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(runs):
                fns[name]()
            samples[name].append((time.perf_counter() - start) / runs)
    out = {name: min(v) for name, v in samples.items()}
    out.update({f"{name}/median": statistics.median(v) for name, v in samples.items()})
    base = samples[names[0]]
    for name in names[1:]:
        out[f"{name}/ratio"] = statistics.median(a / b for a, b in zip(samples[name], base))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="calls per timed repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (the median is reported)")
    args = parser.parse_args()

    # A private device-memory registry: the benchmark must not collide with other processes.
    os.environ.setdefault("OPTIMUM_NPU_STATE_DIR", tempfile.mkdtemp(prefix="npu_bench_state_"))
    from optimum_npu import Runtime, compile_from_torch

    torch.manual_seed(0)
    fp32_module = Stack(args.layers, args.dim).eval()
    bf16_module = Stack(args.layers, args.dim).eval()
    bf16_module.load_state_dict(fp32_module.state_dict())
    bf16_module.to(torch.bfloat16)
    params = sum(p.numel() for p in fp32_module.parameters())
    flops = 2 * params * args.tokens
    x32 = torch.randn(args.tokens, args.dim)
    x16 = x32.to(torch.bfloat16)

    t0 = time.perf_counter()
    compiled16 = compile_from_torch(bf16_module, input_info=[("x", [args.tokens, args.dim], "bfloat16")])
    compiled32 = compile_from_torch(fp32_module, example_inputs=[x32], dtype="bfloat16")
    compile_s = time.perf_counter() - t0
    rt16, rt32 = Runtime(compiled16), Runtime(compiled32)

    # Same numbers as eager (sanity: the benchmark times the same computation).
    with torch.inference_mode():
        eager16 = bf16_module(x16)
        eager32 = bf16_module(x32.bfloat16()).float()
    for name, got, want in (("bf16 in", rt16.run(x16), eager16), ("fp32 in", rt32.run(x32), eager32)):
        err = (got.float() - want.float()).abs().max().item() / want.float().abs().max().item()
        assert err < 2e-2, f"{name}: runtime and eager differ by {err:.3g} of the output scale"

    def eager_bf16():
        with torch.inference_mode():
            return bf16_module(x16)

    def eager_fp32_io():
        with torch.inference_mode():
            return bf16_module(x32.bfloat16()).float()

    def runtime_in_inference_mode(runtime, x):
        def call():
            with torch.inference_mode():
                return runtime.run(x)
        return call

    rows = []
    for label, runtime, x, eager in (("bf16 in", rt16, x16, eager_bf16), ("fp32 in", rt32, x32, eager_fp32_io)):
        t = time_interleaved(
            {"eager": eager, "ours": lambda: runtime.run(x), "ours_im": runtime_in_inference_mode(runtime, x)},
            args.runs, args.repeats,
        )
        steps = compiled16.program.steps if runtime is rt16 else compiled32.program.steps
        kernels = sum(s.kind == "kernel" for s in steps)
        rows.append((label, kernels, t["eager"], t["ours"], t["ours"] / t["eager"], t["ours/ratio"],
                     t["ours_im"] / t["eager"], runtime.stats.last_run_s))

    print(
        f"\n{args.layers} x [Linear({args.dim},{4 * args.dim}) + GELU + Linear({4 * args.dim},{args.dim}) + residual], "
        f"{params / 1e6:.1f} M params, {args.tokens} tokens, {flops / 1e9:.2f} GFLOP per run; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; compile of both programs {compile_s:.1f} s"
    )
    print(f"best of {args.repeats} interleaved repeats x {args.runs} runs (ratio: of the best times; "
          "paired: median of per-repeat ratios)\n")
    header = (f"{'variant':<9} {'kernels':>7} {'eager bf16':>11} {'Runtime':>10} {'ratio':>7} {'paired':>7} "
              f"{'in inference_mode':>18} {'simulated device':>17}")
    print(header)
    print("-" * len(header))
    for label, kernels, eager_s, ours_s, ratio, paired, ratio_im, sim_s in rows:
        print(
            f"{label:<9} {kernels:>7} {eager_s * 1e3:>8.2f} ms {ours_s * 1e3:>7.2f} ms {ratio:>6.3f}x {paired:>6.3f}x "
            f"{ratio_im:>17.3f}x {sim_s * 1e3:>14.3f} ms"
        )
    worst = max(r[5] for r in rows)
    print(f"\nworst paired Runtime/eager ratio: {worst:.3f}x (goal <= 1.15x) -> {'OK' if worst <= 1.15 else 'ABOVE GOAL'}")
    print(f"simulated RBLN-CA25 device time per run: {rows[0][7] * 1e3:.3f} ms (bf16 in), "
          f"{rows[1][7] * 1e3:.3f} ms (fp32 in, with input/output casts)")


if __name__ == "__main__":
    main()
