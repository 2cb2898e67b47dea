"""Where the devices of a tensor-parallel group sit, and what a ring collective over them costs.

Devices talk over PCIe. Two dies of one ATOM-Max card go through the card's own switch
(`NPUSpec.device_link_bandwidth`); devices on different cards go through the host's PCIe
root complex at the card's link rate (PCIe Gen5 x16, 64 GB/s per direction, the ATOM-Max
brief in docs/hardware.md); devices on cards of different NUMA nodes also cross the
inter-socket link, which is slower and adds latency. A collective runs as a ring (as NCCL
and the RBLN runtime do for small groups), so the slowest link and hop of the ring set its pace.
"""

from __future__ import annotations

from dataclasses import dataclass

from .memory import Device
from .specs import NPUSpec

# Per-hop latencies (estimates, the order of a PCIe peer-to-peer write plus a doorbell):
SAME_CARD_LATENCY_S = 1.0e-6        # through the card's switch
ACROSS_CARDS_LATENCY_S = 2.0e-6     # up to the root complex and down to the other card
ACROSS_NUMA_LATENCY_S = 4.0e-6      # plus the inter-socket link
# Peer-to-peer traffic across sockets reaches about half the PCIe rate (estimate: the
# inter-socket link is shared with memory traffic and forwards PCIe writes less efficiently).
ACROSS_NUMA_BANDWIDTH_FRACTION = 0.5
# Ring collectives keep ~80% of the link rate busy with payload (estimate, as for HDMA).
LINK_EFFICIENCY = 0.80


@dataclass(frozen=True)
class Link:
    bandwidth: float    # bytes/s per direction
    latency_s: float    # per message


def link(a: Device, b: Device) -> Link:
    """The path between two devices."""
    pcie = min(a.spec.pcie_bandwidth, b.spec.pcie_bandwidth)
    if a.card == b.card:
        return Link(a.spec.device_link_bandwidth, SAME_CARD_LATENCY_S)
    if a.numa_node == b.numa_node:
        return Link(pcie, ACROSS_CARDS_LATENCY_S)
    return Link(pcie * ACROSS_NUMA_BANDWIDTH_FRACTION, ACROSS_NUMA_LATENCY_S)


@dataclass(frozen=True)
class Ring:
    """A ring over the devices of a group: its size, slowest link and slowest hop."""

    size: int
    bandwidth: float
    hop_latency_s: float
    spans: str           # "one device", "one card", "cards", "NUMA nodes": for reports

    @classmethod
    def over(cls, devices: list[Device]) -> Ring:
        if len(devices) <= 1:
            return cls(1, float("inf"), 0.0, "one device")
        links = [link(a, b) for a, b in zip(devices, devices[1:] + devices[:1])]
        spans = ("NUMA nodes" if len({d.numa_node for d in devices}) > 1
                 else "cards" if len({d.card for d in devices}) > 1 else "one card")
        return cls(len(devices), min(l.bandwidth for l in links), max(l.latency_s for l in links), spans)

    def time(self, op: str, nbytes: int) -> float:
        """Seconds of a ring `op` ("all_reduce" / "all_gather") on a tensor of `nbytes` (its full
        size on one device: the reduced tensor, or the gathered result).

        All-reduce = reduce-scatter + all-gather: 2(N-1) steps each moving nbytes/N per device;
        all-gather alone is N-1 such steps.
        """
        n = self.size
        if n == 1:
            return 0.0
        steps = 2 * (n - 1) if op == "all_reduce" else n - 1
        return steps * (nbytes / n / (self.bandwidth * LINK_EFFICIENCY) + self.hop_latency_s)


def default_group(spec: NPUSpec, size: int) -> list[Device]:
    """Where `size` ranks land when the compiler cannot know: the first devices of a server of
    `spec` cards (ranks fill a card before the next)."""
    # A server of the preset's cards, ranks filling cards in order, half of the cards on each NUMA
    # node (as `memory.devices()` numbers them).
    cards = max(spec.cards_per_server, -(-size // spec.devices_per_card))
    return [Device(index=i, spec=spec, card=i // spec.devices_per_card,
                   numa_node=(i // spec.devices_per_card) * 2 // cards) for i in range(size)]
