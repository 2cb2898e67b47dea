"""The `.rbln` file: one program plus its tensors, with no pickle anywhere.

Layout (all integers little-endian):

    8 bytes   magic  b"RBLNSIM\\0"
    8 bytes   header length H
    H bytes   header, UTF-8 JSON (sorted keys): format version, program, versions, sha256 of payload
    rest      payload: a safetensors blob with the weights and initial buffer values

Loading parses JSON and safetensors only (no pickle). A file may come from anywhere, so
its program is checked before anything runs (`Program.from_json`, `validation.py`): the
runtime will only call allowlisted operators (`ops.py`) with arguments typed by their
schemas, and device memory is accounted from sizes recomputed from the tensor specs. The
checksums catch accidents (a truncated download, a flipped bit), not attackers: anyone
can recompute them. Writing is deterministic (same module -> byte-identical file) and atomic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .files import write_file_atomically
from .program import PROGRAM_DTYPES, ArtifactError, Program

MAGIC = b"RBLNSIM\0"
# 2: multi-device programs (step kinds incl. collectives, tensor_shards, per-rank memory plan).
FORMAT_VERSION = 2
_HEADER_LEN = struct.Struct("<Q")


def _package_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("optimum-npu")
    except PackageNotFoundError:  # running from a source tree that was not pip-installed
        return "0+unknown"


def _check_payload(path, program: Program, tensors: dict[str, torch.Tensor]) -> None:
    """Every weight / buffer is in the payload with its shape, or declared zero-init or external."""
    for spec in program.weights + program.buffers:
        if spec.name in program.zero_init or spec.name in program.external:
            continue
        if spec.name not in tensors:
            raise ArtifactError(f"{path} is invalid: its payload lacks tensor {spec.name!r}")
        tensor = tensors[spec.name]
        if tuple(tensor.shape) != spec.shape:
            raise ArtifactError(
                f"{path} is invalid: tensor {spec.name!r} has shape {list(tensor.shape)}, "
                f"the program says {list(spec.shape)}"
            )
        # Floats may be stored wider than the device type (exact numerics keeps fp32); others exactly.
        expected = PROGRAM_DTYPES[spec.dtype]
        if tensor.dtype != expected and not (tensor.is_floating_point() and expected.is_floating_point):
            raise ArtifactError(
                f"{path} is invalid: tensor {spec.name!r} has dtype {tensor.dtype}, the program says {spec.dtype}"
            )


def _json_sha256(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass(repr=False)
class Artifact:
    """A compiled program and its tensors (weights, initial buffers), in memory."""

    program: Program
    tensors: dict[str, torch.Tensor] | None     # None when compiled on the meta device
    versions: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        # One line: the generated repr printed every step and weight (tens of KB for a small model).
        p = self.program
        weights = "none (meta device)" if self.tensors is None else f"{len(self.tensors)} tensors"
        return (f"{type(self).__name__}(npu={p.npu!r}, tensor_parallel_size={p.tensor_parallel_size}, "
                f"dtype={p.device_dtype!r}, numerics={p.numerics!r}, "
                f"inputs=[{', '.join(s.describe() for s in p.inputs)}], "
                f"outputs=[{', '.join(s.describe() for s in p.outputs)}], steps={len(p.steps)}, weights={weights})")

    def save(self, path: str | os.PathLike, external: tuple[str, ...] | list[str] = ()) -> str:
        """Write the .rbln file. Tensors named in `external` are left out: a runtime loading this
        file gets them from the runtime it shares state with (see `Runtime(share_state_with=)`)."""
        if self.tensors is None:
            raise ValueError(
                "This program was compiled on the meta device: it has sizes and costs but no weights, "
                "so it cannot be saved or run. Compile a module with real weights to get a runnable .rbln."
            )
        external = sorted(set(external))
        # A program loaded from disk may already lack its external tensors: they stay external.
        unknown = set(external) - set(self.tensors) - set(self.program.zero_init) - set(self.program.external)
        if unknown:
            raise ValueError(f"external tensors {sorted(unknown)} are not tensors of this program")
        stored = {k: v.contiguous() for k, v in sorted(self.tensors.items()) if k not in external}
        payload = save_safetensors(stored)
        program = dataclasses.replace(self.program, external=external) if external else self.program
        versions = self.versions or {"optimum_npu": _package_version(), "torch": torch.__version__.split("+")[0]}
        program_json = program.to_json()
        header = {
            "format": "rbln-sim",
            "format_version": FORMAT_VERSION,
            "program": program_json,
            "program_sha256": _json_sha256(program_json),
            "versions": versions,
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "payload_bytes": len(payload),
        }
        header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(path, MAGIC + _HEADER_LEN.pack(len(header_bytes)) + header_bytes + payload)
        return str(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Artifact:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No compiled artifact at {path}")
        data = path.read_bytes()
        if data[: len(MAGIC)] != MAGIC:
            raise ArtifactError(f"{path} is not a .rbln artifact (bad magic bytes)")
        start = len(MAGIC) + _HEADER_LEN.size
        if len(data) < start:
            raise ArtifactError(f"{path} is truncated (no header)")
        (header_len,) = _HEADER_LEN.unpack(data[len(MAGIC) : start])
        if len(data) < start + header_len:
            raise ArtifactError(f"{path} is truncated: header says {header_len} bytes, file has {len(data) - start}")
        try:
            header = json.loads(data[start : start + header_len])
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: bad JSON, ints > 4300 digits
            raise ArtifactError(f"{path} has a corrupted header: {type(e).__name__}: {str(e)[:200]}") from None
        if not isinstance(header, dict):
            raise ArtifactError(f"{path} has a corrupted header: not a JSON object")
        version = header.get("format_version")
        if type(version) is not int or version != FORMAT_VERSION:
            raise ArtifactError(
                f"{path} has format version {str(version)[:20]}, this optimum-npu reads version {FORMAT_VERSION}; "
                "recompile the model with this version (export=True)"
            )
        fields = {"program": dict, "program_sha256": str, "payload_sha256": str, "payload_bytes": int, "versions": dict}
        missing = set(fields) - set(header)
        if missing:
            raise ArtifactError(f"{path} has a corrupted header: missing {sorted(missing)}")
        wrong = [key for key, kind in fields.items() if type(header[key]) is not kind]
        if wrong or not all(type(k) is str and type(v) is str for k, v in header["versions"].items()):
            raise ArtifactError(f"{path} has a corrupted header: wrong types for {wrong or ['versions']}")
        payload = data[start + header_len :]
        if len(payload) != header["payload_bytes"]:
            raise ArtifactError(f"{path} is truncated: payload has {len(payload)} of {header['payload_bytes']} bytes")
        if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
            raise ArtifactError(f"{path} is corrupted or was modified: payload checksum mismatch")
        try:
            program_sha256 = _json_sha256(header["program"])
        except RecursionError:
            raise ArtifactError(f"{path} has a corrupted header: its program is nested too deeply") from None
        if program_sha256 != header["program_sha256"]:
            raise ArtifactError(f"{path} is corrupted or was modified: program checksum mismatch")
        try:
            program = Program.from_json(header["program"])
        except ArtifactError as e:
            raise ArtifactError(f"{path} has an invalid program: {e}") from None
        try:
            tensors = load_safetensors(payload)
        except Exception as e:  # safetensors raises its own error type for a malformed blob
            raise ArtifactError(f"{path} has an invalid tensor payload: {e}") from None
        _check_payload(path, program, tensors)
        return cls(program=program, tensors=tensors, versions=header["versions"])
