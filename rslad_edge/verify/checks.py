"""Sanity checks that tell when a robust accuracy cannot be trusted, after AutoAttack's ``checks.py``.

- Outputs that look like probabilities (every row in [0, 1], summing to 1): the margin and cross-entropy losses then
  work on squashed values, gradients vanish, and attacks look weaker than they are.
- Zero input gradients on a model that white-box or transfer attacks differentiate: a saturated softmax or a
  non-differentiable op (rounding, quantization) leaves PGD nothing to follow, so its robust accuracy is an upper
  bound and nothing more.
- A differentiable twin that disagrees with its artifact (below 99 % top-1 on the verify images): the white-box
  columns crafted on it search with another model's gradients, so they are upper bounds, not the artifact's
  white-box robustness.
- A black-box attack beating the white-box ones on the same model: with honest gradients a white-box attack is at
  least as strong, so this is the classic sign of gradient masking (threshold: AutoAttack's 0.2 points, or the
  paired 95 % interval when that is wider).

Each check returns a warning string (or nothing); verify puts them in the table and the JSON, never raises.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from rslad_edge.attacks import attack_loss
from rslad_edge.attacks.autoattack import AUTOATTACK_LOGGER
from rslad_edge.runtime.twin import TwinAgreement
from rslad_edge.verify.targets import Model

PROBABILITY_TOLERANCE = 1e-3  # int8 / fp16 outputs of a softmax sum to 1 only up to rounding
MASKING_MARGIN = 0.002  # AutoAttack's check_square_sr alpha: 0.2 points of robust accuracy


def probability_output_warning(model: Model, logits: torch.Tensor) -> str | None:
    """A warning when every output row lies in [0, 1] and sums to 1: probabilities where logits are expected."""
    if logits.numel() == 0:
        return None
    in_unit_range = bool(logits.min() > -PROBABILITY_TOLERANCE) and bool(logits.max() < 1 + PROBABILITY_TOLERANCE)
    sums_to_one = bool(((logits.sum(dim=1) - 1).abs() < PROBABILITY_TOLERANCE).all())
    if in_unit_range and sums_to_one:
        return (f"{model.label}: its outputs look like probabilities (every row in [0, 1], summing to 1), not "
                "logits: attack losses and margins on probabilities understate robustness; export the logits")
    return None


def untrusted_twin_warning(label: str, agreement: TwinAgreement) -> str | None:
    """A warning when the twin that crafts an artifact's white-box attacks predicts other classes than the artifact."""
    if agreement.trusted:
        return None
    return (f"{label}: its differentiable twin agrees with it on only {agreement.agreement:.1%} of {agreement.n} "
            f"images (max |logit difference| {agreement.max_abs_logit_diff:.3g}; trusted from "
            f"{agreement.threshold:.0%}): the white-box columns may be crafted on gradients of another function, so "
            "they are upper bounds (an int8 graph whose predictions change with float rounding order parts from its "
            "twin this way too: benchmarks/int8_error_sources.py tells)")


def zero_gradient_warning(model: Model, x: torch.Tensor, y: torch.Tensor) -> str | None:
    """A warning when some of the (clean-correct) samples ``x`` get an all-zero input gradient of the cross-entropy."""
    if model.model_fn is None or x.shape[0] == 0:
        return None
    inputs = x.to(model.device).requires_grad_(True)
    with torch.enable_grad():
        loss = attack_loss(model.model_fn(inputs), y.to(model.device), "ce")
        (input_grad,) = torch.autograd.grad(loss, [inputs])
    zero = int((input_grad.flatten(1).abs().sum(dim=1) == 0).sum())
    if zero == 0:
        return None
    return (f"{model.label}: {zero} of {x.shape[0]} correctly classified images have an all-zero input gradient; "
            "gradient attacks cannot move them (saturated softmax or a non-differentiable op): robust accuracy "
            "from gradient attacks is only an upper bound; trust Square on these")


def gradient_masking_warnings(
    label: str, robust_correct: Mapping[str, torch.Tensor], white_box: set[str], black_box: set[str]
) -> list[str]:
    """Warnings for each black-box attack whose robust accuracy is below the strongest white-box one's.

    "Below" means by more than AutoAttack's 0.2 points *and* more than the 95 % interval of the paired difference
    over these images: on a few hundred images, one or two samples either way is noise, not masking.
    """
    measured_white = {name: robust_correct[name] for name in white_box if name in robust_correct}
    if not measured_white:
        return []
    strongest_name = min(measured_white, key=lambda name: int(measured_white[name].sum()))
    strongest = measured_white[strongest_name]
    warnings = []
    for name in sorted(black_box & set(robust_correct)):
        difference = strongest.double() - robust_correct[name].double()  # (N,) in {-1, 0, 1}
        gap = float(difference.mean())
        noise = 1.96 * float(difference.std()) / math.sqrt(len(difference)) if len(difference) > 1 else 0.0
        if gap > max(MASKING_MARGIN, noise):
            warnings.append(
                f"{label}: black-box {name} ({_mean(robust_correct[name]):.1%}) beat the strongest white-box attack "
                f"{strongest_name} ({_mean(strongest):.1%}) by {100 * gap:.1f} points: a sign of gradient masking; "
                "the white-box figures overstate robustness"
            )
    return warnings


def _mean(flags: torch.Tensor) -> float:
    return int(flags.sum()) / flags.numel() if flags.numel() else float("nan")


@contextmanager
def autoattack_warnings(sink: list[str], label: str) -> Iterator[None]:
    """Collect the WARNING records of the official AutoAttack (randomized / dynamic defense, probabilities, Square
    beating the rest) into ``sink``, prefixed with ``label``, while they still propagate to the log."""

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            sink.append(f"{label}: AutoAttack: {record.getMessage()}")

    handler = _Collect(level=logging.WARNING)
    aa_logger = logging.getLogger(AUTOATTACK_LOGGER)
    aa_logger.addHandler(handler)
    try:
        yield
    finally:
        aa_logger.removeHandler(handler)
