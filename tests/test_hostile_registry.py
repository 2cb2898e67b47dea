"""The device registry (sim_device/memory.py) against hostile or unlucky state folders.

Every test here writes into a state folder of its own (the `state` fixture), never the
session's: junk records, records of dead or impostor processes, a stuck lock holder.
"""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from optimum_npu import Runtime, compile_from_torch
from optimum_npu.cli import main
from optimum_npu.sim_device import memory

HAS_PROC = Path(f"/proc/{os.getpid()}/stat").exists()


@pytest.fixture
def state(tmp_path, monkeypatch):
    """A state folder of this test only, and the default machine (one RBLN-CA25 card)."""
    path = tmp_path / "state"
    path.mkdir()
    monkeypatch.setenv("OPTIMUM_NPU_STATE_DIR", str(path))
    monkeypatch.delenv("OPTIMUM_NPU_SYSTEM", raising=False)
    monkeypatch.delenv("OPTIMUM_NPU_LOCK_TIMEOUT", raising=False)
    return path


def write_record(folder: Path, pid: int, nbytes: dict, owner: str = "Runtime(test)", suffix: str = "abcdef01",
                 **extra) -> Path:
    """A record as `memory.allocate` writes it, for any pid (and start time in `extra`)."""
    record_id = f"{pid}-{suffix}"
    path = folder / f"alloc-{record_id}.json"
    path.write_text(json.dumps({"id": record_id, "pid": pid, "owner": owner,
                                "bytes": {str(k): v for k, v in nbytes.items()}, **extra}))
    return path


def exited_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def valid(pid: int = 7, **changes) -> dict:
    record = {"id": f"{pid}-abcdef01", "pid": pid, "owner": "Runtime(x)", "bytes": {"0": 1024}}
    return {**record, **changes}


