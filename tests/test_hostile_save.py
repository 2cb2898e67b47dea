"""Saving and loading compiled folders as a hostile or unlucky user would (issue 6, sections 2 and 6).

`save_pretrained` writes only the files of the compiled model and never deletes anything it did
not write; a load never runs a half-written, mixed or edited folder; names and values read from
rbln_config.json cannot reach outside the folder or contradict the `.rbln` programs; a checkpoint
of another family and a device the machine lacks are refused before anything is compiled.

The models are the tiny random Llamas of llm_fixtures.py, compiled without runtimes (no device
memory needed) unless a test runs one.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)
from folder_edits import edit_rbln_config, refresh_manifest
from llm_fixtures import make_hf_model, save_source
from optimum_npu import RBLNDecoderOnlyModelForCausalLM, RBLNLlamaForCausalLM, RBLNQwen2ForCausalLM
from optimum_npu.configuration import CONFIG_NAME
from optimum_npu.modeling import base
from optimum_npu.modeling.folder import STAGING_MARK
from optimum_npu.sim_device import Artifact

OPTIONS = dict(rbln_max_seq_len=128, rbln_create_runtimes=False)
OTHER_OPTIONS = dict(rbln_max_seq_len=64, rbln_prefill_chunk_size=64, rbln_create_runtimes=False)  # other graph shapes than OPTIONS


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Llama checkpoint folder with a tokenizer."""
    return save_source(tmp_path_factory.mktemp("src") / "tiny-llama", "llama", tokenizer=True)[0]


@pytest.fixture(scope="module")
def model(source):
    return RBLNLlamaForCausalLM.from_pretrained(source, export=True, **OPTIONS)


@pytest.fixture(scope="module")
def other_model(source):
    """Another compiled model of the same checkpoint whose graphs differ from `model`'s."""
    return RBLNLlamaForCausalLM.from_pretrained(source, export=True, **OTHER_OPTIONS)


