"""Saves never write through a link; reads never follow one out of the folder (issue 17, section 2),
and the pipeline / checker folders share the models' staging, manifest and locks (modeling/folder.py).

Every save writes into a fresh staging folder and moves files in by renames: a link at a file's
place is replaced (the file it pointed to is untouched), a folder on the way that is a link is
refused before anything moves. A user's folder is read without following a link out of it, with a
size cap counted in bytes read (`/proc` files report size 0).
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from llm_fixtures import _one_torch_thread  # noqa: F401  (an autouse fixture)
from llm_fixtures import save_source
from optimum_npu import RBLNLlamaForCausalLM
from optimum_npu.configuration import CONFIG_NAME
from optimum_npu.cosmos_guardrail import Blocklist, RBLNCosmosSafetyChecker
from optimum_npu.modeling.folder import FolderError, read_file_below

SECRET = b"the user's own file\n"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def outside(tmp_path):
    """A folder of the user's outside any save target, with a file a link may point to."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "keywords.txt").write_bytes(SECRET)
    (folder / "id_rsa").write_bytes(b"-----BEGIN PRIVATE KEY-----\nsecret\n")
    return folder


# ---- models --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    source = save_source(tmp_path_factory.mktemp("src") / "tiny-llama", "llama", tokenizer=True)[0]
    return RBLNLlamaForCausalLM.from_pretrained(source, export=True, rbln_max_seq_len=128, rbln_create_runtimes=False)


def test_a_model_save_replaces_a_link_at_a_file_it_writes(model, tmp_path, outside):
    target = Path(model.save_pretrained(tmp_path / "compiled"))
    (target / "config.json").unlink()
    (target / "config.json").symlink_to(outside / "keywords.txt")
    model.save_pretrained(target)
    assert (outside / "keywords.txt").read_bytes() == SECRET
    assert not (target / "config.json").is_symlink()
    RBLNLlamaForCausalLM.from_pretrained(target, rbln_create_runtimes=False)


def test_config_files_are_read_with_a_cap_and_only_if_regular(model, tmp_path, monkeypatch):
    from optimum_npu import untrusted_files

    os.mkfifo(tmp_path / "fifo.json")   # opening it to read would wait for a writer
    for path in ("/dev/zero", tmp_path / "fifo.json"):   # reading /dev/zero would never end
        with pytest.raises(ValueError, match="is not a regular file"):
            untrusted_files.read_json_object(path)
    target = Path(model.save_pretrained(tmp_path / "compiled"))
    monkeypatch.setattr(untrusted_files, "MAX_JSON_BYTES", 1000)   # rbln_config.json is larger
    with pytest.raises(ValueError, match=f"{CONFIG_NAME} is larger than 1000 bytes: not a config file"):
        RBLNLlamaForCausalLM.from_pretrained(target, rbln_create_runtimes=False)


def test_a_checkpoint_file_linked_out_of_the_checkpoint_is_not_copied_into_the_save(tmp_path, outside):
    source = save_source(tmp_path / "src", "llama", tokenizer=True)[0]
    (source / "vocab.txt").symlink_to(outside / "id_rsa")   # a tokenizer file the save copies from the checkpoint
    model = RBLNLlamaForCausalLM.from_pretrained(source, export=True, rbln_max_seq_len=128, rbln_create_runtimes=False)
    with pytest.raises(FolderError, match="vocab.txt is a link out of the folder"):
        model.save_pretrained(tmp_path / "compiled")
    assert not (tmp_path / "compiled").exists()


# ---- the guardrail's blocklist ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def guardrail_source(tmp_path_factory):
    from optimum_npu.testing.cosmos_guardrail import build_tiny_cosmos_guardrail

    return build_tiny_cosmos_guardrail(tmp_path_factory.mktemp("guard") / "checkpoint", blocklist=["zorblax"])


BLOCKLIST_ONLY = dict(rbln_guard_llm=False, rbln_video_filter=False, rbln_face_blur=False)


