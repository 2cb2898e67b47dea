"""The compile cache: compiled programs kept on disk, keyed by what they were compiled from, so a
second process compiles nothing.

Folder: `OPTIMUM_NPU_CACHE` (default `$XDG_CACHE_HOME/optimum_npu/compiled`, i.e.
~/.cache/optimum_npu/compiled); an entry is `<sha256 key>.rbln`, an ordinary `.rbln` artifact. The
key is the caller's description of the graph (for `torch.compile`: the Dynamo graph's code, its
weights' bytes, input shapes and dtypes) with the compile options, the package and torch versions
and the artifact format version: anything that could change the program changes the key.

An entry is read like any artifact from disk, as untrusted input (`Artifact.load` checks format,
checksums and program; the runtime validates the program again before running it). An entry that
fails, is not a regular file, or does not record the key it is stored under (a file copied from
another key) is ignored with a warning and rebuilt, never run. The folder is bounded
(`OPTIMUM_NPU_CACHE_MAX_BYTES`, default 4 GiB): after a store, the least recently used entries go
first. Only files named like our entries are ever removed. `optimum-npu cache info / clear`.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..sim_device.artifact import FORMAT_VERSION, Artifact, ArtifactError, _package_version

CACHE_ENV = "OPTIMUM_NPU_CACHE"
MAX_BYTES_ENV = "OPTIMUM_NPU_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 4 * 1024**3
ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.rbln")
KEY_FIELD = "cache_key"   # in the artifact's `versions`: the key the entry was stored under


def cache_dir() -> Path:
    folder = os.environ.get(CACHE_ENV)
    if folder:
        return Path(folder)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "optimum_npu" / "compiled"


def max_bytes() -> int:
    raw = os.environ.get(MAX_BYTES_ENV)
    if raw is None:
        return DEFAULT_MAX_BYTES
    if not raw.isdigit():
        raise ValueError(f"{MAX_BYTES_ENV} must be a number of bytes (a non-negative integer), got {raw!r}")
    return int(raw)


class Key:
    """A sha256 over the parts of what a program is compiled from, and the versions it depends on."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.add("optimum_npu", _package_version(), "torch", torch.__version__, "format", FORMAT_VERSION)

    def add(self, *parts) -> Key:
        for part in parts:
            if isinstance(part, torch.Tensor):
                t = part.detach().contiguous().cpu()
                self._hash.update(f"tensor{tuple(t.shape)}{t.dtype}".encode())
                self._hash.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            else:
                text = repr(part).encode()
                self._hash.update(len(text).to_bytes(8, "little") + text)
        return self

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def load(key: str):
    """The cached program of `key` (a `CompiledModel`), or None (absent, or ignored: see the docstring)."""
    from .compiler import CompiledModel

    path = cache_dir() / f"{key}.rbln"
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        warnings.warn(f"compile cache: cannot read {path} ({e.strerror}); compiling instead")
        return None
    try:
        if not stat.S_ISREG(mode):
            raise ArtifactError(f"{path} is not a regular file")
        artifact = Artifact.load(path)
        if artifact.versions.get(KEY_FIELD) != key:
            raise ArtifactError(f"{path} does not record the key it is stored under")
    except (ArtifactError, OSError, ValueError) as e:
        warnings.warn(f"compile cache: ignoring entry {path.name}: {e}; compiling it again")
        return None
    try:
        os.utime(path)  # recently used: evicted last
    except OSError:
        pass
    return CompiledModel(program=artifact.program, tensors=artifact.tensors, versions=artifact.versions)


def store(key: str, compiled) -> Path | None:
    """Keep `compiled` under `key` (replacing an ignored entry), then bound the folder's size. A
    cache that cannot be written is a warning, not a failure of the compilation."""
    folder = cache_dir()
    path = folder / f"{key}.rbln"
    versions = {"optimum_npu": _package_version(), "torch": torch.__version__.split("+")[0], KEY_FIELD: key}
    try:
        if path.is_symlink():
            raise OSError(f"{path} is a symbolic link; not writing through it")
        Artifact(program=compiled.program, tensors=compiled.tensors, versions=versions).save(path)
        evict(max_bytes())
    except OSError as e:
        warnings.warn(f"compile cache: cannot store {path}: {e}")
        return None
    return path


@dataclass
class CacheInfo:
    folder: Path
    entries: int
    bytes: int
    max_bytes: int

    def __str__(self) -> str:
        from ..sim_device.stats import format_bytes

        return (f"{self.folder}: {self.entries} compiled program(s), {format_bytes(self.bytes)} "
                f"(bounded at {format_bytes(self.max_bytes)}, {MAX_BYTES_ENV})")


def _entries() -> list[tuple[Path, os.stat_result]]:
    folder = cache_dir()
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if ENTRY_NAME.fullmatch(path.name):
            try:
                st = path.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((path, st))
    return found


def info() -> CacheInfo:
    entries = _entries()
    return CacheInfo(cache_dir(), len(entries), sum(st.st_size for _, st in entries), max_bytes())


def evict(limit: int) -> int:
    """Remove least recently used entries until the folder holds at most `limit` bytes; returns how many went."""
    entries = sorted(_entries(), key=lambda e: e[1].st_mtime)
    total, removed = sum(st.st_size for _, st in entries), 0
    for path, st in entries:
        if total <= limit:
            break
        path.unlink(missing_ok=True)
        total -= st.st_size
        removed += 1
    return removed


def clear() -> int:
    """Remove every entry (only files named like entries); returns how many."""
    return evict(-1)
