"""The divergence attack: adversarial images that fool the edge model while the float model stays right.

An exported model (int8, fp16) computes almost, but not exactly, what its float checkpoint computes. DIVA
(Hao et al. 2022, "A Tale of Two Models: Constructing Evasive Attacks on Edge Models", arXiv 2204.10933) searches
the eps-ball for the inputs where the two differ most: it ascends

    p_float(x')_y - c * p_edge(x')_y        (softmax probabilities of the true class, c = 1 here)

so the edge model loses the true class while the float model keeps it. Such an input passes every check done on the
float model (validation, debugging, the white-box table of the checkpoint) and still fools the deployed model.
The edge model's gradient comes from its differentiable twin (:mod:`rslad_edge.runtime.twin`); what counts is how
often the artifact itself, judged by its own runtime, is fooled where the float model is not.

The search is the PGD loop of :func:`rslad_edge.attacks.pgd.ascend` (20 steps of 2/255, uniform start: the budget
of ``pgd_sat``), so its cost is that of PGD-20 on both models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rslad_edge.attacks.eps import check_eps
from rslad_edge.attacks.pgd import ModelFn, ascend
from rslad_edge.attacks.presets import AttackSpec

EDGE_WEIGHT = 1.0  # c: how much lowering the edge model's true-class probability counts against keeping the float's
ProgressFn = Callable[[int, int], None]


def divergence_objective(
    float_logits: torch.Tensor, edge_logits: torch.Tensor, y: torch.Tensor, *, edge_weight: float = EDGE_WEIGHT
) -> torch.Tensor:
    """Summed ``p_float(x')_y - c * p_edge(x')_y`` over the batch, in float32 (DIVA's objective)."""
    float_true = F.softmax(float_logits.float(), dim=1).gather(1, y[:, None]).squeeze(1)  # (N,)
    edge_true = F.softmax(edge_logits.float(), dim=1).gather(1, y[:, None]).squeeze(1)  # (N,)
    return (float_true - edge_weight * edge_true).sum()


def divergence(
    float_fn: ModelFn,
    edge_fn: ModelFn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step_size: float = 2 / 255,
    steps: int = 20,
    random_start: str = "uniform",
    generator: torch.Generator | None = None,
    edge_weight: float = EDGE_WEIGHT,
) -> torch.Tensor:
    """``x_adv`` in the eps-ball (and [0, 1]) that ascends :func:`divergence_objective`; detached, like ``x``.

    ``float_fn``: the float model's logits; ``edge_fn``: the edge model's (its twin's) logits, both differentiable.
    """
    eps = check_eps(eps)
    step_size = check_eps(step_size, name="divergence step_size")
    y = y.to(device=x.device, dtype=torch.long)

    def objective(x_adv: torch.Tensor) -> torch.Tensor:
        return divergence_objective(float_fn(x_adv), edge_fn(x_adv), y, edge_weight=edge_weight)

    return ascend(objective, x, eps=eps, step_size=step_size, steps=steps, random_start=random_start,
                  generator=generator)


def divergence_examples(
    float_fn: ModelFn,
    edge_fn: ModelFn,
    x: torch.Tensor,
    y: torch.Tensor,
    spec: AttackSpec,
    *,
    eps: float,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Divergence images (on the CPU, like ``x``) for every sample, in batches on ``device``, with the step budget of
    ``spec`` (the ``divergence`` preset)."""
    device = torch.device(device) if device is not None else x.device
    crafted = torch.empty_like(x, device="cpu")
    if progress is not None:
        progress(0, x.shape[0])
    for start in range(0, x.shape[0], batch_size):
        part = slice(start, start + batch_size)
        assert spec.step_size is not None  # checked by AttackSpec
        crafted[part] = divergence(
            float_fn, edge_fn, x[part].to(device), y[part].to(device), eps=eps, step_size=spec.step_size,
            steps=spec.steps, random_start=spec.random_start, generator=generator,
        ).cpu()
        if progress is not None:
            progress(min(start + batch_size, x.shape[0]), x.shape[0])
    return crafted
