"""What the example tests share: importing an example script by its path, and notebooks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(relative_path: str):
    """Import an example script by its path (examples/ is not a package)."""
    path = EXAMPLES / relative_path
    name = f"example_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def committed_without_outputs(notebook: Path) -> bool:
    """True if the notebook has code cells and none carries outputs or an execution count."""
    import nbformat

    code = [c for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]
    return bool(code) and all(not c.outputs and c.execution_count is None for c in code)


def run_notebook(notebook: Path, cwd: Path, timeout: int = 300) -> str:
    """Execute the notebook in a kernel started in `cwd`; what its cells printed or displayed as text."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return "".join(
        o.get("text", "") + "".join(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
