"""Memory and simulated time of the low-precision settings on a Llama-3-8B-shaped model.

Compiled on the meta device from the config alone (no weights), 1-layer and 2-layer copies
scaled to 32 layers as the planner does (every decoder layer is the same program). Per
setting: device memory per device (weights incl. scales, KV cache for batch 1 at max_seq_len
4096, activations), the decode step at KV length 2048 and a 512-token prefill chunk, against bf16.

fp8 weights and activations need an NPU with fp8 arithmetic (`--npu RBLN-CR03`); the ATOM
presets run the others.

Usage: python benchmarks/quantization_speed.py [--npu RBLN-CA25] [--tp 2]
"""

from __future__ import annotations

import argparse

from transformers import LlamaConfig

from optimum_npu.planning.meta import compile_decoder_on_meta
from optimum_npu.planning.planner import _ScaledGraph, _with_layers

LLAMA3_8B = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                        num_hidden_layers=32, vocab_size=128256, max_position_embeddings=8192,
                        tie_word_embeddings=False)
SETTINGS = [("bf16", None), ("w8a16", {"weights": "int8"}), ("w4a16 g128", {"weights": "int4"}),
            ("w8a8 int8", {"weights": "int8", "activations": "int8"}),
            ("bf16 + fp8 KV", {"kv_caches": "fp8"})]


def figures(npu: str, tp: int) -> list[tuple]:
    options = dict(rbln_npu=npu, rbln_tensor_parallel_size=tp, rbln_batch_size=1, rbln_max_seq_len=4096,
                   rbln_prefill_chunk_size=512, check_memory=False)
    layers = LLAMA3_8B.num_hidden_layers
    rows = []
    for label, quantization in SETTINGS:
        one = compile_decoder_on_meta(_with_layers(LLAMA3_8B, 1), rbln_quantization=quantization, **options)[1]
        two = compile_decoder_on_meta(_with_layers(LLAMA3_8B, 2), rbln_quantization=quantization, **options)[1]
        memory = [(p1.program.memory.total_bytes(0), p2.program.memory.total_bytes(0))
                  for p1, p2 in ((one["prefill"], two["prefill"]),)][0]
        per_device = memory[0] + (layers - 1) * (memory[1] - memory[0])
        decode = _ScaledGraph(one["decoder_batch_1"], two["decoder_batch_1"], layers).estimate(2048).total_s
        prefill = _ScaledGraph(one["prefill"], two["prefill"], layers).estimate(512).total_s
        rows.append((label, per_device, decode, prefill))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npu", default="RBLN-CA25")
    parser.add_argument("--tp", type=int, default=2)
    args = parser.parse_args()
    rows = figures(args.npu, args.tp)
    base = rows[0]
    print(f"Llama-3-8B shape on {args.npu} x{args.tp}, batch 1, max_seq_len 4096\n")
    print("| setting | GiB per device | decode step (KV 2048) | vs bf16 | prefill 512 tokens | vs bf16 |")
    print("|---|---|---|---|---|---|")
    for label, memory, decode, prefill in rows:
        print(f"| {label} | {memory / 2**30:.2f} | {decode * 1e3:.2f} ms | {decode / base[2]:.2f}x | "
              f"{prefill * 1e3:.1f} ms | {prefill / base[3]:.2f}x |")


if __name__ == "__main__":
    main()
