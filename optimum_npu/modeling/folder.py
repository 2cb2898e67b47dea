"""Compiled folders on disk: how every save of ours writes and every load reads.

Models, pipelines and the Cosmos checker all save through `save_tree`:

- every file is first written into a staging folder the save creates, named
  `.<target>.tmp-<pid>-<hex>` and marked ours by an empty `.optimum-npu-staging` file inside; being
  new, nothing in it is a link, so no writer (ours or a library's) can write through one;
- a new target folder is that staging folder renamed: it appears whole or not at all;
- an existing one gets each file moved in by a rename, which replaces (never follows) a link at
  the file's place; a folder on the way that is a link, or a file where the save puts a folder, is
  refused before anything moves. `rbln_config.json` files go last, the top one last of all;
- the top `rbln_config.json` lists every other file of the save (relative path, bytes,
  sha256): the manifest. A load checks it, so it never runs a half-written or mixed folder;
- files the previous save listed that this one no longer writes are removed if unchanged (and
  of a name a save writes); nothing else in the folder is touched;
- the staging folders of killed saves are removed by the next save into the same target: only
  folders of our name pattern, marked ours, whose process is gone.

A save moving files into an existing folder holds an exclusive `flock` on that folder, and a
load holds a shared one while it checks and reads: a load during a re-save waits for it
(at most `OPTIMUM_NPU_LOCK_TIMEOUT` seconds, default 30), then says a save is in progress.

Reading a user's folder: `read_file_below` follows no link out of the folder (a Hugging Face cache
snapshot's links into its repository's blobs are in), and caps a file by the bytes actually read
(`st_size` says 0 for `/proc` files).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

from ..configuration import CONFIG_NAME, RBLNModelConfig, check_plain_name
from ..untrusted_files import read_json_object, read_regular_file
from ..sim_device.files import pid_alive, write_file_atomically

STAGING_MARK = ".optimum-npu-staging"
MODEL_INDEX = "model_index.json"
# Names of files a save writes: only these may be removed when a later save no longer writes them.
SAVED_NAMES = (
    "config.json", "generation_config.json", "model_index.json", "scheduler_config.json", "keywords.txt",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "vocab.txt", "merges.txt", "added_tokens.json", "spiece.model", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "image_processor_config.json",
    "feature_extractor_config.json",
)


class FolderError(ValueError):
    """A folder a save or a load refuses (a link on the way, a file where a folder goes, a save in progress)."""


# ---- staging folders -------------------------------------------------------------------------


def _staging_pattern(target: Path) -> re.Pattern:
    return re.compile(rf"\.{re.escape(target.name)}\.tmp-(\d+)-[0-9a-f]{{8}}")


def staging_folders(target: Path) -> list[Path]:
    """Staging folders of saves into `target` (next to it for a new folder, inside it otherwise)."""
    pattern = _staging_pattern(target)
    found = []
    for place in (target.parent, target):
        if place.is_dir():
            found += [p for p in place.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found)


def remove_stale_staging(target: Path) -> None:
    """Remove the staging folders of killed saves into `target`: ours (named and marked so), process gone."""
    pattern = _staging_pattern(target)
    for folder in staging_folders(target):
        pid = int(pattern.fullmatch(folder.name).group(1))
        mark = folder / STAGING_MARK
        if pid != os.getpid() and not pid_alive(pid) and mark.is_file() and not mark.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)


def make_staging_folder(parent: Path, target: Path) -> Path:
    """A new folder for the files of one save, marked ours. Created like any folder (0o777 minus the
    umask), unlike `tempfile.mkdtemp` (0o700), because a new target folder is this very folder renamed."""
    staging = parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o777)
    (staging / STAGING_MARK).touch()
    return staging


# ---- manifests -------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path)}


def relative_files(folder: Path) -> list[str]:
    """Every file below `folder` as a relative POSIX path, links not followed, the staging mark and the
    top rbln_config.json (which holds the manifest) left out."""
    found = []
    for where, dirs, files in os.walk(folder):
        base = Path(where).relative_to(folder)
        found += [(base / name).as_posix() for name in files]
    return sorted(f for f in found if f not in (CONFIG_NAME, STAGING_MARK))


def manifest_of(folder: Path) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of the files written into `folder` (a staging folder)."""
    return {name: manifest_entry(folder / name) for name in relative_files(folder)}


