"""L-inf projected gradient descent (Madry et al. 2018), the attack of both training and evaluation.

One function covers the inner maximisation of every method in RSLAD.md and the white-box rows of its evaluation:

| use | loss | start | steps x step |
|---|---|---|---|
| RSLAD inner max (teacher's clean probs) | ``"kl"`` | ``"normal"`` | 10 x 2/255 |
| TRADES inner max (model's own clean probs) | ``"kl"`` | ``"normal"`` | 10 x 0.007 |
| SAT / ARD / IAD inner max | ``"ce"`` | ``"uniform"`` | 10 x 2/255 |
| PGD_SAT / PGD_TRADES / CW∞ evaluation | ``"ce"`` / ``"cw"`` | ``"uniform"`` | 20 x 2/255 / 0.003 |

Each step is the canonical one of ``rslad_inner_loss`` and ``trades_loss``: ``x' += step_size * sign(grad)``, project
onto the eps-ball around x, clamp to [0, 1]. The gradient is taken with ``torch.autograd.grad`` w.r.t. the input
only, so the model's parameters never receive a ``.grad`` (the training loop's optimizer state stays untouched).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from rslad_edge.attacks.eps import check_eps
from rslad_edge.attacks.losses import CW_CONFIDENCE, LOSS_NAMES, attack_loss
from rslad_edge.errors import ConfigError

ModelFn = Callable[[torch.Tensor], torch.Tensor]
RandomStart = Literal["uniform", "normal", "none"]
RANDOM_STARTS: tuple[str, ...] = ("uniform", "normal", "none")

# The TRADES / RSLAD start: x + 0.001 * N(0, 1). Needed by the KL attacks: at x' = x the KL to the model's own
# clean prediction is at its minimum and its gradient vanishes, so the attack must start slightly off x.
NORMAL_START_STD = 0.001


def pgd(
    model_fn: ModelFn,
    x: torch.Tensor,
    y: torch.Tensor | None,
    *,
    eps: float,
    step_size: float,
    steps: int,
    loss: str = "ce",
    random_start: str = "uniform",
    target_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    cw_confidence: float = CW_CONFIDENCE,
    clamp_start: bool = True,
) -> torch.Tensor:
    """Return ``x_adv`` (detached, dtype and shape of ``x``) with ``|x_adv - x|_inf <= eps`` and values in [0, 1].

    Args:
        model_fn: ``(N, C, H, W) -> (N, classes)`` logits. Called as is: the caller chooses eval/train mode, autocast,
            compilation; the loss is computed in float32 whatever dtype the logits have.
        x: clean inputs, float NCHW in [0, 1].
        y: true labels ``(N,)`` (unused by ``loss="kl"``, may be None then).
        eps: L-inf budget in pixel units (8/255 for the CIFAR protocol).
        step_size: size of each sign step, pixel units (2/255, 0.003, 0.007).
        steps: number of gradient steps (10 in training, 20 in evaluation).
        loss: ``"ce"``, ``"kl"`` (needs ``target_probs``) or ``"cw"``; see :mod:`rslad_edge.attacks.losses`.
        random_start: ``"uniform"`` (x + U(-eps, eps), Madry / the PGD_SAT and PGD_TRADES evaluations),
            ``"normal"`` (x + 0.001 N(0, 1), TRADES / RSLAD) or ``"none"``; the start is clamped to [0, 1].
        target_probs: ``(N, C)`` probabilities for ``loss="kl"``: the teacher's clean soft labels (RSLAD) or the
            model's own detached clean probabilities (TRADES).
        generator: a ``torch.Generator`` on ``x.device`` to make the random start reproducible.
        cw_confidence: κ of the CW margin loss (50 as in the reference evaluation code).
        clamp_start: clamp the random start to the eps-ball and [0, 1] (evaluation PGD: RSLAD's ``attack_pgd``,
            verify). False: the first gradient is taken at ``x + noise`` as drawn, as the training loops of RSLAD,
            TRADES, ARD and IAD do (only their steps are projected); on saturated pixels that changes x'.
    """
    eps = check_eps(eps)
    step_size = check_eps(step_size, name="--step-size")
    if steps < 0:
        raise ConfigError(f"attack steps must be >= 0, got {steps}.")
    if loss not in LOSS_NAMES:
        raise ConfigError(f"unknown attack loss {loss!r}; choose one of {', '.join(LOSS_NAMES)}.")
    if random_start not in RANDOM_STARTS:
        raise ConfigError(f"unknown random start {random_start!r}; choose one of {', '.join(RANDOM_STARTS)}.")

    def objective(x_adv: torch.Tensor) -> torch.Tensor:
        return attack_loss(model_fn(x_adv), y, loss, target_probs=target_probs, cw_confidence=cw_confidence)

    return ascend(objective, x, eps=eps, step_size=step_size, steps=steps, random_start=random_start,
                  generator=generator, clamp_start=clamp_start)


def ascend(
    objective: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    random_start: str = "uniform",
    generator: torch.Generator | None = None,
    clamp_start: bool = True,
) -> torch.Tensor:
    """The PGD loop itself, on any scalar ``objective(x_adv)``: signed steps of ``step_size``, each projected onto the
    eps-ball around ``x`` and clamped to [0, 1]. :func:`pgd` ascends a loss of one model; the divergence attack
    (:mod:`rslad_edge.attacks.divergence`) ascends a function of two. Arguments as in :func:`pgd` (checked there)."""
    x = x.detach()
    if eps == 0:
        return x.clone()
    lower, upper = (x - eps).clamp(min=0), (x + eps).clamp(max=1)  # the eps-ball intersected with [0, 1]
    x_adv = _random_start(x, eps, random_start, generator)
    if clamp_start:
        x_adv = torch.min(torch.max(x_adv.clamp(0.0, 1.0), lower), upper)

    # enable_grad: evaluation loops often run under no_grad, and the input gradient is all this needs.
    with torch.enable_grad():
        for _ in range(steps):
            x_adv.requires_grad_(True)
            (input_grad,) = torch.autograd.grad(objective(x_adv), [x_adv])
            x_adv = x_adv.detach() + step_size * input_grad.sign()
            # min/max against the ball clipped to [0, 1] = project onto the eps-ball, then clamp to [0, 1].
            x_adv = torch.min(torch.max(x_adv, lower), upper)
    return torch.min(torch.max(x_adv, lower), upper).detach()  # a no-op after a step; 0 steps: the start, clamped


def _random_start(x: torch.Tensor, eps: float, random_start: str, generator: torch.Generator | None) -> torch.Tensor:
    if random_start == "uniform":
        noise = torch.empty_like(x).uniform_(-eps, eps, generator=generator)
    elif random_start == "normal":
        noise = NORMAL_START_STD * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    else:
        return x.clone()
    return x + noise
