"""Greedy generation on the simulated NPU vs transformers, on the host: short prompts and long context.

    python benchmarks/llm_generate.py [--rows short long] [--repeats 2] [--profile]

Rows (each: our `generate` vs transformers' on the same weights, same prompts, same dtype):
- `short`: a ~125M-parameter Llama (12 layers, hidden 768), prompt 32 tokens, 128 new tokens,
  at batch 1 and batch 8 (one compiled model with decode buckets 1 and 8);
- `long`: a 6-layer, 768-wide Llama, one prompt of 4000 tokens, 64 new tokens, compiled with
  max_seq_len 8192 and 256-token prefill chunks, once with eager attention and once with
  flash attention over 4096-token partitions.

Both sides do the same work on the same CPU in bf16: the same random weights, the same prompts
(no padding), greedy, `max_new_tokens == min_new_tokens` so eos cannot stop a row early. Ours:
compiled with `rbln_dtype="bfloat16"` (compile time reported apart, never in the rates). Theirs:
`LlamaForCausalLM` in torch.bfloat16 under `torch.inference_mode()`.

Columns: host wall-clock output tokens/s (best of `--repeats`, interleaved, after a warm-up), the
ratio ours / HF (goal: >= 1 on every row), and the *simulated* device figures of our run from
`generation_stats` (TTFT, TPOT, tokens/s on the RBLN-CA25 device). It prints the host CPU and how
it computes bf16 (`sim_device/host_math.py`; OPTIMUM_NPU_HOST_MATH=native|fp32 forces a route). `--profile` runs our
generate of the first row under cProfile and prints where the host time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from dataclasses import dataclass

import torch
from model_shapes import llama_125m_config
from transformers import LlamaConfig, LlamaForCausalLM

from optimum_npu import RBLNLlamaForCausalLM
from optimum_npu.sim_device import host_math

SEED = 0


def long_config() -> LlamaConfig:
    """The long-context model: as the short one with 6 layers and 8192 positions."""
    config = llama_125m_config()
    config.num_hidden_layers, config.max_position_embeddings = 6, 8192
    return config


@dataclass
class Row:
    name: str
    batch: int
    prompt_len: int
    new_tokens: int
    ours: object          # the compiled model
    hf: object


def short_rows(batches: list[int]) -> tuple[list[Row], float]:
    torch.manual_seed(SEED)
    hf = LlamaForCausalLM(llama_125m_config()).eval()
    started = time.perf_counter()
    ours = RBLNLlamaForCausalLM.from_model(
        hf, rbln_batch_size=max(batches), rbln_decoder_batch_sizes=sorted(set(batches)),
        rbln_max_seq_len=256, rbln_prefill_chunk_size=64, rbln_dtype="bfloat16",
    )
    compile_s = time.perf_counter() - started
    hf = hf.to(torch.bfloat16)  # the compiled graphs hold their own copy of the weights
    return [Row(f"125M batch {b}", b, 32, 128, ours, hf) for b in batches], compile_s


def long_rows() -> tuple[list[Row], float]:
    torch.manual_seed(SEED)
    hf = LlamaForCausalLM(long_config()).eval()
    common = dict(rbln_batch_size=1, rbln_max_seq_len=8192, rbln_prefill_chunk_size=256, rbln_dtype="bfloat16")
    started = time.perf_counter()
    eager = RBLNLlamaForCausalLM.from_model(hf, rbln_attn_impl="eager", **common)
    flash = RBLNLlamaForCausalLM.from_model(hf, rbln_attn_impl="flash_attn", rbln_kvcache_partition_len=4096, **common)
    compile_s = time.perf_counter() - started
    hf = hf.to(torch.bfloat16)
    return [Row("6L 4k eager", 1, 4000, 64, eager, hf), Row("6L 4k flash", 1, 4000, 64, flash, hf)], compile_s


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
    parser.add_argument("--rows", nargs="+", choices=["short", "long"], default=["short", "long"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes of the short rows")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="cProfile our generate of the first row")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    busy = ("  (machine busy: host timings are noisy; when other processes share the cores, "
            "OMP_WAIT_POLICY=PASSIVE stops threads spinning for a descheduled peer)") if load > 1.5 else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {load:.1f}{busy}")
    print(host_math.describe())
    rows = []
    if "short" in args.rows:
        built, compile_s = short_rows(args.batches)
        rows += built
        print(f"125M Llama, bf16: compiled prefill + decode buckets {sorted(set(args.batches))} in {compile_s:.1f} s")
    if "long" in args.rows:
        built, compile_s = long_rows()
        rows += built
        print(f"6-layer Llama, bf16, max_seq_len 8192, chunk 256: compiled eager and flash (partition 4096) "
              f"in {compile_s:.1f} s")
    print("(compile time is not counted below)")

    gen = torch.Generator().manual_seed(SEED)
    results = []
    for row in rows:
        input_ids = torch.randint(3, 32000, (row.batch, row.prompt_len), generator=gen)
        ours_s, ours_tokens, hf_s, hf_tokens = race(row.ours, row.hf, input_ids, row.new_tokens, args.repeats)
        # Greedy bf16 on random weights: the first near-tie rounded differently forks the rows.
        differs = (ours_tokens != hf_tokens).int()
        agree = torch.where(differs.any(1), differs.argmax(1), row.new_tokens).float().mean().item()
        results.append((row, ours_s, hf_s, row.ours.generation_stats, agree))

    print(f"\ngreedy generation, best of {args.repeats}")
    header = (f"{'row':<13} | {'prompt':>6} | {'new':>4} | {'ours tok/s':>10} | {'HF tok/s':>9} | {'ours/HF':>7} | "
              f"{'ours s':>7} | {'HF s':>7} | {'sim TTFT ms':>11} | {'sim TPOT ms':>11} | {'sim tok/s':>9} | "
              f"{'same prefix':>11}")
    print(header)
    print("-" * len(header))
    for row, ours_s, hf_s, stats, agree in results:
        tokens = row.batch * row.new_tokens
        ours_rate, hf_rate = tokens / ours_s, tokens / hf_s
        print(f"{row.name:<13} | {row.prompt_len:>6} | {row.new_tokens:>4} | {ours_rate:>10.1f} | {hf_rate:>9.1f} | "
              f"{ours_rate / hf_rate:>7.2f} | {ours_s:>7.2f} | {hf_s:>7.2f} | {stats.ttft_s * 1e3:>11.3f} | "
              f"{stats.tpot_s * 1e3:>11.3f} | {stats.tokens_per_s:>9.0f} | {agree:>11.1f}")
    print("(ours/HF: host wall-clock; sim: simulated RBLN-CA25 device time of our run; "
          "same prefix: mean tokens before ours and HF's greedy bf16 outputs first differ)")

    if args.profile:
        row = rows[0]
        print(f"\ncProfile of our generate, {row.name}, {row.new_tokens} new tokens (sorted by own time):")
        print(profile_ours(row.ours, torch.randint(3, 32000, (row.batch, row.prompt_len), generator=gen), row.new_tokens))
    for model in {id(row.ours): row.ours for row in rows}.values():
        model.close()


if __name__ == "__main__":
    main()
