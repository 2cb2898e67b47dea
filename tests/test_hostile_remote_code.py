"""Loading a folder never runs its code (issue 17, section 1).

A folder whose config files name code (`auto_map`), or a model_type transformers does not know,
is refused with an error saying so: no "run the custom code? [y/N]" prompt, whatever stdin is,
and the folder's Python file is never imported. Each hostile folder ships an `evil_*.py` that
writes a marker file if imported; the tests check the marker and `sys.modules`.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)
from folder_edits import refresh_manifest
from llm_fixtures import save_source
from optimum_npu import RBLNAutoModelForCausalLM, RBLNLlamaForCausalLM
from optimum_npu.cli import main
from optimum_npu.modeling.hf_files import RemoteCodeError

OPTIONS = dict(rbln_max_seq_len=128, rbln_create_runtimes=False)


def plant_code(folder: Path, module: str, marker: Path) -> None:
    """An importable module in `folder` that leaves `marker` behind when imported."""
    (folder / f"{module}.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("imported")
        from transformers import PretrainedConfig, PreTrainedTokenizerFast
        class Evil(PretrainedConfig):
            model_type = "evilcfg"
        class EvilTokenizer(PreTrainedTokenizerFast):
            pass
    """))


def name_code(path: Path, module: str, auto: str = "AutoConfig", **extra) -> None:
    """Add an auto_map entry naming `module` (and `extra` keys) to the JSON file `path`."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update({"auto_map": {auto: f"{module}.Evil"}, **extra})
    path.write_text(json.dumps(data))


def assert_not_run(marker: Path, module: str) -> None:
    assert not marker.exists(), f"{module}.py was imported"
    assert module not in sys.modules


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_source(tmp_path_factory.mktemp("src") / "tiny-llama", "llama", tokenizer=True)[0]


@pytest.fixture(scope="module")
def compiled(source, tmp_path_factory):
    model = RBLNLlamaForCausalLM.from_pretrained(source, export=True, **OPTIONS)
    return Path(model.save_pretrained(tmp_path_factory.mktemp("compiled") / "model"))


@pytest.fixture
def evil_compiled(compiled, tmp_path):
    """A compiled folder whose config.json names remote code (the manifest made to agree)."""
    import shutil

    folder = tmp_path / "evil"
    shutil.copytree(compiled, folder)
    marker = tmp_path / "MARKER"
    plant_code(folder, "evil_cfg", marker)
    (folder / "config.json").write_text(json.dumps({"model_type": "evilcfg", "auto_map": {"AutoConfig": "evil_cfg.Evil"}}))
    refresh_manifest(folder)
    return folder, marker


LOAD = textwrap.dedent("""
    import json, sys
    from optimum_npu import RBLNAutoModelForCausalLM, RBLNLlamaForCausalLM
    found = []
    for cls in (RBLNLlamaForCausalLM, RBLNAutoModelForCausalLM):
        try:
            cls.from_pretrained(sys.argv[1], rbln_create_runtimes=False)
            found.append("loaded")
        except Exception as err:
            found.append(f"{type(err).__name__}: {err}")
    print(json.dumps({"errors": found, "imported": [m for m in sys.modules if "evil" in m]}))