@pytest.fixture
def saved(model, tmp_path):
    """A fresh copy of `model` saved under tmp_path, for tests that damage it."""
    return Path(model.save_pretrained(tmp_path / "compiled"))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder`, hidden ones included, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_entries(*folders: Path) -> list[str]:
    return [f"{folder}/{name}" for folder in folders for name in os.listdir(folder) if name.startswith(".")]


def load(folder, **kwargs):
    return RBLNLlamaForCausalLM.from_pretrained(folder, rbln_create_runtimes=False, **kwargs)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --------------------------------------------------------------------------- what a save may touch


def test_saving_into_a_compiled_folder_keeps_foreign_files(model, saved):
    (saved / "README.md").write_text("my notes")
    (saved / "extra").mkdir()
    (saved / "extra" / "data.bin").write_bytes(b"\x00\x01")
    model.save_pretrained(saved)
    assert (saved / "README.md").read_text() == "my notes"
    assert (saved / "extra" / "data.bin").read_bytes() == b"\x00\x01"
    assert load(saved).rbln_config == model.rbln_config


def test_a_foreign_folder_is_refused_unless_asked_and_its_files_are_kept(model, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="not a compiled model folder.*exist_ok=True"):
        model.save_pretrained(target)
    assert snapshot(tmp_path) == before and hidden_entries(tmp_path, target) == []

    model.save_pretrained(target, exist_ok=True)
    assert (target / "notes.txt").read_text() == "keep me"
    assert load(target).rbln_config == model.rbln_config


def test_an_empty_existing_folder_is_fine(model, tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    model.save_pretrained(target)
    assert load(target).rbln_config == model.rbln_config
    assert hidden_entries(tmp_path, target) == []


def test_saving_into_the_source_checkpoint_keeps_its_weights(tmp_path):
    checkpoint, _ = save_source(tmp_path / "ckpt", "llama", tokenizer=True)
    compiled = RBLNLlamaForCausalLM.from_pretrained(checkpoint, export=True, **OPTIONS)
    before = snapshot(checkpoint)
    with pytest.raises(ValueError, match="model.safetensors.*exist_ok=True"):
        compiled.save_pretrained(checkpoint)
    assert snapshot(checkpoint) == before, "a refused save changes nothing"
    assert hidden_entries(tmp_path, checkpoint) == []

    compiled.save_pretrained(checkpoint, exist_ok=True)
    assert (checkpoint / "model.safetensors").read_bytes() == before["model.safetensors"]
    assert load(checkpoint).rbln_config == compiled.rbln_config
    # The folder is still a checkpoint too: exporting from it again gives the same graphs.
    again = RBLNLlamaForCausalLM.from_pretrained(checkpoint, export=True, **OPTIONS)
    assert again.graphs["prefill"].program == compiled.graphs["prefill"].program


def test_saving_onto_a_file_is_refused_and_the_file_is_untouched(model, tmp_path):
    target = tmp_path / "model"
    target.write_bytes(b"precious")
    with pytest.raises(ValueError, match="is a file"):
        model.save_pretrained(target)
    assert target.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["model"]


def test_saves_leave_no_hidden_files(model, other_model, tmp_path):
    target = Path(model.save_pretrained(tmp_path / "compiled"))
    other_model.save_pretrained(target)  # over an existing compiled folder
    model.save_pretrained(target)
    assert hidden_entries(tmp_path, target) == []
    assert os.listdir(tmp_path) == ["compiled"]


def test_files_of_the_previous_save_that_are_no_longer_written_are_removed_and_only_those(model, tmp_path):
    wide = RBLNLlamaForCausalLM.from_pretrained(
        save_source(tmp_path / "src", "llama")[0], export=True, rbln_batch_size=2, rbln_decoder_batch_sizes=[2, 1],
        **OPTIONS)
    target = Path(wide.save_pretrained(tmp_path / "compiled"))
    assert (target / "decoder_batch_2.rbln").is_file()
    (target / "decoder_batch_7.rbln").write_bytes(b"not written by a save")
    model.save_pretrained(target)  # decoder_batch_1 only
    assert not (target / "decoder_batch_2.rbln").exists(), "a file of the previous save, no longer written"
    assert (target / "decoder_batch_7.rbln").read_bytes() == b"not written by a save"
    assert load(target).rbln_config == model.rbln_config


def test_saving_over_a_folder_without_a_manifest_or_with_a_damaged_one(model, saved):
    edit_rbln_config(saved, lambda data: data.pop("files"))  # as saved by an older optimum-npu
    model.save_pretrained(saved)
    assert load(saved).rbln_config == model.rbln_config
    (saved / CONFIG_NAME).write_text("{ not json")
    model.save_pretrained(saved)
    assert load(saved).rbln_config == model.rbln_config


def test_saved_files_get_the_usual_permissions(model, tmp_path):
    old = os.umask(0o027)
    try:
        target = Path(model.save_pretrained(tmp_path / "compiled"))
        model.save_pretrained(target)  # the in-place path too
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o750
    modes = {p.name: p.stat().st_mode & 0o777 for p in target.iterdir()}
    assert modes and set(modes.values()) == {0o640}, modes


# --------------------------------------------------------------------------- interrupted saves


def fail_when_moving(monkeypatch, target: Path, name: str) -> None:
    """Make the rename of `name` into `target` raise, as a crash at that moment would stop it."""
    real_replace = os.replace

    def replace(src, dst, **kwargs):
        if Path(dst) == target / name:
            raise OSError(f"crash (simulated) while moving {name}")
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_a_crash_while_writing_keeps_the_previous_model_loadable(model, other_model, saved, monkeypatch):
    before = snapshot(saved)
    real_save = Artifact.save
    calls = []

    def crashing_save(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("crash (simulated) in the second graph")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Artifact, "save", crashing_save)
    with pytest.raises(OSError, match="crash"):
        other_model.save_pretrained(saved)
    assert snapshot(saved) == before
    assert load(saved).rbln_config == model.rbln_config


def test_a_crash_while_moving_files_leaves_no_loadable_mix(model, other_model, saved, monkeypatch):
    fail_when_moving(monkeypatch, saved, "prefill.rbln")  # after the decode graph was replaced
    with pytest.raises(OSError, match="crash"):
        other_model.save_pretrained(saved)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="incomplete or mixed save.*decoder_batch_1.rbln.*Save the model again"):
        load(saved)
    other_model.save_pretrained(saved)
    assert load(saved).rbln_config == other_model.rbln_config
    assert hidden_entries(saved.parent, saved) == []


def test_a_new_folder_appears_whole_or_not_at_all(model, tmp_path, monkeypatch):
    fail_when_moving(monkeypatch, tmp_path, "compiled")
    with pytest.raises(OSError, match="crash"):
        model.save_pretrained(tmp_path / "compiled")
    assert os.listdir(tmp_path) == []


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from optimum_npu import RBLNLlamaForCausalLM
    from optimum_npu.sim_device import Artifact

    source, target, when = sys.argv[1:]
    model = RBLNLlamaForCausalLM.from_pretrained(source, rbln_create_runtimes=False)

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if when == "writing":
        Artifact.save = die
    else:  # moving: killed between the renames into the existing folder
        real_replace = os.replace
        os.replace = lambda src, dst: die() if Path(dst) == Path(target) / "prefill.rbln" else real_replace(src, dst)
    model.save_pretrained(target)
""")


@pytest.mark.parametrize("when", ["writing", "moving"])
def test_sigkill_mid_save(model, other_model, saved, tmp_path, when):
    other = Path(other_model.save_pretrained(tmp_path / "other"))
    before = snapshot(saved)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(other), str(saved), when], env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    leftovers = hidden_entries(saved)
    assert len(leftovers) == 1 and f".{saved.name}.tmp-" in leftovers[0], "the killed save's staging folder"
    if when == "writing":
        assert load(saved).rbln_config == model.rbln_config  # the previous model, untouched
        assert {k: v for k, v in snapshot(saved).items() if not k.startswith(".")} == before
    else:
        with pytest.raises(ValueError, match="incomplete or mixed save"):
            load(saved)
    # The next save finishes the job and removes the dead process's staging folder.
    other_model.save_pretrained(saved)
    assert load(saved).rbln_config == other_model.rbln_config
    assert hidden_entries(saved.parent, saved) == []


def test_stale_staging_cleanup_removes_only_ours(model, tmp_path):
    target = Path(model.save_pretrained(tmp_path / "compiled"))
    gone = dead_pid()
    ours_dead = [tmp_path / f".compiled.tmp-{gone}-0123abcd", target / f".compiled.tmp-{gone}-89abcdef"]
    kept = [
        tmp_path / f".compiled.tmp-{os.getppid()}-0123abcd",  # a live process (maybe saving right now)
        tmp_path / f".other.tmp-{gone}-0123abcd",             # a save into another folder
        tmp_path / ".compiled.tmp-backup",                     # not our pattern
        target / f".compiled.tmp-{gone}-0123abcdX",            # not exactly our pattern
    ]
    kept.append(tmp_path / f".compiled.tmp-{gone}-fedcba98")  # our pattern, but not marked as ours
    for folder in ours_dead + kept:
        folder.mkdir()
        (folder / "prefill.rbln").write_bytes(b"partial")
    for folder in ours_dead:
        (folder / STAGING_MARK).touch()   # what a save of ours puts in each staging folder it creates
    kept_file = tmp_path / f".compiled.tmp-{gone}-76543210"  # a file, not one of our folders
    kept_file.write_bytes(b"x")
    model.save_pretrained(target)
    assert not any(f.exists() for f in ours_dead)
    assert all((f / "prefill.rbln").read_bytes() == b"partial" for f in kept) and kept_file.read_bytes() == b"x"


# --------------------------------------------------------------------------- loading what is not a model


def test_messages_for_folders_that_are_not_compiled_models(source, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="not a compiled model folder.*export=True"):
        load(empty)
    with pytest.raises(ValueError, match="Hugging Face checkpoint, not a compiled model.*export=True"):
        load(source)
    with pytest.raises(ValueError, match="no such folder, and not a Hugging Face Hub model id"):
        load(tmp_path / "does" / "not" / "exist")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a model folder"):
        load(tmp_path / "a-file")


def test_a_missing_folder_that_looks_like_a_hub_id_says_there_is_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception) as info:
        load("org/not-saved-here")
    assert "There is no local folder 'org/not-saved-here'" in "\n".join(getattr(info.value, "__notes__", []))


def test_a_folder_without_a_manifest_or_with_a_changed_file_is_refused(saved):
    (saved / "decoder_batch_1.rbln").write_bytes((saved / "decoder_batch_1.rbln").read_bytes()[:-1])
    with pytest.raises(ValueError, match="decoder_batch_1.rbln has .* bytes"):
        load(saved)
    edit_rbln_config(saved, lambda data: data.pop("files"))
    with pytest.raises(ValueError, match="no file list"):
        load(saved)


@pytest.mark.parametrize("bad_name", ["../x", "/etc/passwd", "a/b", "..", ".hidden", ""])
def test_graph_and_file_names_outside_the_folder_are_refused_at_load(saved, bad_name):
    def rename_graph(data):
        data["graphs"][bad_name] = data["graphs"].pop("prefill")

    edit_rbln_config(saved, rename_graph)
    with pytest.raises(ValueError, match="plain name"):
        load(saved)
    edit_rbln_config(saved, lambda data: data["graphs"].__setitem__("prefill", data["graphs"].pop(bad_name)))
    load(saved)  # the edit undone: loads again

    edit_rbln_config(saved, lambda data: data["files"].__setitem__(bad_name, {"bytes": 1, "sha256": "0" * 64}))
    with pytest.raises(ValueError, match="plain name"):
        load(saved)


@pytest.mark.parametrize("bad_name", ["../evil", "/tmp/evil", "a/evil"])
def test_graph_names_outside_the_folder_are_refused_at_save(model, tmp_path, bad_name):
    loaded = load(Path(model.save_pretrained(tmp_path / "compiled")))
    before, absolute_existed = snapshot(tmp_path), Path("/tmp/evil.rbln").exists()
    loaded.graphs = {**loaded.graphs, bad_name: loaded.graphs["prefill"]}
    for target in (tmp_path / "new", tmp_path / "compiled"):
        with pytest.raises(ValueError, match="plain name"):
            loaded.save_pretrained(target)
    assert snapshot(tmp_path) == before and Path("/tmp/evil.rbln").exists() == absolute_existed


@pytest.mark.parametrize("content, error", [
    ("[]", "expected a JSON object"),
    ("{" * 100_000, "not valid JSON"),
    ('{"config_cls": "RBLNLlamaForCausalLMConfig", "compile_options": [], "runtime_options": {}}',
     "'compile_options' must be dict"),
    ('{"config_cls": 3, "compile_options": {}, "runtime_options": {}}', "'config_cls' must be str"),
])
def test_malformed_rbln_config_json_is_a_value_error(saved, content, error):
    (saved / CONFIG_NAME).write_text(content)
    with pytest.raises(ValueError, match=error):
        load(saved)


def test_wrong_types_inside_rbln_config_json(saved):
    edit_rbln_config(saved, lambda data: data.__setitem__("surprise", 1))
    with pytest.raises(ValueError, match="unknown keys.*surprise"):
        load(saved)
    edit_rbln_config(saved, lambda data: data.pop("surprise"))
    edit_rbln_config(saved, lambda data: data["graphs"]["prefill"][0].__setitem__(1, ["1", 64]))
    with pytest.raises(TypeError, match="shape must be a list of ints"):
        load(saved)
    edit_rbln_config(saved, lambda data: data["graphs"]["prefill"][0].__setitem__(1, [1, 64]))
    edit_rbln_config(saved, lambda data: data["files"]["prefill.rbln"].__setitem__("bytes", "12"))
    with pytest.raises(ValueError, match=r"files\['prefill.rbln'\] must be"):
        load(saved)


@pytest.mark.parametrize("edit, contradiction", [
    (lambda data: data["graphs"]["prefill"][0][1].__setitem__(1, 32), "inputs"),
    (lambda data: data["graphs"]["decoder_batch_1"][1].__setitem__(2, "int64"), "inputs"),
    (lambda data: data["compile_options"].__setitem__("npu", "RBLN-CR03"), "npu"),
    (lambda data: data["compile_options"].__setitem__("dtype", "float16"), "dtype"),
    (lambda data: data["compile_options"].__setitem__("numerics", "exact"), "numerics"),
])
def test_rbln_config_contradicting_the_programs_is_refused_at_load(saved, edit, contradiction):
    edit_rbln_config(saved, edit)
    with pytest.raises(ValueError, match=f"contradicts .*rbln: {contradiction} is"):
        load(saved)


# --------------------------------------------------------------------------- another family, another device


def refuse_compiling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("compile_from_torch must not be called")

    monkeypatch.setattr(base, "compile_from_torch", refuse)


def test_a_checkpoint_of_another_family_is_refused_at_export(tmp_path, monkeypatch):
    refuse_compiling(monkeypatch)
    qwen2, qwen2_model = save_source(tmp_path / "qwen2", "qwen2")
    with pytest.raises(ValueError, match="RBLNLlamaForCausalLM compiles model_type llama.*'qwen2'.*RBLNQwen2ForCausalLM"):
        RBLNLlamaForCausalLM.from_pretrained(qwen2, export=True, **OPTIONS)
    with pytest.raises(ValueError, match="model_type 'qwen2'.*RBLNQwen2ForCausalLM"):
        RBLNLlamaForCausalLM.from_model(qwen2_model, **OPTIONS)
    with pytest.raises(ValueError, match="model_type 'llama'.*RBLNLlamaForCausalLM"):
        RBLNQwen2ForCausalLM.from_model(make_hf_model("llama"), **OPTIONS)

    from transformers import BertConfig, FalconConfig, GPT2Config

    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    with pytest.raises(ValueError, match="model_type 'bert': use RBLNBertModel"):
        RBLNLlamaForCausalLM.from_pretrained(bert, export=True, **OPTIONS)
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(gpt2)
    with pytest.raises(ValueError, match="model_type 'gpt2': use RBLNGPT2LMHeadModel"):
        RBLNLlamaForCausalLM.from_pretrained(gpt2, export=True, **OPTIONS)
    falcon = tmp_path / "falcon"
    FalconConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=64).save_pretrained(falcon)
    with pytest.raises(ValueError, match="model_type 'falcon': no RBLN class supports it"):
        RBLNLlamaForCausalLM.from_pretrained(falcon, export=True, **OPTIONS)


def test_a_generic_class_compiles_its_subclasses_families_and_no_other(monkeypatch):
    refuse_compiling(monkeypatch)
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match="RBLNDecoderOnlyModelForCausalLM compiles model_type .*llama.*'bert'"):
        RBLNDecoderOnlyModelForCausalLM.from_model(bert, **OPTIONS)
    with pytest.raises(AssertionError, match="compile_from_torch must not be called"):  # got past the checks
        RBLNDecoderOnlyModelForCausalLM.from_model(make_hf_model("qwen2"), **OPTIONS)


def test_a_config_json_of_another_architecture_is_refused_at_load(saved, tmp_path):
    save_source(tmp_path / "qwen2", "qwen2")
    (saved / "config.json").write_bytes((tmp_path / "qwen2" / "config.json").read_bytes())
    refresh_manifest(saved)
    with pytest.raises(ValueError, match="model_type 'qwen2'"):
        load(saved)


def test_an_absent_device_is_refused_before_compiling(source, monkeypatch):
    refuse_compiling(monkeypatch)
    with pytest.raises(ValueError, match="rbln_device=99 does not exist: this machine has devices 0..3"):
        RBLNLlamaForCausalLM.from_pretrained(source, export=True, rbln_max_seq_len=128, rbln_device=99)
    with pytest.raises(ValueError, match="rbln_device must list 1 distinct device id"):
        RBLNLlamaForCausalLM.from_pretrained(source, export=True, rbln_max_seq_len=128, rbln_device=[0, 1])
    monkeypatch.setenv("OPTIMUM_NPU_SYSTEM", "RBLN-CA25,RBLN-CR03")
    with pytest.raises(ValueError, match="rbln_device=4 is a RBLN-CR03.*rbln_npu='RBLN-CA25'"):
        RBLNLlamaForCausalLM.from_model(make_hf_model("llama"), rbln_max_seq_len=128, rbln_device=4)


def test_an_absent_device_is_refused_before_loading_the_graphs(saved, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Artifact.load must not be called")

    monkeypatch.setattr(Artifact, "load", refuse)
    with pytest.raises(ValueError, match="rbln_device=99 does not exist"):
        RBLNLlamaForCausalLM.from_pretrained(saved, rbln_device=99)
