"""Weight-only quantisation (`rbln_quantization`, issue 20 part 1): w8a16, w4a16 with groups, fp8 weights.

- the option: optimum-rbln 0.12's keys, the older `precision`, clear errors naming the allowed values;
- round-to-nearest, checked against the format's definition computed here (the error of each
  weight at most half its scale; int4 packed two per byte; fp8 = torch's float8_e4m3fn cast);
- exact numerics against the fp32 transformers model whose projections hold the dequantised
  weights (the reference the issue names), on one device and split over two;
- device memory against the bytes the shapes give (packed weights + 16-bit scales), on a
  Llama-3-8B-shaped model compiled on the meta device; the decode step's simulated time.
"""

import copy
import json

import pytest
import torch

from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)
from llm_fixtures import hf_config, hf_generate, hf_logits, random_prompts, rbln_teacher_forced, save_source
import optimum_npu
from optimum_npu import RBLNAutoModelForCausalLM
from optimum_npu.modeling.quantization import Quantization, fake_quantize_, quantize_rtn
from optimum_npu.planning.meta import compile_decoder_on_meta
from optimum_npu.sim_device.quant_kernels import dequantize, pack_int4, unpack_int4

# Exact numerics: fp32 on both sides, the same weights, other summation orders (test_llm_parity's bound).
EXACT_LOGITS_ATOL = 1e-4
INT4_G32 = {"weights": "int4", "group_size": 32}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_source(tmp_path_factory.mktemp("llama"), "llama")


def compile_model(folder, **options):
    options = {"rbln_batch_size": 2, "rbln_max_seq_len": 256, "rbln_prefill_chunk_size": 64, "rbln_cache": False,
               **options}
    return RBLNAutoModelForCausalLM.from_pretrained(folder, export=True, **options)


# --------------------------------------------------------------------------- the option


def test_option_follows_optimum_rbln():
    assert Quantization.parse({"format": "rbln", "weights": "int8"}).to_json() == {
        "format": "rbln", "weights": "int8", "activations": "fp16", "kv_caches": "fp16", "group_size": 0}
    assert Quantization.parse({"precision": "w4a16"}) == Quantization("int4", "fp16", "fp16", 128)
    assert Quantization.parse({"kv_caches": "fp8"}).quantizes_weights is False


@pytest.mark.parametrize("value, match", [
    ({"weights": "int3"}, r"\['weights'\] must be one of 'int4', 'int8', 'fp8', 'fp16'; got 'int3'"),
    ({"activations": "int4"}, r"\['activations'\] must be one of 'int8', 'fp8', 'fp16'"),
    ({"kv_caches": "int8"}, r"\['kv_caches'\] must be one of 'fp8', 'fp16'"),
    ({"format": "gptq", "weights": "int4"}, r"\['format'\] must be one of 'rbln'"),
    ({"precision": "w3a16"}, r"\['precision'\] must be one of 'w4a16', 'w8a16', 'w8a8'"),
    ({"precision": "w4a16", "weights": "int4"}, "either 'precision' or"),
    ({"weights": "fp16"}, "quantises nothing"),
    ({"weights": "int4", "group_size": 0}, "int4 weights need a group"),
    ({"weights": "int4", "group_size": 33}, "must be an even int"),
    ({"weights": "fp8", "group_size": 64}, "one scale per output channel"),
    ({"weight": "int4"}, r"unknown key\(s\) \['weight'\]"),
])
def test_bad_values_are_errors_naming_the_allowed_ones(value, match):
    with pytest.raises(ValueError, match=match):
        Quantization.parse(value)


def test_fp8_weights_need_a_device_with_fp8():
    from optimum_npu import RBLNLlamaForCausalLMConfig

    with pytest.raises(ValueError, match="fp8 weights need a device with fp8 arithmetic, and RBLN-CA25 has none"):
        RBLNLlamaForCausalLMConfig(npu="RBLN-CA25", quantization={"weights": "fp8"})
    assert RBLNLlamaForCausalLMConfig(npu="RBLN-CR03", quantization={"weights": "fp8"}).quantization["weights"] == "fp8"


