"""Reading small files from a folder we do not trust (a compiled model, a checkpoint, a cache).

A file named in a folder may be a FIFO (opening it would wait forever), a device such as /dev/zero
(reading it would never end), or simply huge: every config-sized file is read through
`read_regular_file`, which refuses all three with a ValueError naming the file and what it was meant to be.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

MAX_JSON_BYTES = 64 * 1024 * 1024   # far more than any config file; a link to /dev/zero or a huge file is not one


def read_regular_file(path: str | os.PathLike, max_bytes: int, what: str) -> bytes:
    """The bytes of `path` if it is a regular file (a FIFO or a device such as /dev/zero is a ValueError,
    not waited on or read forever) of at most `max_bytes`, counted as read (st_size says 0 for /proc files)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)   # O_NONBLOCK: opening a FIFO does not hang
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{path} is not a regular file: not a {what}")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path} is larger than {max_bytes} bytes: not a {what}")
    return data


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in the (untrusted) file `path`; any malformed content is a ValueError naming it.
    Read only if regular, at most MAX_JSON_BYTES (`read_regular_file`)."""
    raw = read_regular_file(path, MAX_JSON_BYTES, "config file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path} is malformed: not valid JSON ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is malformed: expected a JSON object, got {type(data).__name__}")
    return data