# Malformed records: file name -> content. Names are as ours (alloc-<pid>-<8 hex>.json) unless
# the case is about the name. Each would crash or mislead a reader that trusts the file.
MALFORMED = {
    "empty object": ("alloc-junk.json", "{}"),
    "list": ("alloc-7-abcdef01.json", "[]"),
    "number": ("alloc-7-abcdef01.json", "3"),
    "empty file": ("alloc-7-abcdef01.json", ""),
    "not JSON": ("alloc-7-abcdef01.json", "{'pid': 7"),
    "not UTF-8": ("alloc-7-abcdef01.json", b"\xff\xfe\x00garbage"),
    "nested too deeply": ("alloc-7-abcdef01.json", "[" * 30_000 + "]" * 30_000),
    "too large": ("alloc-7-abcdef01.json", json.dumps(valid(owner="x" * 100_000))),
    "pid is a string": ("alloc-7-abcdef01.json", json.dumps(valid(pid="x"))),
    "pid is a bool": ("alloc-7-abcdef01.json", json.dumps(valid(pid=True))),
    "pid is negative": ("alloc-7-abcdef01.json", json.dumps(valid(pid=-7))),
    "pid is huge": ("alloc-7-abcdef01.json", json.dumps(valid(pid=10**30))),
    "missing owner": ("alloc-7-abcdef01.json", json.dumps({k: v for k, v in valid().items() if k != "owner"})),
    "unknown key": ("alloc-7-abcdef01.json", json.dumps(valid(command="rm -rf /"))),
    "id of another pid": ("alloc-7-abcdef01.json", json.dumps(valid(id="8-abcdef01"))),
    "id not its file name": ("alloc-7-abcdef02.json", json.dumps(valid())),
    "owner with control characters": ("alloc-7-abcdef01.json", json.dumps(valid(owner="x\n\x1b[2J"))),
    "owner not text": ("alloc-7-abcdef01.json", json.dumps(valid(owner=["x"]))),
    "unknown kind": ("alloc-7-abcdef01.json", json.dumps(valid(kind="everything"))),
    "negative start time": ("alloc-7-abcdef01.json", json.dumps(valid(start_time=-1))),
    "bytes a list": ("alloc-7-abcdef01.json", json.dumps(valid(bytes=[1024]))),
    "bytes empty": ("alloc-7-abcdef01.json", json.dumps(valid(bytes={}))),
    "negative bytes": ("alloc-7-abcdef01.json", json.dumps(valid(bytes={"0": -(2**40)}))),
    "bytes a float": ("alloc-7-abcdef01.json", json.dumps(valid(bytes={"0": 1.5}))),
    "bytes infinite": ("alloc-7-abcdef01.json", '{"id": "7-abcdef01", "pid": 7, "owner": "x", "bytes": {"0": 1e999}}'),
    "bytes huge": ("alloc-7-abcdef01.json", json.dumps(valid(bytes={"0": 10**30}))),
    "bytes of too many digits": ("alloc-7-abcdef01.json",
                                 '{"id": "7-abcdef01", "pid": 7, "owner": "x", "bytes": {"0": ' + "9" * 5000 + "}}"),
    "device index not an int": ("alloc-7-abcdef01.json", json.dumps(valid(bytes={"npu0": 1024}))),
    "device index negative": ("alloc-7-abcdef01.json", json.dumps(valid(bytes={"-1": 1024}))),
    "device index huge": ("alloc-7-abcdef01.json", json.dumps(valid(bytes={"99999999": 1024}))),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_record_is_skipped_and_reported(state, case, capsys):
    name, content = MALFORMED[case]
    (state / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    scan = memory.scan_registry()
    assert [r.path.name for r in scan.malformed] == [name] and scan.live == [] and scan.dead == []
    assert memory.used_bytes(0) == 0  # what it claims is not counted

    # A runtime's allocation goes through, with a warning naming the file.
    with pytest.warns(RuntimeWarning, match=f"ignored 1 malformed .* {name} "):
        allocation = memory.allocate("Runtime(mine)", {0: 4096})
    assert memory.used_bytes(0) == 4096
    assert main(["smi"]) == 0
    out = capsys.readouterr().out
    assert "Runtime(mine)" in out and "Ignored 1 malformed record(s): " + name in out
    memory.release(allocation.id)
    assert (state / name).exists()  # reported, not removed: only `smi --reset` may remove it


def test_records_that_are_not_files_are_skipped(state, capsys):
    (state / "alloc-dir.json").mkdir()
    (state / "alloc-link.json").symlink_to(write_record(state, 7, {0: 1}).rename(state / "elsewhere"))
    os.mkfifo(state / "alloc-fifo.json")  # opening it for reading without O_NONBLOCK would hang
    with pytest.warns(RuntimeWarning, match="ignored 3 malformed"):
        memory.release(memory.allocate("Runtime(mine)", {0: 1}).id)
    assert main(["smi", "--reset"]) == 0
    out = capsys.readouterr().out
    assert "Left 3 malformed record(s)" in out and "a symbolic link" in out and "not a regular file" in out
    assert {p.name for p in state.iterdir()} >= {"alloc-dir.json", "alloc-link.json", "alloc-fifo.json", "elsewhere"}


def test_a_runtime_loads_and_runs_beside_junk_records(state):
    for index, (name, content) in enumerate(MALFORMED.values()):
        path = state / name.replace(".json", f"-{index}.json") if name != "alloc-junk.json" else state / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    module = nn.Linear(32, 16)
    compiled = compile_from_torch(module, example_inputs=[torch.randn(2, 32)], numerics="exact")
    x = torch.randn(2, 32)
    with pytest.warns(RuntimeWarning, match=f"ignored {len(MALFORMED)} malformed .*alloc-junk.json"):
        runtime = Runtime(compiled)
    with runtime:
        torch.testing.assert_close(runtime(x), module(x).detach(), atol=1e-5, rtol=1e-5)
        assert memory.used_bytes(0) == runtime.stats.memory[0].total_bytes
    assert memory.used_bytes(0) == 0
    assert len(memory.scan_registry().malformed) == len(MALFORMED)  # all left in place


def test_records_of_the_previous_format_are_read(state):
    """A record without a start time (written by an earlier version) counts while its pid lives."""
    write_record(state, os.getpid(), {0: 1000, 2: 3000}, kind="weights")
    assert memory.used_bytes(0) == 1000 and memory.used_bytes(2) == 3000
    [allocation] = memory.allocations()
    assert allocation.kind == "weights" and allocation.start_time is None


@pytest.mark.skipif(not HAS_PROC, reason="process start times come from /proc")
def test_a_live_pid_with_another_start_time_is_dead(state):
    """The pid was reused: the record's process has exited and a later one got its number."""
    mine = memory.process_start_time(os.getpid())
    assert mine is not None and memory.process_start_time(os.getpid()) == mine
    honest = write_record(state, os.getpid(), {0: 1000}, start_time=mine, suffix="aaaaaaaa")
    impostor = write_record(state, os.getpid(), {0: 5 * 1024**3}, start_time=mine + 1, suffix="bbbbbbbb",
                            owner="Runtime(reused pid)")
    scan = memory.scan_registry()
    assert [a.id for a in scan.live] == [f"{os.getpid()}-aaaaaaaa"]
    assert [(d.path, d.why) for d in scan.dead] == [(impostor, "pid reused")]
    assert memory.used_bytes(0) == 1000
    # ...so its 5 GiB do not block the device, and the next allocation removes the dead record.
    memory.release(memory.allocate("Runtime(big)", {0: 15 * 1024**3}).id)
    assert not impostor.exists() and honest.exists()


@pytest.mark.skipif(not HAS_PROC, reason="process start times come from /proc")
def test_allocate_records_the_start_time(state):
    allocation = memory.allocate("Runtime(mine)", {1: 10})
    record = json.loads((state / f"alloc-{allocation.id}.json").read_text())
    assert record["pid"] == os.getpid() and record["start_time"] == memory.process_start_time(os.getpid())
    assert memory.parse_record(state / f"alloc-{allocation.id}.json") == allocation
    memory.release(allocation.id)


def test_owner_names_are_made_printable(state):
    """A runtime's name is a file name, which may hold any character: its record stays valid."""
    allocation = memory.allocate("Runtime(a\nb.rbln)", {0: 10})
    assert memory.allocations() == [allocation] and allocation.owner == "Runtime(a?b.rbln)"
    memory.release(allocation.id)


def test_smi_reset_frees_dead_records_and_keeps_live_ones(state, capsys):
    live = memory.allocate("Runtime(live.rbln)", {0: 1000})
    dead_pid = exited_pid()
    dead = write_record(state, dead_pid, {1: 3 * 1024**3}, owner="Runtime(crashed.rbln)", kind="weights")
    ours_malformed = state / "alloc-7-deadbeef.json"
    ours_malformed.write_text("{}")
    foreign = {"alloc-junk.json": "{}", "notes.txt": "mine", "alloc-notes.txt": "mine", "lock": "mine"}
    for name, text in foreign.items():
        (state / name).write_text(text)
    half_written = state / f"alloc-{dead_pid}-abcdef02.tmp"
    half_written.write_text('{"id": ')
    removable = [dead, ours_malformed, half_written]
    if HAS_PROC:
        removable.append(write_record(state, os.getpid(), {2: 2048}, owner="Runtime(impostor)", suffix="cccccccc",
                                      start_time=memory.process_start_time(os.getpid()) + 1))

    before = sorted(state.iterdir())
    assert main(["smi", "--reset", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing removed" in out and "Would free" in out and "Runtime(crashed.rbln)" in out
    assert sorted(state.iterdir()) == before

    assert main(["smi", "--reset", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    freed = {(p["device"], p["owner"], p["bytes"], p["pid"], p["why"]) for p in report["freed"]}
    expected = {(1, "Runtime(crashed.rbln)", 3 * 1024**3, dead_pid, "exited")}
    if HAS_PROC:
        expected.add((2, "Runtime(impostor)", 2048, os.getpid(), "pid reused"))
    assert freed == expected
    assert [r["file"] for r in report["malformed_removed"]] == ["alloc-7-deadbeef.json"]
    assert [r["file"] for r in report["malformed_left"]] == ["alloc-junk.json"]
    assert report["half_written_removed"] == [half_written.name] and report["live_kept"] == 1

    assert not any(path.exists() for path in removable)
    assert (state / f"alloc-{live.id}.json").exists()
    assert {name: (state / name).read_text() for name in foreign} == foreign  # not ours: untouched
    assert memory.allocations() == [live]

    assert main(["smi", "--reset"]) == 0  # nothing left to free, and it says so
    out = capsys.readouterr().out
    assert "Nothing to free" in out and "Kept 1 allocation(s) of live processes" in out
    memory.release(live.id)


def test_smi_reset_prints_what_it_freed(state, capsys):
    write_record(state, exited_pid(), {3: 5 * 1024**3}, owner="Runtime(crashed.rbln)")
    assert main(["smi"]) == 0
    assert "1 record(s) of exited processes hold nothing" in capsys.readouterr().out
    assert main(["smi", "--reset"]) == 0
    out = capsys.readouterr().out
    [row] = [line for line in out.splitlines() if "Runtime(crashed.rbln)" in line]
    assert row.split("|")[1].strip() == "3" and "5.00 GiB" in row and "(exited)" in row
    assert "Freed the memory of processes that are gone" in out


def test_smi_dry_run_needs_reset(state, capsys):
    assert main(["smi", "--dry-run"]) == 2
    assert "--dry-run goes with --reset" in capsys.readouterr().err


def test_release_touches_only_records(state):
    (state / "precious.json").write_text("mine")
    memory.release("../precious")
    memory.release("x/../../precious")
    assert (state / "precious.json").read_text() == "mine"


# ---- the lock ----------------------------------------------------------------------------

HOLD_THE_LOCK = textwrap.dedent(
    """
    import sys
    from optimum_npu.sim_device import memory
    with memory._machine_lock("compiling something very slowly"):
        print("locked", flush=True)
        sys.stdin.readline()
    """
)


def hold_the_lock() -> subprocess.Popen:
    """Another process, holding the registry lock until it reads a line (or is killed)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.fixture
def lock_holder(state):
    holder = hold_the_lock()
    try:
        yield holder
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=60)


def test_the_lock_times_out_naming_its_holder(lock_holder, monkeypatch, capsys):
    monkeypatch.setenv("OPTIMUM_NPU_LOCK_TIMEOUT", "0.3")
    with pytest.raises(memory.RegistryLockTimeout) as error:
        memory.allocate("Runtime(waiting)", {0: 1})
    message = str(error.value)
    assert f"held by pid {lock_holder.pid} (compiling something very slowly)" in message
    assert "OPTIMUM_NPU_LOCK_TIMEOUT" in message and "Waited 0.3 s" in message
    compiled = compile_from_torch(nn.Linear(8, 8), example_inputs=[torch.randn(1, 8)])
    with pytest.raises(TimeoutError, match=f"held by pid {lock_holder.pid}"):
        Runtime(compiled)
    assert memory.allocations() == []
    # The CLI says the same in one line.
    assert main(["smi", "--reset"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"held by pid {lock_holder.pid}" in err and "Traceback" not in err


def test_the_lock_is_free_again_once_released(state, monkeypatch):
    monkeypatch.setenv("OPTIMUM_NPU_LOCK_TIMEOUT", "0")
    with memory._machine_lock("first"):
        pass
    memory.release(memory.allocate("Runtime(after)", {0: 1}).id)  # a zero timeout still gets a free lock


def test_a_killed_holder_does_not_block(state, monkeypatch):
    """The kernel drops the lock of a process that dies holding it."""
    monkeypatch.setenv("OPTIMUM_NPU_LOCK_TIMEOUT", "5")
    holder = hold_the_lock()
    holder.kill()
    holder.wait(timeout=60)
    memory.release(memory.allocate("Runtime(after)", {0: 1}).id)


@pytest.mark.parametrize("value", ["soon", "-1", "nan", "1e"])
def test_a_bad_lock_timeout_is_refused(state, monkeypatch, value):
    monkeypatch.setenv("OPTIMUM_NPU_LOCK_TIMEOUT", value)
    with pytest.raises(ValueError, match=f"OPTIMUM_NPU_LOCK_TIMEOUT='{value}': must be a number of seconds"):
        memory.allocate("Runtime(x)", {0: 1})
    assert memory.allocations() == []


def test_the_state_folder_must_be_a_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("mine")
    monkeypatch.setenv("OPTIMUM_NPU_STATE_DIR", str(tmp_path / "file"))
    assert main(["smi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot use" in err and "OPTIMUM_NPU_STATE_DIR" in err
    assert (tmp_path / "file").read_text() == "mine"


def test_no_warning_without_malformed_records(state):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        memory.release(memory.allocate("Runtime(x)", {0: 1}).id)


@pytest.mark.parametrize("system,match", [
    ("RBLN-CA25x99999999", "more than 99999 card"),         # hung building 400M devices
    ("RBLN-CA25x" + "9" * 900, "more than 99999 card"),
    ("RBLN-CA25x" + "9" * 5000, "characters long"),          # past int()'s digit limit
    ("RBLN-CA25x0", "has 0 card"),                          # an empty machine
    ("RBLN-CA25x1024,RBLN-CA25", "1 to 4096 devices"),      # the registry numbers at most 4096 devices
    ("RBLN-CA25," * 200, "characters long"),
    ("RBLN-CA25,", "NAME or NAMExCOUNT"),
])
def test_absurd_machine_descriptions_are_one_line_errors(state, capsys, monkeypatch, system, match):
    """OPTIMUM_NPU_SYSTEM is bounded and checked: a one-line error naming it, never a hang or an empty machine."""
    monkeypatch.setenv("OPTIMUM_NPU_SYSTEM", system)
    with pytest.raises(ValueError, match=match) as info:
        memory.devices()
    assert "OPTIMUM_NPU_SYSTEM" in str(info.value)
    assert main(["smi"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_the_largest_machine_the_registry_numbers_is_accepted(state, monkeypatch):
    monkeypatch.setenv("OPTIMUM_NPU_SYSTEM", "RBLN-CA25x1024")
    assert len(memory.devices()) == memory.MAX_DEVICES == memory.MAX_DEVICE_INDEX + 1


@pytest.mark.skipif(not HAS_PROC, reason="process states come from /proc")
def test_smi_reset_frees_a_killed_unreaped_holder_and_a_pid_1_record_without_start_time(state, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        zombie = write_record(state, holder.pid, {0: 1000}, owner="Runtime(killed)", suffix="aaaaaaaa",
                              start_time=memory.process_start_time(holder.pid))
        init = write_record(state, 1, {1: 2000}, owner="Runtime(init)", suffix="bbbbbbbb")
        holder.kill()
        os.waitid(os.P_PID, holder.pid, os.WEXITED | os.WNOWAIT)   # it has exited, and is not reaped (a zombie)
        assert Path(f"/proc/{holder.pid}").exists()
        assert main(["smi", "--reset", "--json"]) == 0
        freed = {(p["owner"], p["why"]) for p in json.loads(capsys.readouterr().out)["freed"]}
        expected = {("Runtime(killed)", "exited")}
        if os.getpid() != 1:   # pid 1 is only ours when this very process is pid 1
            expected.add(("Runtime(init)", "pid 1 without start time"))
        assert freed == expected
        assert not zombie.exists() and init.exists() == (os.getpid() == 1)
    finally:
        holder.kill()
        holder.wait()
