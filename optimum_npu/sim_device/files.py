"""Files and processes: the two small facts every writer of ours relies on.

- `write_file_atomically`: a reader sees the old file or the new one, never half of one, and
  the file gets the usual permissions (0o666 filtered by the umask), not 0o600 as
  `tempfile.mkstemp` would give it, because the temporary file becomes the final file.
- `save_folder`: a saved folder of several files (a pipeline, a checker) appears whole or is
  updated only where it is ours; nothing else in a user's folder is touched.
- `pid_alive`: whether a process id names a running process (used to tell our leftovers of
  killed processes from work in progress).
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Callable


def write_file_atomically(path: str | os.PathLike, data: bytes) -> None:
    path = os.fspath(path)
    tmp_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def save_folder(target: str | os.PathLike, write: Callable[[Path, bool], None],
                holds_ours: Callable[[Path], bool], refusal: str) -> Path:
    """Save with `write(folder, in_place)`. A new or empty folder appears whole or not at all (written
    in a hidden sibling, then renamed); a non-empty folder is updated in place only when
    `holds_ours(folder)`; any other non-empty folder, or a file, is a ValueError ("it is not empty
    and <refusal>") and nothing is written."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"Cannot save into {target}: it is a file, not a folder. Nothing was written.")
    if target.is_dir() and any(target.iterdir()):
        if not holds_ours(target):
            raise ValueError(f"Cannot save into {target}: it is not empty and {refusal}. "
                             "Save into a new or empty folder.")
        write(target, True)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir()
        write(staging, False)
        if target.is_dir():
            target.rmdir()  # empty (checked above)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # only our staging folder, if the rename did not happen
    return target


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or not a pid we can ask about: assume alive
    return True
