"""The collectives between tensor-parallel ranks, against figures the simulator does not produce:
the order in which the device adds the ranks' partial sums (bf16 / fp16 arithmetic), and the ring's
price against NCCL's bus-bandwidth identity."""

from __future__ import annotations

import pytest
import torch

from optimum_npu.sim_device.collectives import InProcessCollectives, reduce
from optimum_npu.sim_device.runtime import Numerics
from optimum_npu.sim_device.specs import get_npu_spec
from optimum_npu.sim_device.machine import Ring, default_group

# (device numerics, the smallest step above 1 halved): 1 + tiny is a tie that rounds back to 1 (to even),
# so the three partial sums [1, tiny, tiny] give 1 added in rank order, and 1 + 2 * tiny added the other way.
CASES = [(Numerics(torch.bfloat16, None), 2.0 ** -8), (Numerics(torch.float32, torch.float16), 2.0 ** -11)]


@pytest.mark.parametrize("numerics, tiny", CASES, ids=["bfloat16", "float16"])
def test_all_reduce_adds_the_partial_sums_in_rank_order_each_rounded(numerics, tiny):
    """The device adds rank 0's partial sum to rank 1's, then rank 2's, rounding each sum to 16 bits
    (collectives.py); IEEE round-to-nearest-even gives these values, whatever the simulator says."""
    parts = [numerics.to_device(torch.tensor([value])) for value in (1.0, tiny, tiny)]
    in_rank_order = 1.0                  # (1 + tiny) rounds to 1, and again
    other_order = 1.0 + 2 * tiny         # tiny + tiny is exact, then 1 + 2 tiny is representable
    assert reduce(parts, None, numerics.round).item() == in_rank_order
    assert reduce(parts[::-1], None, numerics.round).item() == other_order  # the order is visible at all
    collectives = InProcessCollectives(numerics.round)  # what the runtime hands a program's all-reduce
    assert collectives.all_reduce(parts, None).item() == in_rank_order
    # The fused residual is added last, after the ranks' sum was rounded.
    residual = numerics.to_device(torch.tensor([tiny]))
    assert collectives.all_reduce(parts, residual).item() == in_rank_order  # 1 + tiny rounds to 1 again


def _bus_bandwidth(ring: Ring, op: str, nbytes: int) -> float:
    """NCCL's bus bandwidth of a collective: algorithm bandwidth (bytes / time) times the share of the
    tensor each device sends, 2(n-1)/n for an all-reduce (reduce-scatter then all-gather), (n-1)/n for an
    all-gather. On a ring it is the link's payload rate, the same for every collective and group size."""
    n = ring.size
    factor = 2 * (n - 1) / n if op == "all_reduce" else (n - 1) / n
    return nbytes / ring.time(op, nbytes) * factor


@pytest.mark.parametrize("npu", ["RBLN-CA25", "RBLN-CA22"])
def test_ring_collectives_obey_the_bus_bandwidth_identity(npu):
    """An all-reduce moves 2(n-1)/n of the tensor per device, twice an all-gather's (n-1)/n: their bus
    bandwidths are equal, and at most the link's rate. 1 GiB tensors: the per-hop latencies are < 1%."""
    spec, nbytes = get_npu_spec(npu), 2 ** 30
    for n in (2, 4, 8):
        ring = Ring.over(default_group(spec, n))
        reduce_bw, gather_bw = _bus_bandwidth(ring, "all_reduce", nbytes), _bus_bandwidth(ring, "all_gather", nbytes)
        assert reduce_bw == pytest.approx(gather_bw, rel=0.01), (npu, n)
        assert 0 < reduce_bw <= ring.bandwidth, (npu, n)  # payload at most the link rate
    if spec.devices_per_card >= 4:  # within one card the links are the same whatever the group size...
        same_card = [Ring.over(default_group(spec, n)) for n in (2, 4)]
        assert {r.spans for r in same_card} == {"one card"}
        rates = [_bus_bandwidth(r, "all_reduce", nbytes) for r in same_card]
        assert rates[0] == pytest.approx(rates[1], rel=0.01)  # ...and so is the bus bandwidth
