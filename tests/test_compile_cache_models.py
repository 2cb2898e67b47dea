"""The compile cache under from_pretrained(export=True): a second process exporting the same
checkpoint runs the compiler zero times and gives the first one's outputs bit for bit; another
weight or option misses; rbln_cache=False neither reads nor writes; a corrupt entry is rebuilt."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from optimum_npu import RBLNLlamaForCausalLM
from optimum_npu.compile import cache, compiler

ROOT = Path(__file__).resolve().parent.parent
EXPORT = dict(rbln_max_seq_len=128, rbln_prefill_chunk_size=64, rbln_numerics="exact")
PROMPT = [[1, 17, 42, 99, 3, 250]]

# A fresh interpreter: counts the compiler's runs (every pass list goes through _run_passes), exports,
# and writes its logits and greedy tokens for the parent to compare.
CHILD = """
import json, sys, torch
import optimum_npu.compile.compiler as compiler
from optimum_npu import RBLNLlamaForCausalLM
runs = []
real = compiler._run_passes
compiler._run_passes = lambda c, passes: runs.append(1) or real(c, passes)
folder, out = sys.argv[1], sys.argv[2]
model = RBLNLlamaForCausalLM.from_pretrained(folder, export=True, rbln_max_seq_len=128, rbln_prefill_chunk_size=64, rbln_numerics="exact")
ids = torch.tensor(%r)
logits = model(input_ids=ids).logits
tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
torch.save({"logits": logits, "tokens": tokens}, out + ".pt")
json.dump({"compiler_runs": len(runs), "from_cache": [g.from_cache for g in model.graphs.values()]}, open(out, "w"))
""" % (PROMPT,)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, initializer_range=0.2,
                         bos_token_id=1, eos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture
def compiler_runs(monkeypatch):
    runs = []
    real = compiler._run_passes
    monkeypatch.setattr(compiler, "_run_passes", lambda c, passes: runs.append(1) or real(c, passes))
    return runs


def export_in_new_process(folder: Path, out: Path) -> tuple[dict, dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(out)], env=env, timeout=600,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), torch.load(str(out) + ".pt")


def test_a_second_process_compiles_nothing_and_gives_the_same_outputs(tmp_path):
    folder = tmp_path / "llama"
    tiny_llama().save_pretrained(folder)
    first, first_out = export_in_new_process(folder, tmp_path / "first.json")
    assert first["compiler_runs"] >= 2 and not any(first["from_cache"])   # the probe, prefill, decode
    second, second_out = export_in_new_process(folder, tmp_path / "second.json")
    assert second["compiler_runs"] == 0 and all(second["from_cache"])
    assert torch.equal(first_out["logits"], second_out["logits"])
    assert torch.equal(first_out["tokens"], second_out["tokens"])


def test_changed_weight_or_option_misses_and_the_opt_out_neither_reads_nor_writes(compiler_runs):
    hf = tiny_llama()
    RBLNLlamaForCausalLM.from_model(hf, **EXPORT, rbln_create_runtimes=False)
    entries = cache.info().entries
    runs = len(compiler_runs)
    assert entries == runs  # every compilation stored (probe included)
    hit = RBLNLlamaForCausalLM.from_model(hf, **EXPORT, rbln_create_runtimes=False)
    assert len(compiler_runs) == runs and all(g.from_cache for g in hit.graphs.values())

    with torch.no_grad():
        hf.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    changed = RBLNLlamaForCausalLM.from_model(hf, **EXPORT, rbln_create_runtimes=False)
    assert not any(g.from_cache for g in changed.graphs.values())
    other_dtype = RBLNLlamaForCausalLM.from_model(hf, **EXPORT, rbln_dtype="float16", rbln_create_runtimes=False)
    assert not any(g.from_cache for g in other_dtype.graphs.values())

    stored, runs = cache.info().entries, len(compiler_runs)
    opted_out = RBLNLlamaForCausalLM.from_model(hf, **EXPORT, rbln_cache=False, rbln_create_runtimes=False)
    assert not any(g.from_cache for g in opted_out.graphs.values())
    assert len(compiler_runs) > runs and cache.info().entries == stored


def test_a_corrupt_entry_is_ignored_and_rebuilt(compiler_runs):
    hf = tiny_llama()
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits[:, -1]  # the compiled decoder returns the last position's
    RBLNLlamaForCausalLM.from_model(hf, **EXPORT, rbln_create_runtimes=False)
    for entry in cache.cache_dir().glob("*.rbln"):
        entry.write_bytes(entry.read_bytes()[:-100] + b"\0" * 100)  # payload no longer matches its checksum
    runs = len(compiler_runs)
    with pytest.warns(UserWarning, match="ignoring entry"):
        model = RBLNLlamaForCausalLM.from_model(hf, **EXPORT)
    assert len(compiler_runs) > runs and not any(g.from_cache for g in model.graphs.values())
    assert (model(input_ids=ids).logits[:, -1] - expected).abs().max().item() <= 1e-4  # exact numerics vs transformers
    again = RBLNLlamaForCausalLM.from_model(hf, **EXPORT, rbln_create_runtimes=False)
    assert all(g.from_cache for g in again.graphs.values())
