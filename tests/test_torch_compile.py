"""torch.compile(backend="rbln"): Dynamo's graphs compiled and run on the simulated NPU, against
eager torch (references computed by the same module in fp32, without the backend)."""

import importlib
import json
import os
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import optimum_npu.torch_backend as torch_backend
from llm_fixtures import _one_torch_thread, make_hf_model  # noqa: F401  (fixture)

# Relative to the largest |value| of the reference, as test_llm_parity states them for logits.
BF16_RTOL = 0.10
FP16_RTOL = 0.01
EXACT_ATOL = 1e-5


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    torch_backend.reset()
    yield
    torch._dynamo.reset()


def relative_error(actual, expected) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.abs().max()).item()


class TwoRegions(torch.nn.Module):
    """A graph break between two regions with weights: two programs, host code between them."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(16, 32)
        self.second = torch.nn.Linear(32, 8)
        self.host_calls = 0

    def forward(self, x):
        h = torch.nn.functional.gelu(self.first(x))
        torch._dynamo.graph_break()
        self.host_calls += 1
        return torch.softmax(self.second(h), dim=-1) * 3.0


@pytest.mark.parametrize("dtype,rtol", [("bfloat16", BF16_RTOL), ("float16", FP16_RTOL)])
def test_graph_break_gives_two_programs_matching_eager(dtype, rtol):
    model = TwoRegions().eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend="rbln", options={"dtype": dtype})
        out = compiled(x)
    assert relative_error(out, expected) <= rtol
    assert counters["stats"]["unique_graphs"] == 2
    graphs = torch_backend.compiled_graphs()   # before explain(), which replaces Dynamo's compiled code
    explanation = torch._dynamo.explain(TwoRegions())(x)
    assert explanation.graph_break_count == 1
    assert len(graphs) == 2 and all(g.on_device for g in graphs)
    assert model.host_calls == 2  # eager reference + the host code between the compiled regions
    for g in graphs:
        assert g.stats.runs == 1 and g.stats.total_s > 0 and g.stats.device_kernels_s > 0
        assert g.stats.memory[0].total_bytes > 0
        assert "device kernels" in g.summary()
    assert graphs[0].stats.memory[0].weights_bytes == (16 * 32 + 32) * 2  # 16-bit weights on the device


def test_exact_numerics_match_eager():
    model = TwoRegions().eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = model(x)
        out = torch.compile(model, backend="rbln", options={"numerics": "exact"})(x)
    assert (out - expected).abs().max().item() <= EXACT_ATOL


@pytest.mark.parametrize("numerics,dtype,tol", [("exact", "bfloat16", None), ("device", "bfloat16", BF16_RTOL),
                                                ("device", "float16", FP16_RTOL)])
def test_llama_forward_logits_match_eager(numerics, dtype, tol):
    model = make_hf_model("llama").eval()
    ids = torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
        compiled = torch.compile(model, backend="rbln", options={"numerics": numerics, "dtype": dtype})
        logits = compiled(ids).logits
    if tol is None:
        assert (logits - expected).abs().max().item() <= EXACT_ATOL
    else:
        assert relative_error(logits, expected) <= tol
    graphs = torch_backend.compiled_graphs()
    assert graphs and all(g.on_device for g in graphs)
    assert sum(g.stats.neural_engine_busy_s for g in graphs) > 0


def test_new_shape_recompiles_under_guards_and_dynamic_graphs_specialise():
    model = TwoRegions().eval()
    with torch.no_grad():
        static = torch.compile(model, backend="rbln", dynamic=False)
        for rows in (2, 3):
            x = torch.randn(rows, 16)
            assert relative_error(static(x), model(x)) <= BF16_RTOL
        assert len(torch_backend.compiled_graphs()) == 4  # two regions x two shapes, each through Dynamo
        torch._dynamo.reset()
        torch_backend.reset()
        automatic = torch.compile(model, backend="rbln")
        for rows in (2, 3, 5, 3):
            x = torch.randn(rows, 16)
            assert relative_error(automatic(x), model(x)) <= BF16_RTOL
    # Dynamo recompiles with a dynamic size; the backend then compiles one program per concrete shape.
    graphs = torch_backend.compiled_graphs()
    dynamic = [g for g in graphs if len(g.programs) > 1]
    assert dynamic
    for g in graphs:
        shapes = [p.input_shapes[0][0] for p in g.programs.values()]
        assert len(shapes) == len(set(shapes))
    assert {3, 5} <= {p.input_shapes[0][0] for g in dynamic for p in g.programs.values()}


def test_changed_weights_recompile():
    model = TwoRegions().eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        compiled = torch.compile(model, backend="rbln", options={"numerics": "exact"})
        compiled(x)
        model.second.weight.mul_(-2.0)
        expected = model(x)
        assert (compiled(x) - expected).abs().max().item() <= EXACT_ATOL


def test_unsupported_graph_runs_on_host_with_one_warning():
    def writes_a_slice_of_its_input(x):
        x[1:].mul_(2.0)  # a write through a view of an input: the compiler refuses it
        return x + 1.0

    compiled = torch.compile(writes_a_slice_of_its_input, backend="rbln")
    x = torch.ones(3)
    with pytest.warns(UserWarning, match="runs on the host"):
        out = compiled(x)
    assert torch.equal(out, torch.tensor([2.0, 3.0, 3.0])) and torch.equal(x, torch.tensor([1.0, 2.0, 2.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(torch.ones(3))  # warned once
    (graph,) = torch_backend.compiled_graphs()
    assert not graph.on_device and "input" in graph.fallback_reason and graph.host_runs == 2


def test_in_place_write_to_an_input_runs_on_the_device_and_reaches_the_input():
    def writes_its_input(x, rows, y):
        x.mul_(2.0)
        rows.index_copy_(0, torch.tensor([2, 0]), y)
        return x + 1.0

    x, rows, y = torch.ones(3), torch.zeros(4, 2), torch.arange(4.0).reshape(2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = torch.compile(writes_its_input, backend="rbln", options={"numerics": "exact"})(x, rows, y)
    assert torch.equal(out, torch.full((3,), 3.0)) and torch.equal(x, torch.full((3,), 2.0))
    assert torch.equal(rows, torch.tensor([[2.0, 3.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    (graph,) = torch_backend.compiled_graphs()
    assert graph.on_device and graph.host_runs == 0


def greedy(model, ids, steps: int):
    """Greedy generate with a static cache: the tokens, and each step's logits."""
    out = model.generate(ids, max_new_tokens=steps, do_sample=False, cache_implementation="static",
                         return_dict_in_generate=True, output_logits=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("numerics,dtype,tol", [("exact", "bfloat16", None), ("device", "bfloat16", BF16_RTOL),
                                                ("device", "float16", FP16_RTOL)])
def test_static_cache_generate_runs_on_the_device_with_eager_tokens(numerics, dtype, tol):
    model = make_hf_model("llama").eval()
    ids = torch.randint(3, 256, (1, 7))
    steps = 8
    with torch.no_grad():
        expected, ref_logits = greedy(model, ids, steps)
        model.forward = torch.compile(model.forward, backend="rbln", options={"numerics": numerics, "dtype": dtype})
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no graph falls back to the host
            tokens, _ = greedy(model, ids, steps)
    graphs = torch_backend.compiled_graphs()
    assert len(graphs) == 2 and all(g.on_device and g.host_runs == 0 for g in graphs)  # prefill, decode
    assert [g.stats.runs for g in graphs] == [1, steps - 1]
    if tol is None:
        assert torch.equal(tokens, expected)
        return
    # 16-bit logits are within tol * max|logit| of fp32's, so the fp32 choice is certain only where its
    # margin over the runner-up exceeds twice that; tokens are compared up to the first step where it does not.
    top2 = ref_logits[0].topk(2, dim=-1).values
    certain = (top2[:, 0] - top2[:, 1]) > 2 * tol * ref_logits[0].abs().amax(dim=-1)
    compared = int(certain.long().cumprod(0).sum())
    assert torch.equal(tokens[0, :compared], expected[0, :compared])
    if dtype == "float16":
        assert compared >= 1  # the comparison is not empty


def test_unknown_option_is_refused_naming_the_options():
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="rbln", options={"dtpye": "bfloat16"})
    with pytest.raises(Exception, match="unknown option.*dtpye.*npu, dtype, numerics"):
        compiled(torch.randn(2, 4))


