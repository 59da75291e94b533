"""Intervals on accuracies measured on a sample of images: one place for the formulas every stage reports with."""

from __future__ import annotations

import math

import torch

Z95 = 1.959963984540054  # two-sided 95 % quantile of the standard normal


def wilson_ci95(correct: int, n: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``correct / n`` (fractions): unlike the normal approximation it
    stays inside [0, 1] and is honest at 0 or n successes, which robust accuracies on a few hundred images reach."""
    if n <= 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + Z95 * Z95 / (2 * n)) / (1 + Z95 * Z95 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 * Z95 / (4 * n * n)) / (1 + Z95 * Z95 / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_drop_ci95_pp(reference: torch.Tensor, candidate: torch.Tensor) -> float | None:
    """Half-width, in points, of the 95 % interval of ``mean(reference) - mean(candidate)`` for per-image boolean
    flags of two models on the same images: a paired difference, much tighter than two independent intervals
    (most images are right, or wrong, for both). None below two images."""
    if reference.numel() < 2:
        return None
    difference = reference.float() - candidate.float()  # (N,) in {-1, 0, 1}
    return 100 * 1.96 * float(difference.std(unbiased=True)) / math.sqrt(reference.numel())
