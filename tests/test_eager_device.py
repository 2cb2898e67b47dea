"""The eager `rbln` torch device (PrivateUse1): op results against CPU torch computing in the
device's numerics (bf16 values), a tiny Llama against fp32 eager, device memory, pricing, the
host fallback."""

import gc
import json
import warnings

import pytest
import torch

import optimum_npu.torch_backend as torch_backend
from optimum_npu.sim_device import DeviceMemoryError
from optimum_npu.torch_backend import eager
from llm_fixtures import _one_torch_thread, make_hf_model  # noqa: F401  (fixture)

BF16_ULP = 2.0**-8      # relative spacing of bf16 values: one rounding step
BF16_RTOL = 0.10        # logits, relative to max|logit| (as test_llm_parity)
FP16_RTOL = 0.01
EXACT_ATOL = 1e-5


@pytest.fixture(autouse=True)
def _default_device():
    gc.collect()
    torch_backend.configure(npu="RBLN-CA25", dtype="bfloat16", numerics="device", device=0, activate_profiler=False)
    yield
    gc.collect()


def bf16(t):
    return t.to(torch.bfloat16).float()


def test_factories_and_copies_hold_device_values():
    torch.manual_seed(1)
    expected = torch.randn(4, 4)
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="aten.normal_"):  # random numbers are drawn on the host
        x = torch.randn(4, 4, device="rbln")
    assert x.device.type == "rbln" and x.dtype == torch.float32 and x.shape == (4, 4)
    assert torch.equal(x.cpu(), bf16(expected))
    y = expected.to("rbln")
    assert y.is_rbln and torch.equal(y.cpu(), bf16(expected))
    assert torch.equal(torch.zeros(3, 2, dtype=torch.int64, device="rbln").cpu(), torch.zeros(3, 2, dtype=torch.int64))
    assert torch.equal(torch.arange(5, device="rbln").cpu(), torch.arange(5))


@pytest.mark.parametrize("name,fn", [
    ("matmul", lambda a, b: a @ b),
    ("add", lambda a, b: a + 2 * b),
    ("softmax", lambda a, b: torch.softmax(a, dim=-1)),
    ("gelu", lambda a, b: torch.nn.functional.gelu(a)),
    ("sum", lambda a, b: a.sum(dim=0)),
    ("view+transpose", lambda a, b: (a.t().reshape(4, 8) * 3).t()),
    ("slice write", lambda a, b: a[:, 1:3].mul_(2) + b[:, 1:3]),
])
def test_ops_match_cpu_in_device_numerics(name, fn):
    a, b = torch.randn(8, 4), torch.randn(8, 4)
    if name == "matmul":
        b = torch.randn(4, 6)
    expected = fn(a.to(torch.bfloat16), b.to(torch.bfloat16)).float()  # CPU torch, in bf16
    out = fn(a.to("rbln"), b.to("rbln")).cpu()
    assert out.shape == expected.shape
    assert ((out - expected).abs() <= BF16_ULP * expected.abs() + 1e-6).all(), name


def test_fp16_numerics_round_each_op():
    torch_backend.configure(dtype="float16")
    a = torch.randn(16, 16) * 3
    h = a.half().float()
    expected = torch.softmax((h @ h).half().float(), dim=-1).half().float()  # rounded to fp16 after each op
    out = torch.softmax(a.to("rbln") @ a.to("rbln"), dim=-1).cpu()
    assert (out - expected).abs().max().item() <= 1e-3
    big = torch.full((4, 4), 200.0)
    assert torch.isfinite(big @ big).all()
    assert torch.isinf((big.to("rbln") @ big.to("rbln")).cpu()).all()  # 160000 overflows fp16 on the device


@pytest.mark.parametrize("numerics,dtype,tol", [("device", "bfloat16", BF16_RTOL), ("device", "float16", FP16_RTOL),
                                                ("exact", "bfloat16", None)])
def test_llama_forward_on_the_device_matches_eager(numerics, dtype, tol):
    torch_backend.configure(numerics=numerics, dtype=dtype)
    model = make_hf_model("llama").eval()
    ids = torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
        model.to("rbln")
        assert all(p.device.type == "rbln" for p in model.parameters())
        logits = model(ids.to("rbln")).logits.cpu()
    if tol is None:
        assert (logits - expected).abs().max().item() <= EXACT_ATOL
    else:
        assert ((logits - expected).abs().max() / expected.abs().max()).item() <= tol
    dev = eager.device()
    assert dev.stats.device_kernels_s > 0 and dev.stats.external_hdma_s > 0
    on_device = sum(n for (op, where), n in dev.op_counts.items() if where == "device")
    assert on_device > 50  # the matmuls, norms and element-wise math ran as device kernels


def test_device_memory_is_held_freed_and_can_run_out():
    before = torch.rbln.memory_allocated()
    x = torch.ones(1024, 256).to("rbln")
    assert torch.rbln.memory_allocated() - before == 1024 * 256 * 2  # 16-bit on the device
    view = x[:10].t()
    del x
    gc.collect()
    assert torch.rbln.memory_allocated() - before == 1024 * 256 * 2  # a view keeps its storage
    del view
    gc.collect()
    assert torch.rbln.memory_allocated() == before
    with pytest.raises(DeviceMemoryError, match="out of device memory"):
        torch.empty(2**34, dtype=torch.bfloat16, device="rbln")  # 32 GiB: refused before any host memory
    assert torch.rbln.memory_allocated() == before


def test_unsupported_op_falls_back_to_host_with_one_warning():
    a = torch.randn(6, 5)
    x = a.to("rbln")
    with pytest.warns(UserWarning, match=r"aten\.sort.* not supported by the rbln device"):
        values, indices = torch.sort(x, dim=-1)
    expected_values, expected_indices = torch.sort(bf16(a), dim=-1)
    assert torch.equal(values.cpu(), expected_values) and torch.equal(indices.cpu(), expected_indices)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.sort(x, dim=0)  # warned once
    assert any(where == "host" and "sort" in op for op, where in eager.device().op_counts)
    assert eager.device().stats.host_fallback_s > 0


def test_ops_are_priced_and_traced(tmp_path):
    torch_backend.configure(activate_profiler=True, device=2)
    a = torch.randn(64, 64).to("rbln")
    dev = eager.device()
    clock = dev.clock_s
    (a @ a).cpu()
    assert dev.clock_s > clock and dev.stats.neural_engine_busy_s > 0
    events = dev.trace.to_chrome_json()["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert {"External HDMA", "Neural Engine Clusters"} <= {e["cat"] for e in slices}
    assert {e["pid"] for e in slices if e["cat"] != "Host"} == {3}  # device 2
    json.dumps(events)


def test_bad_settings_and_device_index_are_refused():
    with pytest.raises(ValueError, match="dtype must be one of 'bfloat16', 'float16'"):
        torch_backend.configure(dtype="int8")
    with pytest.raises(ValueError, match="unknown setting.*dtpye"):
        torch_backend.configure(dtpye="float16")
    with pytest.raises(ValueError, match="one rbln device per process"):
        torch.empty(2, device="rbln:1")