@pytest.fixture
def checker(guardrail_source):
    return RBLNCosmosSafetyChecker.from_pretrained(guardrail_source, export=True, **BLOCKLIST_ONLY)


def test_a_checker_saved_in_place_replaces_a_linked_keywords_file(checker, tmp_path, outside):
    target = Path(checker.save_pretrained(tmp_path / "compiled"))
    keywords = target / "blocklist" / "custom" / "keywords.txt"
    keywords.unlink()
    keywords.symlink_to(outside / "keywords.txt")
    checker.save_pretrained(target)
    assert (outside / "keywords.txt").read_bytes() == SECRET
    assert not keywords.is_symlink() and keywords.read_text() == "zorblax\n"


def test_a_checker_saved_in_place_refuses_a_linked_kind_folder(checker, tmp_path, outside):
    target = Path(checker.save_pretrained(tmp_path / "compiled"))
    shutil.rmtree(target / "blocklist" / "custom")
    (target / "blocklist" / "custom").symlink_to(outside)
    before = snapshot(outside)
    with pytest.raises(FolderError, match="blocklist/custom is a symbolic link, and a save never writes through"):
        checker.save_pretrained(target)
    assert snapshot(outside) == before


def test_blocklist_save_never_writes_through_a_link(tmp_path, outside):
    folder = tmp_path / "blocklist"
    Blocklist(custom=["zorblax"]).save(folder)
    (folder / "custom" / "keywords.txt").unlink()
    (folder / "custom" / "keywords.txt").symlink_to(outside / "keywords.txt")
    Blocklist(custom=["flurbo"]).save(folder)
    assert (outside / "keywords.txt").read_bytes() == SECRET
    assert (folder / "custom" / "keywords.txt").read_text() == "flurbo\n"
    shutil.rmtree(folder / "whitelist")
    (folder / "whitelist").symlink_to(outside)
    with pytest.raises(FolderError, match="whitelist is a symbolic link"):
        Blocklist(custom=["flurbo"]).save(folder)
    assert (outside / "keywords.txt").read_bytes() == SECRET


def guardrail_copy(guardrail_source, tmp_path) -> Path:
    folder = tmp_path / "checkpoint"
    shutil.copytree(guardrail_source, folder)
    return folder


def test_export_refuses_a_blocklist_linked_to_proc(guardrail_source, tmp_path):
    folder = guardrail_copy(guardrail_source, tmp_path)
    shutil.rmtree(folder / "blocklist")
    (folder / "blocklist").symlink_to("/proc/self/environ")
    with pytest.raises(FolderError, match="blocklist is a link out of the folder"):
        RBLNCosmosSafetyChecker.from_pretrained(folder, export=True, **BLOCKLIST_ONLY)


def test_export_refuses_a_kind_folder_linked_to_a_private_folder(guardrail_source, tmp_path, outside):
    folder = guardrail_copy(guardrail_source, tmp_path)
    shutil.rmtree(folder / "blocklist" / "custom")
    (folder / "blocklist" / "custom").symlink_to(outside)   # as `custom -> ~/.ssh` would
    with pytest.raises(FolderError, match="custom is a link out of the folder"):
        RBLNCosmosSafetyChecker.from_pretrained(folder, export=True, **BLOCKLIST_ONLY)
    (folder / "blocklist" / "custom").unlink()
    (folder / "blocklist" / "custom").mkdir()
    (folder / "blocklist" / "custom" / "id_rsa").symlink_to(outside / "id_rsa")   # one linked file
    with pytest.raises(FolderError, match="id_rsa is a link out of the folder"):
        RBLNCosmosSafetyChecker.from_pretrained(folder, export=True, **BLOCKLIST_ONLY)


def test_a_fifo_in_the_blocklist_is_refused_without_hanging(guardrail_source, tmp_path):
    folder = guardrail_copy(guardrail_source, tmp_path)
    os.mkfifo(folder / "blocklist" / "custom" / "pipe.txt")
    with pytest.raises(FolderError, match="pipe.txt is not a regular file"):
        RBLNCosmosSafetyChecker.from_pretrained(folder, export=True, **BLOCKLIST_ONLY)


