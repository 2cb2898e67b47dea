"""A .rbln file from an attacker: checksums recomputed, so only validation stands between
its header and the runtime. Every crafted file below must be refused at load with an
ArtifactError (never RecursionError / KeyError / TypeError), before anything runs, is
allocated or is written. Also: the runtime's thread safety, refusal after close(), and the
device-capacity check coming before any host allocation.

Files are taken apart and re-signed with the documented layout (8-byte magic, 8-byte
little-endian header length, JSON header, safetensors payload), not with the package's reader.
"""

import copy
import hashlib
import json
import struct
import sys
import threading

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from optimum_npu import ArtifactError, DeviceMemoryError, Runtime, compile_from_torch
from optimum_npu.sim_device import Artifact
from optimum_npu.sim_device import memory as device_memory
from optimum_npu.sim_device import ops
from optimum_npu.sim_device.program import Program

MAGIC = b"RBLNSIM\0"


# --------------------------------------------------------------------------- file surgery


def split(data: bytes):
    (length,) = struct.unpack("<Q", data[8:16])
    return json.loads(data[16 : 16 + length]), data[16 + length :]


def dumps(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def signed(header: dict, payload: bytes) -> bytes:
    """The file an attacker writes: whatever header, with correct checksums."""
    header = {**header, "program_sha256": hashlib.sha256(dumps(header["program"])).hexdigest(),
              "payload_sha256": hashlib.sha256(payload).hexdigest(), "payload_bytes": len(payload)}
    header_bytes = dumps(header)
    return MAGIC + struct.pack("<Q", len(header_bytes)) + header_bytes + payload


def signed_raw(header_bytes: bytes, payload: bytes) -> bytes:
    """As `signed`, for a header given as text (structures json.dumps cannot write)."""
    return MAGIC + struct.pack("<Q", len(header_bytes)) + header_bytes + payload


# --------------------------------------------------------------------------- models


class LinearAtanLinear(nn.Module):
    """atan has no device kernel: the program has a host step."""

    def __init__(self, d=16):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.b(torch.atan(self.a(x)))


class Accumulator(nn.Module):
    """Device state: an int64 running total, updated in place by every run."""

    def __init__(self, n=8):
        super().__init__()
        self.register_buffer("total", torch.zeros(n, dtype=torch.int64))

    def forward(self, x):
        new_total = self.total + x
        for _ in range(10):  # ops between reading and writing the total: a window for races
            new_total = new_total + 0
        self.total.copy_(new_total)
        return self.total * 1


@pytest.fixture(scope="module")
def host_file(tmp_path_factory):
    """(module, header, payload) of a compiled LinearAtanLinear."""
    torch.manual_seed(0)
    module = LinearAtanLinear()
    path = compile_from_torch(module, example_inputs=[torch.randn(4, 16)]).save(
        tmp_path_factory.mktemp("hostile") / "atan.rbln")
    header, payload = split(open(path, "rb").read())
    return module, header, payload


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """A device-memory registry of this test only: shows that nothing was allocated."""
    path = tmp_path / "state"
    monkeypatch.setenv("OPTIMUM_NPU_STATE_DIR", str(path))
    return path


def nothing_allocated(state_dir) -> bool:
    return device_memory.used_bytes(0) == 0 and not list(state_dir.glob("alloc-*"))


def host_step(program: dict) -> dict:
    return next(s for s in program["steps"] if s["kind"] == "host")


def first_op(program: dict, target: str) -> dict:
    return next(op for s in program["steps"] for op in s["ops"] if op["target"] == target)


def assert_refused(tmp_path, state_dir, data: bytes, match: str | None = None):
    path = tmp_path / "crafted.rbln"
    path.write_bytes(data)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ArtifactError, match=match) as info:
        Artifact.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(ArtifactError, match=match):
        Runtime(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written next to it
    assert nothing_allocated(state_dir)
    return info.value


def test_untampered_file_loads_and_runs(host_file, tmp_path, state_dir):
    """The baseline the crafted files start from is accepted (so each refusal below is the edit's)."""
    module, header, payload = host_file
    path = tmp_path / "ok.rbln"
    path.write_bytes(signed(header, payload))
    x = torch.randn(4, 16)
    with Runtime(path) as runtime:
        out = runtime.run(x)
    with torch.no_grad():
        expected = module(x)
    assert (out - expected).abs().max() <= 2e-2 * expected.abs().max()


# --------------------------------------------------------------------------- code execution


def test_host_step_calling_from_file_is_refused_and_writes_nothing(host_file, tmp_path, state_dir):
    _, header, payload = host_file
    target = tmp_path / "written_by_the_artifact"
    evil = copy.deepcopy(header)
    op = host_step(evil["program"])["ops"][0]
    op["target"] = "aten.from_file.default"
    op["args"] = [str(target), True, 4096]  # shared=True: torch would create and map the file
    error = assert_refused(tmp_path, state_dir, signed(evil, payload), match="aten.from_file.default")
    assert "not an operator the compiler emits" in str(error)
    assert not target.exists()


@pytest.mark.parametrize("target", [
    "aten.__getattr__.default",      # chains to builtins through the op namespace
    "aten.linear.__init__",
    "aten.linear.__call__",
    "aten.linear.__class__",
    "aten.__class__.default",
    "aten._foo.default",            # `_`-prefixed and not on the list
    "aten._softmax.default",        # real, but never emitted by the compiler
    "aten.linear._schema",
    "aten.linear.default.extra",
    "aten..default",
    "builtins.exec.default",
    "rbln.__init__.default",
    "rbln.kv_cache_update.__call__",
    "aten.empty_like.default",       # real op, not on the allowlist
    "aten.add.out",                  # out= variant: writes into an argument
    "aten.linear.nonexistent_overload",
])
def test_op_names_outside_the_allowlist_are_refused(host_file, tmp_path, state_dir, target):
    _, header, payload = host_file
    evil = copy.deepcopy(header)
    first_op(evil["program"], "aten.linear.default")["target"] = target
    assert_refused(tmp_path, state_dir, signed(evil, payload), match="op")


def test_allowlist_packets_are_real_operators():
    """Each listed name is a torch operator packet; only `_to_copy` starts with '_'."""
    packets = set(ops.DEVICE_OPS) | set(ops.HOST_FALLBACK_OP_PACKETS)
    assert not set(ops.DEVICE_OPS) & set(ops.HOST_FALLBACK_OP_PACKETS)
    for packet in sorted(packets):
        namespace, name = packet.split(".")
        assert namespace == "aten" and not name.startswith("__"), packet
        assert isinstance(getattr(torch.ops.aten, name), torch._ops.OpOverloadPacket), packet
    assert [p for p in packets if p.split(".")[1].startswith("_")] == ["aten._to_copy"]
    assert isinstance(ops.resolve_op("aten.atan.default"), torch._ops.OpOverload)
    assert isinstance(ops.resolve_op("rbln.paged_attention.default"), torch._ops.OpOverload)
    with pytest.raises(ArtifactError):
        ops.resolve_op("aten.from_file.default")


def test_compiler_refuses_an_op_that_is_neither_device_nor_host_fallback():
    class Noisy(nn.Module):
        def forward(self, x):
            return x + torch.rand_like(x)  # random numbers: not pure math, not on either list

    with pytest.raises(ValueError, match="rand_like.*neither an op the device runs nor an allowed host fallback"):
        compile_from_torch(Noisy(), example_inputs=[torch.randn(4, 4)])


# --------------------------------------------------------------------------- typed arguments


def test_schema_string_argument_round_trips(tmp_path, state_dir):
    """A string where the schema takes one (gelu's `approximate`) is accepted and honoured."""
    module = nn.Sequential(nn.Linear(16, 16), nn.GELU(approximate="tanh"))
    path = compile_from_torch(module, example_inputs=[torch.randn(4, 16)], numerics="exact").save(
        tmp_path / "gelu.rbln")
    header, _ = split(open(path, "rb").read())
    assert first_op(header["program"], "aten.gelu.default")["kwargs"] == {"approximate": "tanh"}
    x = torch.randn(4, 16)
    with Runtime(path) as runtime:
        torch.testing.assert_close(runtime.run(x), module(x).detach(), rtol=1e-5, atol=1e-5)


def _edit_linear(edit):
    def apply(header):
        edit(first_op(header["program"], "aten.linear.default"))
    return apply


def _edit_atan(edit):
    def apply(header):
        edit(host_step(header["program"])["ops"][0])
    return apply


BAD_ARGUMENTS = {
    "string-for-a-tensor": _edit_linear(lambda op: op["args"].__setitem__(0, "__import__('os')")),
    "string-for-a-weight": _edit_linear(lambda op: op["args"].__setitem__(1, "os.system")),
    "object-for-a-tensor": _edit_linear(lambda op: op["args"].__setitem__(0, {"__class__": "x"})),
    "ref-with-extra-key": _edit_linear(lambda op: op["args"].__setitem__(0, {**op["args"][0], "fn": "exec"})),
    "ref-to-a-number": _edit_linear(lambda op: op["args"].__setitem__(0, {"ref": 3})),
    "ref-to-undefined-value": _edit_linear(lambda op: op["args"].__setitem__(0, {"ref": "nowhere"})),
    "too-many-args": _edit_linear(lambda op: op["args"].extend([None, None, None])),
    "unknown-kwarg": _edit_linear(lambda op: op["kwargs"].update(__class__=1)),
    "repeated-kwarg": _edit_linear(lambda op: op["kwargs"].update(input={"ref": "x"})),
    "missing-required-arg": _edit_linear(lambda op: op.__setitem__("args", op["args"][:1])),
    "unknown-dtype-encoding": lambda h: first_op(h["program"], "aten._to_copy.default")["kwargs"].update(
        dtype={"dtype": "object"}),
    "float-encoding-not-a-float": _edit_linear(lambda op: op["args"].__setitem__(2, {"float": "1e999"})),
    "huge-int-arg": _edit_atan(lambda op: op.update(target="aten.cumprod.default", args=[op["args"][0], 2**70])),
    "size-beyond-any-tensor": _edit_atan(lambda op: op.update(target="aten.full.default",
                                                             args=[[2**20, 2**20], 0.0], kwargs={})),
    "bool-for-a-ScalarType": _edit_atan(lambda op: op.update(target="aten.cumprod.default",
                                                            args=[op["args"][0], 1], kwargs={"dtype": True})),
    "args-as-object": _edit_linear(lambda op: op.__setitem__("args", {"0": op["args"][0]})),
    "kwargs-as-list": _edit_linear(lambda op: op.__setitem__("kwargs", [])),
    "wrong-output-count": _edit_linear(lambda op: op.__setitem__("outputs", op["outputs"] * 2)),
}


def test_well_typed_edit_still_loads(host_file, tmp_path):
    """The control for the edits above: a host op swapped for another allowed one, typed right."""
    _, header, payload = host_file
    edited = copy.deepcopy(header)
    _edit_atan(lambda op: op.update(target="aten.cumprod.default", args=[op["args"][0], 1]))(edited)
    path = tmp_path / "edited.rbln"
    path.write_bytes(signed(edited, payload))
    assert host_step(Artifact.load(path).program.to_json())["ops"][0]["target"] == "aten.cumprod.default"


@pytest.mark.parametrize("how", sorted(BAD_ARGUMENTS))
def test_ill_typed_op_arguments_are_refused(host_file, tmp_path, state_dir, how):
    _, header, payload = host_file
    evil = copy.deepcopy(header)
    BAD_ARGUMENTS[how](evil)
    assert_refused(tmp_path, state_dir, signed(evil, payload))


def test_strings_only_where_the_schema_takes_a_string(host_file, tmp_path, state_dir):
    """`gelu(approximate=...)` takes a string; `atan` has no string argument to put one in."""
    _, header, payload = host_file
    evil = copy.deepcopy(header)
    host_step(evil["program"])["ops"][0]["kwargs"]["approximate"] = "tanh"
    assert_refused(tmp_path, state_dir, signed(evil, payload), match="approximate")


# --------------------------------------------------------------------------- malformed headers


def _without(path):
    def edit(program):
        *parents, key = path
        node = program
        for p in parents:
            node = node[p]
        del node[key]
    return edit


def _setting(path, value):
    def edit(program):
        *parents, key = path
        node = program
        for p in parents:
            node = node[p]
        node[key] = value
    return edit


MALFORMED = {
    # missing keys
    "no-steps": _without(["steps"]),
    "no-memory": _without(["memory"]),
    "no-step-kind": _without(["steps", 0, "kind"]),
    "no-op-target": lambda p: host_step(p)["ops"][0].pop("target"),
    "no-spec-shape": lambda p: p["weights"][0].pop("shape"),
    "no-offsets": _without(["memory", "offsets"]),
    # wrong types
    "program-is-a-list": None,  # handled below: the whole program replaced
    "tp-is-a-string": _setting(["tensor_parallel_size"], "1"),
    "tp-is-true": _setting(["tensor_parallel_size"], True),
    "shape-is-a-string": lambda p: p["weights"][0].__setitem__("shape", "16,16"),
    "dim-is-a-float": lambda p: p["weights"][0].__setitem__("shape", [16.0, 16]),
    "steps-is-an-object": _setting(["steps"], {}),
    "ops-is-a-string": lambda p: host_step(p).__setitem__("ops", "exec"),
    "kind-is-a-number": _setting(["steps", 0, "kind"], 5),
    "step-output-is-a-number": lambda p: p["steps"][0].__setitem__("outputs", [1]),
    "flops-is-nan": lambda p: p["steps"][0].__setitem__("flops", float("nan")),
    "bytes-negative": _setting(["steps", 0, "bytes_read"], -1),
    "unknown-step-key": lambda p: p["steps"][0].__setitem__("exec", "print(1)"),
    "unknown-program-key": _setting(["__class__"], "Program"),
    "values-is-a-list": _setting(["values"], []),
    # sizes
    "negative-dim": lambda p: p["weights"][0].__setitem__("shape", [-1, 16]),
    "absurd-shape": lambda p: p["weights"][0].__setitem__("shape", [2**21, 2**20]),
    "huge-int-dim": lambda p: p["weights"][0].__setitem__("shape", [10**4000]),
    "too-many-dims": lambda p: p["values"][p["weights"][0]["name"]].__setitem__("shape", [1] * 40),
    "negative-input-dim": lambda p: p["inputs"][0].__setitem__("shape", [4, -16]),
    "tp-zero": _setting(["tensor_parallel_size"], 0),
    "tp-negative": _setting(["tensor_parallel_size"], -2),
    "tp-two-with-one-plan": _setting(["tensor_parallel_size"], 2),
    "activations-absurd": _setting(["memory", "activations_bytes"], [2**61]),
    "activations-too-small": _setting(["memory", "activations_bytes"], [1]),
    "offset-beyond-arena": lambda p: p["memory"]["offsets"].update({k: 2**40 for k in p["memory"]["offsets"]}),
    "offset-of-unknown-value": lambda p: p["memory"]["offsets"].update(ghost=0),
    "weights-bytes-understated": _setting(["memory", "weights_bytes"], [0]),
    "weights-bytes-overstated": _setting(["memory", "weights_bytes"], [2**50]),
    "plan-lists-empty": _setting(["memory", "weights_bytes"], []),
    # unknown names
    "unknown-dtype": lambda p: p["weights"][0].__setitem__("dtype", "complex128"),
    "unknown-step-kind": _setting(["steps", 0, "kind"], "python"),
    "unknown-npu": _setting(["npu"], "RBLN-XX99"),
    "unknown-numerics": _setting(["numerics"], "fast"),
    "unknown-device-dtype": _setting(["device_dtype"], "float32"),
    "zero-init-not-a-buffer": _setting(["zero_init"], ["a.weight"]),
    "external-unknown": _setting(["external"], ["ghost"]),
    # dataflow
    "step-reads-undefined": lambda p: p["steps"][0]["inputs"].__setitem__(0, "ghost"),
    "output-undefined": lambda p: p["outputs"][0].__setitem__("name", "ghost"),
    "step-claims-unproduced-output": lambda p: host_step(p)["outputs"].append("ghost"),
    "copy-with-ops": lambda p: p["steps"][0]["ops"].append(host_step(p)["ops"][0]),
}


@pytest.mark.parametrize("how", sorted(MALFORMED))
def test_malformed_program_is_an_artifact_error(host_file, tmp_path, state_dir, how):
    _, header, payload = host_file
    evil = copy.deepcopy(header)
    if how == "program-is-a-list":
        evil["program"] = [evil["program"]]
    else:
        MALFORMED[how](evil["program"])
    assert_refused(tmp_path, state_dir, signed(evil, payload))


@pytest.mark.parametrize("depth", [50, 400, 200_000])
def test_deeply_nested_arguments_are_an_artifact_error(host_file, tmp_path, state_dir, depth):
    """Nesting deeper than the schema's: refused by the type check, by the parser's
    recursion guard, or by the checksum computation; never a RecursionError."""
    _, header, payload = host_file
    evil = copy.deepcopy(header)
    marker = "@NESTED@"
    host_step(evil["program"])["ops"][0]["args"] = [marker]
    text = dumps(evil).replace(f'"{marker}"'.encode(), b"[" * depth + b"0" + b"]" * depth)
    # Re-sign by hand: the program checksum is that of the nested program, when it parses at all.
    head = json.loads(text) if depth < 500 else None
    if head is not None:
        head["program_sha256"] = hashlib.sha256(dumps(head["program"])).hexdigest()
        text = dumps(head)
    assert_refused(tmp_path, state_dir, signed_raw(text, payload))


def test_huge_int_literal_is_an_artifact_error(host_file, tmp_path, state_dir):
    """Python's json refuses ints over 4300 digits with a plain ValueError: still an ArtifactError."""
    _, header, payload = host_file
    text = dumps(header).replace(b'"tensor_parallel_size":1', b'"tensor_parallel_size":' + b"9" * 5000)
    assert_refused(tmp_path, state_dir, signed_raw(text, payload), match="corrupted header")


@pytest.mark.parametrize("field,value", [
    ("versions", ["1.0"]), ("versions", {"torch": 2}), ("payload_bytes", "12"), ("program_sha256", 7),
    ("format_version", "1"), ("format_version", True),
])
def test_wrong_header_field_types_are_an_artifact_error(host_file, tmp_path, state_dir, field, value):
    _, header, payload = host_file
    evil = signed(header, payload)
    head, payload = split(evil)
    head[field] = value
    assert_refused(tmp_path, state_dir, signed_raw(dumps(head), payload))


def test_payload_tensor_of_another_dtype_is_refused(host_file, tmp_path, state_dir):
    """A weight the program declares as a float, stored as int64 of the right shape."""
    _, header, payload = host_file
    tensors = load_safetensors(payload)
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(tensors[name].shape, dtype=torch.int64)
    assert_refused(tmp_path, state_dir, signed(header, save_safetensors(tensors)), match=f"{name}.*dtype")


def test_in_memory_program_is_validated_by_the_runtime(host_file, state_dir):
    """A Runtime built from an Artifact object (not a file) applies the same checks."""
    _, header, payload = host_file
    program = Program.from_json(copy.deepcopy(header["program"]))
    next(s for s in program.steps if s.kind == "host").ops[0].target = "aten.from_file.default"
    with pytest.raises(ArtifactError, match="from_file"):
        Runtime(Artifact(program=program, tensors=load_safetensors(payload)))
    assert nothing_allocated(state_dir)


# --------------------------------------------------------------------------- device memory first


def test_oversize_zero_init_buffer_fails_before_any_host_allocation(tmp_path, state_dir, monkeypatch):
    """A 20 GiB zero-initialised buffer on a 15.7 GiB device: DeviceMemoryError, and the spy
    proves no host tensor of that size was ever requested (it would OOM a small machine)."""
    path = compile_from_torch(Accumulator(), example_inputs=[torch.zeros(8, dtype=torch.int64)]).save(
        tmp_path / "acc.rbln")
    header, payload = split(open(path, "rb").read())
    program = header["program"]
    assert program["zero_init"] == ["total"]
    # Every tensor of the program is an int64 [8]: scale them all, and the memory plan with them,
    # so the program stays consistent (its ops give the shapes it declares) and only its size is wrong.
    scale = 20 * 2**30 // 64
    for spec in [*program["inputs"], *program["outputs"], *program["buffers"], *program["values"].values()]:
        assert spec["shape"] == [8] and spec["dtype"] == "int64"
        spec["shape"] = [8 * scale]  # 20 GiB
    program["memory"]["buffers_bytes"] = [20 * 2**30]
    program["memory"]["activations_bytes"] = [n * scale for n in program["memory"]["activations_bytes"]]
    program["memory"]["offsets"] = {k: v * scale for k, v in program["memory"]["offsets"].items()}
    crafted = tmp_path / "huge.rbln"
    crafted.write_bytes(signed(header, payload))

    requested = []
    real_zeros, real_empty = torch.zeros, torch.empty

    def spy(real):
        def allocate(*size, **kwargs):
            if torch.device(kwargs.get("device") or "cpu").type == "meta":  # a shape, no storage
                return real(*size, **kwargs)
            shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
            numel = 1
            for s in shape:
                numel *= int(s)
            requested.append(numel)
            if numel > 2**24:
                raise AssertionError(f"host allocation of {numel} elements before the device check")
            return real(*size, **kwargs)
        return allocate

    monkeypatch.setattr(torch, "zeros", spy(real_zeros))
    monkeypatch.setattr(torch, "empty", spy(real_empty))
    with pytest.raises(DeviceMemoryError, match=r"needs \d+\.\d+ GiB"):  # the buffer, and values scaled with it
        Runtime(crafted)
    assert all(n <= 2**24 for n in requested)
    assert nothing_allocated(state_dir)


# --------------------------------------------------------------------------- concurrency, lifetime


def test_two_threads_on_one_runtime_match_sequential_runs(state_dir):
    """A stateful program (an in-place running total): concurrent runs must neither lose
    updates nor mix intermediate values; every output is a prefix sum of the inputs."""
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, to expose races
    try:
        compiled = compile_from_torch(Accumulator(), example_inputs=[torch.zeros(8, dtype=torch.int64)])
        inputs = [torch.full((8,), i + 1, dtype=torch.int64) for i in range(400)]

        sequential = compiled.create_runtime()
        expected_final = None
        for x in inputs:
            expected_final = sequential.run(x)
        sequential.close()

        runtime = compiled.create_runtime()
        outputs: list[list[torch.Tensor]] = [[], []]
        errors = []

        def worker(k):
            try:
                for x in inputs[k::2]:
                    outputs[k].append((x, runtime.run(x)))
            except Exception as e:  # surfaced by the assertion below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch_interval)
    assert not errors
    assert runtime.stats.runs == len(inputs)
    totals = sorted(int(out[0]) for pairs in outputs for _, out in pairs)
    # Serialised runs: the totals seen are exactly the distinct prefix sums of some order.
    assert len(set(totals)) == len(inputs)
    assert totals[-1] == int(expected_final[0]) == sum(range(1, len(inputs) + 1))
    for pairs in outputs:
        for _, out in pairs:
            assert torch.equal(out, out[0].expand(8))  # no run saw a half-updated total
    runtime.close()


def test_two_threads_on_a_stateless_runtime_give_sequential_results(host_file, tmp_path, state_dir):
    module, header, payload = host_file
    path = tmp_path / "atan.rbln"
    path.write_bytes(signed(header, payload))
    inputs = [torch.randn(4, 16) for _ in range(40)]
    with Runtime(path) as runtime:
        expected = [runtime.run(x) for x in inputs]
        results = [None] * len(inputs)

        def worker(k):
            for i in range(k, len(inputs), 2):
                results[i] = runtime.run(inputs[i])

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(torch.equal(r, e) for r, e in zip(results, expected))


def test_run_after_close_is_refused(host_file, tmp_path, state_dir):
    _, header, payload = host_file
    path = tmp_path / "atan.rbln"
    path.write_bytes(signed(header, payload))
    runtime = Runtime(path)
    runtime.run(torch.randn(4, 16))
    runtime.close()
    assert nothing_allocated(state_dir)
    with pytest.raises(RuntimeError, match="closed"):
        runtime.run(torch.randn(4, 16))
    runtime.close()  # closing twice is harmless
    with Runtime(path) as other:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        other(torch.randn(4, 16))


# --------------------------------------------------------------------------- work bounded by the file


def with_host_ops(header: dict, ops: list[dict], values: dict[str, tuple[list[int], str]]) -> dict:
    """The atan program with its host step replaced by `ops` (the last one must produce "atan",
    float32 [4, 16]) and `values` (name -> (shape, dtype)) added to its declared values."""
    evil = copy.deepcopy(header)
    program = evil["program"]
    host_step(program)["ops"] = ops
    for name, (shape, dtype) in values.items():
        program["values"][name] = {"name": name, "shape": shape, "dtype": dtype}
    return evil


def op(target: str, args: list, outputs: list[str], **kwargs) -> dict:
    return {"target": target, "args": args, "kwargs": kwargs, "outputs": outputs}


HOST_IN = {"ref": "linear@host"}   # the host step's input: float32 [4, 16] once on the host


def _into_atan(name: str) -> dict:
    """The step's last op: something of the right shape into "atan", reading `name`."""
    return op("aten.add.Tensor", [HOST_IN, {"ref": name}], ["atan"])


BIG = 3 * 2**27   # int64 elements: 3 GiB
GROWING_OPS = {
    # each computes a tensor far larger than the 4-element value the program declares for it
    "arange-then-sum": ([op("aten.arange.default", [BIG], ["big"]), op("aten.sum.default", [{"ref": "big"}], ["s"]),
                         _into_atan("s")], {"big": ([4], "int64"), "s": ([], "int64")}),
    "arange-2**36": ([op("aten.arange.default", [2**36], ["big"]), op("aten.sum.default", [{"ref": "big"}], ["s"]),
                      _into_atan("s")], {"big": ([4], "int64"), "s": ([], "int64")}),
    "repeat_interleave-int": ([op("aten.repeat_interleave.self_int", [HOST_IN, 2**30], ["big"]),
                               op("aten.sum.default", [{"ref": "big"}], ["s"]), _into_atan("s")],
                              {"big": ([4], "float32"), "s": ([], "float32")}),
    "constant_pad_nd": ([op("aten.constant_pad_nd.default", [HOST_IN, [2**28, 2**28]], ["big"]),
                         op("aten.sum.default", [{"ref": "big"}], ["s"]), _into_atan("s")],
                        {"big": ([4, 16], "float32"), "s": ([], "float32")}),
    "outer-of-aranges": ([op("aten.arange.default", [2**20], ["r"]),
                          op("aten.outer.default", [{"ref": "r"}, {"ref": "r"}], ["big"]),
                          op("aten.sum.default", [{"ref": "big"}], ["s"]), _into_atan("s")],
                         {"r": ([2**20], "int64"), "big": ([4], "int64"), "s": ([], "int64")}),
    # a huge unused value raises the largest declared size, which bounded `size` arguments before
    "full-beside-a-huge-unused-value": ([op("aten.full.default", [[2**36], 1.0], ["big"]),
                                         op("aten.sum.default", [{"ref": "big"}], ["s"]), _into_atan("s")],
                                        {"big": ([4], "float32"), "s": ([], "float32"), "unused": ([2**36], "float32")}),
    # an output size that depends on tensor contents cannot be checked at load: refused
    "data-dependent-size": ([op("aten.repeat_interleave.Tensor", [{"ref": "counts"}], ["big"]),
                             op("aten.sum.default", [{"ref": "big"}], ["s"]), _into_atan("s")],
                            {"big": ([4], "int64"), "s": ([], "int64")}),
}


@pytest.mark.parametrize("how", sorted(GROWING_OPS))
def test_an_op_growing_beyond_its_declared_value_is_refused_at_load(host_file, tmp_path, state_dir, how):
    """Each op runs at load on the meta device (shapes only, no storage): an output whose shape is
    not the one the program declares is refused before anything is allocated or runs."""
    _, header, payload = host_file
    ops_, values = GROWING_OPS[how]
    if how == "data-dependent-size":
        ops_ = [op("aten.full.default", [[4], 2], ["counts"], dtype={"dtype": "int64"}), *ops_]
        values = {**values, "counts": ([4], "int64")}
    error = assert_refused(tmp_path, state_dir, signed(with_host_ops(header, ops_, values), payload))
    assert ("declares" in str(error)) or ("cannot run on the declared shapes" in str(error))


def test_a_large_host_value_declared_as_such_is_counted_before_anything_runs(host_file, tmp_path, state_dir):
    """The same arange + sum, declared at its true 3 GiB: it loads, and the runtime reserves those
    bytes in the device-memory registry before anything runs (what a run creates on the host is
    what the registry counts); at 2**36 elements (512 GiB) the reservation fails before any allocation."""
    _, header, payload = host_file
    values = {"big": ([BIG], "int64"), "s": ([], "int64")}
    ops_ = GROWING_OPS["arange-then-sum"][0]
    path = tmp_path / "big.rbln"
    path.write_bytes(signed(with_host_ops(header, ops_, values), payload))
    with Runtime(path) as runtime:
        assert runtime.stats.memory[0].activations_bytes >= BIG * 8
        assert device_memory.used_bytes(0) == runtime.stats.memory[0].total_bytes
    huge = with_host_ops(header, [op("aten.arange.default", [2**36], ["big"]), *ops_[1:]],
                         {"big": ([2**36], "int64"), "s": ([], "int64")})
    path.write_bytes(signed(huge, payload))
    with pytest.raises(DeviceMemoryError, match="needs 512"):
        Runtime(path)
    assert nothing_allocated(state_dir)


@pytest.mark.parametrize("through", ["directly", "through-a-view", "through-a-copy-step"])
def test_a_program_never_writes_into_the_callers_input(host_file, tmp_path, state_dir, through):
    """`copy_(x, 7.0)` on an input bound by reference would overwrite the caller's tensor: refused at
    load, whether it writes the input, a view of it, or the device copy an h2d step passes on."""
    _, header, payload = host_file
    evil = copy.deepcopy(header)
    program = evil["program"]
    step = next(s for s in program["steps"] if s["kind"] == "kernel")  # reads x@device, the input's copy
    source = step["ops"][0]["args"][0]["ref"]
    if through == "directly":  # a host step reading the input itself
        host_step(program)["inputs"].append("x")
        write = [op("aten.copy_.default", [{"ref": "x"}, 7.0], ["filled"])]
        declared = {"filled": ([4, 16], "float32")}
    elif through == "through-a-view":
        host_step(program)["inputs"].append("x")
        write = [op("aten.view.default", [{"ref": "x"}, [64]], ["flat"]),
                 op("aten.copy_.default", [{"ref": "flat"}, 7.0], ["filled"])]
        declared = {"flat": ([64], "float32"), "filled": ([64], "float32")}
    else:
        assert source == "x@device"
        step["ops"].insert(0, op("aten.copy_.default", [{"ref": source}, 7.0], ["filled"]))
        program["values"]["filled"] = {"name": "filled", "shape": [4, 16], "dtype": "float32"}
        assert_refused(tmp_path, state_dir, signed(evil, payload), match="writes into input 'x'")
        return
    host_step(program)["ops"] = write + host_step(program)["ops"]
    for name, (shape, dtype) in declared.items():
        program["values"][name] = {"name": name, "shape": shape, "dtype": dtype}
    assert_refused(tmp_path, state_dir, signed(evil, payload), match="writes into input 'x'")


def test_in_place_ops_on_the_programs_own_values_still_load(host_file, tmp_path):
    """The control: an in-place op on a value the program computed is not a write to the caller's input."""
    _, header, payload = host_file
    ops_ = [op("aten.clone.default", [HOST_IN], ["mine"]), op("aten.copy_.default", [{"ref": "mine"}, 7.0], ["filled"]),
            op("aten.atan.default", [{"ref": "filled"}], ["atan"])]
    path = tmp_path / "own.rbln"
    path.write_bytes(signed(with_host_ops(header, ops_, {"mine": ([4, 16], "float32"),
                                                          "filled": ([4, 16], "float32")}), payload))
    x = torch.randn(4, 16)
    kept = x.clone()
    with Runtime(path) as runtime:
        out = runtime.run(x)
    assert torch.equal(x, kept)
    assert out.shape == (4, 16)