def test_profiler_trace_per_graph(tmp_path):
    model = TwoRegions().eval()
    with torch.no_grad():
        torch.compile(model, backend="rbln", options={"activate_profiler": True, "device": 1})(torch.randn(4, 16))
    paths = torch_backend.compiled_graphs()[0].save_trace(tmp_path / "graph0.json")
    events = json.loads(Path(paths[0]).read_text())["traceEvents"]
    tracks = {e["cat"] for e in events if e["ph"] == "X"}
    assert {"Neural Engine Clusters", "External HDMA"} <= tracks
    assert {e["pid"] for e in events if e["ph"] == "X"} == {2}  # device 1


def test_backend_is_registered_and_declared_as_entry_point():
    assert "rbln" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("rbln") is torch_backend.rbln_backend
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    target = pyproject["project"]["entry-points"]["torch_dynamo_backends"]["rbln"]
    module, _, name = target.partition(":")
    assert getattr(importlib.import_module(module), name) is torch_backend.rbln_backend


def test_tensor_parallel_llama_forward_is_exact_with_collectives():
    model = make_hf_model("llama").eval()
    ids = torch.randint(3, 256, (2, 12))
    with torch.no_grad():
        expected = model(ids).logits
        options = {"numerics": "exact", "tensor_parallel_size": 2}
        logits = torch.compile(model, backend="rbln", options=options)(ids).logits
    assert (logits - expected).abs().max().item() <= EXACT_ATOL
    (graph,) = torch_backend.compiled_graphs()
    stats = graph.stats
    assert stats.collectives_s > 0 and [m.device for m in stats.memory] == [0, 1]


def test_installed_entry_point_needs_no_import(tmp_path):
    """The package's metadata (as pip would install it) lets a fresh process use backend="rbln"
    without importing optimum_npu: Dynamo finds the entry point and imports the backend itself."""
    from setuptools import build_meta

    root = Path(__file__).parents[1]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        build_meta.prepare_metadata_for_build_wheel(str(tmp_path))
    finally:
        os.chdir(cwd)
    script = (
        "import sys, torch\n"
        "m, x = torch.nn.Linear(8, 8), torch.randn(2, 8)\n"
        "with torch.no_grad():\n"
        "    out = torch.compile(m, backend='rbln', options={'numerics': 'exact', 'cache': False})(x)\n"
        "    err = (out - m(x)).abs().max().item()\n"
        "print(int('optimum_npu.torch_backend' in sys.modules), err)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(root)]))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    imported, err = result.stdout.split()
    assert imported == "1" and float(err) <= EXACT_ATOL