def check_relative_path(what: str, name: object) -> str:
    """`name` if it is a relative path of plain names ("unet/config.json"), else a ValueError."""
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a relative path of plain names; got {name!r}")
    for part in name.split("/"):
        check_plain_name(what, part)
    return name


def read_manifest(folder: Path, nested: bool = True) -> dict[str, dict]:
    """The manifest of a compiled folder ({relative path: {"bytes", "sha256"}}), checked for types; a
    model's (`nested=False`) names plain files only."""
    data = RBLNModelConfig.read_json(folder) if _is_model_config(folder) else _read_top_config(folder)
    if not isinstance(data.get("files"), dict):
        raise ValueError(
            f"{folder / CONFIG_NAME} has no file list ('files'): it was written by an older optimum-npu or "
            "edited by hand. Compile the model again (export=True) and save it."
        )
    manifest = {}
    for name, entry in data["files"].items():
        (check_relative_path if nested else check_plain_name)(f"a file name in {folder / CONFIG_NAME}", name)
        if not (isinstance(entry, dict) and set(entry) == {"bytes", "sha256"} and isinstance(entry["bytes"], int)
                and isinstance(entry["sha256"], str)):
            raise ValueError(f"{folder / CONFIG_NAME} is malformed: files[{name!r}] must be {{'bytes': int, 'sha256': str}}")
        manifest[name] = entry
    return manifest


def _read_top_config(folder: Path) -> dict:
    return read_json_object(folder / CONFIG_NAME)


def _is_model_config(folder: Path) -> bool:
    """A model's rbln_config.json (checked strictly by RBLNModelConfig), not a pipeline's."""
    return not (folder / MODEL_INDEX).is_file()


def check_manifest(folder: Path, needed: list[str], nested: bool = True, skip: tuple[str, ...] = ()) -> None:
    """ValueError unless every file of the manifest is there as saved, and it lists `needed`; files
    below the sub-folders in `skip` are not checked (parts the user chose not to load)."""
    manifest = read_manifest(folder, nested)
    unlisted = [name for name in needed if name not in manifest]
    if unlisted:
        raise ValueError(f"{folder / CONFIG_NAME} does not list {unlisted} in its files; the folder is inconsistent.")
    for name, entry in manifest.items():
        if any(name.startswith(f"{prefix}/") for prefix in skip):
            continue
        path = folder / name
        problem = None
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != entry["bytes"]:
            problem = f"has {path.stat().st_size} bytes, {entry['bytes']} were saved"
        elif sha256_of(path) != entry["sha256"]:
            problem = "differs from the file that was saved (sha256)"
        if problem:
            raise ValueError(
                f"{folder} holds an incomplete or mixed save: {name} {problem}. A save was interrupted, or files "
                "were changed or copied in afterwards. Save the model again."
            )


# ---- moving a staged save into place -------------------------------------------------------


def _link_on_the_way(root: Path, relative: str) -> str | None:
    """The first part of `relative` below `root` that is a symbolic link (the file itself included), or None."""
    path = root
    for part in relative.split("/"):
        path = path / part
        if path.is_symlink():
            return str(path.relative_to(root))
    return None


def _is_ours_to_replace(relative: str) -> bool:
    """A file name that a save writes, so a later save may delete it when it no longer writes it."""
    name = relative.rsplit("/", 1)[-1]
    return name.endswith(".rbln") or name in SAVED_NAMES or (name == CONFIG_NAME and relative != CONFIG_NAME)


def _move_order(relative: str) -> tuple:
    """Data files first, then model_index.json and the components' rbln_config.json, the top rbln_config.json last."""
    name = relative.rsplit("/", 1)[-1]
    return (relative == CONFIG_NAME, name in (CONFIG_NAME, MODEL_INDEX), -relative.count("/"), relative)


