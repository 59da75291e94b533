"""Adversarial attacks shared by training (distill) and evaluation (verify).

Every attack is a pure function ``attack(model_fn, x, y, *, eps, ...) -> x_adv``: inputs float32 NCHW in [0, 1]
(normalisation lives inside the model), eps in pixel units (8/255), gradients w.r.t. the input only, each step
projected onto the eps-ball and clamped to [0, 1]. The caller owns the model's mode, autocast and device.
"""

from rslad_edge.attacks.autoattack import autoattack
from rslad_edge.attacks.divergence import divergence, divergence_examples, divergence_objective
from rslad_edge.attacks.eps import check_eps, parse_eps
from rslad_edge.attacks.evaluate import (
    AttackOutcome,
    accuracy,
    adversarial_examples,
    evaluate_attack,
    predict_labels,
    robust_correct,
)
from rslad_edge.attacks.fgsm import fgsm
from rslad_edge.attacks.losses import CW_CONFIDENCE, attack_loss, cw_margin_loss
from rslad_edge.attacks.pgd import NORMAL_START_STD, ModelFn, pgd
from rslad_edge.attacks.presets import ATTACK_PRESETS, AttackSpec, get_attack, run_white_box
from rslad_edge.attacks.square import SquareResult, square

__all__ = [
    "ATTACK_PRESETS",
    "CW_CONFIDENCE",
    "NORMAL_START_STD",
    "AttackOutcome",
    "AttackSpec",
    "ModelFn",
    "SquareResult",
    "accuracy",
    "adversarial_examples",
    "attack_loss",
    "autoattack",
    "check_eps",
    "cw_margin_loss",
    "divergence",
    "divergence_examples",
    "divergence_objective",
    "evaluate_attack",
    "fgsm",
    "get_attack",
    "parse_eps",
    "pgd",
    "predict_labels",
    "robust_correct",
    "run_white_box",
    "square",
]