def test_the_size_cap_counts_bytes_read_not_st_size():
    environ = Path("/proc/self/environ")
    assert environ.stat().st_size == 0 and len(environ.read_bytes()) > 16
    with pytest.raises(ValueError, match="larger than 16 bytes"):
        read_file_below("/proc/self", "environ", 16)


def test_links_inside_a_hub_cache_snapshot_are_read(tmp_path):
    """A Hub cache snapshot's files are links to ../../blobs: inside the repository's cache folder."""
    repo = tmp_path / "models--nvidia--Cosmos-Guardrail1"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "0abc").write_text("zorblax\n")
    custom = repo / "snapshots" / "rev1" / "blocklist" / "custom"
    custom.mkdir(parents=True)
    (custom / "words.txt").symlink_to("../../../../blobs/0abc")
    assert not Blocklist.from_path(repo / "snapshots" / "rev1" / "blocklist").is_safe("two zorblaxes")[0]


def test_a_checker_folder_with_a_changed_file_is_refused(checker, tmp_path):
    target = Path(checker.save_pretrained(tmp_path / "compiled"))
    (target / "blocklist" / "custom" / "keywords.txt").write_text("")   # the blocklist emptied after the save
    with pytest.raises(ValueError, match="incomplete or mixed save: blocklist/custom/keywords.txt"):
        RBLNCosmosSafetyChecker.from_pretrained(target)


# ---- pipelines -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_pipeline(tmp_path_factory):
    from optimum_npu.diffusers import RBLNStableDiffusionPipeline
    from optimum_npu.testing.diffusers import build_tiny_stable_diffusion

    source = build_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "sd")
    return RBLNStableDiffusionPipeline.from_pretrained(source, export=True, rbln_create_runtimes=False)


def test_a_pipeline_saved_in_place_refuses_a_linked_component_folder(sd_pipeline, tmp_path, outside):
    target = Path(sd_pipeline.save_pretrained(tmp_path / "compiled"))
    shutil.move(target / "unet", outside / "unet")
    (target / "unet").symlink_to(outside / "unet")
    before, before_target = snapshot(outside), snapshot(target)
    with pytest.raises(FolderError, match="unet is a symbolic link, and a save never writes through a link"):
        sd_pipeline.save_pretrained(target)
    assert snapshot(outside) == before and snapshot(target) == before_target


def test_a_pipeline_saved_in_place_replaces_a_linked_tokenizer_file(sd_pipeline, tmp_path, outside):
    from optimum_npu.diffusers import RBLNStableDiffusionPipeline

    target = Path(sd_pipeline.save_pretrained(tmp_path / "compiled"))
    vocab = target / "tokenizer" / "tokenizer_config.json"
    vocab.unlink()
    vocab.symlink_to(outside / "keywords.txt")
    sd_pipeline.save_pretrained(target)
    assert (outside / "keywords.txt").read_bytes() == SECRET and not vocab.is_symlink()
    RBLNStableDiffusionPipeline.from_pretrained(target, rbln_create_runtimes=False)


def test_a_pipeline_folder_has_a_manifest_checked_at_load(sd_pipeline, tmp_path):
    from optimum_npu.diffusers import RBLNStableDiffusionPipeline

    target = Path(sd_pipeline.save_pretrained(tmp_path / "compiled"))
    files = json.loads((target / CONFIG_NAME).read_text())["files"]
    assert "model_index.json" in files and "unet/model.rbln" in files and "scheduler/scheduler_config.json" in files
    (target / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "PNDMScheduler"}))
    with pytest.raises(ValueError, match="incomplete or mixed save: scheduler/scheduler_config.json"):
        RBLNStableDiffusionPipeline.from_pretrained(target, rbln_create_runtimes=False)
