"""FGSM (Goodfellow et al. 2015): one signed-gradient step of size eps, the first row of RSLAD's tables.

Goodfellow's FGSM: the cross-entropy loss, no random start, so each pixel moves by exactly ±eps unless clamped to
[0, 1]. The papers' evaluation scripts do not agree on the start (FAT's TRADES-style evaluation has none, IAD's and
FAT's DAT-style ones start uniformly in the eps-ball): see :mod:`rslad_edge.attacks.presets`, note (2).
"""

from __future__ import annotations

import torch

from rslad_edge.attacks.pgd import ModelFn, pgd


def fgsm(model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, *, eps: float) -> torch.Tensor:
    """Return ``clamp(x + eps * sign(grad_x CE(model_fn(x), y)), 0, 1)``, detached, dtype and shape of ``x``."""
    return pgd(model_fn, x, y, eps=eps, step_size=eps, steps=1, loss="ce", random_start="none")
