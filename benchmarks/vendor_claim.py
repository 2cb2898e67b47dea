"""The vendor's ATOM server claim against the planner: Llama-3-8B, FP16, 2K in / 2K out.

    python benchmarks/vendor_claim.py [--batch-sizes 1 4 16 32 64] [--tensor-parallel-sizes 2 4 8]

Rebellions' published figure (docs/hardware.md): an ATOM server serves Llama3-8B FP16 at
1.8k tokens/s for 2.5 kW, and a 35 kW rack of 224 cards (14 servers of 16 ATOM cards) at
25.2k tokens/s. The planner (`optimum_npu.plan`) compiles the Llama-3-8B configuration on the
meta device for RBLN-CA12 (one ATOM device per card), simulates continuous batching of
2048-token prompts generating 2048 tokens for every deployment that fits, and the best one
(tokens/s per card) is scaled to 16 cards (a server) and 224 cards (the rack).
"""

from __future__ import annotations

import argparse
import time

from transformers import LlamaConfig

from optimum_npu import plan

CLAIM_SERVER_TOKENS_S, CLAIM_SERVER_W = 1800.0, 2500.0
CLAIM_RACK_TOKENS_S, CLAIM_RACK_W, RACK_CARDS, SERVER_CARDS = 25_200.0, 35_000.0, 224, 16


def llama3_8b_config() -> LlamaConfig:
    """meta-llama/Meta-Llama-3-8B's architecture (its public config.json)."""
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="float16",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    parser.add_argument("--tensor-parallel-sizes", type=int, nargs="+", default=[2, 4, 8])
    args = parser.parse_args()
    started = time.perf_counter()
    result = plan(llama3_8b_config(), "RBLN-CA12", input_len=2048, output_len=2048, dtype="float16",
                  tensor_parallel_sizes=tuple(args.tensor_parallel_sizes), batch_sizes=tuple(args.batch_sizes),
                  chunk_sizes=(128,), rack_power_w=CLAIM_RACK_W)
    print(f"planned in {time.perf_counter() - started:.1f} s\n")
    print(result.table())
    best = max(result.candidates, key=lambda c: c.tokens_per_s_per_card)
    server, rack = best.tokens_per_s_per_card * SERVER_CARDS, best.tokens_per_s_per_card * RACK_CARDS
    print(f"\nbest per card: TP {best.tensor_parallel_size}, batch {best.batch_size}, {best.attn_impl}: "
          f"TTFT {best.ttft_s * 1e3:.0f} ms, TPOT {best.tpot_s * 1e3:.1f} ms")
    print(f"{'':<22} | {'planner':>10} | {'vendor':>10} | {'ratio':>6}")
    for name, ours, claim in (
        ("server tokens/s", server, CLAIM_SERVER_TOKENS_S),
        ("server tokens/s per W", server / CLAIM_SERVER_W, CLAIM_SERVER_TOKENS_S / CLAIM_SERVER_W),
        ("rack tokens/s", rack, CLAIM_RACK_TOKENS_S),
        ("rack tokens/s per W", rack / CLAIM_RACK_W, CLAIM_RACK_TOKENS_S / CLAIM_RACK_W),
    ):
        print(f"{name:<22} | {ours:>10.2f} | {claim:>10.2f} | {ours / claim:>6.2f}")
    print("(power: the vendor's server and rack figures, wall power; the planner prices device time only)")


if __name__ == "__main__":
    main()
