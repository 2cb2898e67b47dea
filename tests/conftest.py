"""Test-wide settings: offline hub, a private device-memory registry, seeded RNG.

Kept deliberately small: every test file of the suite shares it.
"""

import os

import pytest
import torch

# Tests never touch the network (no Hub downloads, no telemetry).
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _private_device_state(tmp_path_factory):
    """Point the simulated devices' allocation registry (sim_device/memory.py) and the compile
    cache at fresh folders, so allocations of other processes on this machine (another test run, a
    user's `optimum-npu` session) are never seen, and ours are never left behind."""
    saved = {k: os.environ.get(k) for k in ("OPTIMUM_NPU_STATE_DIR", "OPTIMUM_NPU_SYSTEM", "OPTIMUM_NPU_CACHE")}
    os.environ["OPTIMUM_NPU_STATE_DIR"] = str(tmp_path_factory.mktemp("npu_state"))
    os.environ["OPTIMUM_NPU_CACHE"] = str(tmp_path_factory.mktemp("compile_cache"))  # never the user's cache
    os.environ.pop("OPTIMUM_NPU_SYSTEM", None)  # the default machine: one RBLN-CA25 card
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, whatever ran before it."""
    torch.manual_seed(0)
