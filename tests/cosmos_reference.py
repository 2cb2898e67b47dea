"""`reference_resize_without_torchvision`: an autouse fixture for tests that run diffusers' own Cosmos
transformer as the reference. It resizes its padding mask with torchvision (absent here); this gives it
torchvision's NEAREST tensor resize, which is F.interpolate(mode="nearest"). Ours needs none."""

import types

import pytest
import torch.nn.functional as F


@pytest.fixture(autouse=True)
def reference_resize_without_torchvision(monkeypatch):
    import diffusers.models.transformers.transformer_cosmos as upstream

    resize = lambda x, size, interpolation: F.interpolate(x, size=size, mode=interpolation)  # noqa: E731
    monkeypatch.setattr(upstream, "transforms", types.SimpleNamespace(
        InterpolationMode=types.SimpleNamespace(NEAREST="nearest"), functional=types.SimpleNamespace(resize=resize)),
        raising=False)
