"""The compile cache across processes: a first process compiles a Llama's forward under
torch.compile(backend="rbln"), a second one (same model, same cache folder) loads the program;
then the same for RBLNLlamaForCausalLM.from_pretrained(export=True) of a saved tiny Llama.

Each process is started fresh (`python -c ...`), so the second one has nothing in memory: what it
skips is the cache's doing. Printed per process: the time of the first compiled call (Dynamo's
tracing + our compile or cache load + the run), or of from_pretrained(export=True) (loading the
checkpoint, the decoder's memory probe, its graphs: compiled or from the cache), and of the
whole process (interpreter and imports included).

Usage: python benchmarks/compile_cache.py [--layers 4 --hidden 256 --tokens 32]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
import optimum_npu.torch_backend as tb
layers, hidden, tokens = map(int, sys.argv[1:4])
torch.manual_seed(0)
config = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                     num_attention_heads=hidden // 32, num_key_value_heads=hidden // 64, vocab_size=1024)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 1024, (1, tokens))
compiled = torch.compile(model, backend="rbln")
start = time.perf_counter()
with torch.no_grad():
    compiled(ids)
first_call = time.perf_counter() - start
cached = all(p.from_cache for g in tb.compiled_graphs() for p in g.programs.values())
print(f"{first_call:.3f} {int(cached)}")
"""


EXPORT_CHILD = """
import sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from optimum_npu import RBLNLlamaForCausalLM
layers, hidden, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if sys.argv[4] == "save":
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 32, num_key_value_heads=hidden // 64, vocab_size=1024,
                         max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(folder)
start = time.perf_counter()
model = RBLNLlamaForCausalLM.from_pretrained(folder, export=True, rbln_max_seq_len=256)
export = time.perf_counter() - start
print(f"{export:.3f} {int(all(g.from_cache for g in model.graphs.values()))}")
"""


def run_child(code: str, argv: list, cache: str) -> tuple[float, float, bool]:
    env = dict(os.environ, OPTIMUM_NPU_CACHE=cache, HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *map(str, argv)],
                         env=env, check=True, capture_output=True, text=True).stdout.split()
    return float(out[-2]), time.perf_counter() - start, out[-1] == "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    labels = ("first process (empty cache)", "second process (cache hit)")
    print(f"torch.compile(backend='rbln'): Llama, {args.layers} layers, hidden {args.hidden}, {args.tokens} tokens")
    with tempfile.TemporaryDirectory() as cache:
        for label in labels:
            first_call, total, cached = run_child(CHILD, [args.layers, args.hidden, args.tokens], cache)
            print(f"  {label:30s} first compiled call {first_call:7.2f} s   whole process {total:7.2f} s   "
                  f"from cache: {cached}")
    print(f"RBLNLlamaForCausalLM.from_pretrained(export=True): {args.layers} layers, hidden {args.hidden}, "
          "max_seq_len 256")
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as folder:
        for label, step in zip(labels, ("save", "load")):
            export, total, cached = run_child(EXPORT_CHILD, [args.layers, args.hidden, folder, step], cache)
            print(f"  {label:30s} from_pretrained(export=True) {export:7.2f} s   whole process {total:7.2f} s   "
                  f"from cache: {cached}")


if __name__ == "__main__":
    main()
