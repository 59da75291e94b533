"""Outer (training) losses of RSLAD and its baselines, as small pure functions of logits.

Each ``*_terms`` function returns :class:`LossTerms`: the total in the form its authors wrote it (batchmean KL) and
its named parts, which ``metrics.jsonl`` records per epoch. Where the authors' code reduced a KL differently
(RSLAD: batchmean / 10, ARD: batchmean / C), ``kl_scale`` multiplies that KL in the total (``--loss-scale authors``,
see ``methods.kl_scale_factor``); the terms stay batchmean. ``rslad_loss`` is RSLAD's total alone. Shapes: logits
(B, C), labels (B,).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossTerms:
    """``total``: the scalar the method minimises. ``terms``: its parts by name, each a scalar without the method's
    weights (alpha, beta) and loss scale, so that their values compare across methods and settings."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]


def kl_batchmean(target_logits: torch.Tensor, input_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(target/τ) ‖ softmax(input/τ)), summed over classes, averaged over the batch; float32."""
    return F.kl_div(
        F.log_softmax(input_logits.float() / temperature, dim=1),
        F.softmax(target_logits.float() / temperature, dim=1),
        reduction="batchmean",
    )


def kl_per_sample(target_logits: torch.Tensor, input_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) ‖ softmax(input)) per sample, (B,)."""
    return F.kl_div(
        F.log_softmax(input_logits.float(), dim=1), F.softmax(target_logits.float(), dim=1), reduction="none"
    ).sum(dim=1)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SAT (on x') and natural training (on x)."""
    return F.cross_entropy(logits.float(), labels)


def rslad_terms(
    student_adv_logits: torch.Tensor,
    student_clean_logits: torch.Tensor,
    teacher_clean_logits: torch.Tensor,
    alpha: float = 5 / 6,
    kl_scale: float = 1.0,
) -> LossTerms:
    """RSLAD: the teacher's clean soft labels replace every hard label.

    ``alpha·KL(T(x) ‖ S(x')) + (1 − alpha)·KL(T(x) ‖ S(x))``, batchmean KL at temperature 1, times ``kl_scale``. The
    authors' code averages the elementwise KL over batch × classes (CIFAR-10), i.e. ``kl_scale`` = 1/10.
    """
    teacher_clean_logits = teacher_clean_logits.detach()
    kl_adv = kl_batchmean(teacher_clean_logits, student_adv_logits)
    kl_clean = kl_batchmean(teacher_clean_logits, student_clean_logits)
    total = kl_scale * (alpha * kl_adv + (1 - alpha) * kl_clean)
    return LossTerms(total, {"kl_adv": kl_adv, "kl_clean": kl_clean})


def rslad_loss(
    student_adv_logits: torch.Tensor,
    student_clean_logits: torch.Tensor,
    teacher_clean_logits: torch.Tensor,
    alpha: float = 5 / 6,
) -> torch.Tensor:
    """The total of :func:`rslad_terms`."""
    return rslad_terms(student_adv_logits, student_clean_logits, teacher_clean_logits, alpha).total


def ard_terms(
    student_adv_logits: torch.Tensor,
    teacher_clean_logits: torch.Tensor,
    student_clean_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float = 1.0,
    temperature: float = 30.0,
    kl_scale: float = 1.0,
) -> LossTerms:
    """ARD (Goldblum et al.): ``α·τ²·KL(T^τ(x) ‖ S^τ(x'))·kl_scale + (1 − α)·CE(S(x), y)``. The authors'
    ``nn.KLDivLoss()`` is the batchmean KL / C (``kl_scale`` = 1/C); their cross-entropy is a plain batch mean.
    Terms: ``kl_adv`` = τ²·KL (batchmean), ``ce_clean`` if α < 1."""
    kl_adv = temperature**2 * kl_batchmean(teacher_clean_logits.detach(), student_adv_logits, temperature)
    terms = {"kl_adv": kl_adv}
    total = alpha * kl_scale * kl_adv
    if alpha < 1:
        terms["ce_clean"] = cross_entropy(student_clean_logits, labels)
        total = total + (1 - alpha) * terms["ce_clean"]
    return LossTerms(total, terms)


def iad_terms(
    student_adv_logits: torch.Tensor,
    student_clean_logits: torch.Tensor,
    teacher_clean_logits: torch.Tensor,
    teacher_adv_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    introspect: bool,
    alpha: float = 1.0,
    temperature: float = 1.0,
    beta: float = 0.1,
) -> LossTerms:
    """IAD-I (Zhu et al.): the ARD term, plus from epoch ``begin`` a self-distillation term weighted per sample by
    how little the teacher is to be trusted on x': ``(1 − P_T(y | x')^β)·KL(S(x) ‖ S(x'))``.

    As in the authors' code, KL is batchmean here, the student's clean distribution is not detached, and the
    teacher's trust ``P_T(y | x')^β`` is a constant (no gradient). Terms: ``kl_adv`` (τ²·KL), ``introspection``
    (from ``begin`` on), ``ce_clean`` (if α < 1).
    """
    kl_adv = temperature**2 * kl_batchmean(teacher_clean_logits.detach(), student_adv_logits, temperature)
    terms = {"kl_adv": kl_adv}
    total = alpha * kl_adv
    if introspect:
        teacher_trust = F.softmax(teacher_adv_logits.detach().float(), dim=1).gather(1, labels[:, None])[:, 0] ** beta
        self_kl = kl_per_sample(student_clean_logits, student_adv_logits)  # (B,)
        terms["introspection"] = (self_kl * (1 - teacher_trust)).mean()
        total = total + alpha * terms["introspection"]
    if alpha < 1:
        terms["ce_clean"] = cross_entropy(student_clean_logits, labels)
        total = total + (1 - alpha) * terms["ce_clean"]
    return LossTerms(total, terms)


def trades_terms(
    student_adv_logits: torch.Tensor, student_clean_logits: torch.Tensor, labels: torch.Tensor, beta: float = 6.0
) -> LossTerms:
    """TRADES (Zhang et al.): ``CE(f(x), y) + β·KL(f(x) ‖ f(x'))``, KL summed and divided by the batch size; the
    clean distribution is not detached (as in their code)."""
    ce_clean = cross_entropy(student_clean_logits, labels)
    kl_adv = kl_batchmean(student_clean_logits, student_adv_logits)
    return LossTerms(ce_clean + beta * kl_adv, {"ce_clean": ce_clean, "kl_adv": kl_adv})


def kd_terms(
    student_clean_logits: torch.Tensor,
    teacher_clean_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.9,
    temperature: float = 4.0,
) -> LossTerms:
    """Hinton KD: ``α·τ²·KL(T^τ(x) ‖ S^τ(x)) + (1 − α)·CE(S(x), y)``. Terms: ``kl_clean`` (τ²·KL), ``ce_clean``."""
    kl_clean = temperature**2 * kl_batchmean(teacher_clean_logits.detach(), student_clean_logits, temperature)
    ce_clean = cross_entropy(student_clean_logits, labels)
    return LossTerms(alpha * kl_clean + (1 - alpha) * ce_clean, {"kl_clean": kl_clean, "ce_clean": ce_clean})
