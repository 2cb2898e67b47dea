"""Tensor parallelism: one model split over N simulated devices by the compiler.

- Parity: greedy tokens identical to transformers in exact numerics at TP 2, 4 and 8, for KV
  heads that divide the device count (split) and that do not (each device holds the KV head its
  query heads use), and query heads that do not divide (attention on shared heads, gathered
  before the output projection); device numerics (bf16, fp16) within the 16-bit tolerance of
  the single-device parity tests, and different from TP 1 (the partial sums are rounded).
- The plan: Megatron's layout (column / row / vocab / KV heads), read from the graph; a plain
  torch transformer block (no HF class) splits too and matches its fp32 output.
- Memory per device against what the shapes say; the out-of-memory verdict names the smallest
  tensor-parallel size that fits (and that size does fit).
- The vendor's canonical snippet (batch 4, max_seq_len 8192, TP 4, partition 4096, chunk 256,
  create_runtimes=False, save, load, generate) runs as written on a tiny model.
- Options: rbln_num_devices is rbln_tensor_parallel_size; a device list of the wrong length is
  refused at load before anything is allocated; stats and trace show every device.
- Crafted shard metadata is refused at load like any hostile program.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)
from llm_fixtures import hf_generate, left_pad, make_hf_model, random_prompts, rbln_teacher_forced, save_source
from optimum_npu import ArtifactError, DeviceMemoryError, RBLNAutoModelForCausalLM, RBLNLlamaForCausalLM, compile_from_torch
from optimum_npu.compile.compiler import ProgramTooLargeError
from optimum_npu.compile.frontend import export_graph
from optimum_npu.compile.tensor_parallel import plan_tensor_parallel
from optimum_npu.sim_device import memory as device_memory
from optimum_npu.sim_device import smi
from test_hostile_artifact import signed, split
from test_llm_parity import BF16_LOGITS_RTOL, FP16_LOGITS_RTOL, check_device_logits

NEW_TOKENS = 8
OPTIONS = dict(rbln_batch_size=2, rbln_max_seq_len=256, rbln_prefill_chunk_size=64)


@pytest.fixture(autouse=True)
def two_cards(monkeypatch):
    """Eight devices (two ATOM-Max cards): enough for TP 8."""
    monkeypatch.setenv("OPTIMUM_NPU_SYSTEM", "RBLN-CA25x2")


def generate(model, prompts):
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[:, ids.shape[1]:]


# --------------------------------------------------------------------------- parity


# (family, TP, HF overrides): the tiny models have 4 query heads and 2 KV heads unless overridden.
EXACT_CASES = {
    "llama-tp2-kv-split": ("llama", 2, {}),
    "llama-tp4-kv-shared": ("llama", 4, {}),
    "llama-tp8-q-and-kv-shared": ("llama", 8, {}),
    "llama-tp8-all-divide": ("llama", 8, dict(num_attention_heads=8, num_key_value_heads=8)),
    "qwen2-tp4-qkv-bias": ("qwen2", 4, {}),
    "qwen3-tp4-head-norms": ("qwen3", 4, {}),
    "llama-tp2-untied-embedding": ("llama", 2, dict(tie_word_embeddings=False)),
    "mistral-tp2-sliding-window": ("mistral", 2, {}),
}


@pytest.mark.parametrize("case", EXACT_CASES)
def test_exact_numerics_generate_is_token_identical_to_transformers(case):
    family, tp, overrides = EXACT_CASES[case]
    hf = make_hf_model(family, **overrides)
    model = RBLNAutoModelForCausalLM.from_model(hf, **OPTIONS, rbln_tensor_parallel_size=tp, rbln_numerics="exact")
    try:
        assert model.graphs["prefill"].program.tensor_parallel_size == tp
        prompts = random_prompts((70, 23), seed=3)
        tokens = generate(model, prompts)
        for row, prompt in enumerate(prompts):
            expected = hf_generate(hf, prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert tokens[row].tolist() == expected.tolist(), f"{case}, row {row}"
        assert [m.device for m in model.generation_stats.memory] == list(range(tp))
    finally:
        model.close()


@pytest.mark.parametrize(("family", "dtype", "rtol"), [("llama", "bfloat16", BF16_LOGITS_RTOL),
                                                      ("qwen2", "float16", FP16_LOGITS_RTOL)])
def test_device_numerics_at_tp4_within_16_bit_tolerance(family, dtype, rtol):
    hf = make_hf_model(family)
    model = RBLNAutoModelForCausalLM.from_model(hf, **OPTIONS, rbln_tensor_parallel_size=4, rbln_dtype=dtype)
    check_device_logits(model, hf, f"{family} {dtype} TP 4", rtol)


@pytest.mark.parametrize(("family", "tp", "dtype"), [("llama", 4, "bfloat16"), ("qwen2", 4, "float16"),
                                                   ("llama", 8, "bfloat16")])
def test_rank_batching_on_and_off_give_the_same_bits(family, tp, dtype, monkeypatch):
    """All ranks' matmuls, attention and small ops in one host call (rank_batching.py), or every op
    once per rank as each rank alone computes it (OPTIMUM_NPU_RANK_BATCHING=0): the same logits,
    bit for bit, in device numerics, and the same generated tokens."""
    hf = make_hf_model(family)
    prompts = random_prompts((40, 17), seed=5)
    cont = [hf_generate(hf, prompt, max_new_tokens=4, do_sample=False)[:-1] for prompt in prompts]
    logits, tokens = {}, {}
    for switch in ("1", "0"):
        monkeypatch.setenv("OPTIMUM_NPU_RANK_BATCHING", switch)
        model = RBLNAutoModelForCausalLM.from_model(hf, **OPTIONS, rbln_tensor_parallel_size=tp, rbln_dtype=dtype)
        try:
            assert all(r.rank_batching is (switch == "1") for r in model.runtimes.values())
            logits[switch] = rbln_teacher_forced(model, prompts, cont)
            tokens[switch] = generate(model, prompts)
        finally:
            model.close()
    assert all(torch.equal(on, off) for on, off in zip(logits["1"], logits["0"]))
    assert torch.equal(tokens["1"], tokens["0"])


def test_device_numerics_round_the_partial_sums():
    """TP 4 in bf16 differs from TP 1 only by where it rounds (the row-parallel partial sums are
    16-bit numbers added in 16 bits), so the two are close but not bit-identical; in exact
    numerics they agree to fp32 summation order."""
    hf = make_hf_model("llama")
    prompt = random_prompts((40,), seed=4)
    cont = [hf_generate(hf, prompt[0], max_new_tokens=4, do_sample=False)[:-1]]
    logits = {}
    for tp in (1, 4):
        for numerics in ("device", "exact"):
            model = RBLNAutoModelForCausalLM.from_model(hf, **OPTIONS, rbln_tensor_parallel_size=tp,
                                                        rbln_numerics=numerics)
            try:
                logits[tp, numerics] = rbln_teacher_forced(model, prompt, cont)[0]
            finally:
                model.close()
    scale = logits[1, "exact"].abs().max().item()
    assert (logits[4, "exact"] - logits[1, "exact"]).abs().max().item() <= 1e-5 * scale
    device_gap = (logits[4, "device"] - logits[1, "device"]).abs().max().item()
    assert 0 < device_gap <= BF16_LOGITS_RTOL * scale


# --------------------------------------------------------------------------- the plan


def _decode_graph(hf, tp, **options):
    model = RBLNAutoModelForCausalLM.from_model(hf, **OPTIONS, rbln_tensor_parallel_size=tp, rbln_create_runtimes=False,
                                                **options)
    return model.graphs[f"decoder_batch_{OPTIONS['rbln_batch_size']}"].program


def test_megatron_layout_from_the_graph():
    """Untied Qwen2 (q/k/v bias) at TP 2: fused Q/K/V and gate/up by parts, output and down
    projections by rows, embedding and LM head by vocabulary, KV caches by heads, the rest
    replicated; two all-reduces per layer (each fused with its residual add), one of the
    looked-up embedding rows and one all-gather of the logits."""
    hf = make_hf_model("qwen2")
    program = _decode_graph(hf, 2)
    shards = program.tensor_shards
    heads, kv_heads, head_dim = 4, 2, 16
    q, kv = heads * head_dim, kv_heads * head_dim
    # Rank 1 holds the second half of each part of Q/K/V: rows of q, then of k, then of v.
    assert shards["layers.0.qkv_proj.weight"].ranges == [
        [[0, q // 2], [q, kv // 2], [q + kv, kv // 2]], [[q // 2, q // 2], [q + kv // 2, kv // 2], [q + kv + kv // 2, kv // 2]]]
    assert shards["layers.0.qkv_proj.bias"].ranges == shards["layers.0.qkv_proj.weight"].ranges
    assert shards["layers.0.gate_up_proj.weight"].ranges == [[[0, 64], [128, 64]], [[64, 64], [192, 64]]]
    assert (shards["layers.0.o_proj.weight"].dim, shards["layers.0.down_proj.weight"].dim) == (1, 1)
    assert shards["lm_head.weight"].ranges == [[[0, 128]], [[128, 128]]]
    assert shards["embed_tokens.weight"].ranges == [[[0, 128]], [[128, 128]]]  # untied, split all the same
    assert shards["k_cache_0"].dim == 1 and shards["k_cache_0"].ranges == [[[0, 1]], [[1, 1]]]
    for replicated in ("norm.weight", "layers.0.input_layernorm.weight", "rope_cos"):
        assert replicated not in shards
    collectives = [s.ops[0].target for s in program.steps if s.kind == "collective"]
    residual_fused = [s for s in program.steps if s.kind == "collective" and len(s.ops[0].args) == 2]
    assert collectives.count("rbln.all_reduce.default") == 2 * hf.config.num_hidden_layers + 1
    assert len(residual_fused) == 2 * hf.config.num_hidden_layers
    assert collectives.count("rbln.all_gather.default") == 1


def test_plan_prints_and_refuses_nothing_silently():
    hf = make_hf_model("llama", num_attention_heads=4, num_key_value_heads=2)
    model = RBLNAutoModelForCausalLM.from_model(hf, **OPTIONS, rbln_create_runtimes=False)
    spec = model._graph_specs(hf, model.rbln_config)[1]
    from optimum_npu.compile.compiler import _inputs_from_info

    graph = export_graph(spec.module, _inputs_from_info(list(spec.input_info), False), [i[0] for i in spec.input_info])
    text = str(plan_tensor_parallel(graph, 4))
    assert "tensor parallel over 4 devices" in text
    assert "column" in text and "row" in text and "kv-heads" in text
    assert "parts [64, 32, 32]" in text  # the fused Q/K/V and its parts
    # llama's tied embedding / LM head: one tensor split by vocabulary (lookup all-reduced, logits gathered)
    assert "embed_tokens.weight" in text and "vocab      dim 0 -> [64, 64]" in text


# transformers' plan names the modules of its own classes; our decoder fuses q/k/v into `qkv_proj`
# and gate/up into `gate_up_proj` and drops the self_attn / mlp level (static_decoder.py).
FUSED_INTO = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
              "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
# transformers' TP styles in the plan's words (`replicated_with_grad_allreduce`: replicated,
# gradients aside); an LM head whose logits are gathered, and an embedding split by rows (a tied
# table, in transformers too), are split by vocabulary.
STYLE_NAMES = {"colwise": "column", "rowwise": "row", "replicated_with_grad_allreduce": "replicated",
               "colwise_gather_output": "vocab", "embedding_rowwise": "vocab"}
PLAN_LINE = re.compile(r"^  (\S+)\s+\[[^\]]*\]\s+(\S+)")


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3"])
def test_plan_agrees_with_transformers_tp_plan(family):
    """The plan derived from the graph alone, as printed, splits every module transformers'
    `base_model_tp_plan` names (and the LM head of `_tp_plan`) the way that plan says, in
    every layer: column-parallel Q/K/V and gate/up, row-parallel o and down projections,
    replicated per-head norms (Qwen3), a tied embedding by vocabulary (Llama here)."""
    hf = make_hf_model(family)
    # Compiled, not taken from the compile cache: the splitter is what is checked (and a cache entry
    # keeps the program, not the plan it was split by).
    model = RBLNAutoModelForCausalLM.from_model(hf, **OPTIONS, rbln_tensor_parallel_size=2, rbln_create_runtimes=False,
                                                rbln_cache=False)
    printed = {}
    for line in str(model.graphs[f"decoder_batch_{OPTIONS['rbln_batch_size']}"].sharding_plan).splitlines():
        if match := PLAN_LINE.match(line):
            printed[match[1]] = match[2]
    expected = {}
    for pattern, style in hf.config.base_model_tp_plan.items():
        leaf = FUSED_INTO.get(pattern.rsplit(".", 1)[-1], pattern.rsplit(".", 1)[-1])
        layers = range(hf.config.num_hidden_layers) if pattern.startswith("layers.*.") else [None]
        for layer in layers:
            expected[leaf + ".weight" if layer is None else f"layers.{layer}.{leaf}.weight"] = STYLE_NAMES[style]
    lm_head = "embed_tokens.weight" if hf.config.tie_word_embeddings else "lm_head.weight"
    expected[lm_head] = STYLE_NAMES[type(hf)._tp_plan["lm_head"]]
    assert {name: printed.get(name) for name in expected} == expected
    assert len(expected) >= 4 * hf.config.num_hidden_layers + 1


class Block(nn.Module):
    """A pre-norm transformer block in plain torch (no Hugging Face class)."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = (t.view(batch, tokens, self.heads, -1).transpose(1, 2)
                   for t in self.qkv(self.norm1(x)).split(dim, dim=-1))
        attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attention.transpose(1, 2).reshape(batch, tokens, dim))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


