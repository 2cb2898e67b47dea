"""compile_from_torch + Runtime end to end: outputs against the fp32 torch module, the
profiler trace's structure, the public API's variants, and the errors of bad usage.

Every numerical check compares to the module itself run by torch in fp32, with a
tolerance relative to the output's scale:
- bf16 device numerics: 2e-2 (bf16 has an 8-bit mantissa: ~4e-3 per rounding),
- fp16 device numerics: 2e-3 (11-bit mantissa: ~5e-4 per rounding),
- numerics="exact": 1e-6 (fp32 on the host, the same ops as torch).
"""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import optimum_npu
from optimum_npu import Runtime, compile_from_torch
from shared_modules import PreNormBlock, load_trace

TOLERANCE = {("bfloat16", "device"): 2e-2, ("float16", "device"): 2e-3, ("bfloat16", "exact"): 1e-6,
             ("float16", "exact"): 1e-6}
MODES = sorted(TOLERANCE)
TRACKS = ("Host", "External HDMA", "Task DMA", "Neural Engine Clusters")
EPS_US = 2e-3  # trace timestamps are rounded to 1e-3 us


def assert_matches(actual, expected, rel, what=""):
    """max |actual - expected| <= rel * max |expected| (expected is the fp32 torch output)."""
    assert isinstance(actual, torch.Tensor), type(actual)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, actual.dtype)
    scale = expected.abs().max().item()
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel} x output scale {scale:.3g}"


def reference(module, *inputs):
    with torch.no_grad():
        return module(*inputs)


# --------------------------------------------------------------------------- models


class LinearAtanLinear(nn.Module):
    """atan has no device kernel: it runs on the host between two device linears."""

    def __init__(self, d=16):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)

    def forward(self, x):
        return self.b(torch.atan(self.a(x)))


def seed_examples():
    return {
        "linear": nn.Linear(16, 16),
        "linear_relu": nn.Sequential(nn.Linear(16, 16), nn.ReLU()),
        "linear_atan_linear": LinearAtanLinear(),
    }


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 8 * 8, 10)
        with torch.no_grad():  # non-trivial running statistics, so eval-mode BN matters
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(x, 1))


def kernel_ops(compiled):
    """[(kind, [op names])] of the program's steps, e.g. ("kernel", ["linear", "relu"])."""
    return [(s.kind, [op.target.split(".")[1] for op in s.ops]) for s in compiled.program.steps]


# --------------------------------------------------------------------------- trace helpers


def on(track, slices):
    return [s for s in slices if s["track"] == track]


def profile(module, x, tmp_path, **compile_kwargs):
    compiled = compile_from_torch(module, example_inputs=[x], **compile_kwargs)
    runtime = Runtime(compiled, activate_profiler=True)
    out = runtime.run(x)
    path = runtime.save_trace(tmp_path / "trace.json")
    return compiled, runtime, out, load_trace(path), path


# --------------------------------------------------------------------------- 1. seed examples


@pytest.mark.parametrize("dtype,numerics", MODES)
@pytest.mark.parametrize("name", ["linear", "linear_relu", "linear_atan_linear"])
def test_seed_examples_match_torch(name, dtype, numerics, tmp_path):
    module = seed_examples()[name]
    x = torch.randn(16, 16)
    compiled = compile_from_torch(module, example_inputs=[x], dtype=dtype, numerics=numerics)
    path = compiled.save(tmp_path / "compiled.rbln")
    runtime = Runtime(path, tensor_type="pt", activate_profiler=True)
    for _ in range(2):  # a second run with fresh data: nothing stale between runs
        x = torch.randn(16, 16)
        assert_matches(runtime.run(x), reference(module, x), TOLERANCE[dtype, numerics], f"{name} {dtype} {numerics}")


def test_device_numerics_really_round():
    """bf16 device numerics must differ from fp32 (otherwise the tolerance test proves nothing)."""
    module = nn.Linear(64, 64)
    x = torch.randn(8, 64)
    out = Runtime(compile_from_torch(module, example_inputs=[x]))(x)
    assert (out - reference(module, x)).abs().max() > 1e-5


