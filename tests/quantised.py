"""Comparing outputs that are quantised (uint8 pixels, argmax labels, greedy tokens).

Two runs that agree to ~1e-6 in float can still differ by one quantisation step: a pixel that lies on
a uint8 boundary (diffusers truncates `video * 255` to uint8 around the safety checker) lands on either
side depending on the order in which the CPU's kernels add (torch picks AVX2 / AVX-512 / default
kernels by CPU). So the float values are compared at a float tolerance where they exist, and the
quantised values within one step, never at a float tolerance smaller than a step.
"""

import numpy as np

PIXEL_STEP = 1 / 255  # diffusers' float frames in [0, 1] come from uint8 frames


def assert_pixels_within_one_step(ours: np.ndarray, reference: np.ndarray) -> None:
    """Frames in [0, 1] that went through uint8 agree within one uint8 step everywhere."""
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    gap = np.abs(np.asarray(ours, np.float64) - np.asarray(reference, np.float64))
    assert gap.max() <= PIXEL_STEP + 1e-6, (
        f"{int((gap > PIXEL_STEP + 1e-6).sum())} of {gap.size} pixels differ by more than one uint8 step "
        f"(largest {gap.max():.4f})"
    )
