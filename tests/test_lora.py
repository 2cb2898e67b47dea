"""Compile-time LoRA adapters (rbln_lora_config) on the decoder.

The reference is PEFT: each adapter folder is built by PEFT from the tiny model, and each
adapter's outputs are compared with PEFT's merged model (`merge_and_unload`, fp32
transformers) in exact numerics; lora_int_id 0 with the base model. Two adapters with different
ranks and targets (one rsLoRA) share one compiled model, batch 3.
"""

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from folder_edits import edit_rbln_config, refresh_manifest
from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)
from llm_fixtures import (
    LORA_ADAPTERS as ADAPTERS,
    hf_generate,
    hf_logits,
    left_pad,
    lora_config_of as lora_config,
    peft_merged_model,
    random_prompts,
    rbln_teacher_forced,
    save_lora_adapters,
    save_source,
)
from optimum_npu import RBLNAutoModelForCausalLM, RBLNLoRAAdapterConfig, RBLNLoRAConfig
from optimum_npu.configuration import CONFIG_NAME
from optimum_npu.modeling import base
from optimum_npu.modeling.decoderonly import compile_plan
from optimum_npu.modeling.decoderonly.lora_weights import resolve_adapters
from optimum_npu.sim_device.cost_model import CostModel, estimate_run
from optimum_npu.sim_device.specs import get_npu_spec

OPTIONS = dict(rbln_batch_size=3, rbln_max_seq_len=128, rbln_prefill_chunk_size=64, rbln_numerics="exact")
# Ours adds x A^T B^T to x W^T; PEFT's merged model multiplies by W + B A: the same fp32 math in
# another order, ~1e-6 x |logit| <= ~10 (as test_llm_parity's EXACT_LOGITS_ATOL).
EXACT_LOGITS_ATOL = 1e-4
NEW_TOKENS = 8
PROMPT_LENGTHS = (70, 23, 9)   # 70 > the prefill chunk: two chunks


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(base checkpoint folder, {lora_int_id: adapter folder})."""
    root = tmp_path_factory.mktemp("lora")
    source, _ = save_source(root / "base", "llama")
    return source, save_lora_adapters(root, "llama")


@pytest.fixture(scope="module")
def model(folders):
    source, adapters = folders
    m = RBLNAutoModelForCausalLM.from_pretrained(source, export=True, rbln_lora_config=lora_config(adapters), **OPTIONS)
    yield m
    m.close()


@pytest.fixture(scope="module")
def plain(folders):
    """The same base model compiled without adapters (no devices: its programs are read)."""
    return RBLNAutoModelForCausalLM.from_pretrained(folders[0], export=True, rbln_create_runtimes=False, **OPTIONS)


@pytest.fixture(scope="module")
def references(folders):
    """lora_int_id -> PEFT's merged fp32 model (0: the base model)."""
    _, adapters = folders
    return {0: peft_merged_model("llama", None), **{i: peft_merged_model("llama", path) for i, path in adapters.items()}}


def generate(model, prompts, **kwargs):
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("lora_int_id", [0, 1, 2])
def test_greedy_tokens_equal_peft_merged_model(model, references, lora_int_id):
    prompts = random_prompts(PROMPT_LENGTHS, seed=lora_int_id)
    tokens = generate(model, prompts, lora_int_id=lora_int_id)
    for row, prompt in enumerate(prompts):
        expected = hf_generate(references[lora_int_id], prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(tokens[row], expected), f"row {row}, adapter {lora_int_id}"


def test_the_adapters_change_the_tokens(references):
    """Else the test above would pass with the adapters ignored."""
    prompt = random_prompts([23], seed=1)[0]
    outs = [hf_generate(references[i], prompt, max_new_tokens=NEW_TOKENS, do_sample=False) for i in (0, 1, 2)]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2]) and not torch.equal(outs[1], outs[2])


