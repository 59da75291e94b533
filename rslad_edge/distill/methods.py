"""The training methods: RSLAD and the paper's baselines, each as an inner-max objective plus an outer loss.

A method says which attack crafts x' (loss, start, BN mode of the student during the attack), which forwards the
outer loss needs, the loss itself, and its authors' defaults. The trainer reads nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rslad_edge.distill import losses
from rslad_edge.errors import unknown_name_error


@dataclass(frozen=True)
class StepLogits:
    """Everything an outer loss may need from one batch; fields a method does not need are None. (B, C) each."""

    labels: torch.Tensor
    student_adv: torch.Tensor | None = None
    student_clean: torch.Tensor | None = None
    teacher_clean: torch.Tensor | None = None
    teacher_adv: torch.Tensor | None = None


LossFn = Callable[[StepLogits, dict[str, float], int, float], losses.LossTerms]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    needs_teacher: bool
    loss: LossFn  # (logits, hyperparameters, 1-based epoch, kl_scale) -> the total and its named terms
    # Inner maximisation: None for methods without adversarial examples (natural, kd).
    attack_loss: str | None = None  # "ce" (vs labels) or "kl" (vs the clean soft labels below)
    attack_target: str | None = None  # "teacher": T(x) probabilities; "self": the student's own f(x)
    random_start: str = "uniform"  # "uniform" in the eps-ball, or "normal": x + 0.001·N(0, 1)
    attack_bn_mode: str = "eval"  # the student's BN mode while crafting x', as in the authors' code
    needs: frozenset[str] = frozenset()  # forwards besides the attack: student_adv, student_clean, teacher_adv
    hyperparameters: dict[str, float] = field(default_factory=dict)  # authors' defaults; --alpha etc. override
    # num_classes -> the factor by which the authors' code scales this method's KL term(s) relative to batchmean
    # (their lr and weight decay were tuned at that scale); applied under --loss-scale authors (kl_scale_factor).
    authors_kl_scale: Callable[[int], float] = lambda num_classes: 1.0
    # The method's own recipe under --preset paper, as its authors' code runs it (README: "Schedules").
    paper_overrides: dict[str, Any] = field(default_factory=dict)


def _rslad(logits: StepLogits, hp: dict[str, float], epoch: int, kl_scale: float) -> losses.LossTerms:
    return losses.rslad_terms(logits.student_adv, logits.student_clean, logits.teacher_clean, alpha=hp["alpha"],
                              kl_scale=kl_scale)


def _ard(logits: StepLogits, hp: dict[str, float], epoch: int, kl_scale: float) -> losses.LossTerms:
    return losses.ard_terms(
        logits.student_adv, logits.teacher_clean, logits.student_clean, logits.labels, hp["alpha"], hp["temperature"],
        kl_scale=kl_scale,
    )


# The methods below have no KL whose authors' reduction differs from batchmean: kl_scale is always 1 for them.


def _iad(logits: StepLogits, hp: dict[str, float], epoch: int, kl_scale: float) -> losses.LossTerms:
    return losses.iad_terms(
        logits.student_adv, logits.student_clean, logits.teacher_clean, logits.teacher_adv, logits.labels,
        # epoch is 1-based here; the authors test their 0-based epoch >= begin.
        introspect=epoch > hp["begin"], alpha=hp["alpha"], temperature=hp["temperature"], beta=hp["beta"],
    )


def _sat(logits: StepLogits, hp: dict[str, float], epoch: int, kl_scale: float) -> losses.LossTerms:
    ce_adv = losses.cross_entropy(logits.student_adv, logits.labels)
    return losses.LossTerms(ce_adv, {"ce_adv": ce_adv})


def _trades(logits: StepLogits, hp: dict[str, float], epoch: int, kl_scale: float) -> losses.LossTerms:
    return losses.trades_terms(logits.student_adv, logits.student_clean, logits.labels, beta=hp["beta"])


def _kd(logits: StepLogits, hp: dict[str, float], epoch: int, kl_scale: float) -> losses.LossTerms:
    return losses.kd_terms(logits.student_clean, logits.teacher_clean, logits.labels, hp["alpha"], hp["temperature"])


def _natural(logits: StepLogits, hp: dict[str, float], epoch: int, kl_scale: float) -> losses.LossTerms:
    ce_clean = losses.cross_entropy(logits.student_clean, logits.labels)
    return losses.LossTerms(ce_clean, {"ce_clean": ce_clean})


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "rslad", "RSLAD: teacher's clean soft labels in the attack and both loss terms (Zi et al., ICCV 2021)",
            needs_teacher=True, loss=_rslad, attack_loss="kl", attack_target="teacher", random_start="normal",
            attack_bn_mode="eval", needs=frozenset({"student_adv", "student_clean"}),
            hyperparameters={"alpha": 5 / 6},
            # The authors average the elementwise KL over batch x classes: batchmean / 10 on CIFAR-10, and multiply
            # by 10 on CIFAR-100 (elementwise mean over 100 classes x 10): batchmean / 10 in both cases.
            authors_kl_scale=lambda num_classes: 0.1,
        ),
        Method(
            "ard", "ARD: tempered KL to the teacher on PGD examples (Goldblum et al., AAAI 2020)",
            needs_teacher=True, loss=_ard, attack_loss="ce", random_start="uniform", attack_bn_mode="train",
            needs=frozenset({"student_adv", "student_clean"}),
            hyperparameters={"alpha": 1.0, "temperature": 30.0},
            # 200 epochs, "lr x0.1 at 100 and 150" in 0-based epochs; adjust_learning_rate scales a local copy of the
            # initial lr, so 150 sets 0.01 again: 0.1 for 1-based epochs 1-100, 0.01 from 101 to the end.
            paper_overrides={"epochs": 200, "milestones": [101]},
            # nn.KLDivLoss() in the authors' code averages over batch x classes: batchmean / C (their CE is a plain
            # batch mean, unscaled).
            authors_kl_scale=lambda num_classes: 1.0 / num_classes,
        ),
        Method(
            "iad", "IAD-I: ARD plus introspection where the teacher is unreliable (Zhu et al., ICLR 2022)",
            needs_teacher=True, loss=_iad, attack_loss="ce", random_start="uniform", attack_bn_mode="train",
            needs=frozenset({"student_adv", "student_clean", "teacher_adv"}),
            hyperparameters={"alpha": 1.0, "temperature": 1.0, "beta": 0.1, "begin": 60},
            paper_overrides={"epochs": 200, "milestones": [101]},  # ARD's code, and its schedule, as ARD above
        ),
        Method(
            "sat", "SAT: Madry PGD adversarial training with cross-entropy", needs_teacher=False, loss=_sat,
            attack_loss="ce", random_start="uniform", attack_bn_mode="train", needs=frozenset({"student_adv"}),
        ),
        Method(
            "trades", "TRADES: CE on clean + beta x KL(f(x) || f(x')) (Zhang et al., ICML 2019)", needs_teacher=False,
            loss=_trades, attack_loss="kl", attack_target="self", random_start="normal", attack_bn_mode="eval",
            needs=frozenset({"student_adv", "student_clean"}), hyperparameters={"beta": 6.0},
            # train_trades_cifar10.py: 1-based epochs, lr x0.1 from epoch 75; 76 epochs for CIFAR-10.
            paper_overrides={"step_size": 0.007, "epochs": 76, "milestones": [75]},
        ),
        Method(
            "kd", "Hinton knowledge distillation on clean images (no adversarial examples)", needs_teacher=True,
            loss=_kd, needs=frozenset({"student_clean"}), hyperparameters={"alpha": 0.9, "temperature": 4.0},
        ),
        Method(
            "natural", "Natural training with cross-entropy (the non-robust baseline)", needs_teacher=False,
            loss=_natural, needs=frozenset({"student_clean"}),
        ),
    ]
}


def kl_scale_factor(method: Method, loss_scale: str, num_classes: int) -> float:
    """The factor on the method's KL term(s): the authors' under ``--loss-scale authors``, 1 under ``batchmean``.
    Only RSLAD (1/10, both terms) and ARD (1/C, its KL term) differ between the two."""
    return method.authors_kl_scale(num_classes) if loss_scale == "authors" else 1.0


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise unknown_name_error("--method", name, METHODS)
    return METHODS[name]

