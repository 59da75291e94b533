"""The training attack (inner maximisation) as the authors' training loops run it.

It is :func:`rslad_edge.attacks.pgd` (same losses, same sign step, same projection onto the eps-ball and [0, 1],
same random draws from ``generator``) but for one thing: the random start is **not** clamped to [0, 1]. The training
loops of RSLAD (``rslad_inner_loss``), TRADES (``trades_loss``), ARD and IAD (``AttackPGD``) take their first
gradient at ``x + noise`` as drawn, slightly outside [0, 1] where a pixel is saturated; only the steps are projected
and clamped. Evaluation PGD (RSLAD's own ``attack_pgd``, the verify stage) clamps the start, as ``attacks.pgd`` does.
The difference is not cosmetic: from the same noise, 5 steps on a batch with saturated rows gave x' differing in 45%
of its pixels (and in none on images away from 0 and 1); ``tests/test_distill_reference.py`` checks this loop
against transcriptions of the authors' loops. (A ``clamp_start`` option of ``attacks.pgd`` would make this file
unnecessary.)
"""

from __future__ import annotations

import torch

from rslad_edge.attacks import NORMAL_START_STD, ModelFn, attack_loss, check_eps


def training_attack(
    model_fn: ModelFn,
    x: torch.Tensor,
    y: torch.Tensor | None,
    *,
    eps: float,
    step_size: float,
    steps: int,
    loss: str,
    random_start: str,
    target_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x' (detached, within the eps-ball of ``x`` and [0, 1]) after ``steps`` sign steps ascending ``loss``.

    ``random_start``: ``"uniform"`` (x + U(-eps, eps): SAT, ARD, IAD) or ``"normal"`` (x + 0.001·N(0, 1): RSLAD,
    TRADES), unclamped. ``loss`` and ``target_probs`` as in :func:`rslad_edge.attacks.attack_loss`; the caller owns
    the model's mode and autocast.
    """
    eps = check_eps(eps)
    step_size = check_eps(step_size, name="--step-size")
    x = x.detach()
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)  # the eps-ball intersected with [0, 1]
    if random_start == "uniform":
        x_adv = x + torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    elif random_start == "normal":
        x_adv = x + NORMAL_START_STD * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    else:
        raise ValueError(f"random_start must be 'uniform' or 'normal', got {random_start!r}")

    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            objective = attack_loss(model_fn(x_adv), y, loss, target_probs=target_probs)
            (input_grad,) = torch.autograd.grad(objective, [x_adv])
            x_adv = x_adv.detach() + step_size * input_grad.sign()
            x_adv = torch.min(torch.max(x_adv, lower), upper)
    # A no-op after any step; with steps=0 it returns the start clamped, as the authors' loops return it.
    return torch.min(torch.max(x_adv, lower), upper).detach()
