"""The vendor's ATOM server claim against the planner: Llama-3-8B, FP16, 2K in / 2K out.

    python benchmarks/vendor_claim.py [--batch-sizes 1 4 16 32 64] [--tensor-parallel-sizes 2 4 8]
                                      [--max-ttft-s 2] [--max-tpot-ms 100]

Rebellions' published figure (docs/hardware.md): an ATOM server serves Llama3-8B FP16 at
1.8k tokens/s for 2.5 kW, and a 35 kW rack of 224 cards (14 servers of 16 ATOM cards) at
25.2k tokens/s. The planner (`optimum_npu.plan`) compiles the Llama-3-8B configuration on the
meta device for RBLN-CA12 (one ATOM device per card), simulates continuous batching of
2048-token prompts generating 2048 tokens for every deployment that fits, and the best one
(tokens/s per card) is scaled to 16 cards (a server) and 224 cards (the rack): once with no
latency bound, once under a stated latency objective (`--max-ttft-s`, `--max-tpot-ms`).
"""

from __future__ import annotations

import argparse
import time

from model_shapes import llama3_config

from optimum_npu import plan
from optimum_npu.sim_device.specs import get_npu_spec

CLAIM_SERVER_TOKENS_S, CLAIM_SERVER_W = 1800.0, 2500.0
CLAIM_RACK_TOKENS_S, CLAIM_RACK_W, RACK_CARDS = 25_200.0, 35_000.0, 224
SERVER_CARDS = get_npu_spec("RBLN-CA12").cards_per_server   # 16 ATOM cards, as the claim's server
# The latency objective the best deployment is chosen under (the claim states none): an interactive
# service, first token within 2 s and 10 tokens/s per user (100 ms per output token), the bounds
# MLPerf Inference's server scenario sets for Llama-3.1-8B (github.com/mlcommons/inference,
# loadgen/mlperf.conf: llama3_1-8b.Server.ttft_latency = 2000, tpot_latency = 100, in ms). MLPerf
# holds them at the 99th percentile; the planner bounds the median, a looser objective.
SLO_TTFT_S, SLO_TPOT_MS = 2.0, 100.0


def best_per_card(result):
    return max(result.candidates, key=lambda c: c.tokens_per_s_per_card) if result.candidates else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--tensor-parallel-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--max-ttft-s", type=float, default=SLO_TTFT_S)
    parser.add_argument("--max-tpot-ms", type=float, default=SLO_TPOT_MS)
    args = parser.parse_args()
    options = dict(dtype="float16", tensor_parallel_sizes=tuple(args.tensor_parallel_sizes),
                   batch_sizes=tuple(args.batch_sizes), chunk_sizes=(128,), rack_power_w=CLAIM_RACK_W)
    started = time.perf_counter()
    unbounded = plan(llama3_config("8b", torch_dtype="float16"), "RBLN-CA12", input_len=2048, output_len=2048, **options)
    bounded = plan(llama3_config("8b", torch_dtype="float16"), "RBLN-CA12", input_len=2048, output_len=2048, max_ttft_s=args.max_ttft_s,
                   max_tpot_s=args.max_tpot_ms / 1000, **options)
    print(f"planned in {time.perf_counter() - started:.1f} s\n")
    print(unbounded.table())
    tpot_only = [c for c in unbounded.candidates if c.tpot_s <= args.max_tpot_ms / 1000]
    rows = [("planner, no latency bound", best_per_card(unbounded)),
            (f"planner, median TPOT <= {args.max_tpot_ms:g} ms", max(tpot_only, key=lambda c: c.tokens_per_s_per_card,
                                                                     default=None)),
            (f"planner, {bounded.objective()}", best_per_card(bounded))]
    print(f"\n{'':<56} | {'deployment':>20} | {'TTFT s':>6} | {'TPOT ms':>7} | {'server tok/s':>12} | "
          f"{'per W':>5} | {'rack tok/s':>10} | {'vs claim':>8}")
    print(f"{'vendor claim (16 ATOM cards, 2.5 kW; 224 cards, 35 kW)':<56} | {'?':>20} | {'?':>6} | {'?':>7} | "
          f"{CLAIM_SERVER_TOKENS_S:>12.0f} | {CLAIM_SERVER_TOKENS_S / CLAIM_SERVER_W:>5.2f} | "
          f"{CLAIM_RACK_TOKENS_S:>10.0f} | {1:>8.2f}")
    for name, best in rows:
        if best is None:
            print(f"{name:<56} | no deployment meets it")
            continue
        server, rack = best.tokens_per_s_per_card * SERVER_CARDS, best.tokens_per_s_per_card * RACK_CARDS
        deployment = f"TP {best.tensor_parallel_size}, batch {best.batch_size}"
        print(f"{name:<56} | {deployment:>20} | {best.ttft_s:>6.2f} | {best.tpot_s * 1e3:>7.1f} | {server:>12.0f} | "
              f"{server / CLAIM_SERVER_W:>5.2f} | {rack:>10.0f} | {server / CLAIM_SERVER_TOKENS_S:>8.2f}")
    print(GAP)


GAP = """
In the planner's figures: device time from the cost model (calibrated on Qwen3-4B at TP 4, ResNet-50
and BERT-base: docs/performance-model.md), plus the
serving stack's host work between steps (1 ms per step; sampling and detokenising per sequence:
estimates, docs/performance-model.md). The constants were not tuned to this claim.
The claim states no latency bound. With 2048-token prompts and equal lengths, every user's prompt
queues behind the others' (a prefill runs before the decodes, as in vLLM), so the median time to
first token grows with the batch: the throughput-best deployment keeps its users ~10-20 s before
their first token, and a TTFT bound of a few seconds allows only small batches. The claim lies
between the rows: on this table (16-card servers) it takes a batch of 8 to 16 per 4-device
instance, whose median first token comes after 2.5-5 s: a throughput figure measured without a
2 s TTFT bound. What remains uncertain at equal bounds: FP16 priced at
the bf16 rate, cross-card collectives priced from estimated PCIe latencies, the host-work
estimates, and power (the claim is server wall power; the planner counts card power only)."""


if __name__ == "__main__":
    main()
