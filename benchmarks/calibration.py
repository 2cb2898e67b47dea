"""The cost model against public measurements: Qwen3-4B on an RBLN-CA25 card (tensor parallel 4).

    python benchmarks/calibration.py [--tensor-parallel-size 4] [--decode-context 2048]

Compiles the Qwen3-4B configuration on the meta device (no weights: shapes, memory plan and
costs) with the options of the measured runs (docs/hardware.md, "Public measurements"): bf16,
4 devices of one card, max_seq_len 8192, eager attention, kvcache_block_size 8192,
prefill_chunk_size 128, decode buckets 1/2/4/8. Then prints, for every public point, the
measured figure, the prediction and the error, one line each.

How each point is predicted, with the runtime's own pricing (`CompiledModel.estimate`):
- decode step at batch b: one run of the batch-b decode graph, every sequence at a context of
  `--decode-context` tokens (the measurements do not state their context; see
  docs/performance-model.md);
- prefill of N tokens: ceil(N / 128) runs of the prefill graph, chunk i attending to
  128 * (i + 1) positions (the last chunk is padded to 128 tokens, as on the device);
- device memory per device: weights, non-KV buffers and activations (the fixed part), and the
  KV cache of one batch slot (the per-slot part).

The measurements of another model on one device, kept aside to test the model (not the fit),
are not in this repository's documents; none are printed.
"""

from __future__ import annotations

import argparse
import math
import time

from transformers import Qwen3Config

from optimum_npu.planning.meta import compile_decoder_on_meta

GiB = 1024**3
CHUNK = 128
BUCKETS = (1, 2, 4, 8)

# Real RBLN-CA25 runs of Qwen/Qwen3-4B, bf16, TP 4, vllm-rbln / optimum-rbln 0.11.1 (docs/hardware.md).
DECODE_MS = {1: 9.51, 2: 10.05, 4: 10.355, 8: 12.40}
PREFILL_MS = {500: 88.5, 2000: 359.6, 6000: 1177.0}
MEMORY_FIXED_GIB, MEMORY_PER_SLOT_GIB = 2.1, 0.28


def qwen3_4b_config() -> Qwen3Config:
    """Qwen/Qwen3-4B's config.json (the public model card's architecture figures)."""
    return Qwen3Config(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, torch_dtype="bfloat16",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensor-parallel-size", type=int, default=4)
    parser.add_argument("--decode-context", type=int, default=1088,
                        help="KV positions per sequence at which decode steps are priced")
    args = parser.parse_args()

    started = time.perf_counter()
    config, graphs = compile_decoder_on_meta(
        qwen3_4b_config(), rbln_tensor_parallel_size=args.tensor_parallel_size, rbln_batch_size=max(BUCKETS),
        rbln_decoder_batch_sizes=list(BUCKETS), rbln_max_seq_len=8192, rbln_attn_impl="eager",
        rbln_kvcache_block_size=8192, rbln_prefill_chunk_size=CHUNK, rbln_dtype="bfloat16", rbln_npu="RBLN-CA25",
    )
    print(f"Qwen3-4B, RBLN-CA25 x{config.tensor_parallel_size}, bf16, chunk {CHUNK}, buckets {list(BUCKETS)}: "
          f"compiled on the meta device in {time.perf_counter() - started:.1f} s")

    rows = []
    for batch in BUCKETS:
        estimate = graphs[f"decoder_batch_{batch}"].estimate(kv_len=args.decode_context)
        rows.append((f"decode step, batch {batch} (context {args.decode_context})", "ms", DECODE_MS[batch],
                     estimate.total_s * 1e3))
    prefill = graphs["prefill"]
    for tokens, measured in PREFILL_MS.items():
        chunks = math.ceil(tokens / CHUNK)
        predicted = sum(prefill.estimate(kv_len=CHUNK * (i + 1)).total_s for i in range(chunks))
        rows.append((f"prefill, {tokens} tokens ({chunks} chunks)", "ms", measured, predicted * 1e3))
    program = prefill.program
    caches = [b for b in program.buffers if b.name.startswith(("k_cache_", "v_cache_"))]
    kv_bytes = sum(program.local_spec(b).nbytes for b in caches)  # one device's share (split by KV heads)
    # The fixed part: everything else a device allocates (weights and buffers in whole DRAM pages).
    fixed = max(g.device_bytes for g in graphs.values()) - sum(program.resident_bytes(b) for b in caches)
    rows.append(("device memory per device, fixed part", "GiB", MEMORY_FIXED_GIB, fixed / GiB))
    rows.append(("device memory per device, per batch slot", "GiB", MEMORY_PER_SLOT_GIB,
                 kv_bytes / config.kvcache_num_blocks / GiB))

    width = max(len(name) for name, *_ in rows)
    print(f"\n{'point':<{width}} | {'measured':>9} | {'predicted':>9} | {'error':>7}")
    print("-" * (width + 35))
    worst = 0.0
    for name, unit, measured, predicted in rows:
        error = (predicted - measured) / measured * 100
        worst = max(worst, abs(error))
        print(f"{name:<{width}} | {measured:>9.3f} | {predicted:>9.3f} | {error:>+6.1f}%  {unit}")
    print(f"\nlargest error: {worst:.1f}% (goal: every point within 10%)")
    print("held-out points (another model on one device): not available in this repository; none printed")


if __name__ == "__main__":
    main()
