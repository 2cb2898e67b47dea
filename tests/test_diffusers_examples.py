"""The diffusers examples run as they are: the Stable Diffusion and Cosmos scripts and notebooks."""

from __future__ import annotations

import numpy as np
import pytest
from example_helpers import EXAMPLES, committed_without_outputs, load_example, run_notebook

NOTEBOOKS = [EXAMPLES / "stable-diffusion" / "stable_diffusion_on_npu.ipynb", EXAMPLES / "cosmos" / "cosmos_on_npu.ipynb"]


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
    assert committed_without_outputs(notebook)


@pytest.mark.heavy
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(notebook, tmp_path):
    printed = run_notebook(notebook, tmp_path, timeout=600)
    assert "simulated generation" in printed
    assert list((tmp_path / "out").glob("notebook_*"))
