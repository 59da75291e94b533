"""``verify``: robust accuracy of one artifact (and of a reference on the same images), per sample, per attack.

What runs against what (every adversarial image is judged by the model's own runtime, never by a gradient proxy):

- **white-box** attacks (``fgsm``, ``pgd_sat``, ``pgd_trades``, ``cw``, ``autoattack``) are crafted on each model's
  gradients: a checkpoint's own, an exported artifact's differentiable twin (``runtime/twin.py``: its own graph,
  weights and int8 scales as torch ops). The twin's agreement with the artifact is measured on the verify images
  every time and reported; below 99 % top-1 it is flagged as untrusted. An artifact without a twin (an op the twin
  cannot emulate) skips these columns with a one-line warning naming the op.
- **transfer** attacks are crafted once per source model (default: the reference) on every image that the artifact
  *or* the reference classifies correctly, then the very same adversarial images are evaluated on the artifact (and
  on the reference for sources other than itself: on itself they would only repeat its white-box PGD). With several
  sources, a sample is robust only if it survives the examples of every source.
- **divergence** (DIVA) is crafted on the float reference and the artifact's twin together, to fool the artifact
  while the float model stays right; the artifact gets a robust-accuracy column, and the report counts how often the
  artifact is fooled where the float model is not.
- **square** queries each model's own predictions (ONNX Runtime, TensorRT, PyTorch): the one attack that sees the
  artifact exactly as it runs, masked gradients and all. All still-correct images go to the runtime in one call per
  query, so each query is as large a batch as the runtime takes.

Each attack runs only on the samples its model classifies correctly (a wrong clean prediction cannot become robust),
and each attack is scored on its own, so the table shows the paper's per-attack columns. The worst case is the
per-sample AND across all attacks (AutoAttack's rule). Attacking only the samples that survived the previous attacks
would be cheaper, but would make every column after the first a cumulative figure, so it is not done.

The reference faces what a checkpoint faces on its own (white-box, Square, transfer from other models), so its worst
case is the checkpoint's worst case on these images, and the drop of the worst case compares like with like.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rslad_edge.attacks import (
    AttackSpec,
    ModelFn,
    adversarial_examples,
    divergence_examples,
    evaluate_attack,
    parse_eps,
)
from rslad_edge.attacks.autoattack import AUTOATTACK_VERSIONS
from rslad_edge.attacks.square import DEFAULT_SCHEDULE, SQUARE_SCHEDULES
from rslad_edge.errors import ConfigError, DatasetError
from rslad_edge.runtime import Runner
from rslad_edge.runtime.twin import OnnxTwin, twin_agreement
from rslad_edge.verify.checks import (
    autoattack_warnings,
    gradient_masking_warnings,
    probability_output_warning,
    untrusted_twin_warning,
    zero_gradient_warning,
)
from rslad_edge.verify.report import (
    AttackDetail,
    DivergenceStats,
    ModelResult,
    QueryStats,
    TransferSource,
    VerifyReport,
)
from rslad_edge.verify.suite import VerifyAttack, default_attack_names, parse_attacks
from rslad_edge.verify.targets import Model, as_model

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (task, completed, total): Square in queries, the rest in images
RANGE_TOLERANCE = 1e-3  # as the runtime's input check: float rounding outside [0, 1]


def verify(
    runner: Runner | nn.Module,
    data_x: torch.Tensor | np.ndarray,
    data_y: torch.Tensor | np.ndarray,
    *,
    attacks: str | Sequence[str] | None = None,
    eps: float = 8 / 255,
    reference: Runner | nn.Module | None = None,
    sources: Sequence[Runner | nn.Module] | None = None,
    square_queries: int = 5000,
    square_schedule: str = DEFAULT_SCHEDULE,
    batch_size: int = 256,
    seed: int = 0,
    aa_version: str = "standard",
    progress: ProgressFn | None = None,
) -> VerifyReport:
    """Measure clean and robust accuracy of ``runner`` (and ``reference``) on ``data_x``, ``data_y``.

    Args:
        runner: the artifact: any Runner (``load_runner``), or an ``nn.Module``.
        data_x: images ``(N, C, H, W)``, float32 in [0, 1] (or uint8, converted). data_y: labels ``(N,)``.
        attacks: names (a list or ``"a,b"``), see :mod:`rslad_edge.verify.suite`; None: the white-box suite and
            Square for every artifact, plus transfer when there is a source and divergence when there is a reference.
        eps: L-inf budget in pixel units (8/255).
        reference: the PyTorch model the artifact came from; every figure it applies to is computed for it too, on
            the same images (and the same transfer examples from other sources).
        sources: models to craft transfer examples on; None: ``[reference]``.
        square_queries: Square's query budget per image (5000 in RSLAD's black-box row).
        square_schedule: ``"budget"`` (Square's p schedule compressed to the budget: the strongest measured at 150 to
            5,000 queries) or ``"paper"`` (fixed for 10,000 queries, p_init 0.8: the paper's setting).
        batch_size: images per white-box / crafting batch and per AutoAttack batch.
        seed: seeds PGD's random starts, Square and AutoAttack.
        aa_version: AutoAttack version (``standard``, ``plus``, ``rand``).
        progress: called as ``progress(task, completed, total)`` while attacks run.
    """
    started = time.perf_counter()
    eps = check_verify_options(eps=eps, square_queries=square_queries, batch_size=batch_size, aa_version=aa_version,
                               square_schedule=square_schedule)
    x, y = _as_inputs(data_x, data_y)

    artifact = as_model(runner, batch_size=batch_size)
    ref = as_model(reference, batch_size=batch_size) if reference is not None else None
    _check_same_architecture(artifact, ref)
    source_models = _source_models(sources, ref, batch_size)
    for model in [artifact, *([ref] if ref is not None else []), *source_models]:
        _check_fits(model, x, y, artifact)

    notes: list[str] = []
    if attacks is None:
        names, note = default_attack_names(exported=artifact.gradients != "own", has_reference=ref is not None,
                                           has_source=bool(source_models))
        notes += [note] if note else []
    else:
        names = attacks
    chosen = parse_attacks(names)
    _check_runnable(chosen, artifact, ref, source_models)

    warnings: list[str] = []
    targets: list[_Target] = []
    for model in [artifact, *([ref] if ref is not None else [])]:
        clean_logits = model.logits(x)  # (N, classes)
        result = ModelResult(model.info, clean_correct=clean_logits.argmax(dim=1) == y, gradients=model.gradients,
                             twin_error=model.twin_error)
        targets.append(_Target(model, result))
        warnings += _some(probability_output_warning(model, clean_logits))
        if model.gradients == "twin" and _uses_gradients(chosen):
            assert model.model_fn is not None
            result.twin = twin_agreement(model.model_fn, clean_logits, x, batch_size=batch_size, device=model.device)
            warnings += _some(untrusted_twin_warning(model.label, result.twin))
    skipped = _skipped_for_artifact(chosen, artifact)
    if skipped:
        warnings.append(f"{artifact.label}: {', '.join(skipped)} skipped: {artifact.twin_error}; the other columns "
                        "still ran")
    warnings += _zero_gradient_checks(chosen, targets, source_models, x, y, batch_size)
    static_batch = getattr(runner, "static_batch", None)
    if static_batch and any(attack.family in ("transfer", "query") for attack in chosen):
        notes.append(f"{artifact.label} has a static batch of {static_batch}: each Square query and transfer "
                     f"evaluation is split into batches of {static_batch}, slower than a dynamic-batch export")

    divergence_stats: DivergenceStats | None = None
    attack_seconds: dict[str, float] = {}
    for attack in chosen:
        attack_started = time.perf_counter()
        if attack.family == "white-box":
            spec = attack.spec
            if spec.kind == "autoattack":
                spec = replace(spec, version=aa_version, seed=seed)
            for target in targets:
                if target.model.model_fn is None:
                    continue  # an artifact without a twin: warned above
                with autoattack_warnings(warnings, target.model.label):
                    target.result.robust_correct[attack.name] = _white_box(
                        attack.name, spec, target, x, y, eps=eps, batch_size=batch_size, seed=seed, progress=progress)
        elif attack.family == "transfer":
            _transfer(attack, source_models, targets, x, y, eps=eps, batch_size=batch_size, seed=seed,
                      progress=progress)
        elif attack.family == "divergence":
            if artifact.model_fn is not None:
                assert len(targets) == 2  # _check_runnable: divergence needs the reference
                divergence_stats = _divergence(attack, targets[0], targets[1], x, y, eps=eps, batch_size=batch_size,
                                               seed=seed, progress=progress)
        else:
            spec = replace(attack.spec, n_queries=square_queries, seed=seed, square_schedule=square_schedule)
            for target in targets:
                flags, stats = _square(attack.name, spec, target, x, y, eps=eps, batch_size=batch_size,
                                       progress=progress)
                target.result.robust_correct[attack.name] = flags
                target.result.queries[attack.name] = stats
        attack_seconds[attack.name] = time.perf_counter() - attack_started
        _log_attack(attack.name, [target.result for target in targets], attack_seconds[attack.name])

    for target in targets:
        target.result.runtime_seconds = target.model.runtime_seconds
        white, black = _white_and_black_box(chosen, target.model, source_models)
        warnings += gradient_masking_warnings(target.model.label, target.result.robust_correct, white, black)

    return VerifyReport(
        artifact=targets[0].result,
        reference=targets[1].result if ref is not None else None,
        attacks=[attack.name for attack in chosen],
        n=len(y), eps=eps, seed=seed,
        sources=[source.info.path or source.label for source in source_models]
        if any(a.family == "transfer" for a in chosen) else [],
        attack_details={attack.name: _attack_detail(attack, source_models, ref, artifact) for attack in chosen},
        attack_seconds=attack_seconds,
        seconds=time.perf_counter() - started,
        warnings=list(dict.fromkeys(warnings)),
        notes=notes,
        config={"attacks": [a.name for a in chosen], "eps": eps, "square_queries": square_queries,
                "square_schedule": square_schedule,
                "batch_size": batch_size, "seed": seed, "aa_version": aa_version},
        divergence=divergence_stats,
    )


def check_verify_options(
    *, eps: float | str, square_queries: int, batch_size: int, aa_version: str, square_schedule: str = DEFAULT_SCHEDULE
) -> float:
    """The checks shared by :func:`verify` and ``VerifyConfig`` (one place for each rule); returns eps as a float.

    eps may be written ``"8/255"``; ConfigError names the flag at fault.
    """
    eps = parse_eps(eps)
    if square_queries < 1:
        raise ConfigError(f"--square-queries must be at least 1, got {square_queries}")
    if square_schedule not in SQUARE_SCHEDULES:
        raise ConfigError(f"--square-schedule must be one of {', '.join(SQUARE_SCHEDULES)}, got {square_schedule!r}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if aa_version not in AUTOATTACK_VERSIONS:
        raise ConfigError(f"--aa-version must be one of {', '.join(AUTOATTACK_VERSIONS)}, got {aa_version!r}")
    return eps


@dataclass
class _Target:
    """A model verify reports on (the artifact or the reference) and the result it owns: its clean flags, and its
    flags per attack as each attack fills them in."""

    model: Model
    result: ModelResult


# --------------------------------------------------------------------------------------------------- the attacks


def _white_box(
    name: str, spec: AttackSpec, target: _Target, x: torch.Tensor, y: torch.Tensor, *, eps: float, batch_size: int,
    seed: int, progress: ProgressFn | None,
) -> torch.Tensor:
    """(N,) bool: correct on the clean image and on the attack's image; judged by the model's own runtime."""
    model = target.model
    assert model.model_fn is not None  # _check_runnable
    generator = torch.Generator(device=model.device).manual_seed(seed)  # PGD's random starts
    outcome = evaluate_attack(
        model.model_fn, x, y, spec, eps=eps, batch_size=batch_size, generator=generator, device=model.device,
        clean_correct=target.result.clean_correct, predict=model.labels,
        progress=_task(progress, f"{name} on {model.label}"),
    )
    return outcome.robust_correct


def _transfer(
    attack: VerifyAttack, sources: list[Model], targets: list[_Target], x: torch.Tensor, y: torch.Tensor, *,
    eps: float, batch_size: int, seed: int, progress: ProgressFn | None,
) -> None:
    """Craft ``attack.spec`` on each source, evaluate the same images on every target; AND over sources.

    The artifact is judged on every source's examples; the reference on those of the other sources only (on its
    own they are its white-box PGD / CW again, already a column), and has no row when it is the only source.
    """
    artifact = targets[0].model
    judged_by = {id(target): [s for s in sources if target.model is artifact or s is not target.model]
                 for target in targets}
    needed = torch.zeros_like(y, dtype=torch.bool)
    for target in targets:
        if judged_by[id(target)]:
            needed |= target.result.clean_correct  # images no judged target gets right need no adversarial example
    index = needed.nonzero().flatten()
    robust = {id(target): target.result.clean_correct.clone() for target in targets}
    for source in sources:
        x_adv = _craft(attack, source, x[index], y[index], eps=eps, batch_size=batch_size, seed=seed,
                       progress=progress)
        for target in targets:
            if source not in judged_by[id(target)]:
                continue
            survived = target.result.clean_correct.clone()
            survived[index] &= target.model.labels(x_adv) == y[index]  # one call: the runtime batches it
            target.result.per_source.setdefault(attack.name, {})[source.label] = int(survived.sum()) / len(y)
            robust[id(target)] &= survived
    for target in targets:
        if judged_by[id(target)]:
            target.result.robust_correct[attack.name] = robust[id(target)]


def _divergence(
    attack: VerifyAttack, artifact: _Target, reference: _Target, x: torch.Tensor, y: torch.Tensor, *, eps: float,
    batch_size: int, seed: int, progress: ProgressFn | None,
) -> DivergenceStats:
    """DIVA on every image the artifact classifies correctly, crafted on the reference and the artifact's twin,
    judged by both runtimes; the artifact gets the robust-accuracy column, the stats count the divergences."""
    edge, float_model = artifact.model, reference.model
    assert edge.model_fn is not None and float_model.model_fn is not None  # _check_runnable
    device = edge.device
    float_fn = _on_device(float_model.model_fn, float_model.device, device)
    index = artifact.result.clean_correct.nonzero().flatten()
    generator = torch.Generator(device=device).manual_seed(seed)
    x_adv = divergence_examples(float_fn, edge.model_fn, x[index], y[index], attack.spec, eps=eps,
                                batch_size=batch_size, generator=generator, device=device,
                                progress=_task(progress, f"{attack.name}: {float_model.label} vs {edge.label}"))
    edge_right = edge.labels(x_adv) == y[index]
    float_right = float_model.labels(x_adv) == y[index]
    robust = artifact.result.clean_correct.clone()
    robust[index] = edge_right
    artifact.result.robust_correct[attack.name] = robust
    both = reference.result.clean_correct[index]  # (attacked,) the float model was right on the clean image too
    return DivergenceStats(both_correct=int(both.sum()), artifact_fooled=int((both & ~edge_right).sum()),
                           artifact_fooled_float_not=int((both & ~edge_right & float_right).sum()),
                           float_fooled=int((both & ~float_right).sum()))


def _on_device(model_fn: ModelFn, model_device: torch.device, device: torch.device) -> ModelFn:
    """``model_fn`` (on ``model_device``) as a function of tensors on ``device``; gradients flow through the moves."""
    if model_device == device:
        return model_fn
    return lambda images: model_fn(images.to(model_device)).to(device)


def _craft(
    attack: VerifyAttack, source: Model, x: torch.Tensor, y: torch.Tensor, *, eps: float, batch_size: int,
    seed: int, progress: ProgressFn | None,
) -> torch.Tensor:
    """Adversarial images (CPU) of ``attack.spec`` run on ``source``'s gradients, in batches on its device."""
    assert source.model_fn is not None  # _check_runnable
    generator = torch.Generator(device=source.device).manual_seed(seed)
    return adversarial_examples(
        source.model_fn, x, y, attack.spec, eps=eps, batch_size=batch_size, generator=generator, device=source.device,
        progress=_task(progress, f"{attack.name}: crafting on {source.label}"),
    )


