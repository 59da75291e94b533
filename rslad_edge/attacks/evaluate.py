"""Clean and robust accuracy, per sample, as AutoAttack counts it: the project's one robust-accuracy loop.

A sample is robust to an attack when the model is right on the clean input AND on the adversarial one. Flags are kept
per sample so that verify can AND them across attacks (the per-sample worst case, as ``run_standard_evaluation``
does across its four attacks) and compare artifacts sample by sample. Samples already misclassified are not attacked
(``only_correct=True``): they cannot become robust, and on a robust model this skips ~15-20 % of the work.

Who calls what:

- distill's per-epoch check, ``robust_correct(student, x, y, "pgd_trades", ...)``: what RSLAD's own training script
  measures every epoch (``attack_pgd(attack_iters=20, step_size=0.003, epsilon=8/255)``, uniform start, CE);
- verify, :func:`evaluate_attack` per model and attack, with the clean flags it already has, the model's own
  runtime as the judge (``predict``) and Square's query counts; and :func:`adversarial_examples` to craft transfer
  examples on a source model once, for every target to be judged on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from rslad_edge.attacks.autoattack import autoattack
from rslad_edge.attacks.eps import check_eps
from rslad_edge.attacks.pgd import ModelFn
from rslad_edge.attacks.presets import AttackSpec, get_attack, run_white_box
from rslad_edge.attacks.square import square
from rslad_edge.errors import ConfigError

LabelFn = Callable[[torch.Tensor], torch.Tensor]  # images (any device) -> arg-max labels (N,) int64 on the CPU
ProgressFn = Callable[[int, int], None]  # (completed, total): images for gradient attacks, queries for Square


class AttackOutcome(NamedTuple):
    """What one attack did to one model: per-sample robust flags, and Square's queries per sample."""

    robust_correct: torch.Tensor  # (N,) bool on the CPU: correct on the clean input and on the adversarial one
    queries: torch.Tensor | None  # (N,) int64: Square's queries per sample (0 where not attacked); None otherwise


def predict_labels(
    model_fn: ModelFn, x: torch.Tensor, *, batch_size: int = 256, device: torch.device | str | None = None
) -> torch.Tensor:
    """Arg-max predictions ``(N,)`` int64 on the CPU, computed in batches on ``device`` (default: ``x.device``)."""
    _check_batch_size(batch_size)
    device = torch.device(device) if device is not None else x.device
    predictions = torch.empty(x.shape[0], dtype=torch.long)
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            batch = x[start : start + batch_size].to(device)
            predictions[start : start + batch_size] = model_fn(batch).argmax(dim=1).cpu()
    return predictions


def accuracy(
    model_fn: ModelFn,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 256,
    *,
    device: torch.device | str | None = None,
) -> float:
    """Clean accuracy in [0, 1] (NaN for an empty set)."""
    if x.shape[0] == 0:
        return float("nan")
    correct = predict_labels(model_fn, x, batch_size=batch_size, device=device) == y.cpu()
    return correct.float().mean().item()


