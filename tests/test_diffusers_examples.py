"""The diffusers examples run as they are: the Stable Diffusion and Cosmos scripts and notebooks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = [EXAMPLES / "stable-diffusion" / "stable_diffusion_on_npu.ipynb", EXAMPLES / "cosmos" / "cosmos_on_npu.ipynb"]


def load_example(relative_path: str):
    path = EXAMPLES / relative_path
    name = f"example_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.heavy
def test_stable_diffusion_script(tmp_path):
    result = load_example("stable-diffusion/text_to_image.py").main(tmp_path)
    assert result.image.shape == (32, 32, 3) and result.png.is_file()
    np.testing.assert_array_equal(result.reloaded_image, result.image)  # reloaded without compiling: same image
    assert (tmp_path / "image_to_image.png").is_file() and (result.compiled_folder / "model_index.json").is_file()


@pytest.mark.heavy
def test_cosmos_script(tmp_path):
    result = load_example("cosmos/text_to_world.py").main(tmp_path)
    assert result.video.shape == result.continued.shape == (9, 32, 32, 3)
    assert "unsafe text" in result.refused and "refused by the Blocklist guardrail" in result.refused
    assert all(gif.is_file() for gif in result.gifs)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(notebook):
    import nbformat

    code = [c for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.heavy
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(notebook, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "simulated generation" in printed
    assert list((tmp_path / "out").glob("notebook_*"))
