"""How long things take on the simulated NPU: the one pricing code for everything.

The runtime's simulated clock, the profiler, the compile-time estimate and the planner all
call `CostModel`. A device kernel streams its operands between DRAM and on-chip SRAM (Task
DMA) while the neural engines compute, so it takes the larger of its compute time and its
memory time, plus a fixed launch latency. Copies between host and device (External HDMA) go
at the PCIe rate; host-fallback ops run at the host CPU's rate; collectives between the
devices of a tensor-parallel group go around a ring priced by `machine.py`.

Every constant in `Calibration` is a property of the hardware (peak rates come from the
preset, `specs.py`; efficiencies are functions of a kernel's shape), independent of the
model, the batch and the tensor-parallel size. docs/performance-model.md says what each is
physically and which public measurement fixed its value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .program import PROGRAM_DTYPES, Program, Ref, Step, StepKind, decode_arg
from .specs import NPUSpec


@dataclass(frozen=True)
class Calibration:
    """Physical constants of the cost model (docs/performance-model.md gives the source of each)."""

    # Matrix engines. A matrix product [M, K] x [K, N] runs in passes of `matmul_tile_rows` rows
    # of M (M is padded up to a multiple: tile quantisation); each pass over a weight tile also
    # pays a pipeline fill / drain worth `matmul_fill_rows` rows. Large products sustain
    # `matmul_peak_utilisation` of the spec-sheet peak. Utilisation at M rows:
    #     u(M) = matmul_peak_utilisation * M / (ceil(M / tile) * tile + fill)
    # u(1) = 0.025, u(8) = 0.2, u(128) = 0.53, u(1024) = 0.59: a decode step of up to 8 sequences
    # is bound by streaming its weights (the engines need about a third of that time), and a
    # 128-token prefill chunk runs at 90% of a 1024-token one's rate per token.
    matmul_peak_utilisation: float = 0.60
    matmul_tile_rows: int = 8
    matmul_fill_rows: int = 16
    # Element-wise and reduction work runs on the vector units (estimate: 1/16 of the matrix
    # peak; these kernels are memory-bound, so the figure rarely matters).
    vector_fraction_of_peak: float = 1 / 16
    # DRAM <-> SRAM streaming (Task DMA): large transfers sustain `dram_peak_utilisation` of the
    # spec-sheet bandwidth; each kernel's transfers also pay a fixed setup latency, so a small
    # kernel streams at a lower effective rate (efficiency by transfer size).
    dram_peak_utilisation: float = 0.95
    dma_setup_s: float = 0.5e-6
    # Command submission per kernel: the compiler schedules the whole graph ahead, so the command
    # processor queues the next kernel while one runs; what is left is its dispatch.
    kernel_launch_s: float = 0.5e-6
    # Paged attention handles the sequences of a batch one after the other (each has its own block
    # table and KV length): each sets up its own KV transfers, per attention kernel and layer.
    attention_sequence_setup_s: float = 2e-6
    # PCIe host transfers reach ~80% of the link rate, plus a descriptor / doorbell latency per
    # transfer (estimates).
    pcie_efficiency: float = 0.80
    hdma_latency_s: float = 5e-6
    # Host fallback: fp32 on one core of the host CPU (estimate for a server core with AVX-512).
    host_flops: float = 50e9
    host_bandwidth: float = 20e9
    host_op_overhead_s: float = 5e-6
    # The host's share of every run, as a user times `model(inputs)` on the synchronous runtime:
    # the runtime call (argument checks, submitting the run to the driver) and waiting for the
    # completion interrupt. The copies in and out are steps of their own (HDMA, priced at the
    # PCIe rate above). Estimate, checked end to end on ResNet-50 and BERT-base (batch 1, CA22).
    run_overhead_s: float = 20e-6

    def matmul_utilisation(self, rows: int) -> float:
        """Fraction of the matrix engines' peak a product with `rows` rows (M) achieves."""
        if rows <= 0:
            return self.matmul_peak_utilisation
        padded = math.ceil(rows / self.matmul_tile_rows) * self.matmul_tile_rows
        return self.matmul_peak_utilisation * rows / (padded + self.matmul_fill_rows)


DEFAULT_CALIBRATION = Calibration()


@dataclass(frozen=True)
class StepCost:
    """What one step of a program costs on one device. `total_s` is its time on the device's
    timeline; the others say which unit was busy for how long (kernels overlap compute and
    Task DMA; a collective keeps the device-to-device link busy)."""

    total_s: float
    compute_s: float = 0.0      # neural engines busy
    dma_s: float = 0.0          # Task DMA busy (DRAM <-> SRAM)
    comm_s: float = 0.0         # device-to-device link busy (collectives)
    flops: float = 0.0
    bytes: int = 0


