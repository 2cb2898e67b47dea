"""Greedy generation of a ~125M-parameter Llama: our `generate` on the simulated NPU vs transformers.

    python benchmarks/llm_generate.py [--new-tokens 128] [--prompt-len 32] [--batches 1 8] [--repeats 2] [--profile]

Both sides do the same work on the same CPU in the same dtype (bf16): the same random
weights, the same prompts (no padding), greedy, `max_new_tokens == min_new_tokens` so eos
cannot stop a row early. Ours: the model compiled once with `rbln_dtype="bfloat16"` and a
decode graph per batch bucket (compile time reported apart, never in the rates). Theirs:
`LlamaForCausalLM` in torch.bfloat16 under `torch.inference_mode()`.

Columns: host wall-clock output tokens/s (best of `--repeats`, interleaved, after a warm-up), the
ratio ours / HF (goal: >= 1), and the *simulated* device figures of our run from
`generation_stats` (TTFT, TPOT, tokens/s on the RBLN-CA25 device). `--profile` runs our
batch-1 generate under cProfile and prints where the host time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from optimum_npu import RBLNLlamaForCausalLM

SEED = 0


def bench_config() -> LlamaConfig:
    """~125M parameters: 12 layers of hidden 768, GQA 12 query / 4 KV heads, untied 32k vocab."""
    return LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )


def greedy(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Wall-clock seconds of one greedy generation of exactly `new_tokens` per row, and those tokens."""
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=2)
    seconds = time.perf_counter() - started
    new = out[:, input_ids.shape[1]:]
    if new.shape[1] != new_tokens:
        raise AssertionError(f"{type(model).__name__} generated {new.shape[1]} tokens, not {new_tokens}")
    return seconds, new


def race(ours, hf, input_ids: torch.Tensor, new_tokens: int, repeats: int):
    """Best-of-`repeats` seconds of each side, runs interleaved (ours, HF, ours, ...) after a warm-up each,
    so that a burst of load from elsewhere on the machine hits both alike."""
    greedy(ours, input_ids, 4), greedy(hf, input_ids, 4)
    ours_s = hf_s = float("inf")
    for _ in range(repeats):
        seconds, ours_tokens = greedy(ours, input_ids, new_tokens)
        ours_s = min(ours_s, seconds)
        seconds, hf_tokens = greedy(hf, input_ids, new_tokens)
        hf_s = min(hf_s, seconds)
    return ours_s, ours_tokens, hf_s, hf_tokens


def profile_ours(model, input_ids: torch.Tensor, new_tokens: int, top: int = 25) -> str:
    profiler = cProfile.Profile()
    with torch.inference_mode():
        profiler.enable()
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=2)
        profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(top)  # where the time goes, call tree order
    stats.sort_stats("tottime").print_stats(top)     # what costs by itself (aten ops run inside OpOverload.__call__)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="cProfile our batch-1 generate")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    busy = ("  (machine busy: host timings are noisy; when other processes share the cores, "
            "OMP_WAIT_POLICY=PASSIVE stops threads spinning for a descheduled peer)") if load > 1.5 else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load:.1f}{busy}")
    torch.manual_seed(SEED)
    hf = LlamaForCausalLM(bench_config()).eval()
    params = sum(p.numel() for p in hf.parameters())

    started = time.perf_counter()
    ours = RBLNLlamaForCausalLM.from_model(
        hf, rbln_batch_size=max(args.batches), rbln_decoder_batch_sizes=sorted(set(args.batches)),
        rbln_max_seq_len=256, rbln_prefill_chunk_size=64, rbln_dtype="bfloat16",
    )
    compile_s = time.perf_counter() - started
    hf = hf.to(torch.bfloat16)  # the compiled graphs hold their own copy of the weights
    print(f"Llama {params / 1e6:.0f}M parameters, bf16; compiled prefill + decode buckets {sorted(set(args.batches))} "
          f"in {compile_s:.1f} s (not counted below)")

    gen = torch.Generator().manual_seed(SEED)
    rows = []
    for batch in args.batches:
        input_ids = torch.randint(3, 32000, (batch, args.prompt_len), generator=gen)
        ours_s, ours_tokens, hf_s, hf_tokens = race(ours, hf, input_ids, args.new_tokens, args.repeats)
        stats = ours.generation_stats
        # Greedy bf16 on random weights: the first near-tie rounded differently forks the rows.
        differs = (ours_tokens != hf_tokens).int()
        agree = torch.where(differs.any(1), differs.argmax(1), args.new_tokens).float().mean().item()
        rows.append((batch, ours_s, hf_s, stats, agree))

    tokens = args.new_tokens
    print(f"\ngreedy, prompt {args.prompt_len} tokens, {tokens} new tokens per row, best of {args.repeats}")
    header = (f"{'batch':>5} | {'ours tok/s':>10} | {'HF tok/s':>9} | {'ours/HF':>7} | {'ours s':>7} | {'HF s':>7} | "
              f"{'sim TTFT ms':>11} | {'sim TPOT ms':>11} | {'sim tok/s':>9} | {'same prefix':>11}")
    print(header)
    print("-" * len(header))
    for batch, ours_s, hf_s, stats, agree in rows:
        ours_rate, hf_rate = batch * tokens / ours_s, batch * tokens / hf_s
        print(f"{batch:>5} | {ours_rate:>10.1f} | {hf_rate:>9.1f} | {ours_rate / hf_rate:>7.2f} | {ours_s:>7.2f} | "
              f"{hf_s:>7.2f} | {stats.ttft_s * 1e3:>11.3f} | {stats.tpot_s * 1e3:>11.3f} | "
              f"{stats.tokens_per_s:>9.0f} | {agree:>11.1f}")
    print("(ours/HF: host wall-clock; sim: simulated RBLN-CA25 device time of our run; "
          "same prefix: mean tokens before ours and HF's greedy bf16 outputs first differ)")
    print(f"device memory: {', '.join(f'npu{m.device} {m.total_bytes / 2**20:.0f} MiB' for m in stats.memory)}")

    if args.profile:
        print(f"\ncProfile of our generate, batch 1, {tokens} new tokens (sorted by own time):")
        print(profile_ours(ours, torch.randint(3, 32000, (1, args.prompt_len), generator=gen), tokens))
    ours.close()


if __name__ == "__main__":
    main()
