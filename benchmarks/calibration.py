"""The cost model against every public measurement: one line per point, measured / predicted / error.

    python benchmarks/calibration.py [--decode-context 1088] [--skip-memory]

Points (sources in docs/performance-model.md, "Calibration"):

- Qwen3-4B on an RBLN-CA25 card, tensor parallel 4 (the RBLN model zoo recipe: bf16, max_seq_len
  8192, eager attention, kvcache_block_size 8192, prefill_chunk_size 128, decode buckets 1/2/4/8):
  decode step at batch 1/2/4/8 (one run of that bucket's decode graph, every sequence at a context
  of `--decode-context` tokens: the measurements do not state it), prefill of 500/2000/6000 tokens
  (ceil(N / 128) runs of the prefill graph, chunk i attending to 128 (i + 1) positions), device
  memory per device (the fixed part and one batch slot's KV cache).
- ResNet-50 (224x224) and BERT-base (sequence 128) at batch 1 on one RBLN-CA22, end to end as the
  user times a call of the synchronous runtime: the run's host share, its copies in and out and its
  kernels (`CompiledModel.estimate`).
- Device memory on one RBLN-CA22: Llama-3.1-8B (max_seq_len 512, batch 1) and Llama-3.2-1B
  (max_seq_len 8192, batch 4): the compiled decoder's largest graph (weights, KV cache, activations),
  compiled as the real stack compiles it, the token embedding looked up on the host
  (rbln_use_inputs_embeds=True: the table takes no device memory).
- Card power of one RBLN-CA22 (sim_device/power.py) at the utilisation of the ResNet-50 and
  BERT-base runs above, and at rest.

Every program is compiled on the meta device (shapes, memory plan and costs; no weights).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import BertConfig, BertModel, LlamaConfig, Qwen3Config, ResNetConfig, ResNetForImageClassification

from optimum_npu.planning.meta import compile_decoder_on_meta
from optimum_npu.sim_device import power
from optimum_npu.sim_device.specs import get_npu_spec

GiB, MiB = 1024**3, 1024**2
CHUNK = 128
BUCKETS = (1, 2, 4, 8)

# Real RBLN-CA25 runs of Qwen/Qwen3-4B, bf16, TP 4, vllm-rbln / optimum-rbln 0.11.1 (docs/hardware.md).
DECODE_MS = {1: 9.51, 2: 10.05, 4: 10.355, 8: 12.40}
PREFILL_MS = {500: 88.5, 2000: 359.6, 6000: 1177.0}
MEMORY_FIXED_GIB, MEMORY_PER_SLOT_GIB = 2.1, 0.28
# One RBLN-CA22, rebel-compiler 0.11.0, synchronous Python runtime, batch 1, mean latency; card power
# (github.com/hunterhhunter/ML-HW-Benchmark-Framework, framework/docs/rbln-troubleshooting.md).
RESNET50_MS, BERT_BASE_MS = 0.716, 1.595
RESNET50_W, BERT_BASE_W, IDLE_W = 38.9, 37.0, 18.9
# Device memory on one RBLN-CA22: Llama-3.1-8B (vllm-rbln 0.11.0, same source), Llama-3.2-1B-Instruct
# (a public vllm serve tutorial: "3.4 GiB" of contexts).
LLAMA_8B_MIB, LLAMA_1B_GIB = 14_630, 3.4


def qwen3_4b_config() -> Qwen3Config:
    """Qwen/Qwen3-4B's config.json (the public model card's architecture figures)."""
    return Qwen3Config(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, torch_dtype="bfloat16",
    )


def llama_config(size: str) -> LlamaConfig:
    """meta-llama/Llama-3.1-8B's and Llama-3.2-1B's config.json figures."""
    if size == "8B":
        return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                           rope_theta=500000.0, tie_word_embeddings=False)
    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                       rope_theta=500000.0, tie_word_embeddings=True)


def qwen_rows(decode_context: int) -> list[tuple]:
    config, graphs = compile_decoder_on_meta(
        qwen3_4b_config(), rbln_tensor_parallel_size=4, rbln_batch_size=max(BUCKETS),
        rbln_decoder_batch_sizes=list(BUCKETS), rbln_max_seq_len=8192, rbln_attn_impl="eager",
        rbln_kvcache_block_size=8192, rbln_prefill_chunk_size=CHUNK, rbln_dtype="bfloat16", rbln_npu="RBLN-CA25",
    )
    rows = []
    for batch in BUCKETS:
        estimate = graphs[f"decoder_batch_{batch}"].estimate(kv_len=decode_context)
        rows.append((f"Qwen3-4B TP4 decode step, batch {batch} (context {decode_context})", "ms", DECODE_MS[batch],
                     estimate.total_s * 1e3))
    prefill = graphs["prefill"]
    for tokens, measured in PREFILL_MS.items():
        chunks = math.ceil(tokens / CHUNK)
        predicted = sum(prefill.estimate(kv_len=CHUNK * (i + 1)).total_s for i in range(chunks))
        rows.append((f"Qwen3-4B TP4 prefill, {tokens} tokens ({chunks} chunks)", "ms", measured, predicted * 1e3))
    program = prefill.program
    caches = [b for b in program.buffers if b.name.startswith(("k_cache_", "v_cache_"))]
    kv_bytes = sum(program.local_spec(b).nbytes for b in caches)  # one device's share (split by KV heads)
    fixed = max(g.device_bytes for g in graphs.values()) - sum(program.resident_bytes(b) for b in caches)
    rows.append(("Qwen3-4B TP4 device memory per device, fixed part", "GiB", MEMORY_FIXED_GIB, fixed / GiB))
    rows.append(("Qwen3-4B TP4 device memory per device, per batch slot", "GiB", MEMORY_PER_SLOT_GIB,
                 kv_bytes / config.kvcache_num_blocks / GiB))
    return rows


def single_graph_rows() -> list[tuple]:
    from optimum_npu import RBLNResNetForImageClassification
    from optimum_npu.modeling.encoders import RBLNBertModel

    spec = get_npu_spec("RBLN-CA22")
    with torch.device("meta"):
        resnet = ResNetForImageClassification(ResNetConfig(num_labels=1000))  # ResNet-50: transformers' defaults
        bert = BertModel(BertConfig())                                        # BERT-base: transformers' defaults
    models = [
        ("ResNet-50 224x224", RESNET50_MS, RESNET50_W, RBLNResNetForImageClassification.from_model(
            resnet, rbln_batch_size=1, rbln_image_size=224, rbln_npu="RBLN-CA22", rbln_create_runtimes=False)),
        ("BERT-base seq 128", BERT_BASE_MS, BERT_BASE_W, RBLNBertModel.from_model(
            bert, rbln_batch_size=1, rbln_max_seq_len=128, rbln_npu="RBLN-CA22", rbln_create_runtimes=False)),
    ]
    rows, power_rows = [], []
    for name, measured_ms, measured_w, model in models:
        estimate = model.graphs["model"].estimate()
        rows.append((f"{name}, CA22 batch 1, end to end", "ms", measured_ms, estimate.total_s * 1e3))
        # The card's power over back-to-back calls: the run's FLOPs and DRAM bytes over its wall time.
        watts = power.card_watts(spec, *power.utilisation(spec, estimate.flops, estimate.dram_bytes, estimate.total_s))
        power_rows.append((f"{name}, CA22 card power", "W", measured_w, watts))
    power_rows.append(("CA22 card power at rest", "W", IDLE_W, power.card_watts(spec, 0.0, 0.0)))
    return rows + power_rows


def memory_rows() -> list[tuple]:
    rows = []
    for size, options, measured, unit in (
            ("8B", dict(rbln_max_seq_len=512, rbln_batch_size=1), LLAMA_8B_MIB, "MiB"),
            ("1B", dict(rbln_max_seq_len=8192, rbln_batch_size=4), LLAMA_1B_GIB, "GiB")):
        # As the real stack compiles them: the token embedding looked up on the host (use_inputs_embeds).
        _, graphs = compile_decoder_on_meta(llama_config(size), check_memory=False, rbln_npu="RBLN-CA22",
                                            rbln_attn_impl="eager", rbln_prefill_chunk_size=CHUNK,
                                            rbln_use_inputs_embeds=True, **options)
        device = max(g.device_bytes for g in graphs.values())
        rows.append((f"Llama-3.{'1-8B' if size == '8B' else '2-1B'} device memory, CA22, "
                     f"max_seq_len {options['rbln_max_seq_len']} batch {options['rbln_batch_size']}", unit, measured,
                     device / (MiB if unit == "MiB" else GiB)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-context", type=int, default=1088,
                        help="KV positions per sequence at which the Qwen3-4B decode steps are priced")
    parser.add_argument("--skip-memory", action="store_true", help="without the Llama memory points (two compiles)")
    args = parser.parse_args()

    started = time.perf_counter()
    rows = qwen_rows(args.decode_context) + single_graph_rows() + ([] if args.skip_memory else memory_rows())
    print(f"compiled on the meta device in {time.perf_counter() - started:.0f} s")

    width = max(len(name) for name, *_ in rows)
    print(f"\n{'point':<{width}} | {'measured':>9} | {'predicted':>9} | {'error':>7}")
    print("-" * (width + 36))
    worst = 0.0
    for name, unit, measured, predicted in rows:
        error = (predicted - measured) / measured * 100
        worst = max(worst, abs(error))
        print(f"{name:<{width}} | {measured:>9.3f} | {predicted:>9.3f} | {error:>+6.1f}%  {unit}")
    print(f"\nlargest error: {worst:.1f}% over {len(rows)} points (goal: every point within 10%)")


if __name__ == "__main__":
    main()