class CostModel:
    """Prices steps on one device of `spec`; `ring` is the device group a collective runs over
    (None: a single device)."""

    def __init__(self, spec: NPUSpec, calibration: Calibration = DEFAULT_CALIBRATION, ring=None):
        self.spec = spec
        self.cal = calibration
        self.ring = ring

    def kernel(self, flops: float, vector_flops: float, bytes_moved: int, matmul_rows: int = 0,
               matmul_format: str = "16bit", sequences: int = 0) -> StepCost:
        """A device kernel; its matrix work at the peak rate of its number format (8-bit W8A8 products
        at the int8 / fp8 rate), its vector work at a fraction of the 16-bit peak."""
        peak = self.spec.peak_flops_16bit
        compute = (flops / (self.spec.matmul_rate(matmul_format) * self.cal.matmul_utilisation(matmul_rows))
                   + vector_flops / (peak * self.cal.vector_fraction_of_peak))
        dma = (bytes_moved / (self.spec.dram_bandwidth * self.cal.dram_peak_utilisation) + self.cal.dma_setup_s
               + sequences * self.cal.attention_sequence_setup_s)
        return StepCost(max(compute, dma) + self.cal.kernel_launch_s, compute_s=compute, dma_s=dma,
                        flops=flops + vector_flops, bytes=bytes_moved)

    def hdma(self, bytes_moved: int) -> StepCost:
        return StepCost(bytes_moved / (self.spec.pcie_bandwidth * self.cal.pcie_efficiency) + self.cal.hdma_latency_s,
                        bytes=bytes_moved)

    def host(self, flops: float, bytes_moved: int) -> StepCost:
        seconds = flops / self.cal.host_flops + bytes_moved / self.cal.host_bandwidth + self.cal.host_op_overhead_s
        return StepCost(seconds, flops=flops, bytes=bytes_moved)

    def collective(self, op: str, bytes_per_device: int, vector_flops: float) -> StepCost:
        """A ring collective over this model's device group (see `machine.Ring`); a reduction's
        additions (and a fused residual add) run on the vector units while the ring streams."""
        ring = self.ring
        if ring is None or ring.size == 1:
            return StepCost(self.cal.kernel_launch_s, flops=vector_flops, bytes=bytes_per_device)
        comm = ring.time(op, bytes_per_device)
        compute = vector_flops / (self.spec.peak_flops_16bit * self.cal.vector_fraction_of_peak)
        return StepCost(max(comm, compute) + self.cal.kernel_launch_s, compute_s=compute, comm_s=comm,
                        flops=vector_flops, bytes=bytes_per_device)

    def run_overhead(self) -> float:
        return self.cal.run_overhead_s

    def price(self, step: Step, flops: float | None = None, bytes_moved: int | None = None) -> StepCost:
        """Price one program step on one device: a device kernel, a host-fallback segment, an
        HDMA copy or a collective. `flops` / `bytes_moved` override the step's compile-time
        figures (attention priced from the KV length of a run)."""
        flops = step.flops if flops is None else flops
        bytes_moved = step.bytes_read + step.bytes_written if bytes_moved is None else bytes_moved
        if step.kind == StepKind.KERNEL:
            return self.kernel(flops, step.vector_flops, bytes_moved, step.matmul_rows, step.matmul_format,
                               step.sequences)
        if step.kind == StepKind.HOST:
            return self.host(flops + step.vector_flops, bytes_moved)
        if step.kind == StepKind.COLLECTIVE:
            # ops[0].target: "rbln.all_reduce.default"; the size is that of the result on one device
            return self.collective(step.ops[0].target.split(".")[1], step.bytes_written, step.vector_flops)
        return self.hdma(bytes_moved)


@dataclass(frozen=True)
class RunEstimate:
    """Simulated time of one run of a program, priced without running it."""

    kv_len: int | None                  # KV positions per sequence attention was priced at; None: full capacity
    per_kind_s: dict[StepKind, float]   # step time by step kind
    overhead_s: float                   # per-run submission and sync
    flops: float = 0.0                  # device FLOPs (matrix and vector units) of one device's run
    dram_bytes: float = 0.0             # bytes its kernels stream between DRAM and SRAM (the power model's)

    @property
    def total_s(self) -> float:
        return self.overhead_s + sum(self.per_kind_s.values())

    @property
    def kv_label(self) -> str:
        return "attention at full KV capacity" if self.kv_len is None else f"attention at KV length {self.kv_len}"


def attention_work(program: Program, step: Step, kv_len: int) -> tuple[float, int]:
    """(flops, bytes moved) of an attention step (`Step.dynamic_cost`) when every sequence of
    the batch has `kv_len` KV positions (its context, this run's tokens included): the
    pricing the runtime applies to a real run (`kernels.attention_cost`), on shapes only."""
    from .kernels import KERNEL_OPS, attention_cost

    def meta(arg):
        if isinstance(arg, Ref):
            spec = program.values[arg.name]
            return torch.empty(spec.shape, dtype=PROGRAM_DTYPES[spec.dtype], device="meta")
        return [meta(a) for a in arg] if isinstance(arg, list) else arg

    float_bytes = PROGRAM_DTYPES[program.device_dtype].itemsize
    flops, nbytes = 0.0, 0
    for op in step.ops:
        if op.target in KERNEL_OPS:
            args = tuple(meta(decode_arg(a, torch.bfloat16)) for a in op.args)
            batch = args[4].shape[0]  # the batch: block_tables of kv_cache_update, start_pos of the attention ops
            f, read, written = attention_cost(op.target, args, float_bytes=float_bytes, kv_lengths=[kv_len] * batch)
            flops, nbytes = flops + f, nbytes + read + written
    return flops, nbytes


def estimate_run(program: Program, cost_model: CostModel, kv_len: int | None = None) -> RunEstimate:
    """Price one run of `program` step by step with `cost_model`, as the runtime's clock does;
    attention at `kv_len` positions per sequence (None: the full capacity, the compile-time worst case)."""
    per_kind = {kind: 0.0 for kind in StepKind}
    flops = dram_bytes = 0.0
    for step in program.steps:
        if step.dynamic_cost and kv_len is not None:
            cost = cost_model.price(step, *attention_work(program, step, kv_len))
        else:
            cost = cost_model.price(step)
        per_kind[step.kind] += cost.total_s
        if step.kind in (StepKind.KERNEL, StepKind.COLLECTIVE):
            flops += cost.flops
        if step.kind == StepKind.KERNEL:
            dram_bytes += cost.bytes
    return RunEstimate(kv_len, per_kind, cost_model.run_overhead(), flops, dram_bytes)