def check_writable_tree(target: Path, names: list[str]) -> None:
    """FolderError unless moving `names` into `target` writes nowhere but inside it: no folder on the
    way is a link or a file, and no file lands where a folder is."""
    for name in names:
        parts = name.split("/")
        path = target
        for i, part in enumerate(parts):
            path = path / part
            last = i == len(parts) - 1
            if not last and path.is_symlink():
                raise FolderError(f"Cannot save into {target}: {'/'.join(parts[:i + 1])} is a symbolic link, and a save "
                                  "never writes through a link. Nothing was written; remove the link or save elsewhere.")
            if not last and path.exists() and not path.is_dir():
                raise FolderError(f"Cannot save into {target}: {'/'.join(parts[:i + 1])} is a file where the save "
                                  "puts a folder. Nothing was written.")
            if last and path.is_dir() and not path.is_symlink():
                raise FolderError(f"Cannot save into {target}: {name} would replace a folder of the same name. "
                                  "Nothing was written.")


def move_into(staging: Path, target: Path) -> None:
    """Replace the files of `target` by those of `staging`, one rename each, the manifest last; then
    remove the files the previous save listed and this one did not write, if unchanged."""
    try:  # what the previous save wrote; nothing for a folder saved before manifests, or a damaged one
        previous = read_manifest(target) if (target / CONFIG_NAME).is_file() else {}
    except (ValueError, TypeError, OSError):
        previous = {}
    names = sorted([*relative_files(staging), CONFIG_NAME], key=_move_order)
    check_writable_tree(target, names)
    with save_lock(target):
        for name in names:
            (target / name).parent.mkdir(parents=True, exist_ok=True)   # no link on the way: checked above
            os.replace(staging / name, target / name)   # the save is complete once CONFIG_NAME (last) is moved
        for name, entry in previous.items():
            path = target / name
            if (name not in names and _is_ours_to_replace(name) and not _link_on_the_way(target, name)
                    and path.is_file() and manifest_entry(path) == entry):
                path.unlink()


def save_tree(target: str | os.PathLike, write: Callable[[Path], None],
              check_target: Callable[[Path], None]) -> Path:
    """Save with `write(staging)` (every file of the save, the top rbln_config.json with its manifest
    last) into `target`: refused by `check_target(target)` (raising) before anything is written."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"Cannot save into {target}: it is a file, not a folder. Nothing was written.")
    check_target(target)
    remove_stale_staging(target)
    existing = target.is_dir() and any(target.iterdir())
    parent = target if existing else target.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_folder(parent, target)
    try:
        write(staging)
        if existing:
            move_into(staging, target)
        else:
            (staging / STAGING_MARK).unlink()
            if target.is_dir():
                target.rmdir()   # empty (checked above)
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
    return target


# ---- locks: a load waits for a save moving files in --------------------------------------------


def _lock_timeout() -> float:
    try:
        return max(0.0, float(os.environ.get("OPTIMUM_NPU_LOCK_TIMEOUT", "30")))
    except ValueError:
        return 30.0


@contextlib.contextmanager
def _flock(lock_on: Path, mode: int, doing: str, folder: Path, deadline: float) -> Iterator[None]:
    """Hold flock `mode` on the folder `lock_on`, waiting until `deadline` (polled, so that a stuck save ends
    in an error about `folder`, the one being saved or loaded)."""
    try:
        fd = os.open(lock_on, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield   # not a folder we can open: the caller's own checks say what is wrong
        return
    try:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    break   # a file system without flock: no waiting, the manifest check still holds
                if time.monotonic() >= deadline:
                    raise FolderError(f"{folder}: {doing} waited {_lock_timeout():.0f} s for a save into it that is "
                                      "still in progress; try again once it has finished.") from None
                time.sleep(0.01)   # short: a load holds its lock only while it reads
        yield
    finally:
        os.close(fd)   # releases the lock


# flock has no queue: a save polling for its exclusive lock could wait forever behind loads that follow
# one another without a gap (each one's shared lock taken before the last one's is released). So both
# go through a gate first, a lock on the folder's parent: a save holds it exclusively while it waits for
# the loads already inside to finish and moves its files in; a load holds it shared only until it has its
# own lock, so new loads queue behind a waiting save. (Never held for a save's writes, done before.)


def _gate(folder: Path, mode: int, doing: str, deadline: float):
    real = Path(os.path.realpath(folder))
    if real.parent == real:   # "/": no parent to queue at
        return contextlib.nullcontext()
    return _flock(real.parent, mode, doing, folder, deadline)


@contextlib.contextmanager
def save_lock(folder: Path) -> Iterator[None]:
    """Held while a save moves files into `folder` (exclusive)."""
    deadline = time.monotonic() + _lock_timeout()
    with _gate(folder, fcntl.LOCK_EX, "this save", deadline):
        with _flock(folder, fcntl.LOCK_EX, "this save", folder, deadline):
            yield


@contextlib.contextmanager
def load_lock(folder: Path) -> Iterator[None]:
    """Held while a load checks and reads `folder` (shared): it waits for a save moving files in."""
    deadline = time.monotonic() + _lock_timeout()
    with contextlib.ExitStack() as held:
        with _gate(folder, fcntl.LOCK_SH, "loading", deadline):   # through the gate ...
            held.enter_context(_flock(folder, fcntl.LOCK_SH, "loading", folder, deadline))
        yield   # ... and out of it: a save arriving now waits for this load only


# ---- reading a user's folder without following links out of it ---------------------------------


def _boundary(root: Path) -> Path:
    """What links below `root` may point into: `root` itself, or for a folder in a Hugging Face cache snapshot
    (`models--org--name/snapshots/<rev>/...`, whose files are links to its `blobs/`) the repository's cache folder."""
    real = Path(os.path.realpath(root))
    parts = real.parts
    for i in range(len(parts) - 2):
        if parts[i].startswith(("models--", "datasets--", "spaces--")) and parts[i + 1] == "snapshots":
            return Path(*parts[:i + 1])
    return real


