"""The device program: what the compiler produces and the runtime executes.

A program is a flat schedule of steps, the same on every device of a tensor-parallel
group (each device runs it on its own shard of the weights). Each step is one thing the
hardware does (`StepKind`):

- ``kernel``     a (possibly fused) device kernel: a few ops run together on the neural engines,
- ``host``       a host-fallback segment (ops the device cannot run), computed on the CPU in fp32,
- ``h2d`` / ``d2h``   an External HDMA copy between host memory and device DRAM,
- ``collective`` communication between the devices of the group (all-reduce, all-gather).

Values have the shapes one device sees (its shard). `tensor_shards` says, for each weight
or buffer split across devices, which slices of the full tensor each rank holds; the
others are replicated. `memory` gives the DRAM each rank needs.

Values are referenced by name. Every op is an aten (or ``rbln``) operator named by its
string form, e.g. ``"aten.linear.default"``; its arguments are JSON data where a tensor
is ``{"ref": name}``. Nothing in a program is executable Python. A program read from a
file is untrusted: `Program.from_json` checks it (`validation.py`) before it exists, so
the runtime only sees allowlisted ops (`ops.py`) with schema-typed arguments, values
defined before they are read, and sizes that add up.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .specs import NPUSpec

# The 16-bit float type the device computes in, as a placeholder in op arguments: the
# runtime maps it to the host dtype its numerics mode executes with (bf16 natively, or
# fp32 for fp16 emulation and for exact mode).
DEVICE_FLOAT = "@device"

PROGRAM_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
    # an 8-bit KV cache (rbln_quantization kv_caches="fp8"): kept as it is, never widened to the device float
    "float8_e4m3fn": torch.float8_e4m3fn,
}
DTYPE_NAMES = {v: k for k, v in PROGRAM_DTYPES.items()}
# Number formats of the matrix engines a kernel's products may run in (`Step.matmul_format`).
MATMUL_FORMATS = ("16bit", "int8", "fp8")
DEVICE_DTYPES = ("bfloat16", "float16")


class StepKind(StrEnum):
    KERNEL = "kernel"
    HOST = "host"
    H2D = "h2d"
    D2H = "d2h"
    COLLECTIVE = "collective"


STEP_KINDS = tuple(kind.value for kind in StepKind)
# "exact": simulator-only fp32 host math, to tell porting bugs from 16-bit rounding.
NUMERICS = ("device", "exact")
# Activations are placed in the arena at multiples of this many bytes.
ARENA_ALIGNMENT = 64


def aligned(nbytes: int) -> int:
    """Bytes a value of `nbytes` takes in the activation arena."""
    return (nbytes + ARENA_ALIGNMENT - 1) // ARENA_ALIGNMENT * ARENA_ALIGNMENT


class ArtifactError(ValueError):
    """A .rbln file or program that cannot be loaded: not one, corrupted, truncated, too new/old,
    or not a program this compiler could have produced (unknown ops, ill-typed arguments, sizes
    that do not add up)."""


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise TypeError(f"dtype {dtype} is not supported by the device; use one of {', '.join(PROGRAM_DTYPES)}")
    return DTYPE_NAMES[dtype]


def dtype_size(name: str) -> int:
    return PROGRAM_DTYPES[name].itemsize


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}{list(self.shape)}"


@dataclass
class OpCall:
    target: str                      # "aten.linear.default"
    args: list[Any]
    kwargs: dict[str, Any]
    outputs: list[str]               # one name per output; "" where an output is unused


@dataclass
class Step:
    kind: StepKind
    name: str
    inputs: list[str]                # values read
    outputs: list[str]               # values materialised (in DRAM for kernels / h2d, host memory otherwise)
    ops: list[OpCall] = field(default_factory=list)
    flops: float = 0.0               # matrix-engine FLOPs (matmul, conv, attention)
    vector_flops: float = 0.0        # element-wise / reduction work on the vector units
    bytes_read: int = 0
    bytes_written: int = 0
    # For copies into the device: cast floating data to the device float type on the way.
    cast_to_device_float: bool = False
    # Ops whose cost depends on runtime values (attention over the used KV length).
    dynamic_cost: bool = False
    # Rows (M) of the step's main matrix product, which sets how well the matrix engines are
    # used (cost_model.Calibration.matmul_utilisation); 0 when the step has none.
    matmul_rows: int = 0
    # The number format of the step's matrix work (`flops`), whose peak rate prices it: "16bit",
    # or "int8" / "fp8" for a W8A8 matmul (`NPUSpec.matmul_rate`).
    matmul_format: str = "16bit"
    # Sequences a paged-attention kernel processes one after the other (each has its own block table
    # and KV length, so each sets up its own KV transfers); 0 for every other step.
    sequences: int = 0


@dataclass
class TensorShard:
    """Which part of a full weight / buffer one rank holds: along `dim`, rank r holds the
    concatenation of the index ranges `ranges[r]` ([start, length] pairs). A fused projection
    (Q/K/V in one matrix) gives each rank one range per part; a KV head shared by several ranks
    (fewer KV heads than devices) appears in the ranges of each of them."""

    dim: int
    ranges: list[list[list[int]]]    # per rank: [[start, length], ...]

    def local_size(self, rank: int) -> int:
        return sum(length for _, length in self.ranges[rank])

    def local_shape(self, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
        return tuple(self.local_size(rank) if d == self.dim else s for d, s in enumerate(shape))

    def indices(self, rank: int) -> list[int]:
        return [i for start, length in self.ranges[rank] for i in range(start, start + length)]


def local_spec(spec: TensorSpec, shard: TensorShard | None, rank: int) -> TensorSpec:
    """The part of weight / buffer `spec` that rank `rank` holds (all of it when not split)."""
    return spec if shard is None else TensorSpec(spec.name, shard.local_shape(spec.shape, rank), spec.dtype)


def resident_bytes(spec: TensorSpec, shard: TensorShard | None, rank: int, npu: NPUSpec) -> int:
    """DRAM rank `rank` allocates for weight / buffer `spec` split by `shard`: its part, in whole pages
    of `npu`. The one rule the memory plan, the tensor-parallel advice and the planner all count by."""
    return npu.resident_bytes(local_spec(spec, shard, rank).nbytes)


def host_only_weights(weights: list[TensorSpec], steps: list[Step]) -> set[str]:
    """The names of `weights` that no step reads (a step reads a weight where it lives, on the device)."""
    read = {name for step in steps for name in step.inputs}
    return {spec.name for spec in weights if spec.name not in read}


@dataclass
class MemoryPlan:
    """Device DRAM one program needs, per device (one entry per tensor-parallel rank)."""

    weights_bytes: list[int]
    buffers_bytes: list[int]         # persistent device state, e.g. a KV cache
    activations_bytes: list[int]     # peak of the activation arena (inputs, kernel outputs)
    offsets: dict[str, int]          # activation name -> offset in the arena (the same on every rank)

    def total_bytes(self, rank: int = 0) -> int:
        return self.weights_bytes[rank] + self.buffers_bytes[rank] + self.activations_bytes[rank]

    @property
    def num_devices(self) -> int:
        return len(self.weights_bytes)


@dataclass
class Program:
    npu: str
    device_dtype: str                # "bfloat16" | "float16": what the device computes in
    numerics: str                    # one of NUMERICS
    tensor_parallel_size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    weights: list[TensorSpec]        # read-only device tensors (parameters, constants), full shapes
    buffers: list[TensorSpec]        # device state kept across runs (may be mutated), full shapes
    values: dict[str, TensorSpec]    # every intermediate value, as it lives on its side
    steps: list[Step]
    memory: MemoryPlan
    # Buffers that start as zeros (e.g. a KV cache): created on load, not stored in the payload.
    zero_init: list[str] = field(default_factory=list)
    # Weights / buffers stored in a sibling artifact and provided by the runtime this one shares
    # state with (e.g. a decode graph using its prefill graph's weights).
    external: list[str] = field(default_factory=list)
    # Weights / buffers split across the tensor-parallel ranks (the others are replicated).
    tensor_shards: dict[str, TensorShard] = field(default_factory=dict)

    def local_spec(self, spec: TensorSpec, rank: int = 0) -> TensorSpec:
        """The part of weight / buffer `spec` that rank `rank` holds."""
        return local_spec(spec, self.tensor_shards.get(spec.name), rank)

    def resident_bytes(self, spec: TensorSpec, rank: int = 0) -> int:
        """DRAM rank `rank` allocates for weight / buffer `spec`: its shard, in the NPU's pages; none
        for a weight no step reads (`host_only_weights`)."""
        from .specs import get_npu_spec

        if spec.name in self.host_only_weights:
            return 0
        return resident_bytes(spec, self.tensor_shards.get(spec.name), rank, get_npu_spec(self.npu))

    @cached_property
    def host_only_weights(self) -> frozenset[str]:
        """Weights no step of the program reads: they stay in host memory, where the host uses them
        (a decoder compiled with use_inputs_embeds looks its token embedding up on the host, as
        optimum-rbln's decoders do), and take no device DRAM."""
        return frozenset(host_only_weights(self.weights, self.steps))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data) -> Program:
        """Build a program from untrusted JSON: ArtifactError unless it passes `validation`."""
        from .validation import validate_program, validate_program_json

        validate_program_json(data)

        def spec(d):
            return TensorSpec(d["name"], tuple(d["shape"]), d["dtype"])

        steps = [Step(**{**s, "kind": StepKind(s["kind"]), "ops": [OpCall(**o) for o in s["ops"]]}) for s in data["steps"]]
        program = cls(
            npu=data["npu"],
            device_dtype=data["device_dtype"],
            numerics=data["numerics"],
            tensor_parallel_size=data["tensor_parallel_size"],
            inputs=[spec(d) for d in data["inputs"]],
            outputs=[spec(d) for d in data["outputs"]],
            weights=[spec(d) for d in data["weights"]],
            buffers=[spec(d) for d in data["buffers"]],
            values={k: spec(v) for k, v in data["values"].items()},
            steps=steps,
            memory=MemoryPlan(**data["memory"]),
            zero_init=list(data.get("zero_init", [])),
            external=list(data.get("external", [])),
            tensor_shards={name: TensorShard(**shard) for name, shard in data.get("tensor_shards", {}).items()},
        )
        validate_program(program)
        return program


