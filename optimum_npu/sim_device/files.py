"""Files and processes: the two small facts every writer of ours relies on.

- `write_file_atomically`: a reader sees the old file or the new one, never half of one, and
  the file gets the usual permissions (0o666 filtered by the umask), not 0o600 as
  `tempfile.mkstemp` would give it, because the temporary file becomes the final file.
- `pid_alive`: whether a process id names a running process (used to tell our leftovers of
  killed processes from work in progress).
"""

from __future__ import annotations

import os
import secrets


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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or not a pid we can ask about: assume alive
    return True