def test_each_row_of_a_batch_uses_its_own_adapter(model, references):
    """Per-row adapters, by id and by name, teacher forced: every step's logits within the exact
    tolerance of the row's PEFT model."""
    prompts = random_prompts(PROMPT_LENGTHS, seed=7)
    chosen = [2, 0, 1]
    tokens = generate(model, prompts, lora_int_id=["mlp", "base", "attn"])
    model.set_adapter(chosen)
    try:
        logits = rbln_teacher_forced(model, prompts, [tokens[row, :-1] for row in range(3)])
    finally:
        model.set_adapter(None)
    for row, (prompt, adapter) in enumerate(zip(prompts, chosen)):
        expected = hf_logits(references[adapter], torch.cat([prompt, tokens[row, :-1]]))[prompt.shape[0] - 1:]
        error = (logits[row] - expected).abs().max().item()
        assert error <= EXACT_LOGITS_ATOL, f"row {row} (adapter {adapter}): max |difference| {error:.3g}"
        assert torch.equal(tokens[row], expected.argmax(-1))


def test_adapter_not_compiled_in_is_a_clear_error(model):
    prompts = random_prompts([5, 5], seed=3)
    with pytest.raises(ValueError, match=r"no LoRA adapter 3 was compiled.*rbln_lora_config.*0 \(base\), 1 \(attn\)"):
        generate(model, prompts, lora_int_id=3)
    with pytest.raises(ValueError, match="no LoRA adapter 'chat'"):
        generate(model, prompts, lora_int_id=[1, "chat"])
    with pytest.raises(ValueError, match="1 adapter.* for a batch of 2 rows"):
        generate(model, prompts, lora_int_id=[1])


def test_saved_folder_loads_without_the_adapter_folders(model, folders, references, tmp_path, monkeypatch):
    saved = Path(model.save_pretrained(tmp_path / "compiled"))
    recorded = json.loads((saved / CONFIG_NAME).read_text())["compile_options"]["lora_config"]
    assert [(a["lora_int_id"], a["r"], sorted(a["target_modules"])) for a in recorded["adapters"]] == [
        (i, r, sorted(targets)) for i, _, targets, r, _ in ADAPTERS]
    # Adapter folders moved away and the compiler unavailable: a load reads only the compiled folder.
    _, adapters = folders
    for path in adapters.values():
        shutil.move(path, path.with_name(path.name + ".moved"))
    monkeypatch.setattr(base, "compile_from_torch", _no_compiling)
    monkeypatch.setattr(compile_plan, "compile_from_torch", _no_compiling)
    try:
        loaded = RBLNAutoModelForCausalLM.from_pretrained(saved)
        prompts = random_prompts(PROMPT_LENGTHS, seed=11)
        tokens = generate(loaded, prompts, lora_int_id=2)
        loaded.close()
    finally:
        for path in adapters.values():
            shutil.move(path.with_name(path.name + ".moved"), path)
    for row, prompt in enumerate(prompts):
        assert torch.equal(tokens[row], hf_generate(references[2], prompt, max_new_tokens=NEW_TOKENS, do_sample=False))


def _no_compiling(*args, **kwargs):
    raise AssertionError("loading a compiled folder compiled something")


def test_a_folder_whose_config_lists_other_adapters_is_refused(model, tmp_path):
    saved = Path(model.save_pretrained(tmp_path / "compiled"))
    edit_rbln_config(saved, lambda data: data["compile_options"]["lora_config"]["adapters"].append(
        {"lora_int_id": 3, "lora_name": "added", "lora_path": "x", "r": 4, "lora_alpha": 8,
         "target_modules": ["q_proj"], "use_rslora": False, "scaling_factor": 1.0}))
    refresh_manifest(saved)
    with pytest.raises(ValueError, match="lora_config has 3 adapter.*should stack 4 LoRA slots, but it stacks "
                                         r"\[3\]"):
        RBLNAutoModelForCausalLM.from_pretrained(saved, rbln_create_runtimes=False)