""")


@pytest.mark.parametrize("stdin", ["answers y", "/dev/null", "closed"])
def test_a_compiled_folder_naming_remote_code_is_refused_without_a_prompt(evil_compiled, stdin):
    folder, marker = evil_compiled
    options = {"input": "y\ny\n"} if stdin == "answers y" else {"stdin": subprocess.DEVNULL}
    if stdin == "closed":
        options["preexec_fn"] = lambda: os.close(0)
    done = subprocess.run([sys.executable, "-c", LOAD, str(folder)], capture_output=True, text=True, timeout=300,
                          cwd=folder, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, **options)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for error in result["errors"]:
        assert error.startswith("RemoteCodeError") and "names remote code" in error, error
    assert result["imported"] == []
    assert "custom code" not in done.stdout + done.stderr   # transformers' prompt never shown
    assert not marker.exists()


def test_a_checkpoint_naming_remote_code_is_refused_at_export(source, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(source, folder)
    marker = tmp_path / "MARKER"
    plant_code(folder, "evil_ckpt", marker)
    name_code(folder / "config.json", "evil_ckpt")   # model_type stays "llama": transformers would use its own
    for load in (lambda: RBLNLlamaForCausalLM.from_pretrained(folder, export=True, **OPTIONS),
                 lambda: RBLNAutoModelForCausalLM.from_pretrained(folder, export=True, **OPTIONS)):
        with pytest.raises(RemoteCodeError, match="names remote code"):
            load()
    assert_not_run(marker, "evil_ckpt")


def test_a_model_type_transformers_does_not_know_is_refused(evil_compiled):
    folder, marker = evil_compiled
    (folder / "config.json").write_text(json.dumps({"model_type": "evilcfg"}))
    refresh_manifest(folder)
    with pytest.raises(RemoteCodeError, match="model_type 'evilcfg', which transformers does not know"):
        RBLNLlamaForCausalLM.from_pretrained(folder, rbln_create_runtimes=False)
    assert_not_run(marker, "evil_cfg")


def test_plan_refuses_a_config_json_naming_remote_code(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    plant_code(tmp_path, "evil_plan", marker)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoConfig": "evil_plan.Evil"}}))
    assert main(["plan", str(config), "--input-len", "64", "--output-len", "64"]) == 2
    error = capsys.readouterr().err
    assert "names remote code" in error and len(error.strip().splitlines()) == 1
    assert_not_run(marker, "evil_plan")


@pytest.fixture(scope="module")
def sd_source(tmp_path_factory):
    from optimum_npu.testing.diffusers import build_tiny_stable_diffusion

    return Path(build_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "sd"))


@pytest.fixture
def sd_copy(sd_source, tmp_path):
    import shutil

    folder = tmp_path / "sd"
    shutil.copytree(sd_source, folder)
    return folder


def edit_index(folder: Path, **components) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    index.update(components)
    (folder / "model_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("entry", [["transformers", "AutoTokenizer"], ["transformers", "AutoModel"],
                                   ["diffusers", "AutoModel"], ["transformers", "AutoProcessor"]])
def test_a_pipeline_naming_an_auto_class_is_refused(sd_copy, tmp_path, entry):
    from optimum_npu.diffusers import RBLNStableDiffusionPipeline

    marker = tmp_path / "MARKER"
    plant_code(sd_copy / "tokenizer", "evil_tok", marker)
    name_code(sd_copy / "tokenizer" / "tokenizer_config.json", "evil_tok", auto="AutoTokenizer")
    edit_index(sd_copy, tokenizer=entry)
    with pytest.raises(ValueError, match=f"{entry[1]} is an Auto class"):
        RBLNStableDiffusionPipeline.from_pretrained(sd_copy, export=True, rbln_create_runtimes=False)
    assert_not_run(marker, "evil_tok")


def test_a_pipeline_component_naming_remote_code_is_refused(sd_copy, tmp_path):
    from optimum_npu.diffusers import RBLNStableDiffusionPipeline

    marker = tmp_path / "MARKER"
    plant_code(sd_copy / "tokenizer", "evil_tok", marker)
    name_code(sd_copy / "tokenizer" / "tokenizer_config.json", "evil_tok", auto="AutoTokenizer")
    with pytest.raises(RemoteCodeError, match="tokenizer_config.json names remote code"):
        RBLNStableDiffusionPipeline.from_pretrained(sd_copy, export=True, rbln_create_runtimes=False)
    assert_not_run(marker, "evil_tok")


def test_a_pipeline_component_class_outside_the_allowlist_is_refused(sd_copy):
    from optimum_npu.diffusers import RBLNStableDiffusionPipeline

    edit_index(sd_copy, tokenizer=["transformers", "GenerationConfig"])
    with pytest.raises(ValueError, match="is not a tokenizer, processor, scheduler or model class"):
        RBLNStableDiffusionPipeline.from_pretrained(sd_copy, export=True, rbln_create_runtimes=False)


@pytest.fixture(scope="module")
def guardrail_source(tmp_path_factory):
    from optimum_npu.testing.cosmos_guardrail import build_tiny_cosmos_guardrail

    return build_tiny_cosmos_guardrail(tmp_path_factory.mktemp("guard") / "checkpoint", blocklist=["zorblax"])


@pytest.mark.parametrize("where", ["llamaGuard3/tokenizer_config.json",
                                   "video_content_safety_filter/siglip_encoder/preprocessor_config.json",
                                   "face_blur_filter/config.json"])
def test_the_guardrail_refuses_configs_naming_remote_code(guardrail_source, tmp_path, where):
    import shutil

    from optimum_npu.cosmos_guardrail import RBLNCosmosSafetyChecker

    folder = tmp_path / "guard"
    shutil.copytree(guardrail_source, folder)
    marker = tmp_path / "MARKER"
    plant_code((folder / where).parent, "evil_guard", marker)
    name_code(folder / where, "evil_guard", auto="AutoTokenizer")
    with pytest.raises(RemoteCodeError, match=f"{Path(where).name} names remote code"):
        RBLNCosmosSafetyChecker.from_pretrained(folder, export=True, rbln_create_runtimes=False)
    assert_not_run(marker, "evil_guard")


def test_trust_remote_code_is_not_accepted(source):
    from transformers import AutoConfig

    from optimum_npu.modeling.hf_files import auto_class_from_pretrained

    with pytest.raises(TypeError, match="trust_remote_code is not accepted"):
        auto_class_from_pretrained(AutoConfig, source, trust_remote_code=True)
