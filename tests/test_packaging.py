"""pyproject.toml builds without setuptools deprecation warnings (each install printed one for the
license given as a TOML table; PEP 639 makes it an SPDX expression)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_project_metadata_applies_without_warnings(monkeypatch):
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution
    from setuptools.warnings import SetuptoolsWarning

    monkeypatch.chdir(ROOT)   # the readme is read relative to the project folder
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), os.path.join(ROOT, "pyproject.toml"))
    # setuptools' own warnings about the metadata (others, e.g. an import's pkg_resources notice, are not ours)
    assert [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, SetuptoolsWarning)] == []
    assert dist.metadata.license_expression == "Apache-2.0"