def test_trace_is_perfetto_loadable(tmp_path):
    _, runtime, _, _, path = profile(LinearAtanLinear(), torch.randn(16, 16), tmp_path)
    assert path == str(tmp_path / "trace.json")
    with open(path) as f:
        data = json.load(f)
    events = data["traceEvents"]
    assert isinstance(events, list) and events
    complete = [e for e in events if e["ph"] == "X"]
    meta = [e for e in events if e["ph"] == "M"]
    assert complete and meta and all(e["ph"] in ("X", "M") for e in events)
    for e in complete:
        assert isinstance(e["name"], str) and isinstance(e["pid"], int) and isinstance(e["tid"], int)
        assert isinstance(e["ts"], (int, float)) and isinstance(e["dur"], (int, float))
        assert e["ts"] >= 0 and e["dur"] >= 0
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    processes = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    assert set(TRACKS) <= set(threads.values())
    for e in complete:  # every slice sits on a named thread of a named process
        assert (e["pid"], e["tid"]) in threads and e["pid"] in processes
    host_pids = {pid for (pid, _), name in threads.items() if name == "Host"}
    assert {processes[pid] for pid in host_pids} == {"Host"}
    device_pids = {pid for (pid, _), name in threads.items() if name == "Neural Engine Clusters"}
    assert {processes[pid] for pid in device_pids} == {"npu0"}
    # Slices carry what they moved / computed.
    for e in complete:
        track = threads[(e["pid"], e["tid"])]
        if track in ("External HDMA", "Task DMA"):
            assert e["args"]["bytes"] > 0
        elif track == "Neural Engine Clusters":
            assert e["args"]["flops"] > 0
        elif track == "Host":
            assert e["args"]["flops"] > 0 and e["args"]["bytes"] > 0


def test_trace_linear(tmp_path):
    m, n, k = 16, 16, 16
    _, _, _, slices, _ = profile(nn.Linear(k, n), torch.randn(m, k), tmp_path)
    hdma, ne, dma = on("External HDMA", slices), on("Neural Engine Clusters", slices), on("Task DMA", slices)
    assert not on("Host", slices)
    assert [s["args"]["direction"] for s in hdma] == ["h2d", "d2h"]
    assert hdma[0]["args"]["bytes"] == m * k * 4 and hdma[1]["args"]["bytes"] == m * n * 4  # fp32 in and out
    assert len(ne) == 3, [s["name"] for s in ne]
    cast, matmul, upcast = ne
    assert "cast" in cast["name"] and "upcast" in upcast["name"] and "linear" in matmul["name"]
    # The matmul's work: 2*m*n*k MACs-as-FLOPs plus at most the bias add.
    assert 2 * m * n * k <= matmul["args"]["flops"] <= 2 * m * n * k + m * n
    # Casts are element-wise: far less work than the matmul.
    assert cast["args"]["flops"] <= m * k and upcast["args"]["flops"] <= m * n
    # Time order: HDMA in -> cast -> matmul -> upcast -> HDMA out, one after the other.
    chain = [hdma[0], cast, matmul, upcast, hdma[1]]
    for before, after in zip(chain, chain[1:]):
        assert before["end"] <= after["ts"] + EPS_US, (before, after)
    # Each kernel streams its operands on Task DMA while the engines compute (same start).
    assert [s["name"] for s in dma] == [s["name"] for s in ne]
    assert [s["ts"] for s in dma] == [s["ts"] for s in ne]
    # The matmul's Task DMA moves bf16 weight + bias + input + output.
    assert dma[1]["args"]["bytes"] == 2 * (k * n + n + m * k + m * n)


def test_trace_linear_relu_is_one_fused_kernel(tmp_path):
    compiled, _, _, slices, _ = profile(nn.Sequential(nn.Linear(16, 16), nn.ReLU()), torch.randn(16, 16), tmp_path)
    ne = on("Neural Engine Clusters", slices)
    assert len(ne) == 3, [s["name"] for s in ne]  # input cast, linear+relu, output upcast
    fused = ne[1]
    assert "linear" in fused["name"] and "relu" in fused["name"]
    assert not any(s["name"] == "relu" for s in ne)
    relu_steps = [ops for kind, ops in kernel_ops(compiled) if "relu" in ops]
    assert relu_steps == [["linear", "relu"]]
    assert [kind for kind, _ in kernel_ops(compiled)].count("kernel") == 3