def test_the_low_rank_matmuls_are_priced(model, plain):
    """The decode graph's FLOPs exceed the base model's by exactly the low-rank matmuls, 2 * R *
    (in + out) per row, targeted projection and layer, R the padded rank (computed here from the
    shapes); the simulated step takes longer."""
    hf = peft_merged_model("llama", None)
    layer = hf.model.layers[0]
    shapes = {name: (module.in_features, module.out_features) for name, module in
              [*layer.self_attn.named_children(), *layer.mlp.named_children()] if hasattr(module, "in_features")}
    rank = max(a[3] for a in ADAPTERS)
    targeted = {t for a in ADAPTERS for t in a[2]}
    per_token = sum(2 * rank * sum(shapes[t]) for t in targeted) * hf.config.num_hidden_layers
    cost = CostModel(get_npu_spec(model.rbln_config.npu))
    for graph, rows in (("decoder_batch_3", 3), ("prefill", 64)):
        with_lora, without = model.graphs[graph].program, plain.graphs[graph].program
        extra = sum(s.flops for s in with_lora.steps) - sum(s.flops for s in without.steps)
        assert extra == rows * per_token, graph
        assert estimate_run(with_lora, cost, kv_len=32).total_s > estimate_run(without, cost, kv_len=32).total_s


def test_the_planner_prices_adapters_from_their_shapes(model):
    """On the meta device (the planner's compile), a resolved rbln_lora_config is priced from its
    shapes, no adapter folder read: the same programs' FLOPs as the compiled model's."""
    from optimum_npu.planning.meta import compile_decoder_on_meta

    resolved = dataclasses.replace(model.rbln_config.lora_config, adapters=tuple(
        dataclasses.replace(a, lora_path="/nonexistent") for a in model.rbln_config.lora_config.adapters))
    _, graphs = compile_decoder_on_meta(model.config, check_memory=False, rbln_lora_config=resolved,
                                        **{k: v for k, v in OPTIONS.items() if k != "rbln_numerics"})
    for name in ("prefill", "decoder_batch_3"):
        assert sum(s.flops for s in graphs[name].program.steps) == sum(s.flops for s in model.graphs[name].program.steps)


# ---- bad options and hostile adapter folders -------------------------------------------------


@pytest.mark.parametrize("build, message", [
    (lambda: RBLNLoRAAdapterConfig(0, "zero", "x"), "lora_int_id must be an int >= 1 .0 is reserved"),
    (lambda: RBLNLoRAAdapterConfig(1, "base", "x"), "lora_name must be a non-empty string other than 'base'"),
    (lambda: RBLNLoRAAdapterConfig(1, "a", "x", r=0), "r of adapter 'a' must be a positive int"),
    (lambda: RBLNLoRAAdapterConfig(1, "a", "x", target_modules=["lm_head"]), "the decoder's projections are q_proj"),
    (lambda: RBLNLoRAConfig(adapters=[]), "adapters must be a non-empty list"),
    (lambda: RBLNLoRAConfig(adapters=[RBLNLoRAAdapterConfig(1, "a", "x"), RBLNLoRAAdapterConfig(1, "b", "y")]),
     r"own lora_int_id; \[1\] appear"),
    (lambda: RBLNLoRAConfig(adapters=[{"lora_int_id": 1, "lora_name": "a", "lora_path": "x", "rank": 4}]),
     r"unknown adapter fields \['rank'\]"),
    (lambda: RBLNLoRAConfig(adapters=[RBLNLoRAAdapterConfig(1, "a", "x", r=16)], max_lora_rank=8),
     "max_lora_rank=8 is below the rank 16"),
])
def test_bad_lora_options_are_clear_errors(build, message):
    with pytest.raises(ValueError, match=f"rbln_lora_config: .*{message}"):
        build()


def test_lora_with_tensor_parallelism_is_refused(folders):
    source, adapters = folders
    with pytest.raises(ValueError, match="rbln_lora_config with rbln_tensor_parallel_size=2"):
        RBLNAutoModelForCausalLM.from_pretrained(source, export=True, rbln_lora_config=lora_config(adapters),
                                                 rbln_tensor_parallel_size=2, **OPTIONS)


def test_lora_int_id_on_a_model_without_adapters_is_an_error(plain):
    with pytest.raises(ValueError, match="lora_int_id needs a model compiled with LoRA adapters .rbln_lora_config"):
        plain.generate(input_ids=torch.tensor([[5, 6]]), lora_int_id=1, max_new_tokens=1)


