"""Take a faster route only where it was seen to give the reference route's bits.

The host has faster ways to compute some ops than the one a rank alone would take: a weight
pre-packed for oneDNN (`host_linear.py`), every rank's matmul or elementwise op in one call
(`rank_batching.py`). Whether the faster way gives the same bits can depend on the shapes and
the thread count (the host's kernels pick their blocking from them), so it is checked where it
is used: the first call with a key runs both ways, compares, and returns the reference result;
later calls with that key take the way the verdict says.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch


def same_bits(a: Any, b: Any) -> bool:
    """Two results (tensors, or sequences of tensors) with the same bits."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


class VerifiedFastPath:
    """Verdicts per key: whether `fast` gave `reference`'s bits on the key's first call."""

    __slots__ = ("verdicts",)

    def __init__(self) -> None:
        self.verdicts: dict[Hashable, bool] = {}

    def __call__(self, key: Hashable, fast: Callable, reference: Callable, *args, **kwargs) -> Any:
        """`fast(*args, **kwargs)` or `reference(*args, **kwargs)` as the key's verdict says; on the
        key's first call, both, and the reference's result. `fast` may return None: no fast way
        here (the verdict is then False)."""
        verdict = self.verdicts.get(key)
        if verdict:
            out = fast(*args, **kwargs)
            if out is not None:
                return out
        if verdict is not None:
            return reference(*args, **kwargs)
        quick = fast(*args, **kwargs)
        expected = reference(*args, **kwargs)
        self.verdicts[key] = quick is not None and same_bits(quick, expected)
        return expected
