"""The .rbln artifact: loads without pickle, refuses tampered / truncated / foreign files
with ArtifactError before any runtime exists, and is byte-identical across recompiles.

File layout (sim_device/artifact.py): 8-byte magic, 8-byte little-endian header length,
a JSON header, then a safetensors payload. The tests below take files apart with that
layout only, not with the package's own reader.
"""

import gc
import hashlib
import json
import os
import pickle
import stat
import struct

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import optimum_npu
from optimum_npu import ArtifactError, Runtime, compile_from_torch
from optimum_npu.sim_device import memory as device_memory
from optimum_npu.sim_device.artifact import FORMAT_VERSION

MAGIC = b"RBLNSIM\0"


def mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(torch.flatten(x, 1))


def split(data: bytes):
    """-> (header dict, header bytes, payload bytes)."""
    assert data[:8] == MAGIC
    (length,) = struct.unpack("<Q", data[8:16])
    header_bytes = data[16 : 16 + length]
    return json.loads(header_bytes), header_bytes, data[16 + length :]


def join(header_bytes: bytes, payload: bytes) -> bytes:
    return MAGIC + struct.pack("<Q", len(header_bytes)) + header_bytes + payload


def dump(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def sha_json(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    """A device-memory registry of this test only: lets a test see that nothing was allocated."""
    path = tmp_path / "state"
    monkeypatch.setenv("OPTIMUM_NPU_STATE_DIR", str(path))
    return path


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """(module, path, bytes) of a small compiled MLP."""
    torch.manual_seed(0)
    module = mlp()
    path = compile_from_torch(module, example_inputs=[torch.randn(4, 16)]).save(
        tmp_path_factory.mktemp("artifact") / "mlp.rbln"
    )
    with open(path, "rb") as f:
        return module, path, f.read()


# --------------------------------------------------------------------------- format


def test_file_layout_and_checksums(artifact):
    module, _, data = artifact
    header, _, payload = split(data)
    assert header["format_version"] == FORMAT_VERSION == 2
    assert header["payload_bytes"] == len(payload)
    assert header["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    assert header["program_sha256"] == sha_json(header["program"])
    assert {"optimum_npu", "torch"} <= set(header["versions"])
    # The payload is plain safetensors: the weights, stored in the device dtype (bf16).
    tensors = st_load(payload)
    params = dict(module.named_parameters())
    assert set(tensors) == set(params)
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(tensor.float(), params[name].detach().to(torch.bfloat16).float(), rtol=0, atol=0)


def test_saved_file_gets_umask_permissions_and_leaves_no_temporary(tmp_path):
    """A .rbln is an ordinary file (0o666 minus the umask), not 0o600 like a mkstemp file."""
    compiled = compile_from_torch(mlp(), example_inputs=[torch.randn(4, 16)])
    old_umask = os.umask(0o022)
    try:
        path = compiled.save(tmp_path / "out" / "mlp.rbln")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mlp.rbln"]


def test_load_and_run_without_pickle(artifact, monkeypatch):
    module, path, _ = artifact

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle / torch.load used while loading a .rbln artifact")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    runtime = Runtime(path)
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = module(x)
    out = runtime.run(x)
    assert (out - expected).abs().max() <= 2e-2 * expected.abs().max()


# --------------------------------------------------------------------------- tampering


def _flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    return data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]


def _in_program(data: bytes, needle: bytes) -> int:
    """Offset of `needle` inside the header's program part."""
    start = data.index(b'"program":{')
    index = data.index(needle, start)
    assert index < 16 + struct.unpack("<Q", data[8:16])[0]
    return index


def _tampered(data: bytes, how: str) -> bytes:
    header, header_bytes, payload = split(data)
    if how == "payload-byte":
        return _flip(data, len(data) - 1, 0xFF)
    if how == "payload-middle-byte":
        return _flip(data, len(data) - len(payload) // 2, 0x10)
    if how == "program-byte":  # still valid JSON: "aten.linear.default" -> "aten.linear.defaulu"
        return _flip(data, _in_program(data, b'linear.default"') + len(b"linear.defaul"))
    if how == "program-digit":  # still valid JSON: a shape 16 -> 17
        return _flip(data, _in_program(data, b'"shape":[4,16]') + len(b'"shape":[4,1'), 0x01)
    if how == "header-syntax":  # no longer JSON
        return _flip(data, data.index(b'"program":{') + len(b'"program":'), 0x40)
    if how == "truncated-payload":
        return data[:-1]
    if how == "truncated-header":
        return data[: 16 + len(header_bytes) // 2]
    if how == "truncated-length":
        return data[:12]
    if how == "empty":
        return b""
    if how == "wrong-magic":
        return b"PK\x03\x04\0\0\0\0" + data[8:]
    if how == "version-999":
        return join(dump({**header, "format_version": 999}), payload)
    if how == "version-1":  # single-device programs of optimum-npu before tensor parallelism
        return join(dump({**header, "format_version": 1}), payload)
    if how == "extra-bytes":
        return data + b"\0"
    raise AssertionError(how)


TAMPERING = {
    "payload-byte": "payload checksum",
    "payload-middle-byte": "payload checksum",
    "program-byte": "program checksum",
    "program-digit": "program checksum",
    "header-syntax": "corrupted header",
    "truncated-payload": "truncated",
    "truncated-header": "truncated",
    "truncated-length": "truncated",
    "empty": "not a .rbln",
    "wrong-magic": "not a .rbln",
    "version-999": "format version 999.*recompile",
    "version-1": "format version 1, this optimum-npu reads version 2; recompile",
    "extra-bytes": "payload has",
}


@pytest.mark.parametrize("how", sorted(TAMPERING))
def test_tampered_file_is_refused(artifact, how, tmp_path, state_dir):
    _, _, data = artifact
    bad = tmp_path / "bad.rbln"
    bad.write_bytes(_tampered(data, how))
    with pytest.raises(ArtifactError, match=TAMPERING[how]) as info:
        Runtime(bad)
    assert isinstance(info.value, ValueError)
    assert str(bad) in str(info.value)  # the message says which file
    gc.collect()
    assert device_memory.used_bytes(0) == 0 and not list(state_dir.glob("alloc-*"))  # no runtime was built
    with pytest.raises(ArtifactError):
        optimum_npu.CompiledModel.load(bad)


def test_checksums_do_not_let_foreign_ops_run(artifact, tmp_path, state_dir):
    """A program re-checksummed by an attacker still only runs aten / rbln operators."""
    _, _, data = artifact
    header, _, payload = split(data)
    for step in header["program"]["steps"]:
        for op in step["ops"]:
            if op["target"] == "aten.linear.default":
                op["target"] = "builtins.exec.default"
    header["program_sha256"] = sha_json(header["program"])
    bad = tmp_path / "evil.rbln"
    bad.write_bytes(join(dump(header), payload))
    with pytest.raises(ArtifactError, match=r"builtins.exec.default.*allowed namespaces"):
        optimum_npu.CompiledModel.load(bad)  # refused at load, before any runtime exists
    with pytest.raises(ArtifactError, match=r"builtins.exec.default.*allowed namespaces"):
        Runtime(bad)
    gc.collect()
    assert device_memory.used_bytes(0) == 0


def _rewrite(data: bytes, edit) -> bytes:
    header, _, payload = split(data)
    header, payload = edit(header, payload)
    return join(dump(header), payload)


def test_malformed_op_name_is_named_in_the_error(artifact, tmp_path):
    def edit(header, payload):
        header["program"]["steps"][2]["ops"][0]["target"] = "os.system"
        header["program_sha256"] = sha_json(header["program"])
        return header, payload

    bad = tmp_path / "bad.rbln"
    bad.write_bytes(_rewrite(artifact[2], edit))
    with pytest.raises(ArtifactError, match="os.system"):
        Runtime(bad)


@pytest.mark.parametrize("header_bytes", [b'{"format_version":1}', b"[1]", b"null"], ids=["missing-keys", "list", "null"])
def test_malformed_header_is_an_artifact_error(artifact, tmp_path, header_bytes):
    _, _, data = artifact
    bad = tmp_path / "bad.rbln"
    bad.write_bytes(join(header_bytes, split(data)[2]))
    with pytest.raises(ArtifactError):
        Runtime(bad)


def test_payload_missing_a_weight_is_an_artifact_error(artifact, tmp_path):
    def edit(header, payload):
        tensors = st_load(payload)
        tensors.pop(sorted(tensors)[0])
        payload = st_save(tensors)
        header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
        header["payload_bytes"] = len(payload)
        return header, payload

    bad = tmp_path / "bad.rbln"
    bad.write_bytes(_rewrite(artifact[2], edit))
    with pytest.raises(ArtifactError):
        Runtime(bad)


def test_meta_compile_cannot_be_saved(tmp_path):
    with torch.device("meta"):
        module = mlp()
    compiled = compile_from_torch(module, example_inputs=[torch.randn(4, 16)])
    with pytest.raises(ValueError, match="meta device"):
        compiled.save(tmp_path / "meta.rbln")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- determinism


def _compile_bytes(build, example, tmp_path, name, **kwargs):
    torch.manual_seed(1234)
    module = build()
    if hasattr(module, "eval"):
        module.eval()
    path = compile_from_torch(module, example_inputs=[example], **kwargs).save(tmp_path / name)
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize(
    "build,shape,kwargs",
    [
        (mlp, (4, 16), {}),
        (mlp, (4, 16), {"dtype": "float16"}),
        (mlp, (4, 16), {"numerics": "exact"}),
        (ConvNet, (2, 3, 8, 8), {}),
    ],
    ids=["mlp", "mlp-fp16", "mlp-exact", "convnet"],
)
def test_recompile_is_byte_identical(build, shape, kwargs, tmp_path):
    first = _compile_bytes(build, torch.randn(shape), tmp_path, "a.rbln", **kwargs)
    second = _compile_bytes(build, torch.randn(shape), tmp_path, "b.rbln", **kwargs)  # other example values
    assert first == second


def test_same_module_compiled_twice_is_byte_identical(tmp_path):
    module = ConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    a = compile_from_torch(module, example_inputs=[x]).save(tmp_path / "a.rbln")
    b = compile_from_torch(module, example_inputs=[x]).save(tmp_path / "b.rbln")
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()


def test_load_save_round_trip_is_byte_identical(artifact, tmp_path):
    _, path, data = artifact
    again = optimum_npu.CompiledModel.load(path).save(tmp_path / "nested" / "again.rbln")
    with open(again, "rb") as f:
        assert f.read() == data
    assert [p.name for p in (tmp_path / "nested").iterdir()] == ["again.rbln"]  # no temp files left


def test_different_weights_give_different_files(tmp_path):
    a = _compile_bytes(mlp, torch.randn(4, 16), tmp_path, "a.rbln")
    torch.manual_seed(99)
    path = compile_from_torch(mlp(), example_inputs=[torch.randn(4, 16)]).save(tmp_path / "b.rbln")
    with open(path, "rb") as f:
        assert f.read() != a