def _hostile(folders, tmp_path, edit, compile_it=False):
    """Adapter 1 copied to tmp_path and edited by `edit(folder)`, then read as a compile reads it
    (or compiled); the error raised."""
    source, adapters = folders
    folder = tmp_path / "adapter"
    shutil.copytree(adapters[1], folder)
    edit(folder)
    config = RBLNLoRAConfig(adapters=[RBLNLoRAAdapterConfig(1, "edited", str(folder))])
    with pytest.raises(ValueError) as error:
        if compile_it:
            RBLNAutoModelForCausalLM.from_pretrained(source, export=True, rbln_lora_config=config,
                                                     rbln_create_runtimes=False, **OPTIONS)
        else:
            resolve_adapters(config, peft_merged_model("llama", None))
    return str(error.value)


def _edit_config(**changes):
    def edit(folder):
        data = json.loads((folder / "adapter_config.json").read_text())
        data.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(data))
    return edit


def _edit_weights(change):
    def edit(folder):
        tensors = load_file(folder / "adapter_model.safetensors")
        change(tensors)
        save_file(tensors, folder / "adapter_model.safetensors")
    return edit


def _pickle_only(folder):
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")


def _fifo(folder):
    (folder / "adapter_model.safetensors").unlink()
    os.mkfifo(folder / "adapter_model.safetensors")


FIRST_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("edit, message", [
    (lambda folder: shutil.rmtree(folder), "lora_path of adapter 'edited' .* is not a local folder"),
    (_pickle_only, "has only adapter_model.bin, a pickle, which is never loaded"),
    (lambda folder: (folder / "adapter_config.json").unlink(), "has no adapter_config.json"),
    (_fifo, "is not a regular file"),
    (_edit_config(use_dora=True), r"use_dora=True: not supported"),
    (_edit_config(bias="all"), "bias='all': LoRA adapters that train biases are not supported"),
    (_edit_config(peft_type="IA3"), "peft_type is 'IA3'; only 'LORA'"),
    (_edit_config(r=8), r"expected finite float .* \(r=8, the model's"),
    (_edit_config(r=10**9), "r=1000000000 is larger than"),
    (_edit_config(r="4"), "r of adapter 'edited' must be a positive int; got '4'"),
    (_edit_config(lora_alpha=-1), "lora_alpha of adapter 'edited' must be a positive number"),
    (_edit_weights(lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)})),
     "holds 'base_model.model.lm_head.lora_A.weight', not a LoRA weight of a decoder projection"),
    (_edit_weights(lambda t: t.pop(FIRST_A)), "layer 0 q_proj has lora_B without its lora_A"),
    (_edit_weights(lambda t: t.update({FIRST_A: torch.zeros(4, 65)})), r"expected finite float \[4, 64\]"),
    (_edit_weights(lambda t: t[FIRST_A].__setitem__((0, 0), float("nan"))), "expected finite float"),
    (_edit_weights(lambda t: t.update({FIRST_A.replace("layers.0", "layers.9"): t[FIRST_A].clone()})),
     "is for layer 9, but the model has 2 layers"),
    (lambda folder: (folder / "adapter_model.safetensors").write_bytes(b"\xff" * 64), "not a valid safetensors file"),
])
def test_hostile_adapter_folders_are_clear_errors(folders, tmp_path, edit, message):
    assert "rbln_lora_config" in (text := _hostile(folders, tmp_path, edit))
    assert re.search(message, text), text


def test_a_hostile_adapter_stops_the_export(folders, tmp_path):
    """The same checks run when from_pretrained(export=True) compiles (before any graph is)."""
    text = _hostile(folders, tmp_path, _edit_config(use_dora=True), compile_it=True)
    assert re.search("rbln_lora_config: adapter 'edited' .*use_dora=True: not supported", text), text


# ---- what the vLLM plugin reads from a LoRA folder (no engine: tests/test_vllm_lora.py starts one) -----