def _square(
    name: str, spec: AttackSpec, target: _Target, x: torch.Tensor, y: torch.Tensor, *, eps: float, batch_size: int,
    progress: ProgressFn | None,
) -> tuple[torch.Tensor, QueryStats]:
    """Square against the model's own predictions; every still-unfooled image goes to the runtime in one call."""
    model, clean_correct = target.model, target.result.clean_correct
    started, runtime_before = time.perf_counter(), model.runtime_seconds
    outcome = evaluate_attack(
        model.logits, x, y, spec, eps=eps, batch_size=batch_size, clean_correct=clean_correct, predict=model.labels,
        progress=_task(progress, f"{name} on {model.label}"),
    )
    assert outcome.queries is not None  # a Square outcome counts its queries
    per_image = outcome.queries[clean_correct].float()
    stats = QueryStats(total=int(outcome.queries.sum()), attacked=int(clean_correct.sum()), budget=spec.n_queries,
                       seconds=time.perf_counter() - started, runtime_seconds=model.runtime_seconds - runtime_before,
                       median=float(per_image.median()) if per_image.numel() else 0.0,
                       schedule=spec.square_schedule, p_init=spec.p_init)
    return outcome.robust_correct, stats


# --------------------------------------------------------------------------------------------------- checks


def _as_inputs(data_x: torch.Tensor | np.ndarray, data_y: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, ...]:
    """float32 (N, C, H, W) in [0, 1] and int64 (N,) labels, on the CPU; DatasetError saying what is wrong."""
    x = torch.as_tensor(data_x).detach().cpu()
    y = torch.as_tensor(data_y).detach().cpu()
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    if not x.is_floating_point():
        raise DatasetError(f"verify images must be float32 in [0, 1] or uint8, got {x.dtype}")
    x = x.float().contiguous()
    if x.ndim != 4:
        raise DatasetError(f"verify images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if y.ndim != 1 or len(y) != len(x) or y.is_floating_point():
        raise DatasetError(f"verify labels must be integers of shape ({len(x)},), got {y.dtype} {tuple(y.shape)}")
    if len(x) == 0:
        raise DatasetError("verify got no images: --n must be at least 1")
    low, high = float(x.min()), float(x.max())
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise DatasetError(
            f"verify images must be in [0, 1] (the models normalise inside), got [{low:.3g}, {high:.3g}]"
        )
    return x, y.long()


def _check_fits(model: Model, x: torch.Tensor, y: torch.Tensor, artifact: Model) -> None:
    """The images fit the model's input; its class count is the artifact's and covers the labels."""
    expected = "x".join(str(d) if d else "?" for d in model.input_shape)
    got = "x".join(str(d) for d in x.shape[1:])
    if any(want and want != have for want, have in zip(model.input_shape, x.shape[1:], strict=True)):
        raise DatasetError(
            f"{model.label} takes {expected} images but the verify images are {got}: verify on the dataset the "
            "model was trained on (--dataset), or export it for that input size"
        )
    both_known = model.num_classes and artifact.num_classes
    if model is not artifact and both_known and model.num_classes != artifact.num_classes:
        raise ConfigError(f"{model.label} predicts {model.num_classes} classes but the artifact "
                          f"{artifact.label} predicts {artifact.num_classes}: they are not the same task")
    if model.num_classes and int(y.max()) >= model.num_classes:
        raise DatasetError(f"the labels go up to {int(y.max())} but {model.label} predicts only "
                           f"{model.num_classes} classes: verify on the dataset it was trained on (--dataset)")


def _check_runnable(attacks: list[VerifyAttack], artifact: Model, ref: Model | None, sources: list[Model]) -> None:
    """Refuse, before any work, an attack that cannot run on the models given, saying what would.

    An artifact without gradients (no twin) is not refused: its white-box and divergence columns are skipped with
    a warning (:func:`_skipped_for_artifact`), the others still run.
    """
    white_box = [a.name for a in attacks if a.family == "white-box"]
    if white_box and ref is not None and not ref.differentiable:
        raise ConfigError(f"{', '.join(white_box)} need gradients on the reference too; give a PyTorch checkpoint "
                          f"as --reference, not {ref.label}")
    transfer = [a.name for a in attacks if a.family == "transfer"]
    if transfer and not sources:
        raise ConfigError(f"{', '.join(transfer)} need a model to craft the examples on: pass --reference CKPT (the "
                          "checkpoint the artifact was exported from) or --source CKPT")
    for source in sources:
        if transfer and not source.differentiable:
            raise ConfigError(f"transfer source {source.label} has no gradients: sources must be PyTorch checkpoints")
    if any(a.family == "divergence" for a in attacks):
        if ref is None:
            raise ConfigError("divergence needs the float model the artifact came from: pass --reference CKPT")
        if not ref.differentiable:
            raise ConfigError(f"divergence needs the reference's gradients; give a PyTorch checkpoint as --reference, "
                              f"not {ref.label}")


def _skipped_for_artifact(attacks: list[VerifyAttack], artifact: Model) -> list[str]:
    """The attacks that need the artifact's gradients when it has none (no twin)."""
    if artifact.differentiable:
        return []
    return [a.name for a in attacks if a.family in ("white-box", "divergence")]


def _uses_gradients(attacks: list[VerifyAttack]) -> bool:
    return any(a.family in ("white-box", "divergence") for a in attacks)


def _check_same_architecture(artifact: Model, ref: Model | None) -> None:
    """A --reference must be the model the artifact came from: same architecture (ConfigError naming both).

    Read from the metadata when both say it (rslad-edge checkpoints and exports do), else from the convolution
    kernels: the twin's graph against the reference's Conv2d weights (BatchNorm folding keeps their shapes).
    """
    if ref is None:
        return
    artifact_arch, reference_arch = artifact.metadata.get("arch"), ref.metadata.get("arch")
    if artifact_arch and reference_arch and artifact_arch != reference_arch:
        raise ConfigError(f"--reference {ref.label} is a {reference_arch} but {artifact.label} is a {artifact_arch}: "
                          "give the checkpoint the artifact was exported from")
    artifact_kernels, reference_kernels = _conv_kernels(artifact), _conv_kernels(ref)
    if artifact_kernels is not None and reference_kernels is not None and artifact_kernels != reference_kernels:
        raise ConfigError(f"--reference {ref.label} is not the architecture of {artifact.label} (their convolution "
                          f"layers differ: {len(reference_kernels)} vs {len(artifact_kernels)} kernels of other "
                          "shapes): give the checkpoint the artifact was exported from")


def _conv_kernels(model: Model) -> list[tuple[int, ...]] | None:
    """Sorted shapes of the model's 2-d convolution kernels (None when they cannot be read)."""
    function = model.model_fn
    if isinstance(function, OnnxTwin):
        return sorted(function.conv_kernel_shapes)
    module = function if isinstance(function, nn.Module) else getattr(model.handle, "model", None)
    if not isinstance(module, nn.Module):
        return None
    return sorted(tuple(m.weight.shape) for m in module.modules() if isinstance(m, nn.Conv2d))


def _source_models(sources: Sequence[Runner | nn.Module] | None, ref: Model | None, batch_size: int) -> list[Model]:
    """The transfer sources; the reference (when it is one) is the same Model, so identity checks hold."""
    if sources is None:
        return [ref] if ref is not None else []
    models: list[Model] = []
    for source in sources:
        model = ref if ref is not None and source is ref.handle else as_model(source, batch_size=batch_size)
        if all(model is not known for known in models):
            models.append(model)
    labels = [model.label for model in models]
    for model in models:
        if labels.count(model.label) > 1 and model.info.path:
            model.label = model.info.path  # two sources called student.pt: tell them apart by their paths
    return models


def _zero_gradient_checks(
    attacks: list[VerifyAttack], targets: list[_Target], sources: list[Model], x: torch.Tensor, y: torch.Tensor,
    batch_size: int,
) -> list[str]:
    """Check the input gradients of every model an attack will differentiate, on up to one batch of the images it
    classifies correctly (the ones its attacks will start from)."""
    differentiated: list[Model] = []
    if _uses_gradients(attacks):
        differentiated += [target.model for target in targets]
    if any(a.family == "transfer" for a in attacks):
        differentiated += sources
    warnings: list[str] = []
    checked: list[Model] = []
    for model in differentiated:
        if any(model is done for done in checked):
            continue
        checked.append(model)
        as_target = next((target for target in targets if target.model is model), None)
        correct = as_target.result.clean_correct if as_target is not None else model.labels(x) == y
        index = correct.nonzero().flatten()[:batch_size]
        warnings += _some(zero_gradient_warning(model, x[index], y[index]))
    return warnings


def _white_and_black_box(attacks: list[VerifyAttack], model: Model, sources: list[Model]) -> tuple[set, set]:
    """Which attacks used ``model``'s own gradients or its twin's (white-box for it) and which only its outputs or
    another model's (black-box for it): a transfer attack from the model itself is white-box, and so is divergence
    (crafted on the artifact's twin)."""
    white, black = set(), set()
    for attack in attacks:
        own_transfer = attack.family == "transfer" and any(s.same_as(model) for s in sources)
        if attack.family in ("white-box", "divergence") or own_transfer:
            white.add(attack.name)
        else:
            black.add(attack.name)
    return white, black


def _attack_detail(attack: VerifyAttack, sources: list[Model], ref: Model | None, artifact: Model) -> AttackDetail:
    """What ``attack`` ran, on whose gradients and judged by what; for a transfer attack, which models its examples
    were crafted on."""
    crafted_on: tuple[TransferSource, ...] = ()
    if attack.family == "transfer":
        crafted_on = tuple(
            TransferSource(label=source.label, path=source.info.path, sha256=source.info.sha256,
                           role="reference" if source is ref else "source")
            for source in sources
        )
    gradients = artifact.gradients if artifact.differentiable else None
    judged_by = f"{artifact.info.backend} ({artifact.info.provider})"
    return AttackDetail(attack.family, attack.spec.name, crafted_on, artifact_gradients=gradients, judged_by=judged_by)


def _log_attack(name: str, results: list[ModelResult], seconds: float) -> None:
    figures = ", ".join(f"{Path(r.info.path).name if r.info.path else r.info.backend}: {r.robust_acc[name]:.1%}"
                        for r in results if name in r.robust_correct)
    logger.info("%s: %s (%.1f s)", name, figures, seconds)


def _task(progress: ProgressFn | None, task: str) -> Callable[[int, int], None] | None:
    """``progress`` bound to one task, as the attacks report it: ``(completed, total)``."""
    if progress is None:
        return None
    return lambda completed, total: progress(task, completed, total)


def _some(warning: str | None) -> list[str]:
    return [warning] if warning else []
