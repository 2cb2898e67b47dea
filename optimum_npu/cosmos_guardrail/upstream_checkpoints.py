"""Reading the upstream guardrail's PyTorch checkpoints (`Resnet50_Final.pth`, `safety_filter.pt`).

They are pickles. A pickle can run code when it is unpickled, and a downloaded file is untrusted,
so they are read only with `torch.load(weights_only=True)`, whose restricted unpickler accepts
tensors and plain containers and refuses anything else. The weights must then match the network
exactly: every parameter present, nothing extra, every shape the same.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_torch_checkpoint(path: Path):
    """The content of a `.pt` / `.pth` file, unpickled with the weights-only unpickler."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty: not a PyTorch checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        if err.errno is not None:   # the file could not be read (missing, permissions): say so as it is
            raise
        reason = err
    except Exception as err:  # noqa: BLE001  the unpickler fails on malformed input with any error type
        # (an empty file: IndexError; a text file: KeyError; a damaged one: UnpicklingError / RuntimeError ...)
        reason = err
    first_line = (str(reason).splitlines() or [""])[0] or "no message"
    raise ValueError(f"{path} is not a weights-only PyTorch checkpoint (refused by torch.load(weights_only=True): "
                     f"{type(reason).__name__}: {first_line})")


def load_exact_state_dict(model: torch.nn.Module, state, path: Path) -> torch.nn.Module:
    """`model` with the weights of `state` (read from `path`), refused unless they match it exactly."""
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{path} is not a state dict (a mapping of parameter names to tensors)")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{path} does not match the {type(model).__name__} ({model.config.to_diff_dict() or 'default config'}): "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}, other shapes {reshaped[:4]} "
            f"({len(missing)} / {len(unexpected)} / {len(reshaped)} in all)"
        )
    model.load_state_dict(state)
    return model
