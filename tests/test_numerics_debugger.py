"""The numerics debugger: its exact-fp32 values against eager torch, and a planted fp16 overflow
found at the op that overflows (the overflow itself established with eager torch)."""

import pytest
import torch
from example_helpers import load_example

from optimum_npu.torch_backend.numerics_debugger import compare_numerics, run_until

EXACT_ATOL = 1e-5
FP16_MAX = torch.finfo(torch.float16).max


@pytest.fixture(scope="module")
def example():
    return load_example("pytorch-native/find_fp16_overflow.py")


def test_run_until_gives_the_eager_intermediates(example):
    torch.manual_seed(0)
    model, x = example.OutlierMLP().eval(), torch.randn(4, 16)
    values = run_until(model, [x], "gelu", numerics="exact")
    assert list(values)[-1] == "gelu" and "mul" not in values
    with torch.no_grad():
        assert (values["linear"] - model.up(x)).abs().max().item() <= EXACT_ATOL * model.up(x).abs().max().item()
        gelu = torch.nn.functional.gelu(model.up(x))
        assert (values["gelu"] - gelu).abs().max().item() <= EXACT_ATOL * gelu.abs().max().item()
    with pytest.raises(ValueError, match="no op output named 'nope'.*linear"):
        run_until(model, [x], "nope")


def test_planted_fp16_overflow_is_found_at_the_square(example, capsys):
    torch.manual_seed(0)
    model, x = example.OutlierMLP().eval(), torch.randn(4, 16)
    with torch.no_grad():
        h = torch.nn.functional.gelu(model.up(x))
        assert h.abs().max() < FP16_MAX < (h * h).abs().max()  # the square, and only it, passes fp16's range
    report = example.main("float16", 0.01)
    first = report.first_failure
    assert first.target == "aten.mul.Tensor" and first.non_finite > 0
    assert all(op.error <= 0.01 for op in report.ops if op.index < first.index)
    assert "first failure at op" in capsys.readouterr().out
    # bf16 has fp32's range: the same model stays within a bf16 tolerance everywhere.
    assert compare_numerics(model, [x], dtype="bfloat16", tolerance=0.05).first_failure is None


def test_tolerance_is_checked():
    with pytest.raises(ValueError, match="tolerance must be a positive number"):
        compare_numerics(torch.nn.Linear(2, 2), [torch.randn(1, 2)], tolerance=0)
