"""Leftovers of the second hardening round (issue 17, section 6).

- loads while another process re-saves the same folder succeed (a load waits for the save's
  renames instead of reporting "a save was interrupted"), and loads that never pause do not starve the save;
- `optimum-npu compile` imports the spec's module from the working folder without letting that
  folder shadow what torch imports (a `sympy.py` there is never run);
- malformed guardrail `.pt` files are clear ValueErrors;
- a host allocation that fails under a process memory limit is a clear HostMemoryError.
(Killed pipeline saves: tests/test_hostile_pipeline.py; the registry: tests/test_hostile_registry.py.)
"""

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)
from llm_fixtures import save_source
from optimum_npu import RBLNLlamaForCausalLM
from optimum_npu.modeling.folder import FolderError, load_lock, save_lock

CHILD_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}

RESAVE = textwrap.dedent("""
    import sys
    from optimum_npu import RBLNLlamaForCausalLM

    first, second, target, rounds = sys.argv[1:]
    models = [RBLNLlamaForCausalLM.from_pretrained(f, rbln_create_runtimes=False) for f in (first, second)]
    print("ready", flush=True)
    for i in range(int(rounds)):
        models[i % 2].save_pretrained(target)
""")


def test_loads_during_a_concurrent_resave_succeed(tmp_path):
    source = save_source(tmp_path / "src", "llama", tokenizer=True)[0]
    folders = [Path(RBLNLlamaForCausalLM.from_pretrained(source, export=True, rbln_create_runtimes=False, **options)
                    .save_pretrained(tmp_path / name))
               for name, options in (("a", dict(rbln_max_seq_len=128)),
                                     ("b", dict(rbln_max_seq_len=64, rbln_prefill_chunk_size=64)))]
    target = Path(RBLNLlamaForCausalLM.from_pretrained(folders[0], rbln_create_runtimes=False)
                  .save_pretrained(tmp_path / "target"))
    saver = subprocess.Popen([sys.executable, "-c", RESAVE, str(folders[0]), str(folders[1]), str(target), "40"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    try:
        assert saver.stdout.readline().strip() == "ready", saver.stderr.read()
        loads = 0
        while saver.poll() is None and loads < 2000:   # bounded: the saver ends after its 40 saves
            loaded = RBLNLlamaForCausalLM.from_pretrained(target, rbln_create_runtimes=False)
            assert loaded.rbln_config.max_seq_len in (128, 64)
            loads += 1
    finally:
        saver.wait(timeout=600)
    assert saver.returncode == 0, saver.stderr.read()
    assert loads > 0



def test_a_save_is_not_starved_by_loads_that_overlap(tmp_path, monkeypatch):
    """Two readers whose shared locks always overlap (there is never a moment without a load): a save
    still gets in, after the loads already inside, instead of waiting out its timeout."""
    monkeypatch.setenv("OPTIMUM_NPU_LOCK_TIMEOUT", "5")
    folder = tmp_path / "model"
    folder.mkdir()
    saved = threading.Event()
    overlap = threading.Barrier(2)

    def keep_loading():
        for _ in range(2000):   # bounded: a few seconds of loads even if the save never gets in
            if saved.is_set():
                return
            with load_lock(folder):
                try:
                    overlap.wait(timeout=0.02)   # both readers inside together, then one leaves ...
                except threading.BrokenBarrierError:
                    overlap.reset()
                time.sleep(0.005)   # ... while the other one still holds its shared lock

    readers = [threading.Thread(target=keep_loading) for _ in range(2)]
    for reader in readers:
        reader.start()
    time.sleep(0.1)
    try:
        with save_lock(folder):
            saved.set()
    except FolderError as err:
        pytest.fail(f"the save was starved by the loads: {err}")
    finally:
        saved.set()
        for reader in readers:
            reader.join(timeout=60)


MODELS = textwrap.dedent("""
    import torch

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
""")
SHADOW = textwrap.dedent("""
    from pathlib import Path
    Path(__file__).with_name("SHADOWED").write_text("the working folder's sympy.py ran")
    raise ImportError("not the real sympy")
""")
# The console script's view: the working folder is not on sys.path (python -P, as for an entry point).
CLI = "import sys; from optimum_npu.cli import main; code = main(sys.argv[1:]); print(sys.modules['sympy'].__file__); sys.exit(code)"


def test_compile_does_not_let_the_working_folder_shadow_what_torch_imports(tmp_path):
    (tmp_path / "mymods.py").write_text(MODELS)
    (tmp_path / "sympy.py").write_text(SHADOW)
    done = subprocess.run([sys.executable, "-P", "-c", CLI, "compile", "mymods:build", "--input", "x:2x16",
                           "-o", "mlp.rbln"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=CHILD_ENV)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "SHADOWED").exists()
    assert Path(done.stdout.strip().splitlines()[-1]).parent != tmp_path   # torch got the installed sympy
    assert (tmp_path / "mlp.rbln").is_file()


@pytest.mark.parametrize("content, error", [
    (b"", "is empty: not a PyTorch checkpoint"),
    (b"hello world\n", "is not a weights-only PyTorch checkpoint .*KeyError"),
])
def test_malformed_guardrail_pt_files_are_clear_errors(tmp_path, content, error):
    from optimum_npu.cosmos_guardrail.face_blur import UPSTREAM_CHECKPOINT, load_retinaface
    from optimum_npu.cosmos_guardrail.video_filter import UPSTREAM_SAFETY_FILTER, load_video_safety_model

    for loader, name in ((load_video_safety_model, UPSTREAM_SAFETY_FILTER), (load_retinaface, UPSTREAM_CHECKPOINT)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / name).write_bytes(content)
        with pytest.raises(ValueError, match=error) as raised:
            loader(folder)
        assert len(str(raised.value).splitlines()) == 1


LIMITED = textwrap.dedent("""
    import resource, sys
    import torch
    torch.set_num_threads(1)
    from optimum_npu.sim_device import HostMemoryError, Runtime

    with open("/proc/self/status") as f:
        size_kb = int(next(line for line in f if line.startswith("VmSize")).split()[1])
    limit = (size_kb + 16 * 1024) * 1024   # 16 MiB more than this process has now; the weights are 64 MiB
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        Runtime(sys.argv[1])
    except HostMemoryError as err:
        print("HostMemoryError:", err)
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmSize from /proc")
def test_a_host_allocation_failing_under_a_memory_limit_is_a_clear_error(tmp_path):
    from optimum_npu.compile import compile_from_torch

    compiled = compile_from_torch(torch.nn.Linear(2048, 8192), input_info=[("x", (1, 2048), "float32")])
    compiled.save(tmp_path / "big.rbln")
    done = subprocess.run([sys.executable, "-c", LIMITED, str(tmp_path / "big.rbln")], capture_output=True,
                          text=True, timeout=600, env=CHILD_ENV)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("HostMemoryError: the host ran out of memory"), done.stdout
    assert "memory limit" in lines[0]