def test_trace_host_fallback_between_device_kernels(tmp_path):
    d = 16
    _, _, _, slices, _ = profile(LinearAtanLinear(d), torch.randn(d, d), tmp_path)
    host = on("Host", slices)
    assert len(host) == 1 and "atan" in host[0]["name"]
    atan = host[0]
    linears = [s for s in on("Neural Engine Clusters", slices) if s["args"]["flops"] >= 2 * d**3]
    assert len(linears) == 2
    first, second = linears
    assert first["end"] <= atan["ts"] + EPS_US and atan["end"] <= second["ts"] + EPS_US
    hdma = on("External HDMA", slices)
    out_copies = [s for s in hdma if first["end"] - EPS_US <= s["ts"] and s["end"] <= atan["ts"] + EPS_US]
    in_copies = [s for s in hdma if atan["end"] - EPS_US <= s["ts"] and s["end"] <= second["ts"] + EPS_US]
    assert [s["args"]["direction"] for s in out_copies] == ["d2h"]
    assert [s["args"]["direction"] for s in in_copies] == ["h2d"]
    # The device result leaves in bf16; the host result is cast to bf16 before the copy back.
    assert out_copies[0]["args"]["bytes"] == d * d * 2
    assert in_copies[0]["args"]["bytes"] == d * d * 2
    # The host segment computes atan over every element: reads the bf16 copy, writes fp32.
    assert atan["args"]["flops"] >= d * d and atan["args"]["bytes"] >= d * d * (2 + 4)


# --------------------------------------------------------------------------- 2. conv net, transformer


@pytest.mark.parametrize("dtype,numerics", MODES)
def test_conv_net_matches_torch(dtype, numerics):
    module = ConvNet().eval()
    x = torch.randn(2, 3, 16, 16)
    runtime = Runtime(compile_from_torch(module, example_inputs=[x], dtype=dtype, numerics=numerics))
    x = torch.randn(2, 3, 16, 16)
    assert_matches(runtime(x), reference(module, x), TOLERANCE[dtype, numerics], f"convnet {dtype} {numerics}")


def test_conv_net_fusion():
    module = ConvNet().eval()
    compiled = compile_from_torch(module, example_inputs=[torch.randn(2, 3, 16, 16)])
    steps = kernel_ops(compiled)
    assert all(kind != "host" for kind, _ in steps), steps  # everything runs on the device
    # ReLU is an epilogue of the conv / batch-norm kernel, never a kernel of its own.
    with_relu = [ops for _, ops in steps if "relu" in ops]
    assert len(with_relu) == 1 and ({"conv2d", "batch_norm"} & set(with_relu[0])), steps
    # Flatten is a view: it rides along with a neighbouring kernel.
    assert not any(ops == ["flatten"] for _, ops in steps), steps
    assert any("conv2d" in ops for _, ops in steps) and any("linear" in ops for _, ops in steps)


@pytest.mark.parametrize("dtype,numerics", MODES)
def test_transformer_block_matches_torch(dtype, numerics):
    module = PreNormBlock().eval()
    x = torch.randn(2, 8, 64)
    runtime = Runtime(compile_from_torch(module, example_inputs=[x], dtype=dtype, numerics=numerics))
    assert_matches(runtime(x), reference(module, x), TOLERANCE[dtype, numerics], f"block {dtype} {numerics}")


def test_transformer_block_fusion():
    compiled = compile_from_torch(PreNormBlock().eval(), example_inputs=[torch.randn(2, 8, 64)])
    steps = kernel_ops(compiled)
    assert all(kind != "host" for kind, _ in steps), steps
    assert any("scaled_dot_product_attention" in ops for _, ops in steps)
    # GELU fused into the fc1 kernel; residual adds fused into the projection kernels.
    assert any(ops[:2] == ["linear", "gelu"] for _, ops in steps), steps
    assert sum(1 for _, ops in steps if ops[:1] == ["linear"] and "add" in ops) == 2, steps
    assert not any(ops in (["gelu"], ["add"]) for _, ops in steps), steps


@pytest.mark.parametrize("dtype,numerics", [("bfloat16", "device"), ("float16", "device"), ("bfloat16", "exact")])
def test_torch_transformer_encoder_layer_matches_torch(dtype, numerics):
    module = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval()  # dropout 0.1, off in eval
    x = torch.randn(2, 8, 64)
    runtime = Runtime(compile_from_torch(module, example_inputs=[x], dtype=dtype, numerics=numerics))
    assert_matches(runtime(x), reference(module, x), TOLERANCE[dtype, numerics], f"encoder layer {dtype} {numerics}")


# --------------------------------------------------------------------------- 3. API variants


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x, y):
        return self.lin(x) * torch.sigmoid(y)


def test_runtime_from_compiled_and_from_path_agree(tmp_path):
    module = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
    compiled = compile_from_torch(module, example_inputs=[torch.randn(16, 16)])
    path = compiled.save(tmp_path / "compiled.rbln")
    assert path == str(tmp_path / "compiled.rbln")
    x = torch.randn(16, 16)
    from_object, from_path = Runtime(compiled), Runtime(path)
    from_create = compiled.create_runtime()
    assert torch.equal(from_object.run(x), from_path.run(x))
    assert torch.equal(from_object.run(x), from_create.run(x))
    assert torch.equal(from_path(x), from_path.run(x))  # __call__ is run
    assert_matches(from_path(x), reference(module, x), 2e-2)


