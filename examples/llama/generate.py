"""A Llama on the simulated NPU: export, save, reload, generate, read the stats and the trace.

    python examples/llama/generate.py            # ~1 min (plus ~1 min the first time, to train the model)

1. Build the tiny Llama of `build_tiny_llama.py` (once; the folder is reused).
2. Export it: `from_pretrained(export=True, rbln_*=...)` compiles a prefill graph (chunks of
   `rbln_prefill_chunk_size` tokens) and one decode graph per batch bucket, all sharing the
   weights and a paged KV cache on the device. `save_pretrained` writes them as `.rbln` files.
3. Load the compiled folder back (no recompilation) and `generate` for prompts of different
   lengths, left-padded, streaming the first one with a `TextStreamer`.
4. Print the simulated device figures (`generation_stats`) and save a Perfetto trace.
5. Compile again with `rbln_numerics="exact"` (fp32 on the host, still priced as bf16) and
   check that greedy decoding matches transformers token for token.

Outputs go to examples/llama/out/ (compiled folders and trace.json; open it at https://ui.perfetto.dev).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM, TextStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_tiny_llama import DEFAULT_FOLDER, DEFAULT_STEPS, build  # noqa: E402

from optimum_npu import RBLNLlamaForCausalLM  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
PROMPTS = [
    "Once upon a time, there was a",
    "It was the best of times,",
    "Alice was beginning to get very tired of sitting by her sister on the bank, and",
    "Call me Ishmael. Some years ago,",
]
EXPORT_OPTIONS = dict(
    rbln_batch_size=4,                 # up to 4 sequences per generate call (4 KV cache slots)
    rbln_decoder_batch_sizes=[4, 1],   # decode graphs compiled for 4 rows and for 1 row
    rbln_max_seq_len=256,              # prompt + generated tokens per sequence
    rbln_prefill_chunk_size=64,        # prompt tokens per prefill step (a multiple of 64)
    rbln_dtype="bfloat16",             # the device computes in bf16
)


@dataclass
class Result:
    texts: list[str]
    tokens: torch.Tensor               # generated ids (device numerics), batch x new tokens
    exact_tokens: torch.Tensor         # generated ids with rbln_numerics="exact"
    hf_tokens: torch.Tensor            # transformers' greedy generate, fp32
    trace_path: Path
    stats: object                      # GenerationStats of the batched generate

    @property
    def exact_matches_hf(self) -> bool:
        return torch.equal(self.exact_tokens, self.hf_tokens)


def _timed(label: str, started: float) -> None:
    print(f"[{label}: {time.perf_counter() - started:.1f} s]")


def main(model_dir: str | Path = DEFAULT_FOLDER, out_dir: str | Path = OUT, train_steps: int = DEFAULT_STEPS,
         max_new_tokens: int = 48, prompts: list[str] = PROMPTS) -> Result:
    out_dir = Path(out_dir)
    started = time.perf_counter()
    model_dir = build(model_dir, steps=train_steps)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # padding_side="left" is saved with it
    _timed("tiny Llama ready", started)

    # -- export (compile) with the profiler on, and save --------------------------------------
    started = time.perf_counter()
    model = RBLNLlamaForCausalLM.from_pretrained(model_dir, export=True, rbln_activate_profiler=True, **EXPORT_OPTIONS)
    compiled_dir = model.save_pretrained(out_dir / "compiled_llama")
    model.close()  # free its simulated device memory before loading the saved copy
    _timed("export + save_pretrained", started)
    print(f"{compiled_dir}: " + ", ".join(sorted(p.name for p in Path(compiled_dir).iterdir())))

    # -- load the compiled folder: no recompilation. Runtime options (rbln_activate_profiler,
    # rbln_device) are chosen at load; compile-time ones are fixed in the folder.
    started = time.perf_counter()
    model = RBLNLlamaForCausalLM.from_pretrained(compiled_dir, rbln_activate_profiler=True)
    _timed("load compiled folder", started)
    print(model)

    # -- generate: one prompt streamed, then the whole batch ----------------------------------
    started = time.perf_counter()
    print(f"\n--- streaming prompt 0 (batch 1, decode bucket 1) ---\n{prompts[0]}", end="")
    single = tokenizer(prompts[:1], return_tensors="pt")
    model.generate(**single, max_new_tokens=max_new_tokens, do_sample=False,
                   streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    print(model.generation_stats)

    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    tokens = out[:, batch.input_ids.shape[1]:]
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    print(f"\n--- batch of {len(prompts)} prompts, left-padded to {batch.input_ids.shape[1]} tokens ---")
    for prompt, text in zip(prompts, texts):
        print(f"> {prompt}\033[1m{text}\033[0m")
    stats = model.generation_stats
    print(f"\ngeneration_stats (simulated device):\n{stats}")
    trace_path = Path(model.save_trace(out_dir / "trace.json"))
    print(f"Perfetto trace: {trace_path}  (open at https://ui.perfetto.dev)")
    _timed("generate", started)
    model.close()

    # -- exact numerics: same program, fp32 on the host: token-identical to transformers -------
    started = time.perf_counter()
    exact = RBLNLlamaForCausalLM.from_pretrained(model_dir, export=True, rbln_numerics="exact", **EXPORT_OPTIONS)
    exact_tokens = exact.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)[:, batch.input_ids.shape[1]:]
    exact.close()
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        hf_tokens = hf.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)[:, batch.input_ids.shape[1]:]
    result = Result(texts, tokens, exact_tokens, hf_tokens, trace_path, stats)
    same_as_bf16 = (tokens == exact_tokens).float().mean().item() if tokens.shape == exact_tokens.shape else 0.0
    print(f"\nrbln_numerics='exact' vs transformers (fp32), greedy, {len(prompts)} x {max_new_tokens} tokens: "
          f"{'MATCH token for token' if result.exact_matches_hf else 'MISMATCH'}; "
          f"bf16 device numerics agree with them on {same_as_bf16:.0%} of the tokens")
    _timed("exact-numerics check", started)
    return result


if __name__ == "__main__":
    main()