@pytest.mark.parametrize(("heads", "tp"), [(4, 2), (4, 4), (3, 2)], ids=["4-heads-tp2", "4-heads-tp4", "3-heads-tp2"])
def test_plain_torch_block_splits_and_matches_fp32(heads, tp):
    torch.manual_seed(0)
    block = Block(dim=16 * heads, heads=heads).eval()
    x = torch.randn(2, 8, 16 * heads)
    compiled = compile_from_torch(block, example_inputs=[x], tensor_parallel_size=tp, numerics="exact")
    program = compiled.program
    with torch.no_grad():
        expected = block(x)
    out = compiled.create_runtime()(x)
    assert (out - expected).abs().max().item() <= 1e-5
    assert program.tensor_shards["fc1.weight"].dim == 0 and program.tensor_shards["fc2.weight"].dim == 1
    assert "fc2.bias" not in program.tensor_shards  # a row-parallel bias is added once, after the sum
    if heads % tp == 0:
        assert program.tensor_shards["qkv.weight"].ranges[0][0] == [0, 16 * heads // tp]
    else:
        assert "qkv.weight" not in program.tensor_shards  # 3 heads over 2 devices: left whole


# --------------------------------------------------------------------------- memory


def _expected_weight_bytes(config, tp: int, dtype_bytes: int = 2) -> int:
    """Weights one device holds under Megatron's split, from the model's shapes (untied, q/k/v bias)."""
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = hidden // heads
    local_qkv = heads * head_dim // tp + 2 * head_dim * max(1, kv_heads // tp)
    per_layer = (local_qkv * hidden + local_qkv        # q/k/v weight and bias
                 + hidden * heads * head_dim // tp      # o_proj by rows
                 + 2 * inter // tp * hidden + hidden * inter // tp  # gate/up by columns, down by rows
                 + 2 * hidden)                          # two norms, whole
    # The untied embedding and the LM head are split by vocabulary (plus each rank's first id,
    # one int64, for the lookup); the final norm is whole.
    vocab_parallel = 2 * vocab // tp * hidden * dtype_bytes + (8 if tp > 1 else 0)
    return dtype_bytes * (config.num_hidden_layers * per_layer + hidden) + vocab_parallel


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_memory_per_device_follows_the_shapes(tp):
    """8 query heads, 2 KV heads: at TP 4 and 8 each device holds one KV head (shared)."""
    hf = make_hf_model("qwen2", num_attention_heads=8, num_key_value_heads=2)
    program = _decode_graph(hf, tp)
    config = hf.config
    assert program.memory.weights_bytes == [_expected_weight_bytes(config, tp)] * tp
    layout = next(s for s in program.buffers if s.name == "k_cache_0").shape  # full: [blocks, kv heads, block, dim]
    cache = 2 * config.num_hidden_layers * math.prod(layout) // layout[1] * max(1, config.num_key_value_heads // tp) * 2
    rope = 2 * 256 * (config.hidden_size // config.num_attention_heads) * 2
    assert program.memory.buffers_bytes == [cache + rope] * tp


class Lookup(nn.Module):
    """A token embedding (untied) and a small table of position rows."""

    def __init__(self, vocab=512, positions=8, dim=64):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(positions, dim)

    def forward(self, ids, position_ids):
        return self.tokens(ids) + self.positions(position_ids)


@pytest.mark.parametrize("tp", [2, 4])
def test_untied_embedding_split_by_vocabulary_saves_its_rows_and_matches_fp32(tp):
    """A vocabulary of 512 rows of 64: split, each device holds 512/N rows (16-bit) and its
    first id (int64). 8 position rows of 64: too small to pay the all-reduce, whole, and the
    plan says why."""
    torch.manual_seed(0)
    module = Lookup().eval()
    ids, position_ids = torch.randint(0, 512, (2, 16)), torch.arange(16).remainder(8).expand(2, 16)
    single = compile_from_torch(module, example_inputs=[ids, position_ids], numerics="exact")
    split = compile_from_torch(module, example_inputs=[ids, position_ids], tensor_parallel_size=tp, numerics="exact")
    saved_rows_bytes = (512 - 512 // tp) * 64 * 2
    assert split.program.memory.weights_bytes == [single.program.memory.weights_bytes[0] - saved_rows_bytes + 8] * tp
    plan = split.sharding_plan.by_name()
    assert plan["tokens.weight"].style == "vocab" and "rows per device" in plan["tokens.weight"].note
    assert plan["positions.weight"].style == "replicated" and "8 rows of 64" in plan["positions.weight"].note
    with torch.no_grad():
        expected = module(ids, position_ids)
    assert (split.create_runtime()(ids, position_ids) - expected).abs().max().item() <= 1e-5


def test_out_of_memory_names_the_smallest_tensor_parallel_size_that_fits():
    """A 16 GiB MLP (bf16) on a 15.7 GiB device: column + row parallel at TP 2 holds 8 GiB each."""
    with torch.device("meta"):
        mlp = nn.Sequential(nn.Linear(32768, 131072, bias=False), nn.GELU(), nn.Linear(131072, 32768, bias=False))
    with pytest.raises(ProgramTooLargeError, match=r"tensor_parallel_size=2 \(the smallest that fits") as info:
        compile_from_torch(mlp, input_info=[("x", (1, 32768), "float32")])
    assert info.value.smallest_tensor_parallel_size == 2
    compiled = compile_from_torch(mlp, input_info=[("x", (1, 32768), "float32")], tensor_parallel_size=2)
    assert compiled.program.memory.weights_bytes == [2 * 32768 * 131072 * 2 // 2] * 2


def test_out_of_memory_at_a_tensor_parallel_size_names_the_next_that_fits():
    """An 80 GiB MLP (bf16) compiled for TP 2 (40 GiB per device): 20 GiB at TP 4 does not fit, 10 at TP 8 does.
    The advice splits the model as exported at each larger size; splitting the TP 2 shards again would
    count 10 GiB at TP 4 and name it."""
    with torch.device("meta"):
        mlp = nn.Sequential(nn.Linear(32768, 655360, bias=False), nn.GELU(), nn.Linear(655360, 32768, bias=False))
    with pytest.raises(ProgramTooLargeError, match=r"tensor_parallel_size=8 \(the smallest that fits") as info:
        compile_from_torch(mlp, input_info=[("x", (1, 32768), "float32")], tensor_parallel_size=2)
    assert info.value.smallest_tensor_parallel_size == 8


def test_decoder_out_of_memory_names_the_smallest_tensor_parallel_size():
    """A KV cache of ~20 GiB: the model says which TP fits, and that TP passes the same check
    (all on the meta device: nothing of that size is ever allocated)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=32000, max_position_embeddings=32768)
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    options = dict(batch_size=20, max_seq_len=32768)
    rbln_config = RBLNLlamaForCausalLM.config_class(**options)
    with pytest.raises(DeviceMemoryError, match=r"rbln_tensor_parallel_size=(\d+) devices \(the smallest") as info:
        RBLNLlamaForCausalLM._resolve_config(hf, rbln_config)
    tp = int(re.search(r"rbln_tensor_parallel_size=(\d+) devices", str(info.value)).group(1))
    assert tp == 2  # 20 GiB of KV cache + 0.8 GiB of weights: half of it fits 15.7 GiB
    RBLNLlamaForCausalLM._resolve_config(hf, RBLNLlamaForCausalLM.config_class(**options, tensor_parallel_size=tp))


# --------------------------------------------------------------------------- the vendor's usage


def test_canonical_snippet_batch4_8192_tp4_partition4096_chunk256(tmp_path):
    folder, hf = save_source(tmp_path / "hf", "llama", max_position_embeddings=8192)
    model = RBLNLlamaForCausalLM.from_pretrained(
        folder, export=True,
        rbln_batch_size=4, rbln_max_seq_len=8192, rbln_tensor_parallel_size=4,
        rbln_kvcache_partition_len=4096, rbln_prefill_chunk_size=256, rbln_create_runtimes=False,
    )
    model.save_pretrained(tmp_path / "compiled")
    assert device_memory.used_bytes(0) == 0  # compiled without devices
    model = RBLNLlamaForCausalLM.from_pretrained(tmp_path / "compiled")
    try:
        assert model.rbln_config.tensor_parallel_size == 4 and model.rbln_config.attn_impl == "flash_attn"
        prompts = random_prompts((30, 12, 7, 20), seed=5)
        tokens = generate(model, prompts)
        assert tokens.shape == (4, NEW_TOKENS)
        assert [m.device for m in model.generation_stats.memory] == [0, 1, 2, 3]
        assert all(device_memory.used_bytes(d) > 0 for d in range(4))
    finally:
        model.close()


# --------------------------------------------------------------------------- options, stats, trace


def test_num_devices_is_an_alias_and_a_wrong_device_list_is_refused_at_load(tmp_path):
    hf = make_hf_model("llama")
    model = RBLNAutoModelForCausalLM.from_model(hf, **OPTIONS, rbln_num_devices=2, rbln_create_runtimes=False)
    assert model.rbln_config.tensor_parallel_size == 2
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "rbln_config.json").read_text())
    assert saved["compile_options"]["tensor_parallel_size"] == 2
    with pytest.raises(ValueError, match="rbln_num_devices=4 and rbln_tensor_parallel_size=2 disagree"):
        RBLNAutoModelForCausalLM.from_model(hf, **OPTIONS, rbln_num_devices=4, rbln_tensor_parallel_size=2)
    # Other tests of the session may still hold device memory (eager tensors, torch.compile programs):
    # the refused load must add none.
    used_before = [device_memory.used_bytes(d) for d in range(8)]
    with pytest.raises(ValueError, match=r"rbln_device must list 2 distinct device id\(s\)"):
        RBLNAutoModelForCausalLM.from_pretrained(tmp_path / "m", rbln_device=[0, 1, 2, 3])
    assert [device_memory.used_bytes(d) for d in range(8)] == used_before  # refused before any allocation
    loaded = RBLNAutoModelForCausalLM.from_pretrained(tmp_path / "m", rbln_num_devices=2, rbln_device=[3, 4],
                                                      rbln_activate_profiler=True)
    try:
        generate(loaded, random_prompts((9,), seed=6))
        assert [m.device for m in loaded.generation_stats.memory] == [3, 4]
        used = {d["index"]: d["memory_used_bytes"] - used_before[d["index"]]   # `optimum-npu smi`
                for d in smi.status()["devices"]}
        assert used[3] == used[4] > 0 and sum(used.values()) == 2 * used[3]
        assert "npu3" in str(loaded.generation_stats) and "npu4" in str(loaded.generation_stats)
        trace = json.loads(Path(loaded.save_trace(tmp_path / "trace.json")).read_text())["traceEvents"]
        devices = {e["pid"] - 1 for e in trace if e.get("ph") == "X" and e["pid"] > 0}
        assert devices == {3, 4}
        sync = [e for e in trace if e.get("cat") == "Device Sync"]
        assert {e["name"] for e in sync} >= {"all_reduce+add"}
        assert {e["pid"] - 1 for e in sync} == {3, 4}
        # npu3 is on card 0, npu4 on card 1; a two-card machine has one card per NUMA node.
        assert all(e["args"]["ring"] == "NUMA nodes" for e in sync)
    finally:
        loaded.close()


# --------------------------------------------------------------------------- hostile shard metadata


@pytest.fixture(scope="module")
def tp2_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp") / "block.rbln"
    torch.manual_seed(0)
    compile_from_torch(Block(), example_inputs=[torch.randn(1, 4, 64)], tensor_parallel_size=2).save(path)
    return path.read_bytes()


def _edit_shard(edit):
    def apply(program):
        edit(program["tensor_shards"]["fc1.weight"])
    return apply


def _first_collective(program):
    return next(s for s in program["steps"] if s["kind"] == "collective")


CRAFTED = {
    "range-beyond-tensor": (_edit_shard(lambda s: s["ranges"][1].__setitem__(0, [200, 100])), "outside"),
    "ranks-of-other-sizes": (_edit_shard(lambda s: s["ranges"][1].__setitem__(0, [128, 64])), "different sizes"),
    "dim-beyond-tensor": (_edit_shard(lambda s: s.__setitem__("dim", 5)), "dimension 5"),
    "one-rank-of-ranges": (_edit_shard(lambda s: s["ranges"].pop()), "1 rank"),
    "shard-of-unknown-tensor": (lambda p: p["tensor_shards"].__setitem__("ghost", {"dim": 0, "ranges": [[[0, 1]], [[0, 1]]]}),
                                "names no weight"),
    "shard-with-extra-key": (_edit_shard(lambda s: s.__setitem__("code", "x")), "unknown keys"),
    "weights-bytes-of-one-rank-understated": (lambda p: p["memory"]["weights_bytes"].__setitem__(1, 0), "weights_bytes"),
    "collective-inside-a-kernel": (lambda p: _first_collective(p).__setitem__("kind", "kernel"), "collective"),
    "kernel-op-as-collective": (lambda p: next(s for s in p["steps"] if s["kind"] == "kernel" and s["ops"]).__setitem__(
        "kind", "collective"), "exactly one op"),
    "collective-argument-of-wrong-type": (lambda p: _first_collective(p)["ops"][0]["args"].append("evil"),
                                          "residual|positional"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_tensor_parallel_program_is_refused(case, tp2_file, tmp_path):
    edit, match = CRAFTED[case]
    header, payload = split(tp2_file)
    edit(header["program"])
    path = tmp_path / "crafted.rbln"
    path.write_bytes(signed(header, payload))
    with pytest.raises(ArtifactError, match=match):
        from optimum_npu import Runtime

        Runtime(path)


# --------------------------------------------------------------------------- torchrun: one rank per process


@pytest.mark.heavy  # two fresh Python processes importing torch and transformers: ~30 s
@pytest.mark.parametrize("numerics", ["exact", "device"])
def test_torchrun_two_processes_give_the_in_process_outputs(numerics, tmp_path):
    """The same compiled folder under `torchrun --nproc-per-node 2`: each process runs one rank
    on one device, the all-reduces go through torch.distributed (gloo), and the tokens and
    logits are those of the in-process run (which, in exact numerics, are transformers')."""
    hf = make_hf_model("qwen2")
    model = RBLNAutoModelForCausalLM.from_model(hf, **OPTIONS, rbln_tensor_parallel_size=2, rbln_numerics=numerics)
    prompts = random_prompts((23, 9), seed=7)
    ids, mask = left_pad(prompts)
    try:
        with torch.no_grad():
            local = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                   output_scores=True, return_dict_in_generate=True)
        model.save_pretrained(tmp_path / "compiled")
        memory = model.generation_stats.memory
    finally:
        model.close()
    request = {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "max_new_tokens": NEW_TOKENS}
    (tmp_path / "prompts.json").write_text(json.dumps(request))
    torchrun = Path(sys.executable).with_name("torchrun")
    worker = Path(__file__).with_name("tp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", str(worker), str(tmp_path / "compiled"),
         str(tmp_path / "prompts.json"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected_tokens = local.sequences[:, ids.shape[1]:].tolist()
    for rank, result in enumerate(ranks):
        assert result["tokens"] == expected_tokens
        assert torch.equal(torch.tensor(result["scores"]), torch.stack(local.scores))  # the same bits
        assert result["devices"] == [rank]  # each process holds one device: its own shard
        assert result["weights_bytes"] == [memory[rank].weights_bytes]
    if numerics == "exact":
        for row, prompt in enumerate(prompts):
            assert expected_tokens[row] == hf_generate(hf, prompt, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()


def test_compiled_model_carries_its_printable_plan():
    torch.manual_seed(0)
    compiled = compile_from_torch(Block(), example_inputs=[torch.randn(1, 4, 64)], tensor_parallel_size=2)
    text = str(compiled.sharding_plan)
    assert "qkv.weight" in text and "column" in text and "fc2.weight" in text and "row" in text
    assert compile_from_torch(Block(), example_inputs=[torch.randn(1, 4, 64)]).sharding_plan is None