def test_numpy_tensor_type():
    module = nn.Linear(16, 16)
    compiled = compile_from_torch(module, example_inputs=[torch.randn(16, 16)])
    x = torch.randn(16, 16)
    out_np = Runtime(compiled, tensor_type="np").run(x.numpy())
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32 and out_np.shape == (16, 16)
    assert np.array_equal(out_np, Runtime(compiled, tensor_type="pt").run(x).numpy())


def test_numpy_output_of_a_bf16_program_is_float32():
    """numpy has no bfloat16: a bf16 output comes back as float32, with the same values."""
    module = nn.Linear(16, 16).to(torch.bfloat16)
    compiled = compile_from_torch(module, input_info=[("x", [4, 16], "bfloat16")])
    x = torch.randn(4, 16).to(torch.bfloat16)
    out_pt = Runtime(compiled).run(x)
    out_np = Runtime(compiled, tensor_type="np").run(x)
    assert out_pt.dtype == torch.bfloat16 and out_np.dtype == np.float32
    assert np.array_equal(out_np, out_pt.float().numpy())


def test_named_inputs_by_keyword():
    module = TwoInputs()
    x, y = torch.randn(4, 16), torch.randn(4, 16)
    compiled = compile_from_torch(module, example_inputs=[x, y])
    runtime = Runtime(compiled)
    assert [s.name for s in compiled.program.inputs] == ["x", "y"]
    positional = runtime(x, y)
    assert torch.equal(runtime(x=x, y=y), positional)
    assert torch.equal(runtime(y=y, x=x), positional)
    assert torch.equal(runtime(x, y=y), positional)
    assert_matches(positional, reference(module, x, y), 2e-2)


def test_input_info_compile_path():
    module = nn.Linear(16, 16)
    compiled = compile_from_torch(module, input_info=[("x", [16, 16], "float32")])
    assert [(s.name, s.shape, s.dtype) for s in compiled.program.inputs] == [("x", (16, 16), "float32")]
    runtime = Runtime(compiled)
    x = torch.randn(16, 16)
    assert torch.equal(runtime(x=x), runtime(x))
    assert_matches(runtime(x), reference(module, x), 2e-2)


def test_input_info_names_and_torch_dtypes():
    module = TwoInputs()
    compiled = compile_from_torch(module, input_info=[("a", (4, 16), torch.float32), ("b", [4, 16], "float32")])
    x, y = torch.randn(4, 16), torch.randn(4, 16)
    out = Runtime(compiled)(b=y, a=x)
    assert_matches(out, reference(module, x, y), 2e-2)


def test_multiple_outputs():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 32)

        def forward(self, x):
            h = self.lin(x)
            return h[:, :16].relu(), h[:, 16:].sum(-1)

    module = Split()
    x = torch.randn(4, 16)
    out = Runtime(compile_from_torch(module, example_inputs=[x], numerics="exact"))(x)
    expected = reference(module, x)
    assert isinstance(out, tuple) and len(out) == 2
    for got, want in zip(out, expected):
        assert_matches(got, want, 1e-6)


def test_output_does_not_track_gradients():
    module = nn.Linear(16, 16)
    runtime = Runtime(compile_from_torch(module, example_inputs=[torch.randn(4, 16)]))
    out = runtime(torch.randn(4, 16, requires_grad=True))
    assert not out.requires_grad and out.grad_fn is None


# --------------------------------------------------------------------------- 8. errors