def test_vllm_side_selects_compiled_adapters_by_lora_int_id(model, plain, tmp_path):
    from types import SimpleNamespace

    from optimum_npu.vllm.decoder_steps import CompiledDecoderSteps
    from optimum_npu.vllm.folder import CompiledDecoder, _fit_lora, check_adapter

    compiled = CompiledDecoder.read(model.save_pretrained(tmp_path / "with_lora"))
    assert compiled.lora_adapters == ((1, "attn"), (2, "mlp"))
    check_adapter(compiled, SimpleNamespace(lora_int_id=2, lora_name="any name"))
    with pytest.raises(ValueError, match=r"lora_int_id 3, but the folder .* compiled with the LoRA adapters "
                                         r"1 \(attn\), 2 \(mlp\) \(rbln_lora_config\)"):
        check_adapter(compiled, SimpleNamespace(lora_int_id=3, lora_name="x"))
    with pytest.raises(ValueError, match="compiled adapter 1 is 'attn' and 'mlp' is another.*--lora-modules"):
        check_adapter(compiled, SimpleNamespace(lora_int_id=1, lora_name="mlp"))
    steps = CompiledDecoderSteps(model)
    assert [steps.adapter_slot(r) for r in (None, SimpleNamespace(lora_int_id=2, lora_name="mlp"))] == [0, 2]
    plain_folder = CompiledDecoder.read(plain.save_pretrained(tmp_path / "plain"))
    with pytest.raises(ValueError, match="enable_lora=True, but the folder .* has no LoRA adapters compiled in"):
        _fit_lora(SimpleNamespace(max_loras=1), plain_folder)


# ---- heavy: the other families, and device numerics ---------------------------------------------


@pytest.mark.heavy
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_other_families_equal_peft_merged_model(tmp_path, family):
    """Qwen2 (q/k/v bias), Qwen3 (q/k norms, head_dim 32: q_proj is 64 -> 128) and Mistral
    (sliding window): one adapter per row, each row's tokens those of PEFT's merged model."""
    source, _ = save_source(tmp_path / "base", family)
    adapters = save_lora_adapters(tmp_path, family)
    compiled = RBLNAutoModelForCausalLM.from_pretrained(source, export=True, rbln_lora_config=lora_config(adapters),
                                                        **OPTIONS)
    prompts, chosen = random_prompts(PROMPT_LENGTHS, seed=5), [1, 2, 0]
    tokens = generate(compiled, prompts, lora_int_id=chosen)
    compiled.close()
    for row, (prompt, adapter) in enumerate(zip(prompts, chosen)):
        reference = peft_merged_model(family, adapters.get(adapter))
        assert torch.equal(tokens[row], hf_generate(reference, prompt, max_new_tokens=NEW_TOKENS, do_sample=False))


# As test_llm_parity's BF16_LOGITS_RTOL: bf16 keeps an 8-bit mantissa; the device is off by 3-6% of
# the row's largest |logit| on these tiny models (measured there), the tolerance 2x that.
BF16_LOGITS_RTOL = 0.10


@pytest.mark.heavy
def test_device_numerics_within_the_bf16_tolerance(folders, references):
    """bf16 on the device, adapters included: teacher-forced logits of each row within 10% of the
    row's largest |logit| of PEFT's fp32 merged model."""
    source, adapters = folders
    options = {**OPTIONS, "rbln_numerics": "device", "rbln_dtype": "bfloat16"}
    compiled = RBLNAutoModelForCausalLM.from_pretrained(source, export=True, rbln_lora_config=lora_config(adapters),
                                                        **options)
    prompts, chosen = random_prompts(PROMPT_LENGTHS, seed=9), [1, 2, 0]
    continuations = [hf_generate(references[a], p, max_new_tokens=NEW_TOKENS, do_sample=False)
                     for p, a in zip(prompts, chosen)]
    compiled.set_adapter(chosen)
    logits = rbln_teacher_forced(compiled, prompts, [c[:-1] for c in continuations])
    compiled.close()
    for row, (prompt, adapter) in enumerate(zip(prompts, chosen)):
        expected = hf_logits(references[adapter], torch.cat([prompt, continuations[row][:-1]]))[prompt.shape[0] - 1:]
        bound = BF16_LOGITS_RTOL * expected.abs().amax(-1, keepdim=True)
        assert ((logits[row] - expected).abs() <= bound).all(), f"row {row} (adapter {adapter})"
