"""The host's packed-weight matmul (sim_device/host_linear.py) against torch's own linear."""

import pytest
import torch
import torch.nn.functional as F

from optimum_npu.sim_device.host_linear import PackedLinear, PackedWeights, packing_available

needs_packing = pytest.mark.skipif(not packing_available(torch.bfloat16), reason="no oneDNN bf16 packing on this host")


@needs_packing
@pytest.mark.parametrize("rows", [1, 8, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_is_linear_bit_for_bit(rows, with_bias):
    torch.manual_seed(rows)
    weight = torch.randn(384, 256).bfloat16()
    bias = torch.randn(384).bfloat16() if with_bias else None
    call_site = PackedLinear(PackedWeights())
    for _ in range(3):  # the first call decides, the later ones take the chosen path
        x = torch.randn(2, rows, 256).bfloat16()
        assert torch.equal(call_site(x, weight, bias), F.linear(x, weight, bias))


@needs_packing
def test_weights_are_packed_once_and_shared():
    weights = PackedWeights()
    weight = torch.randn(128, 64).bfloat16()
    first, second = PackedLinear(weights), PackedLinear(weights)
    x = torch.randn(1, 4, 64).bfloat16()
    first(x, weight), second(x, weight)
    assert weights.get(weight, 4) is weights.get(weight, 1)


def test_fp32_and_unpackable_weights_stay_on_linear():
    assert not packing_available(torch.float32)
    weights = PackedWeights()
    strided = torch.randn(64, 128).bfloat16().t()  # not contiguous: never packed
    assert weights.get(strided, 1) is None
    x = torch.randn(3, 64).bfloat16()
    assert torch.equal(PackedLinear(weights)(x, strided), F.linear(x, strided))