@pytest.fixture(scope="module")
def linear_runtime():
    compiled = compile_from_torch(nn.Linear(16, 16), input_info=[("x", [16, 16], "float32")])
    return Runtime(compiled)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((torch.randn(8, 16),), {}, ValueError, r"shape \[8, 16\].*\[16, 16\]"),
        ((torch.randn(16, 16).double(),), {}, TypeError, r"dtype torch.float64.*float32"),
        ((torch.randn(16, 16).half(),), {}, TypeError, r"dtype torch.float16.*float32"),
        ((torch.randn(16, 16), torch.randn(16, 16)), {}, TypeError, r"1 input.*got 2"),
        ((), {}, TypeError, r"missing input.*'x'"),
        ((), {"x": torch.randn(16, 16), "z": torch.randn(16, 16)}, TypeError, r"unknown input 'z'"),
        ((torch.randn(16, 16),), {"x": torch.randn(16, 16)}, TypeError, r"'x' twice"),
        (([[0.0] * 16] * 16,), {}, TypeError, r"'x' must be a torch.Tensor or numpy array, got list"),
        ((3.0,), {}, TypeError, r"got float"),
    ],
    ids=["shape", "dtype", "dtype-half", "too-many", "missing", "unknown-kwarg", "twice", "list", "scalar"],
)
def test_bad_run_inputs(linear_runtime, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        linear_runtime.run(*args, **kwargs)


X16 = [torch.randn(16, 16)]


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(example_inputs=X16, npu="RBLN-CA99"), ValueError, r"RBLN-CA99.*RBLN-CA12.*RBLN-CA25.*RBLN-CR03"),
        (dict(input_info=[("x", [16, 16])]), ValueError, r"triple"),
        (dict(input_info=["x"]), ValueError, r"triple"),
        (dict(input_info=[("x", [16, -1], "float32")]), ValueError, r"positive ints"),
        (dict(input_info=[("x", [16, 16], "float8")]), ValueError, r"dtype of 'x'.*float8"),
        (dict(input_info=[("x", [16, 16], "float32"), ("x", [16, 16], "float32")]), ValueError, r"unique.*'x'"),
        (dict(input_info=[("x", [16, 16], "float32"), ("y", [16, 16], "float32")]), ValueError, r"Linear"),
        (dict(input_info=[]), ValueError, r"non-empty"),
        (dict(input_info=[("1x", [16, 16], "float32")]), ValueError, r"identifier"),
        (dict(example_inputs=X16, input_info=[("x", [16, 16], "float32")]), ValueError, r"exactly one"),
        (dict(), ValueError, r"exactly one"),
        (dict(example_inputs=["not a tensor"]), TypeError, r"tensors"),
        (dict(example_inputs=X16, dtype="float32"), ValueError, r"bfloat16.*float16.*float32"),
        (dict(example_inputs=X16, dtype=torch.float32), ValueError, r"16 bits"),
        (dict(example_inputs=X16, numerics="fast"), ValueError, r"numerics.*'fast'"),
        (dict(example_inputs=X16, tensor_parallel_size=0), ValueError, r"tensor_parallel_size"),
        (dict(example_inputs=X16, tensor_parallel_size="1"), ValueError, r"tensor_parallel_size"),
    ],
    ids=["npu", "pair", "bare-name", "negative-dim", "dtype-string", "duplicate", "count", "empty", "identifier",
         "both", "neither", "non-tensor", "float32", "torch-float32", "numerics", "tp0", "tp-str"],
)
def test_bad_compile_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        compile_from_torch(nn.Linear(16, 16), **kwargs)


def test_input_info_count_error_names_the_problem():
    """Fewer input_info entries than forward() takes: a ValueError saying what is missing."""
    with pytest.raises(ValueError, match=r"TwoInputs.*'y'"):
        compile_from_torch(TwoInputs(), input_info=[("x", [4, 16], "float32")])


def test_compile_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        compile_from_torch(lambda x: x, example_inputs=X16)


def test_bad_runtime_arguments(tmp_path):
    compiled = compile_from_torch(nn.Linear(16, 16), example_inputs=X16)
    with pytest.raises(ValueError, match=r"tensor_type.*'jax'"):
        Runtime(compiled, tensor_type="jax")
    with pytest.raises(TypeError, match="path to a .rbln file or a compiled model"):
        Runtime(nn.Linear(16, 16))
    with pytest.raises(FileNotFoundError):
        Runtime(tmp_path / "missing.rbln")
    with pytest.raises(ValueError, match="devices 0..3"):
        Runtime(compiled, device=7)
    runtime = Runtime(compiled)  # profiler off
    runtime(torch.randn(16, 16))
    with pytest.raises(ValueError, match="activate_profiler=True"):
        runtime.save_trace(tmp_path / "trace.json")
    assert not (tmp_path / "trace.json").exists()


def test_errors_are_public_types():
    assert issubclass(optimum_npu.ArtifactError, ValueError)
    assert issubclass(optimum_npu.DeviceMemoryError, Exception)


def test_a_compiled_module_prints_in_one_line_and_speaks_of_attention_only_when_it_has_some():
    compiled = compile_from_torch(torch.nn.Linear(16, 16), example_inputs=[torch.randn(16, 16)])
    text = repr(compiled)
    assert text.startswith("CompiledModel(npu='RBLN-CA25', tensor_parallel_size=1") and "\n" not in text
    assert len(text) < 400 and str(compiled) == text
    assert "attention" not in compiled.summary() and compiled.summary().endswith("ms per run")
