"""The simulated machine: its devices, their cards and NUMA nodes, and the links between them.

Which NPUs the machine has is configuration: `OPTIMUM_NPU_SYSTEM` lists cards, e.g.
"RBLN-CA25" (one ATOM-Max card = 4 devices, the default), "RBLN-CA25x8" (an ATOM-Max
server: 8 cards, 32 devices, 16 per NUMA node) or "RBLN-CA12x2,RBLN-CR03". How many cards
a server holds is a property of the card (`NPUSpec.cards_per_server`).

Devices talk over PCIe. Two dies of one ATOM-Max card go through the card's own switch
(`NPUSpec.device_link_bandwidth`); devices on different cards go through the host's PCIe
root complex at the card's link rate (PCIe Gen5 x16, 64 GB/s per direction, the ATOM-Max
brief in docs/hardware.md); devices on cards of different NUMA nodes also cross the
inter-socket link, which is slower and adds latency. A collective runs as a ring (as NCCL
and the RBLN runtime do for small groups), so the slowest link and hop of the ring set its pace.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .specs import DEFAULT_NPU, NPUSpec, get_npu_spec

SYSTEM_ENV = "OPTIMUM_NPU_SYSTEM"
DEFAULT_SYSTEM = DEFAULT_NPU      # one card of the default preset
# The registry numbers devices 0..MAX_DEVICES - 1: a machine has at most this many.
MAX_DEVICES = 4096
MAX_SYSTEM_CHARS = 1024
# A server splits its cards between two NUMA nodes (ATOM-Max server: 16 devices per node).
NUMA_NODES_PER_SERVER = 2

# Per-hop latencies (estimates, the order of a PCIe peer-to-peer write plus a doorbell):
SAME_CARD_LATENCY_S = 1.0e-6        # through the card's switch
ACROSS_CARDS_LATENCY_S = 2.0e-6     # up to the root complex and down to the other card
ACROSS_NUMA_LATENCY_S = 4.0e-6      # plus the inter-socket link
# Peer-to-peer traffic across sockets reaches about half the PCIe rate (estimate: the
# inter-socket link is shared with memory traffic and forwards PCIe writes less efficiently).
ACROSS_NUMA_BANDWIDTH_FRACTION = 0.5
# Payload fraction of a device-to-device link in a ring collective. Fitted: the one public
# multi-device measurement (Qwen3-4B at TP 4 on an ATOM-Max card, docs/performance-model.md)
# prefills at what the single-device points (ResNet-50, BERT-base on CA22) say the engines
# deliver only if its 72 all-reduces per 128-token chunk move ~13 GB/s per link: partial sums go
# die to die through the card's PCIe switch as DMA writes, each ring step waiting on the previous
# one's completion flag. No public collective figure for these cards exists to check it by.
LINK_EFFICIENCY = 0.20


@dataclass(frozen=True)
class Device:
    index: int           # global device number, as rbln-smi numbers them
    spec: NPUSpec
    card: int
    numa_node: int

    @property
    def name(self) -> str:
        return f"npu{self.index}"


def system_description() -> str:
    return os.environ.get(SYSTEM_ENV, DEFAULT_SYSTEM)


def _system_cards() -> list[NPUSpec]:
    """The cards `OPTIMUM_NPU_SYSTEM` lists, or ValueError naming the variable and what it may hold."""
    text = system_description()
    example = "e.g. 'RBLN-CA25', 'RBLN-CA25x8' or 'RBLN-CA12x2,RBLN-CR03'"
    if len(text) > MAX_SYSTEM_CHARS:
        raise ValueError(f"{SYSTEM_ENV} is {len(text)} characters long (at most {MAX_SYSTEM_CHARS}): {example}")
    cards: list[NPUSpec] = []
    devices_so_far = 0
    for item in text.split(","):
        match = re.fullmatch(r"\s*([A-Za-z0-9-]+?)(?:x(\d+))?\s*", item)
        if not match:
            raise ValueError(f"{SYSTEM_ENV}={_short(text)}: each item must be NAME or NAMExCOUNT with a "
                             f"count of 1 to {MAX_DEVICES}, {example}")
        digits = match.group(2) or "1"
        spec, count = get_npu_spec(match.group(1)), int(digits) if len(digits) <= 5 else MAX_DEVICES + 1
        said = digits if len(digits) <= 5 else "more than 99999"
        devices_so_far += count * spec.devices_per_card
        if count < 1 or devices_so_far > MAX_DEVICES:
            raise ValueError(f"{SYSTEM_ENV}={_short(text)}: {_short(item.strip())} has {said} card(s); a machine "
                             f"has 1 to {MAX_DEVICES} devices in all ({example})")
        cards += [spec] * count
    return cards


def _short(text: str) -> str:
    return repr(text) if len(text) <= 80 else repr(text[:77] + "...")


def _numa_node(card: int, cards: int) -> int:
    """The NUMA node of card number `card` of `cards`: the first half of the cards on node 0."""
    return card * NUMA_NODES_PER_SERVER // cards


def devices() -> list[Device]:
    """Every simulated device of this machine, in index order."""
    cards = _system_cards()
    out = []
    for card_index, spec in enumerate(cards):
        for _ in range(spec.devices_per_card):
            out.append(Device(index=len(out), spec=spec, card=card_index, numa_node=_numa_node(card_index, len(cards))))
    return out


def default_group(spec: NPUSpec, size: int) -> list[Device]:
    """Where `size` ranks land when the compiler cannot know: the first devices of a server of
    `spec` cards (ranks fill a card before the next), numbered as `devices()` numbers them."""
    cards = max(spec.cards_per_server, -(-size // spec.devices_per_card))
    return [Device(index=i, spec=spec, card=i // spec.devices_per_card,
                   numa_node=_numa_node(i // spec.devices_per_card, cards)) for i in range(size)]


def pick_devices(spec: NPUSpec, count: int, device: int | list[int] | None) -> list[int]:
    """The indices of the `count` devices a program for `spec` runs on: `device` (an index or a list)
    checked against the machine, or by default the first `count` devices of that kind."""
    machine = devices()
    if device is None:
        matching = [d.index for d in machine if d.spec.name == spec.name]
        if len(matching) < count:
            present = sorted({d.spec.name for d in machine})
            raise ValueError(
                f"This program was compiled for {count} x {spec.name}, but the simulated machine has "
                f"{len(matching)} such device(s) (it has: {', '.join(present)}). Set {SYSTEM_ENV}, "
                f"e.g. {SYSTEM_ENV}={spec.name}x{max(1, count // spec.devices_per_card)}."
            )
        return matching[:count]
    indices = [device] if isinstance(device, int) else list(device)
    if len(indices) != count or not all(isinstance(i, int) for i in indices):
        raise ValueError(f"device must be {count} device index(es) for this program, got {device!r}")
    for i in indices:
        if not 0 <= i < len(machine):
            raise ValueError(f"device {i} does not exist: the simulated machine has devices 0..{len(machine) - 1}")
        if machine[i].spec.name != spec.name:
            raise ValueError(f"device {i} is a {machine[i].spec.name}, this program was compiled for {spec.name}")
    return indices


# ---- links and rings ----------------------------------------------------------------


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
