"""Hardware presets of the simulated NPUs, as plain data.

A preset describes one *device* (what `rbln-smi` lists as one NPU) and the card it sits on.
Figures come from Rebellions' public product pages and briefs (rebellions.ai, ATOM /
ATOM+ / ATOM-Max / REBEL-Quad), as collected in docs/hardware.md;
figures the vendor has not published are marked "estimate" and are ours.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3
GB = 1000**3
TB = 1000**4
MB_BINARY = 1024**2
TFLOPS = 1e12
# System DRAM the firmware keeps before a program allocates (optimum-rbln `get_available_dram`):
# 288 MiB per ATOM device, 1 GiB per REBEL chiplet.
ATOM_RESERVED_BYTES = 288 * MB_BINARY
REBEL_RESERVED_BYTES_PER_CHIPLET = GiB


@dataclass(frozen=True)
class NPUSpec:
    name: str                      # the `npu=` value, e.g. "RBLN-CA25"
    product: str                   # marketing name of the card
    devices_per_card: int          # ATOM-Max packs 4 ATOM dies, each its own device
    dram_bytes: int                # DRAM per device
    usable_dram_bytes: int         # what the runtime may allocate (firmware keeps the rest)
    dram_bandwidth: float          # bytes/s per device
    peak_flops_16bit: float        # fp16/bf16 FLOP/s per device
    peak_ops_int8: float           # int8 OP/s per device
    sram_shared_bytes: int         # on-chip shared memory per device
    sram_per_engine_bytes: int     # local memory per neural engine
    num_neural_engines: int
    pcie_bandwidth: float          # host <-> card, bytes/s per direction
    device_link_bandwidth: float   # device <-> device on the same card, bytes/s
    card_tdp_watts: float
    cards_per_server: int          # cards one server holds: the planner's "server", the largest TP group
    # The runtime's DRAM allocator hands out whole pages: a weight or buffer of a page or more takes
    # whole pages, smaller ones are packed together. 2 MiB: the granularity Rebellions' own memory
    # estimators assume for every weight and KV-cache allocation on ATOM (optimum-rbln and
    # vllm-rbln, `get_maximum_num_blocks`: `align_2MB`; docs/performance-model.md).
    dram_page_bytes: int = 2 * MB_BINARY
    estimated: tuple[str, ...] = ()  # names of the fields above that are our estimates
    # fp8 FLOP/s per device; None: the device has no fp8 matrix arithmetic (the ATOM die's brief lists
    # fp16/bf16 and int8 rates only), so fp8 activations are refused on it.
    peak_flops_fp8: float | None = None

    def matmul_rate(self, fmt: str) -> float:
        """Peak matrix-engine rate of `fmt` ("16bit", "int8", "fp8"), per device."""
        rate = {"16bit": self.peak_flops_16bit, "int8": self.peak_ops_int8, "fp8": self.peak_flops_fp8}[fmt]
        if rate is None:
            raise ValueError(f"{self.name} has no {fmt} matrix arithmetic (its rates: 16-bit and int8)")
        return rate

    @property
    def devices_per_server(self) -> int:
        """Devices of one server of these cards: the largest tensor-parallel group."""
        return self.devices_per_card * self.cards_per_server

    @property
    def sram_bytes(self) -> int:
        return self.sram_shared_bytes + self.num_neural_engines * self.sram_per_engine_bytes

    def resident_bytes(self, nbytes: int) -> int:
        """DRAM a weight or buffer of `nbytes` (one device's shard) takes: whole pages from a page on."""
        page = self.dram_page_bytes
        return nbytes if nbytes < page else -(-nbytes // page) * page


# ATOM die, the building block of CA12 / CA22 / CA25.
# 16 GiB GDDR6 at 256 GB/s, 32 TFLOPS fp16/bf16, 128 TOPS int8, 8 neural engines with
# 4 MB local memory each and 32 MB shared memory: ATOM product brief (docs/hardware.md).
# Usable: 16 GiB less the 288 MiB of system DRAM the firmware keeps, 16,877,879,296 bytes: what an
# RBLN-CA22 reports, and what optimum-rbln's `get_available_dram` (utils/runtime_utils.py) gives an
# ATOM device before it sizes a KV cache (docs/hardware.md).
# PCIe Gen5 x16: 64 GB/s per direction (PCI-SIG Gen5 x16 figure, cited in the ATOM-Max brief).
_ATOM_DIE = dict(
    devices_per_card=1,
    dram_bytes=16 * GiB,
    usable_dram_bytes=16 * GiB - ATOM_RESERVED_BYTES,
    dram_bandwidth=256 * GB,
    peak_flops_16bit=32 * TFLOPS,
    peak_ops_int8=128 * TFLOPS,
    sram_shared_bytes=32 * MB_BINARY,
    sram_per_engine_bytes=4 * MB_BINARY,
    num_neural_engines=8,
    pcie_bandwidth=64 * GB,
    device_link_bandwidth=64 * GB,
)

NPU_PRESETS: dict[str, NPUSpec] = {
    # ATOM card, single device, 130 W max (ATOM brief: 60-130 W configurable TDP).
    # An ATOM server holds 16 cards (the vendor's Llama-3-8B server figure is for 16 ATOM cards).
    "RBLN-CA12": NPUSpec(name="RBLN-CA12", product="ATOM (RBLN-CA12)", card_tdp_watts=130.0, cards_per_server=16,
                         **_ATOM_DIE),
    # ATOM+ card, single device; same die figures (docs/hardware.md). Its host link trains at PCIe
    # Gen5 x8 (32 GT/s x8: 32 GB/s per direction, rbln-smi on a CA22, docs/performance-model.md).
    # TDP: calibrated with the power model on public CA22 card power (sim_device/power.py: what the
    # card would draw with its engines at peak and its DRAM at full bandwidth; no ATOM+ figure is
    # published); server: an estimate, as CA12.
    "RBLN-CA22": NPUSpec(
        name="RBLN-CA22", product="ATOM+ (RBLN-CA22)", card_tdp_watts=56.0, cards_per_server=16,
        estimated=("card_tdp_watts", "cards_per_server"), **{**_ATOM_DIE, "pcie_bandwidth": 32 * GB}
    ),
    # ATOM-Max card: 4 ATOM dies = 4 devices, 64 GiB / 1 TB/s / 128 TFLOPS per card, 350 W,
    # PCIe Gen5 x16 to the host (ATOM-Max brief). The dies talk through the card's PCIe
    # switch; we price that link at the Gen5 x16 rate (estimate).
    "RBLN-CA25": NPUSpec(
        name="RBLN-CA25",
        product="ATOM-Max (RBLN-CA25)",
        card_tdp_watts=350.0,
        cards_per_server=8,   # an ATOM-Max server: 8 cards, 32 devices (docs/hardware.md, "Topology")
        estimated=("device_link_bandwidth",),
        **{**_ATOM_DIE, "devices_per_card": 4},
    ),
    # REBEL-Quad: 4 chiplets presented as one device, 144 GB HBM3E (144 GiB in optimum-rbln's estimators,
    # less 1 GiB of system DRAM per chiplet: 140 GiB usable, docs/hardware.md),
    # 4.8 TB/s. Compute: vendor figure of ~2 PFLOPS FP8 dense (peak_flops_fp8), so ~1 PFLOPS fp16/bf16 and
    # ~2 POPS int8 (estimates); SRAM, link and TDP are estimates too.
    "RBLN-CR03": NPUSpec(
        name="RBLN-CR03",
        product="REBEL-Quad (RBLN-CR03)",
        devices_per_card=1,
        dram_bytes=144 * GiB,
        usable_dram_bytes=144 * GiB - 4 * REBEL_RESERVED_BYTES_PER_CHIPLET,
        dram_bandwidth=4.8 * TB,
        peak_flops_16bit=1000 * TFLOPS,
        peak_ops_int8=2000 * TFLOPS,
        peak_flops_fp8=2000 * TFLOPS,
        sram_shared_bytes=256 * MB_BINARY,
        sram_per_engine_bytes=4 * MB_BINARY,
        num_neural_engines=32,
        pcie_bandwidth=64 * GB,
        device_link_bandwidth=256 * GB,
        card_tdp_watts=600.0,
        cards_per_server=8,
        estimated=(
            "peak_flops_16bit", "peak_ops_int8", "sram_shared_bytes", "sram_per_engine_bytes",
            "num_neural_engines", "device_link_bandwidth", "card_tdp_watts", "cards_per_server",
        ),
    ),
}

DEFAULT_NPU = "RBLN-CA25"


def get_npu_spec(name: str) -> NPUSpec:
    """The preset called `name`, or a ValueError listing the valid names."""
    if not isinstance(name, str) or name not in NPU_PRESETS:
        raise ValueError(f"Unknown npu {name!r}. Valid values: {', '.join(sorted(NPU_PRESETS))}.")
    return NPU_PRESETS[name]