def robust_correct(
    model_fn: ModelFn,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str | AttackSpec,
    *,
    eps: float,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    only_correct: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-sample flags ``(N,)`` bool on the CPU: correct on the clean input AND on the adversarial example.

    :func:`evaluate_attack` without its verify-only options; see there for the arguments.
    """
    return evaluate_attack(
        model_fn, x, y, attack, eps=eps, batch_size=batch_size, generator=generator, only_correct=only_correct,
        device=device,
    ).robust_correct


def evaluate_attack(
    model_fn: ModelFn,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str | AttackSpec,
    *,
    eps: float,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    only_correct: bool = True,
    device: torch.device | str | None = None,
    clean_correct: torch.Tensor | None = None,
    predict: LabelFn | None = None,
    progress: ProgressFn | None = None,
) -> AttackOutcome:
    """Run ``attack`` on the samples to attack and judge every adversarial example.

    Args:
        model_fn: ``x -> logits``; its mode (eval), autocast and device are the caller's choice. For ``"square"``
            it is only queried for logits, so it may wrap an ONNX Runtime / TensorRT runner.
        x, y: inputs (float NCHW in [0, 1]) and labels; they may live on the CPU, batches move to ``device``.
        attack: a preset name (``fgsm``, ``pgd_sat``, ``pgd_trades``, ``cw``, ``autoattack``, ``square``) or a spec.
        eps: L-inf budget in pixel units (8/255).
        batch_size: samples per attack batch (FGSM, PGD, and each AutoAttack call). Square sends every sample it
            attacks to ``model_fn`` in one call per query: batching is then the runtime's business.
        generator: for the random starts of PGD (a ``torch.Generator`` on ``device``).
        only_correct: attack only the clean-correct samples (same flags, less work); False attacks every sample.
        device: where the model runs; default ``x.device``.
        clean_correct: ``(N,)`` bool clean flags when the caller has them already; default: computed by ``predict``.
        predict: the judge, ``images -> labels``; default: arg-max of ``model_fn`` in batches on ``device``. Verify
            passes the artifact's runtime, so that what is measured is what runs.
        progress: called as ``progress(completed, total)``: in images, or in queries for Square.
    """
    spec = get_attack(attack) if isinstance(attack, str) else attack
    eps = check_eps(eps)
    _check_batch_size(batch_size)
    device = torch.device(device) if device is not None else x.device
    if predict is None:
        def predict(images: torch.Tensor) -> torch.Tensor:
            return predict_labels(model_fn, images, batch_size=batch_size, device=device)

    y_cpu = y.to(device="cpu", dtype=torch.long)
    if clean_correct is None:
        clean_correct = predict(x) == y_cpu  # (N,)
    robust = clean_correct.clone()
    to_attack = clean_correct.nonzero().flatten() if only_correct else torch.arange(x.shape[0])

    if spec.kind == "square":
        queries = torch.zeros(x.shape[0], dtype=torch.long)
        if to_attack.numel() == 0:
            return AttackOutcome(robust, queries)
        result = square(
            model_fn, x[to_attack].to(device), y_cpu[to_attack].to(device), eps=eps, n_queries=spec.n_queries,
            p_init=spec.p_init, seed=spec.seed, progress=progress, schedule=spec.square_schedule,
        )
        robust[to_attack] &= predict(result.x_adv) == y_cpu[to_attack]  # re-judged: what the model says, not Square
        queries[to_attack] = result.queries
        return AttackOutcome(robust, queries)

    if progress is not None:
        progress(0, to_attack.numel())
    for start in range(0, to_attack.numel(), batch_size):
        batch_index = to_attack[start : start + batch_size]
        x_batch, y_batch = x[batch_index].to(device), y_cpu[batch_index].to(device)
        x_adv = _attack_batch(spec, model_fn, x_batch, y_batch, eps=eps, batch_size=batch_size, generator=generator)
        robust[batch_index] &= predict(x_adv) == y_cpu[batch_index]
        if progress is not None:
            progress(min(start + batch_size, to_attack.numel()), to_attack.numel())
    return AttackOutcome(robust, None)


def adversarial_examples(
    model_fn: ModelFn,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str | AttackSpec,
    *,
    eps: float,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Adversarial images (on the CPU, like ``x``) of a gradient attack (or AutoAttack) run on ``model_fn``, in
    batches on ``device``: how transfer examples are crafted on a source model for other models to be judged on."""
    spec = get_attack(attack) if isinstance(attack, str) else attack
    eps = check_eps(eps)
    _check_batch_size(batch_size)
    device = torch.device(device) if device is not None else x.device
    crafted = torch.empty_like(x, device="cpu")
    if progress is not None:
        progress(0, x.shape[0])
    for start in range(0, x.shape[0], batch_size):
        part = slice(start, start + batch_size)
        x_batch, y_batch = x[part].to(device), y[part].to(device=device, dtype=torch.long)
        crafted[part] = _attack_batch(spec, model_fn, x_batch, y_batch, eps=eps, batch_size=batch_size,
                                      generator=generator).cpu()
        if progress is not None:
            progress(min(start + batch_size, x.shape[0]), x.shape[0])
    return crafted


def _attack_batch(
    spec: AttackSpec, model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor, *, eps: float, batch_size: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One batch of a gradient attack: AutoAttack (which batches internally), or FGSM / PGD (ConfigError for the
    query attacks, which :func:`evaluate_attack` runs on the whole set at once)."""
    if spec.kind == "autoattack":
        return autoattack(model_fn, x, y, eps=eps, version=spec.version, batch_size=batch_size, seed=spec.seed)
    return run_white_box(spec, model_fn, x, y, eps=eps, generator=generator)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}.")
