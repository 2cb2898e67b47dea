"""Image classification: simulated device figures of a ResNet-50, and host overhead vs HF eager.

1. A ResNet-50-shaped classifier (transformers' default ResNetConfig: bottleneck blocks
   [3, 4, 6, 3]; 1000 classes: 25.6 M parameters) built on the meta device (no weights,
   nothing downloaded), compiled for RBLN-CA25 at 224x224 and batch 1, 8 and 32: device
   memory and the simulated time of one batch, beside the time the same FLOPs would take at
   the device's 16-bit peak (the roofline; ratio = how far the cost model is from it).
2. Host wall time of a small ResNet (ResNet-18 layout, 112x112, batch 8) through our model
   class (device numerics, bf16) vs the HF model in eager bf16 on the same CPU, interleaved
   repeats (goal: ours <= 1.15x eager); eager fp32 beside it for scale. Ours runs batch norms
   folded into the convolutions, which eager does not.

Usage: python benchmarks/vision.py [--runs 3 --repeats 5 --skip-host]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_overhead import time_interleaved  # noqa: E402  (benchmarks/ is not a package)


def resnet50_device_figures(batches=(1, 8, 32)) -> list[tuple]:
    from transformers import ResNetConfig, ResNetForImageClassification

    from optimum_npu import RBLNResNetForImageClassification
    from optimum_npu.sim_device.specs import get_npu_spec

    with torch.device("meta"):
        hf = ResNetForImageClassification(ResNetConfig(num_labels=1000))  # ImageNet's 1000 classes
    spec = get_npu_spec("RBLN-CA25")
    rows = []
    for batch in batches:
        model = RBLNResNetForImageClassification.from_model(
            hf, rbln_batch_size=batch, rbln_image_size=224, rbln_create_runtimes=False)
        graph = model.graphs["model"]
        plan, steps = graph.program.memory, graph.program.steps
        flops = sum(s.flops for s in steps)
        roofline_s = flops / spec.peak_flops_16bit
        kernels = sum(s.kind == "kernel" for s in steps)
        rows.append((batch, kernels, flops / batch / 1e9, plan.weights_bytes[0], plan.activations_bytes[0],
                     graph.device_bytes, graph.estimated_latency_s, roofline_s))
    return rows


def host_overhead(runs: int, repeats: int) -> dict:
    from transformers import ResNetConfig, ResNetForImageClassification

    from optimum_npu import RBLNResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], num_labels=1000)
    hf = ResNetForImageClassification(config).eval()
    ours = RBLNResNetForImageClassification.from_model(hf, rbln_batch_size=8, rbln_image_size=112)
    hf16 = ResNetForImageClassification(config).eval()
    hf16.load_state_dict(hf.state_dict())
    hf16.to(torch.bfloat16)
    x = torch.randn(8, 3, 112, 112)

    def eager():
        with torch.inference_mode():
            return hf16(pixel_values=x.bfloat16()).logits.float()

    def eager_fp32():
        with torch.inference_mode():
            return hf(pixel_values=x).logits

    def compiled():
        return ours(x).logits

    scale = eager().abs().max().item()
    assert (compiled() - eager()).abs().max().item() < 0.1 * scale, "ours and eager compute different things"
    times = time_interleaved({"eager": eager, "ours": compiled, "eager_fp32": eager_fp32}, runs, repeats)
    return {"eager_s": times["eager"], "ours_s": times["ours"], "ratio": times["ours/ratio"],
            "fp32_s": times["eager_fp32"], "stats": str(ours.inference_stats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="calls per timed repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats")
    parser.add_argument("--skip-host", action="store_true", help="only the simulated ResNet-50 figures")
    args = parser.parse_args()
    os.environ.setdefault("OPTIMUM_NPU_STATE_DIR", tempfile.mkdtemp(prefix="npu_bench_state_"))
    gib = 1024**3

    print("\nResNet-50 (transformers ResNetConfig defaults, 1000 classes), 224x224, RBLN-CA25 bf16, built on the meta device\n")
    header = (f"{'batch':>5} {'kernels':>7} {'GFLOP/img':>9} {'weights':>9} {'activations':>11} {'device mem':>10} "
              f"{'simulated/batch':>15} {'images/s':>9} {'roofline':>9} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for batch, kernels, gflop, weights, activations, total, latency_s, roofline_s in resnet50_device_figures():
        print(f"{batch:>5} {kernels:>7} {gflop:>9.2f} {weights / gib:>7.3f} G {activations / gib:>9.3f} G "
              f"{total / gib:>8.3f} G {latency_s * 1e3:>12.3f} ms {batch / latency_s:>9.0f} "
              f"{roofline_s * 1e3:>6.3f} ms {latency_s / roofline_s:>5.2f}x")
    print("roofline: the batch's FLOPs at the 32 TFLOPS 16-bit peak; the simulated time adds the matmul "
          "efficiency, DRAM traffic of each kernel, launches and the host<->device copies.")

    if args.skip_host:
        return
    result = host_overhead(args.runs, args.repeats)
    print(f"\nHost wall time, ResNet-18 layout, 112x112, batch 8, {torch.get_num_threads()} threads "
          f"(best of {args.repeats} interleaved repeats x {args.runs} runs)\n")
    print(f"{'HF eager bf16':>14} {'ours (device numerics)':>23} {'ratio (paired median)':>22} {'HF eager fp32':>14} "
          f"{'ours / fp32':>12}")
    print(f"{result['eager_s'] * 1e3:>11.1f} ms {result['ours_s'] * 1e3:>20.1f} ms {result['ratio']:>21.3f}x "
          f"{result['fp32_s'] * 1e3:>11.1f} ms {result['ours_s'] / result['fp32_s']:>11.3f}x")
    print(f"goal <= 1.15x -> {'OK' if result['ratio'] <= 1.15 else 'ABOVE GOAL'}")
    print(f"our model's stats after the last call: {result['stats']}")


if __name__ == "__main__":
    main()
