"""Card power: what a card draws at rest, plus a part that follows how busy its devices are.

    watts = tdp * (idle_fraction + (1 - idle_fraction) * activity)
    activity = (compute_utilisation + dram_utilisation) / 2

`compute_utilisation` is the FLOPs a device performed over the time, divided by its 16-bit peak
(a device idle half the time at full rate is 0.5); `dram_utilisation` the bytes it streamed over
the time, divided by its DRAM bandwidth. Both are averaged over wall time, host work and idle
gaps included, as a card's power meter averages. Switching activity, and so dynamic power,
follows the work done per second in the matrix engines and in the DRAM interface; the two get
equal weight because no public figure separates them. At full compute and full DRAM streaming
the card draws its TDP (`NPUSpec.card_tdp_watts`); at rest it draws `idle_fraction` of it.

`IDLE_FRACTION_OF_TDP` and the RBLN-CA22 TDP are calibrated on public card power of one
RBLN-CA22 (docs/performance-model.md, "Power"): 18.9 W with the device almost idle (PatchTST,
2.35% NPU utilisation; YOLOv5m 18.9 W), 38.9 W running ResNet-50 and 37.0 W running BERT-base.
"""

from __future__ import annotations

from .specs import NPUSpec

# 18.9 W at rest over the RBLN-CA22's calibrated TDP (56 W, specs.py): an ATOM card's clocks,
# GDDR6 refresh and PCIe link do not stop when its engines do. The TDP is the one slope that puts
# the ResNet-50 (38.9 W) and BERT-base (37.0 W) runs within 4.2% either way.
IDLE_FRACTION_OF_TDP = 18.9 / 56.0


def activity(compute_utilisation: float, dram_utilisation: float) -> float:
    """How busy a device is, 0 (idle) to 1 (engines at peak and DRAM at full bandwidth)."""
    for name, value in (("compute_utilisation", compute_utilisation), ("dram_utilisation", dram_utilisation)):
        if not 0.0 <= value <= 1.0 + 1e-9:
            raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
    return (compute_utilisation + dram_utilisation) / 2


def card_watts(spec: NPUSpec, compute_utilisation: float, dram_utilisation: float) -> float:
    """Average power of one card of `spec` whose devices are each this busy."""
    busy = activity(compute_utilisation, dram_utilisation)
    return spec.card_tdp_watts * (IDLE_FRACTION_OF_TDP + (1 - IDLE_FRACTION_OF_TDP) * busy)


def utilisation(spec: NPUSpec, flops: float, nbytes: float, seconds: float) -> tuple[float, float]:
    """(compute, DRAM) utilisation of one device that performed `flops` and streamed `nbytes` in
    `seconds` of wall time (capped at 1: a cost model prices a kernel at or below the peaks)."""
    if seconds <= 0:
        return 0.0, 0.0
    return (min(1.0, flops / seconds / spec.peak_flops_16bit), min(1.0, nbytes / seconds / spec.dram_bandwidth))
