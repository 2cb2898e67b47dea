"""How the hostile tests edit a saved folder as an attacker would (no tests here)."""

import hashlib
import json
from pathlib import Path

from optimum_npu.configuration import CONFIG_NAME


def edit_json(path: Path, edit) -> None:
    """Apply `edit(data)` to the JSON object in `path`."""
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def edit_rbln_config(folder: Path, edit) -> None:
    edit_json(folder / CONFIG_NAME, edit)


def refresh_manifest(folder: Path) -> None:
    """What a careful attacker does after replacing a file: make the manifest agree with it."""
    def edit(data):
        for name in data["files"]:
            content = (folder / name).read_bytes()
            data["files"][name] = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}

    edit_rbln_config(folder, edit)