def contained_path(root: str | os.PathLike, relative: str) -> Path:
    """The real path of `root/relative`; a FolderError if a link on the way points out of the folder."""
    root = Path(root)
    real = Path(os.path.realpath(root / relative))
    if not real.is_relative_to(_boundary(root)):
        raise FolderError(f"{root / relative} is a link out of the folder (to {real}); files of a model folder are "
                          "read only inside it")
    return real


def read_file_below(root: str | os.PathLike, relative: str, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of the regular file `root/relative` (no link out of `root` followed), at most
    `max_bytes` of them counted as read (`st_size` is 0 for /proc files): more is a ValueError naming it."""
    real = contained_path(root, relative)
    try:
        return read_regular_file(real, max_bytes, what)
    except ValueError as err:   # name the file as the user knows it, not where a link led
        raise FolderError(str(err).replace(str(real), str(Path(root) / relative))) from None


def write_file_below(root: str | os.PathLike, relative: str, data: bytes) -> None:
    """Write `root/relative` atomically (a link at its place is replaced, not followed), creating its
    folders; a folder on the way that is a link is a FolderError and nothing is written."""
    root = Path(root)
    check_writable_tree(root, [relative])
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(root / relative, data)


def is_compiled_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


# A checkpoint's weight files (transformers, diffusers, torch, GGUF...): a folder holding one is
# a checkpoint, and saving a compiled model into it needs `exist_ok=True`.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")


def check_save_target(target: Path, exist_ok: bool) -> None:
    """Refuse a target whose content we could damage: a file, a checkpoint, a foreign folder."""
    if target.exists() and not target.is_dir():
        raise ValueError(f"Cannot save into {target}: it is a file, not a folder. Nothing was written.")
    if not target.exists() or exist_ok:
        return
    # An interrupted save of ours into this folder leaves its staging folder inside: the folder is ours.
    staging = [p for p in staging_folders(target) if p.parent == target]
    contents = [p for p in target.iterdir() if p not in staging]
    weights = sorted(p.name for p in contents if p.name.endswith(WEIGHT_SUFFIXES))
    if weights:
        raise ValueError(
            f"Cannot save into {target}: it holds a checkpoint's weights ({', '.join(weights[:3])}). Saving there "
            "would replace its config.json, generation_config.json and tokenizer files with the compiled model's. "
            "Save into another folder, or pass save_pretrained(..., exist_ok=True) to add the compiled files "
            "(the weights and other files are kept)."
        )
    if contents and not is_compiled_folder(target) and not staging:
        raise ValueError(
            f"Cannot save into {target}: it is not empty and is not a compiled model folder (no {CONFIG_NAME}). "
            "Save into a new or empty folder, or pass save_pretrained(..., exist_ok=True) to add the compiled "
            "files there (other files are kept)."
        )