def test_a_group_that_does_not_divide_the_hidden_size_is_refused(source):
    folder, _ = source
    with pytest.raises(ValueError, match=r"group_size'\]=48 does not divide hidden_size=64.*allowed here: 32, 64"):
        compile_model(folder, rbln_quantization={"weights": "int4", "group_size": 48})


# --------------------------------------------------------------------------- round to nearest


@pytest.mark.parametrize("fmt, group, qmax", [("int8", 0, 127), ("int8", 16, 127), ("int4", 16, 7)])
def test_rtn_integer_formats_are_within_half_a_step(fmt, group, qmax):
    weight = torch.randn(24, 64)
    packed, scales = quantize_rtn(weight, fmt, group, torch.bfloat16)
    width = 64 if group == 0 else group
    # every scale is a bf16 value near the group's largest magnitude over qmax
    expected = weight.reshape(24, 64 // width, width).abs().amax(-1) / qmax
    assert torch.equal(scales, scales.to(torch.bfloat16).float())
    assert torch.allclose(scales, expected, rtol=2**-8)
    q = unpack_int4(packed) if fmt == "int4" else packed
    assert q.dtype == torch.int8 and int(q.min()) >= -qmax - 1 and int(q.max()) <= qmax
    step = scales.repeat_interleave(width, dim=1)
    restored = q.float() * step
    assert torch.equal(dequantize(packed, scales, fmt, group), restored)
    # round to nearest: each weight within half a step (and a hair for the bf16-rounded scale at the edge)
    assert ((restored - weight).abs() <= step * (0.5 + 2**-7)).all()


def test_int4_packs_two_signed_values_per_byte_low_nibble_first():
    q = torch.tensor([[-8, 7, -1, 0, 3, -4]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.tolist() == [[0x78, 0x0F, 0xC3]]
    assert torch.equal(unpack_int4(packed), q)


def test_fp8_weights_are_torch_float8_e4m3fn_of_the_scaled_weight():
    weight = torch.randn(8, 32)
    packed, scales = quantize_rtn(weight, "fp8", 0, torch.bfloat16)
    expected = (weight / scales).to(torch.float8_e4m3fn)
    assert torch.equal(packed.view(torch.float8_e4m3fn).float(), expected.float())
    assert scales.shape == (8, 1)


# --------------------------------------------------------------------------- exact numerics


@pytest.mark.parametrize("quantization, tp", [
    (INT4_G32, 1),
    pytest.param({"weights": "int8"}, 2, marks=pytest.mark.heavy),
    pytest.param({"weights": "fp8"}, 1, marks=pytest.mark.heavy),
])
def test_exact_numerics_equal_the_dequantised_fp32_model(source, monkeypatch, quantization, tp):
    folder, hf = source
    npu = "RBLN-CR03" if quantization["weights"] == "fp8" else "RBLN-CA25"   # fp8 where the preset has it
    monkeypatch.setenv("OPTIMUM_NPU_SYSTEM", f"{npu}x1")
    reference = fake_quantize_(copy.deepcopy(hf), quantization, torch.bfloat16)
    prompts = random_prompts((23, 9), seed=1)
    model = compile_model(folder, rbln_numerics="exact", rbln_quantization=quantization, rbln_tensor_parallel_size=tp,
                          rbln_npu=npu)
    try:
        ids = torch.stack([p[-9:] for p in prompts])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        for row in range(2):
            assert out[row, 9:].tolist() == hf_generate(reference, ids[row], max_new_tokens=8, do_sample=False).tolist()
        continuations = [hf_generate(reference, p, max_new_tokens=5, do_sample=False)[:-1] for p in prompts]
        for prompt, cont, logits in zip(prompts, continuations, rbln_teacher_forced(model, prompts, continuations)):
            expected = hf_logits(reference, torch.cat([prompt, cont]))[prompt.shape[0] - 1:]
            err = (logits - expected).abs().max().item()
            assert err <= EXACT_LOGITS_ATOL, f"{quantization} tp {tp}: max |difference| {err:.3g}"
            # ... and the quantisation itself is visible: the 16-bit model's logits differ
            assert (hf_logits(hf, torch.cat([prompt, cont]))[prompt.shape[0] - 1:] - expected).abs().max() > 1e-3
    finally:
        model.close()


# Device numerics (bf16) against fp32 on the same dequantised weights: test_llm_parity's bound for bf16,
# a fraction of the row's largest |logit| (the device dequantises to bf16 and multiplies in bf16).
BF16_LOGITS_RTOL = 0.10


def test_saved_folder_holds_the_packed_weights_and_reloads(source, tmp_path):
    folder, hf = source
    model = compile_model(folder, rbln_quantization=INT4_G32)
    ids = torch.tensor([random_prompts((12,), seed=2)[0].tolist()])
    try:
        expected = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
        model.save_pretrained(tmp_path / "compiled")
    finally:
        model.close()
    loaded = RBLNAutoModelForCausalLM.from_pretrained(tmp_path / "compiled")
    try:
        assert loaded.rbln_config.quantization == {"format": "rbln", "weights": "int4", "activations": "fp16",
                                                   "kv_caches": "fp16", "group_size": 32}
        weights = {spec.name: spec.dtype for spec in loaded.graphs["prefill"].program.weights}
        assert sum(dtype == "uint8" for dtype in weights.values()) == 4 * 2   # 4 projections x 2 layers
        assert torch.equal(loaded.generate(input_ids=ids, max_new_tokens=6, do_sample=False), expected)
        # the bf16 device against fp32 transformers on the dequantised weights
        reference = fake_quantize_(copy.deepcopy(hf), INT4_G32, torch.bfloat16)
        prompt, cont = ids[0], expected[0, ids.shape[1]:-1]
        (logits,) = rbln_teacher_forced(loaded, [prompt], [cont])
        wanted = hf_logits(reference, torch.cat([prompt, cont]))[prompt.shape[0] - 1:]
        assert ((logits - wanted).abs().amax(-1) <= BF16_LOGITS_RTOL * wanted.abs().amax(-1)).all()
    finally:
        loaded.close()


# --------------------------------------------------------------------------- a compressed-tensors checkpoint


# compressed-tensors layouts: (format, bits, type, group (0: per channel), largest magnitude, what we compile)
CT_INT4_G32 = ("pack-quantized", 4, "int", 32, 7, ("int4", 32))
CT_INT8 = ("int-quantized", 8, "int", 0, 127, ("int8", 0))
CT_FP8 = ("float-quantized", 8, "float", 0, 448, ("fp8", 0))


def _compressed_tensors_checkpoint(folder, model, layout):
    """`model` written as llm-compressor writes a quantised model: compressed-tensors' own
    quantisation config, scales (the largest magnitude of each group / channel over the format's,
    computed here) and its compressor of `layout` (int4: packed eight per int32)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config,
    )

    fmt, bits, kind, group, qmax, _ = layout
    strategy = dict(strategy="group", group_size=group) if group else dict(strategy="channel")
    weights = QuantizationArgs(num_bits=bits, type=kind, symmetric=True, **strategy)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=["lm_head"]))
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                rows, cols = module.weight.shape
                width = group or cols
                amax = module.weight.reshape(rows, cols // width, width).abs().amax(-1)
                scale = (amax / qmax).to(torch.bfloat16).float()   # as a bf16 checkpoint stores them
                module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(folder)
    return folder


@pytest.mark.parametrize("layout", [CT_INT4_G32, pytest.param(CT_INT8, marks=pytest.mark.heavy),
                                    pytest.param(CT_FP8, marks=pytest.mark.heavy)], ids=lambda layout: layout[0])
def test_a_compressed_tensors_checkpoint_runs_as_transformers_loads_it(tmp_path, monkeypatch, layout):
    from transformers import LlamaForCausalLM

    from llm_fixtures import make_hf_model

    folder = _compressed_tensors_checkpoint(tmp_path / "quantised", make_hf_model("llama"), layout)
    reference = LlamaForCausalLM.from_pretrained(folder)   # transformers' CompressedTensorsHfQuantizer
    npu = "RBLN-CR03" if layout is CT_FP8 else "RBLN-CA25"   # fp8 where the preset has it
    monkeypatch.setenv("OPTIMUM_NPU_SYSTEM", f"{npu}x1")
    model = compile_model(folder, rbln_numerics="exact", rbln_npu=npu)
    try:
        quantization = model.rbln_config.quantization
        assert (quantization["weights"], quantization["group_size"]) == layout[-1]
        prompts = random_prompts((23, 9), seed=1)
        continuations = [hf_generate(reference, p, max_new_tokens=5, do_sample=False)[:-1] for p in prompts]
        for prompt, cont, logits in zip(prompts, continuations, rbln_teacher_forced(model, prompts, continuations)):
            expected = hf_logits(reference, torch.cat([prompt, cont]))[prompt.shape[0] - 1:]
            assert (logits - expected).abs().max() <= EXACT_LOGITS_ATOL
    finally:
        model.close()
    if layout is CT_INT4_G32:
        with pytest.raises(ValueError, match=r"the checkpoint holds int4 weights \(group_size 32, compressed-tensors\)"):
            compile_model(folder, rbln_quantization={"weights": "int8"})


# --------------------------------------------------------------------------- memory and time


LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, num_hidden_layers=1, max_position_embeddings=8192, tie_word_embeddings=False)


def _projection_shapes(config):
    """(out, in) of the quantised projections of one layer, from the config alone."""
    head_dim = config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    h, i = config.hidden_size, config.intermediate_size
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


META_OPTIONS = dict(rbln_max_seq_len=1024, rbln_prefill_chunk_size=128, rbln_batch_size=1)


@pytest.fixture(scope="module")
def bf16_8b():
    """A layer of Llama-3-8B's shape, and its graphs compiled on the meta device in bf16."""
    config = hf_config("llama", **LLAMA3_8B)
    return config, compile_decoder_on_meta(config, check_memory=False, **META_OPTIONS)[1]


@pytest.mark.parametrize("quantization, bits, group", [({"weights": "int8"}, 8, 0), (INT4_G32 | {"group_size": 128}, 4, 128)])
def test_device_memory_of_an_8b_shaped_model_is_the_packed_bytes_and_scales(bf16_8b, quantization, bits, group):
    config, bf16 = bf16_8b
    options = META_OPTIONS
    _, quant = compile_decoder_on_meta(config, check_memory=False, rbln_quantization=quantization, **options)
    shapes = _projection_shapes(config) * config.num_hidden_layers
    projection_bytes = sum(n * k for n, k in shapes) * 2
    packed_bytes = sum(n * k * bits // 8 + n * (1 if group == 0 else k // group) * 2 for n, k in shapes)
    expected_saving = projection_bytes - packed_bytes
    saving = bf16["prefill"].program.memory.weights_bytes[0] - quant["prefill"].program.memory.weights_bytes[0]
    # weights are placed in whole DRAM pages: one page of slack per tensor
    assert abs(saving - expected_saving) <= len(shapes) * 2 * 64 * 1024 + 1
    # decode is bound by the weight bytes it streams: the step speeds up, by at most the ratio of
    # those bytes (every weight but the token embedding, of which a decode step reads one row)
    step_bf16 = bf16["decoder_batch_1"].estimate(kv_len=512).total_s
    step_quant = quant["decoder_batch_1"].estimate(kv_len=512).total_s
    streamed = bf16["prefill"].program.memory.weights_bytes[0] - config.vocab_size * config.hidden_size * 2
    byte_ratio = (streamed - saving) / streamed
    assert byte_ratio <= step_quant / step_bf16 <= 1.0, (step_quant / step_bf16, byte_ratio)


# --------------------------------------------------------------------------- the planner


@pytest.mark.heavy   # ~20 s on a busy machine: 12 small compilations and 3 serving simulations
def test_plan_takes_quantization_as_a_dimension(tmp_path, capsys):
    from optimum_npu.cli import main

    hf_config("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4).save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path), "--npu", "RBLN-CA12", "--input-len", "100", "--output-len", "20",
                 "--tensor-parallel-sizes", "1", "--batch-sizes", "1", "--chunk-sizes", "64", "--json",
                 "--quantization", "16bit", "w8a16", '{"weights": "int4", "group_size": 64}']) == 0
    candidates = json.loads(capsys.readouterr().out)
    by_quant = {c["quantization"]: c for c in candidates}
    assert set(by_quant) == {"16bit", "w8a16", "w4a16 g64"}
    memory = [by_quant[q]["memory_per_device_bytes"] for q in ("16bit", "w8a16", "w4a16 g64")]
    assert memory[0] > memory[1] > memory[2]


def test_plan_refuses_an_unknown_quantization_naming_the_known_ones(tmp_path, capsys):
    from optimum_npu.cli import main

    hf_config("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="quantization 'w3a16' is not one of 16bit, w8a16, w4a16"):
        optimum_npu.plan(tmp_path, input_len=100, output_len=20, quantizations=["w3a16"])
    assert main(["plan", str(tmp_path), "--input-len", "100", "--output-len", "20", "--quantization", "{bad"]) != 0
    assert "--quantization '{bad' is not a valid JSON object" in capsys.readouterr().err


LLAMA3_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                  num_hidden_layers=80, vocab_size=128256, max_position_embeddings=8192, tie_word_embeddings=False)


@pytest.mark.heavy   # ~60 s: 70B-wide graphs compiled on the meta device for 3 sizes x 2 quantisations
def test_llama_70b_in_w4a16_fits_on_fewer_devices_and_decodes_faster():
    result = optimum_npu.plan(hf_config("llama", **LLAMA3_70B), "RBLN-CA25", input_len=1024, output_len=128,
                              tensor_parallel_sizes=(4, 8, 16), batch_sizes=(1,), chunk_sizes=(128,),
                              quantizations=("16bit", "w4a16"))
    eager = [c for c in result.candidates if c.attn_impl == "eager"]
    smallest = {q: min(c.tensor_parallel_size for c in eager if c.quantization == q) for q in ("16bit", "w4a16 g128")}
    assert smallest == {"16bit": 16, "w4a16 g128": 4}   # 141 GB of bf16 weights need 16 ATOMs; int4, 4
    at_16 = {c.quantization: c for c in eager if c.tensor_parallel_size == 16}
    assert at_16["w4a16 g128"].memory_per_device_bytes < 0.35 * at_16["16bit"].memory_per_device_bytes
    assert at_16["w4a16 g128"].tpot_s < at_16["16bit"].tpot_s


# --------------------------------------------------------------------------- quality


@pytest.mark.heavy   # trains the tiny Llama (~40 s on a quiet machine)
def test_rtn_int8_is_near_lossless_and_int4_g128_a_small_increase(tmp_path):
    """On the tiny Llama trained on the repository's corpus and held-out generated stories: the
    fp32 model with the device's dequantised weights (what exact numerics computes, tested above)."""
    import math
    import random

    from transformers import AutoTokenizer, LlamaForCausalLM

    from optimum_npu.testing.llama import build_tiny_llama, story

    folder = build_tiny_llama(tmp_path / "tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rng = random.Random(1)   # the corpus is built from seed 0: these stories are new
    rows = []
    while len(rows) < 16:
        text = tokenizer(" ".join(story(rng) for _ in range(3))).input_ids
        if len(text) >= 96:
            rows.append(text[:96])
    ids = torch.tensor(rows)
    fp32 = LlamaForCausalLM.from_pretrained(folder).float().eval()

    def perplexity(model):
        with torch.no_grad():
            return math.exp(model(input_ids=ids, labels=ids).loss.item())

    base = perplexity(fp32)
    int8 = perplexity(fake_quantize_(copy.deepcopy(fp32), {"weights": "int8"}, torch.bfloat16))
    int4 = perplexity(fake_quantize_(copy.deepcopy(fp32), {"weights": "int4", "group_size": 128}, torch.bfloat16))
    assert abs(int8 / base - 1) < 0.005
    assert abs(int4 / base - 1) < 0.05
