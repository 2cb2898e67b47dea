"""What a compiled pipeline folder says must match what it is (issue 17, section 5), and what a
killed pipeline save leaves behind (section 6).

A load re-derives every component's options from the pipeline-wide ones saved in
rbln_config.json (height, width, batch, npu, dtype, guidance) and checks them against the
components; each component's options are checked against its programs; a save into a folder
holding another compiled pipeline is refused. The folders are edited as an attacker would, the
manifests made to agree with the edits.
"""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from folder_edits import edit_json, refresh_manifest
from optimum_npu.configuration import CONFIG_NAME
from optimum_npu.diffusers import RBLNStableDiffusionPipeline


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from optimum_npu.testing.diffusers import build_tiny_stable_diffusion

    source = build_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "sd")
    pipe = RBLNStableDiffusionPipeline.from_pretrained(source, export=True, rbln_create_runtimes=False)
    return pipe, Path(pipe.save_pretrained(tmp_path_factory.mktemp("compiled") / "pipe"))


@pytest.fixture
def folder(compiled, tmp_path):
    target = tmp_path / "pipe"
    shutil.copytree(compiled[1], target)
    return target


def load(folder):
    return RBLNStableDiffusionPipeline.from_pretrained(folder, rbln_create_runtimes=False)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_unedited_folder_loads(folder):
    load(folder)


@pytest.mark.parametrize("option, value, component, key", [
    ("height", 10**9, "unet", "sample_size"),
    ("width", 32, "unet", "sample_size"),
    ("batch_size", 8, "text_encoder", "batch_size"),
    ("guidance_scale", 1.0, "unet", "batch_size"),   # guidance off: a UNet of half the batch
    ("npu", "RBLN-CA12", "text_encoder", "npu"),
    ("dtype", "float16", "text_encoder", "dtype"),
])
def test_edited_pipeline_options_are_refused(folder, option, value, component, key):
    edit_json(folder / CONFIG_NAME, lambda data: data["compile_options"].__setitem__(option, value))
    with pytest.raises(ValueError, match=f"gives {component} {key}=.*was compiled with.*edited or mixed"):
        load(folder)


def test_a_unet_config_against_a_program_of_another_batch_is_refused(folder):
    """unet/rbln_config.json says batch 4, its program takes 2; every copy of the option and every
    manifest made to agree, so only the program tells."""
    def four(options):
        options["batch_size"] = 4

    edit_json(folder / "unet" / CONFIG_NAME, lambda data: four(data["compile_options"]))
    refresh_manifest(folder / "unet")

    def top(data):
        four(data["components"]["unet"]["compile_options"])
        data["requested"]["unet"] = {"batch_size": 4}
    edit_json(folder / CONFIG_NAME, top)
    refresh_manifest(folder)
    with pytest.raises(ValueError, match=r"implies the graphs .*\(4, 4, 8, 8\).* but the folder holds .*\(2, 4, 8, 8\)"):
        load(folder)


def test_saving_one_pipeline_into_another_ones_folder_is_refused(compiled, folder):
    pipe, _ = compiled
    edit_json(folder / CONFIG_NAME, lambda data: data.__setitem__("cls_name", "RBLNCosmosTextToWorldPipeline"))
    before = snapshot(folder)
    with pytest.raises(ValueError, match="holds a compiled RBLNCosmosTextToWorldPipeline, not a "
                                         "RBLNStableDiffusionPipeline; saving there would mix two models"):
        pipe.save_pretrained(folder)
    assert snapshot(folder) == before


KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from optimum_npu.diffusers import RBLNStableDiffusionPipeline
    from optimum_npu.sim_device import Artifact

    source, target = sys.argv[1:]
    pipe = RBLNStableDiffusionPipeline.from_pretrained(source, rbln_create_runtimes=False)
    Artifact.save = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
    pipe.save_pretrained(target)
""")


@pytest.mark.parametrize("existing", [False, True])
def test_the_staging_folder_of_a_killed_pipeline_save_is_removed_by_the_next(compiled, tmp_path, existing):
    pipe, source = compiled
    target = tmp_path / "target"
    if existing:
        pipe.save_pretrained(target)
    child = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(source), str(target)], capture_output=True,
                           text=True, timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.returncode == -signal.SIGKILL, child.stderr
    where = target if existing else tmp_path
    leftovers = [p for p in where.iterdir() if p.name.startswith(".target.tmp-")]
    assert len(leftovers) == 1, "the killed save's staging folder"
    not_ours = where / ".target.tmp-999999-0123abcd"   # our name pattern, a dead pid, but not marked ours
    not_ours.mkdir()
    pipe.save_pretrained(target)
    assert not leftovers[0].exists()
    assert not_ours.is_dir()
    load(target)
