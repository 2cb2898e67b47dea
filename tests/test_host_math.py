"""The two host routes for bf16 device numerics (sim_device/host_math.py), each forced with
OPTIMUM_NPU_HOST_MATH, against fp32 references on bf16-rounded operands.

Tolerances (relative to the output's largest magnitude):
- one matmul with bias: 2^-8 (one bf16 rounding of the result is at most 2^-9 of it; the native
  route may also round the bias add separately: 2^-8 covers both);
- a two-matmul block with GELU between: 2e-2, as every bf16 check of test_compile_runtime
  (each rounding adds ~2^-9, and the rounded intermediate feeds the second matmul);
- a tiny Llama's logits (prefill, then decode steps fed the same tokens), against the
  transformers model in fp32: 5% of the largest |logit|, test_llm_parity's bf16 bound.
The routes are not compared with each other bit for bit: they accumulate in different orders.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from optimum_npu import Runtime, compile_from_torch
from optimum_npu.sim_device import host_math, smi
from llm_fixtures import rbln_teacher_forced

ROUTES = ("native", "fp32")


def assert_close_to(actual, expected, rel, what):
    scale = expected.abs().max().item()
    err = (actual.float() - expected).abs().max().item()
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel} x output scale {scale:.3g}"


def bf16_exact(t):
    return t.detach().bfloat16().float()


class MatmulGeluMatmul(nn.Module):
    def __init__(self, d=96, hidden=256):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("rows", [1, 64])
def test_one_matmul_is_the_fp32_product_of_bf16_operands_rounded_once(route, rows, monkeypatch):
    monkeypatch.setenv(host_math.ENV, route)
    module = nn.Linear(96, 200).bfloat16()
    x = torch.randn(rows, 96).bfloat16()
    runtime = Runtime(compile_from_torch(module, input_info=[("x", [rows, 96], "bfloat16")]))
    assert runtime.host_math.route == route
    out = runtime.run(x)
    assert out.dtype == torch.bfloat16
    expected = F.linear(x.float(), module.weight.float(), module.bias.float())
    assert_close_to(out, expected, 2**-8, f"{route} route, {rows} rows")
    runtime.close()


@pytest.mark.parametrize("route", ROUTES)
def test_a_block_matches_fp32_on_bf16_weights(route, monkeypatch):
    monkeypatch.setenv(host_math.ENV, route)
    module = MatmulGeluMatmul().bfloat16()
    x = torch.randn(8, 96).bfloat16()
    runtime = Runtime(compile_from_torch(module, input_info=[("x", [8, 96], "bfloat16")]))
    expected = MatmulGeluMatmul()
    expected.load_state_dict({k: bf16_exact(v) for k, v in module.state_dict().items()})
    with torch.no_grad():
        assert_close_to(runtime.run(x), expected(x.float()), 2e-2, f"{route} route")
    runtime.close()


def test_fp32_route_holds_bf16_values_in_fp32_and_accounts_device_memory_at_2_bytes(monkeypatch):
    module = nn.Linear(64, 64).bfloat16()
    compiled = compile_from_torch(module, input_info=[("x", [4, 64], "bfloat16")])
    usage = {}
    for route in ROUTES:
        monkeypatch.setenv(host_math.ENV, route)
        with Runtime(compiled) as runtime:
            (weight,) = [t for t in runtime._state.values() if t.dim() == 2]
            assert weight.dtype == (torch.float32 if route == "fp32" else torch.bfloat16)
            assert torch.equal(weight.float(), module.weight.float())   # the same bf16 values
            usage[route] = [(m.weights_bytes, m.buffers_bytes, m.activations_bytes) for m in runtime.stats.memory]
    assert usage["fp32"] == usage["native"]
    assert usage["fp32"][0][0] >= 2 * 64 * 64   # the weight counts at bf16 width


def test_a_runtime_sharing_state_takes_the_route_of_the_one_it_shares_with(monkeypatch):
    module = nn.Linear(32, 32).bfloat16()
    compiled = compile_from_torch(module, input_info=[("x", [2, 32], "bfloat16")])
    monkeypatch.setenv(host_math.ENV, "fp32")
    first = Runtime(compiled)
    monkeypatch.setenv(host_math.ENV, "native")
    second = Runtime(compiled, share_state_with=first)
    assert second.host_math == first.host_math and second.host_math.route == "fp32"
    x = torch.randn(2, 32).bfloat16()
    assert torch.equal(first.run(x), second.run(x))
    second.close()
    first.close()


def test_auto_is_native_only_on_cpus_with_bf16_matmul_instructions(monkeypatch):
    monkeypatch.delenv(host_math.ENV, raising=False)
    monkeypatch.setattr(host_math, "native_bf16_instructions", lambda: ["AMX"])
    assert host_math.choose().route == "native"
    monkeypatch.setattr(host_math, "native_bf16_instructions", lambda: [])
    assert host_math.choose().route == "fp32"
    assert "no AVX512-BF16 / AMX" in host_math.choose().reason


def test_fp32_copies_that_would_not_fit_host_ram_stay_native(monkeypatch):
    monkeypatch.setenv(host_math.ENV, "fp32")
    monkeypatch.setattr(host_math, "available_ram_bytes", lambda: 8 * 2**30)
    assert host_math.choose(1 * 2**30).route == "fp32"
    chosen = host_math.choose(6 * 2**30)
    assert chosen.route == "native" and "host RAM" in chosen.reason


def test_a_bad_route_is_refused_naming_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(host_math.ENV, "fast")
    with pytest.raises(ValueError, match=r"OPTIMUM_NPU_HOST_MATH must be one of 'auto', 'native', 'fp32'; got 'fast'"):
        host_math.choose()
    module = nn.Linear(8, 8).bfloat16()
    with pytest.raises(ValueError, match="OPTIMUM_NPU_HOST_MATH"):
        Runtime(compile_from_torch(module, input_info=[("x", [1, 8], "bfloat16")]))


def test_smi_says_which_route_bf16_programs_take(monkeypatch):
    monkeypatch.setenv(host_math.ENV, "fp32")
    text = smi.format_status()
    assert "host CPU: " + torch.backends.cpu.get_cpu_capability() in text
    assert "in fp32 on bf16 values" in text and "OPTIMUM_NPU_HOST_MATH=fp32" in text
    assert smi.status()["host_math"]["route"] == "fp32"


@pytest.mark.parametrize("route", ROUTES)
def test_a_llama_in_either_route_is_within_bf16_of_transformers_fp32(route, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from optimum_npu import RBLNLlamaForCausalLM

    monkeypatch.setenv(host_math.ENV, route)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    hf = LlamaForCausalLM(config).eval()
    # The reference: transformers in fp32 on the bf16 values of the weights the device holds.
    hf.load_state_dict({k: bf16_exact(v) for k, v in hf.state_dict().items()})
    model = RBLNLlamaForCausalLM.from_model(hf, rbln_max_seq_len=128, rbln_prefill_chunk_size=64,
                                            rbln_dtype="bfloat16")
    assert all(r.host_math.route == route for r in model.runtimes.values())
    prompt, continuation = torch.randint(0, 128, (8,)), torch.randint(0, 128, (4,))
    with torch.no_grad():
        (ours,) = rbln_teacher_forced(model, [prompt], [continuation])   # prefill, then 4 decode steps
        expected = hf(torch.cat([prompt, continuation])[None]).logits[0, 7:]
    for step, (row, reference) in enumerate(zip(ours, expected)):
        assert_close_to(row, reference, 0.05, f"{route} route, step {step}")
    model.close()
