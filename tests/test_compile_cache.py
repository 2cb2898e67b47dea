"""The compile cache: torch.compile's programs reused by a later compilation (as a second process
would), corrupt and misplaced entries ignored and rebuilt, the folder bounded, the CLI."""

import os
import warnings

import pytest
import torch

import optimum_npu.torch_backend as torch_backend
from optimum_npu.cli import main as cli
from optimum_npu.compile import cache

EXACT_ATOL = 1e-5


class Block(torch.nn.Module):
    def __init__(self, width=24):
        super().__init__()
        self.a = torch.nn.Linear(width, width)
        self.b = torch.nn.Linear(width, width)

    def forward(self, x):
        return self.b(torch.nn.functional.silu(self.a(x)))


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    torch._dynamo.reset()
    torch_backend.reset()
    yield
    torch._dynamo.reset()


def compiled_run(model, x):
    """A fresh Dynamo compilation (what a new process does), run once; its program record."""
    torch._dynamo.reset()
    torch_backend.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="rbln", options={"numerics": "exact"})(x)
    (graph,) = torch_backend.compiled_graphs()
    (program,) = graph.programs.values()
    return out, program


def test_second_compilation_loads_from_the_cache():
    model, x = Block().eval(), torch.randn(3, 24)
    with torch.no_grad():
        expected = model(x)
    out, first = compiled_run(model, x)
    assert not first.from_cache and cache.info().entries == 1
    out2, second = compiled_run(model, x)
    assert second.from_cache
    assert (out - expected).abs().max().item() <= EXACT_ATOL and torch.equal(out, out2)
    with torch.no_grad():
        model.a.weight.add_(1.0)  # other weights: another key
        expected = model(x)
    out3, third = compiled_run(model, x)
    assert not third.from_cache and (out3 - expected).abs().max().item() <= EXACT_ATOL
    assert cache.info().entries == 2


def test_corrupt_and_misplaced_entries_are_ignored_and_rebuilt():
    model, other, x = Block().eval(), Block(width=24).eval(), torch.randn(3, 24)
    with torch.no_grad():
        expected = model(x)
    compiled_run(other, x)
    compiled_run(model, x)
    entries = sorted(cache.cache_dir().glob("*.rbln"), key=os.path.getmtime)
    other_entry, entry = entries
    entry.write_bytes(b"RBLNSIM\0" + b"\xff" * 40)  # corrupt
    with pytest.warns(UserWarning, match="ignoring entry"):
        out, program = compiled_run(model, x)
    assert not program.from_cache and (out - expected).abs().max().item() <= EXACT_ATOL
    entry.write_bytes(other_entry.read_bytes())  # a valid program, but another graph's (a swapped file)
    with pytest.warns(UserWarning, match="does not record the key"):
        out, program = compiled_run(model, x)
    assert not program.from_cache and (out - expected).abs().max().item() <= EXACT_ATOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compiled_run(model, x)[1].from_cache  # rebuilt and stored again


def test_size_is_bounded_least_recently_used_first(monkeypatch):
    x = torch.randn(3, 24)
    models = [Block().eval() for _ in range(3)]
    compiled_run(models[0], x)
    one_entry = cache.info().bytes
    monkeypatch.setenv(cache.MAX_BYTES_ENV, str(2 * one_entry + one_entry // 2))
    compiled_run(models[1], x)
    compiled_run(models[0], x)  # used again: now the most recent
    compiled_run(models[2], x)  # a third entry: the least recently used (models[1]) goes
    assert cache.info().entries == 2
    assert compiled_run(models[0], x)[1].from_cache
    assert not compiled_run(models[1], x)[1].from_cache


def test_cli_info_and_clear_remove_only_entries(capsys):
    compiled_run(Block().eval(), torch.randn(3, 24))
    foreign = cache.cache_dir() / "notes.txt"
    foreign.write_text("not ours")
    assert cli(["cache", "info"]) == 0
    assert "1 compiled program(s)" in capsys.readouterr().out
    assert cli(["cache", "clear"]) == 0
    assert "removed 1" in capsys.readouterr().out
    assert cache.info().entries == 0 and foreign.read_text() == "not ours"


def test_bad_cache_size_setting_is_refused(monkeypatch):
    monkeypatch.setenv(cache.MAX_BYTES_ENV, "4GB")
    with pytest.raises(ValueError, match="OPTIMUM_NPU_CACHE_MAX_BYTES must be a number of bytes"):
        cache.max_bytes()


class MLP(torch.nn.Module):
    """Column then row parallel under tensor parallelism: a plan with both styles and one all-reduce."""

    def __init__(self, width=32):
        super().__init__()
        self.up, self.down = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def test_a_cached_tensor_parallel_program_keeps_its_sharding_plan():
    from optimum_npu.compile.compiler import compile_from_torch

    model, x = MLP().eval(), torch.randn(2, 32)
    first = compile_from_torch(model, example_inputs=[x], tensor_parallel_size=2, cache=True)
    second = compile_from_torch(model, example_inputs=[x], tensor_parallel_size=2, cache=True)
    assert second.from_cache and not getattr(first, "from_cache", False)
    assert "column" in str(first.sharding_plan) and "row" in str(first.sharding_plan)
    assert str(second.sharding_plan) == str(first.sharding_plan)  # shapes and shards from the program
    (entry,) = cache.cache_dir().glob("*.rbln")
    data = entry.read_bytes()
    at = data.index(b'"sharding_plan":"')
    # A plan that names a tensor the program lacks: the entry is ignored and rebuilt, never half-read.
    entry.write_bytes(data[:at] + data[at:].replace(b"up.weight", b"up.weighX", 1))
    with pytest.warns(UserWarning, match="ignoring entry.*names no tensor of the program"):
        third = compile_from_torch(model, example_inputs=[x], tensor_parallel_size=2, cache=True)
    assert not getattr(third, "from_cache", False) and str(third.sharding_plan) == str(first.sharding_plan)
