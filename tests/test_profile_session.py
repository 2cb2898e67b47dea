"""`with optimum_npu.profile(path):` one timeline of the host's spans and every device's tracks,
for a compiled model, torch.compile and the eager device, on one clock."""

import gc
import json

import pytest
import torch

import optimum_npu
import optimum_npu.torch_backend as torch_backend


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32, 32)

    def forward(self, x):
        return torch.relu(self.proj(x))


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    gc.collect()
    torch_backend.configure(device=1, dtype="bfloat16", numerics="device", activate_profiler=False)
    yield
    torch._dynamo.reset()
    gc.collect()


def slices(events, **match):
    return [e for e in events if e["ph"] == "X" and all(e.get(k) == v for k, v in match.items())]


def test_one_timeline_for_compiled_torch_compile_and_eager(tmp_path):
    model = Small().eval()
    x = torch.randn(4, 32)
    compiled = optimum_npu.compile_from_torch(model, example_inputs=[x])
    runtime = compiled.create_runtime(device=0)
    dynamo = torch.compile(model, backend="rbln", options={"device": 2})
    path = tmp_path / "trace.json"
    with torch.no_grad(), optimum_npu.profile(path) as session:
        with session.span("compiled model"):
            runtime(x)
        with session.span("torch.compile"):
            dynamo(x)
        with session.span("eager"):
            y = x.to("rbln")
            (y @ y.t()).cpu()
    events = json.loads(path.read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names[0] == "Host" and {"npu0", "npu1", "npu2"} <= set(names.values())
    pid = {name: p for p, name in names.items()}
    # Each device's kernels sit inside the host span of the call that ran them, and in call order.
    spans = {s["name"]: s for s in slices(events, pid=0) if s["name"] in ("compiled model", "torch.compile", "eager")}
    assert spans["compiled model"]["ts"] + spans["compiled model"]["dur"] <= spans["torch.compile"]["ts"]
    assert spans["torch.compile"]["ts"] + spans["torch.compile"]["dur"] <= spans["eager"]["ts"]
    for span, device in (("compiled model", "npu0"), ("torch.compile", "npu2"), ("eager", "npu1")):
        kernels = slices(events, pid=pid[device], cat="Neural Engine Clusters")
        assert kernels, device
        start, end = spans[span]["ts"], spans[span]["ts"] + spans[span]["dur"]
        for k in kernels:
            assert start - 1e-3 <= k["ts"] and k["ts"] + k["dur"] <= end + 1e-3, (span, k)
    # Device calls do not overlap on the host (calls are synchronous), and the host's own code shows.
    calls = sorted((s for s in slices(events, pid=0) if s["args"].get("waiting_for_device")), key=lambda s: s["ts"])
    assert len(calls) >= 3
    for a, b in zip(calls, calls[1:]):
        assert a["ts"] + a["dur"] <= b["ts"] + 1e-3
    assert slices(events, pid=0, name="Python")
    assert {"External HDMA", "Task DMA"} <= {s["cat"] for s in slices(events, pid=pid["npu0"])}


def test_one_session_at_a_time(tmp_path):
    with optimum_npu.profile(tmp_path / "a.json"):
        with pytest.raises(RuntimeError, match="already recording"):
            with optimum_npu.profile(tmp_path / "b.json"):
                pass
    assert (tmp_path / "a.json").exists()