# --- op arguments as JSON -----------------------------------------------------------
# Tensors are {"ref": name}; torch enums and non-finite floats get a one-key object; all
# else (None, bool, int, float, str, lists) is plain JSON. Compiler and runtime share
# these two functions so the encoding has one definition.

LAYOUTS = {"strided": torch.strided}
MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format, "preserve_format": torch.preserve_format,
    "channels_last": torch.channels_last,
}


def encode_arg(value: Any, ref_name) -> Any:
    """`ref_name(value)` returns the value name for a graph value, or None if it is not one."""
    name = ref_name(value)
    if name is not None:
        return {"ref": name}
    if isinstance(value, (list, tuple)):
        return [encode_arg(v, ref_name) for v in value]
    if isinstance(value, torch.dtype):
        return {"dtype": dtype_name(value)}
    if isinstance(value, torch.device):
        return {"device": "cpu"}  # host and simulated device tensors both live in host memory
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot encode op argument of type {type(value).__name__}: {value!r}")


@dataclass(frozen=True)
class Ref:
    name: str


def decode_arg(value: Any, device_float: torch.dtype) -> Any:
    """JSON argument (checked by `ops.check_op_arguments`) -> python/torch value, with `Ref`
    placeholders for tensors."""
    if isinstance(value, list):
        return [decode_arg(v, device_float) for v in value]
    if isinstance(value, dict):
        ((key, v),) = value.items()
        if key == "ref":
            return Ref(v)
        if key == "dtype":
            return device_float if v == DEVICE_FLOAT else PROGRAM_DTYPES[v]
        if key == "device":
            return torch.device("cpu")
        if key == "layout":
            return LAYOUTS[v]
        if key == "memory_format":
            return MEMORY_FORMATS[v]
        if key == "float":
            return float(v)
        raise ValueError(f"unknown argument encoding {value!r}")
    return value
