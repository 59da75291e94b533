"""``verify``: robust accuracy of one artifact (and of a reference on the same images), per sample, per attack.

What runs against what (every adversarial image is judged by the model's own runtime, never by a gradient proxy):

- **white-box** attacks (``fgsm``, ``pgd_sat``, ``pgd_trades``, ``cw``, ``autoattack``) are crafted on each model's
  gradients: a checkpoint's own, an exported artifact's differentiable twin (``runtime/twin.py``: its own graph,
  weights and int8 scales as torch ops). The twin's agreement with the artifact is measured on the verify images
  every time and reported; below 99 % top-1 it is flagged as untrusted. An artifact without a twin (an op the twin
  cannot emulate) skips these columns with a one-line warning naming the op.
- **transfer** attacks are crafted once per source model (default: the reference) on every image that a model judged
  on them classifies correctly, then the very same adversarial images are evaluated on the artifact (and on the
  reference for sources other than itself: on itself they would only repeat its white-box PGD). With several
  sources, a sample is robust only if it survives the examples of every source.
- **divergence** (DIVA) is crafted on the float reference and the artifact's twin together, to fool the artifact
  while the float model stays right; the artifact gets a robust-accuracy column, and the report counts how often the
  artifact is fooled where the float model is not.
- **square** queries each model's own predictions (ONNX Runtime, TensorRT, PyTorch): the one attack that sees the
  artifact exactly as it runs, masked gradients and all. All still-correct images go to the runtime in one call per
  query, so each query is as large a batch as the runtime takes.

One evaluator, after AutoAttack's ``run_standard_evaluation``: an attack is made of runs (:class:`_Run`: one per model
for white-box and Square, per source for transfer, one for divergence) of one shape: craft adversarial images on some
models (gradients, or answers for Square) for the samples the targets it counts toward classify correctly (a wrong
clean prediction cannot become robust), and judge each image by each target's own runtime (:class:`_Outcome`). One
loop in :func:`verify` turns judgments into per-sample flags: per attack the AND over its runs, per model the AND
over its attacks (the worst case). Attacks are not chained: attacking only what survived the previous attacks would
be cheaper, but every column after the first would then be a cumulative figure, not the paper's per-attack column.

The reference faces what a checkpoint faces on its own (white-box, Square, transfer from other models), so its worst
case is the checkpoint's worst case on these images, and the drop of the worst case compares like with like.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from rslad_edge.attacks import (
    AttackSpec,
    ModelFn,
    adversarial_examples,
    divergence_examples,
    parse_eps,
    square,
)
from rslad_edge.attacks.autoattack import AUTOATTACK_VERSIONS
from rslad_edge.attacks.square import DEFAULT_SCHEDULE, SQUARE_SCHEDULES
from rslad_edge.data import check_image_shape
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
    notes: Sequence[str] = (),
    config: Mapping[str, Any] | None = None,
    reference_measured: ModelResult | None = None,
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
        notes: what the caller has to say about the run (how the images were chosen), first among the report's notes.
        config: what the caller ran with (its options, the dataset), recorded in the report's ``config`` with the
            settings verify used, which win where both name one.
        reference_measured: the reference's own result from an earlier ``verify`` of it on these images with the same
            eps, seed and attack settings (the pipeline's checkpoint row): its white-box and Square columns are
            taken instead of attacking the reference again, and said in the notes. Its clean flags must match.
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

    notes = list(notes)
    if attacks is None:
        attacks, note = default_attack_names(exported=artifact.gradients != "own", has_reference=ref is not None,
                                             has_source=bool(source_models))
        notes += _some(note)
    chosen = parse_attacks(attacks)
    _check_runnable(chosen, artifact, ref, source_models)

    warnings: list[str] = []
    targets: list[_Target] = []
    for model in [artifact, *([ref] if ref is not None else [])]:
        clean_logits = model.logits(x)  # (N, classes)
        result = ModelResult(model.info, clean_correct=clean_logits.argmax(dim=1) == y, gradients=model.gradients,
                             twin_error=model.twin_error)
        targets.append(_Target(model, result))
        if model is ref and reference_measured is not None and not torch.equal(
                reference_measured.clean_correct.cpu(), result.clean_correct.cpu()):
            raise ValueError(f"reference_measured: {ref.label} was measured on other images (its clean flags differ)")
        warnings += _some(probability_output_warning(model, clean_logits))
        if model.gradients == "twin" and _uses_gradients(chosen):
            assert model.model_fn is not None
            result.twin = twin_agreement(model.model_fn, clean_logits, x, batch_size=batch_size, device=model.device)
            warnings += _some(untrusted_twin_warning(model.label, result.twin))
    if not artifact.differentiable and _uses_gradients(chosen):
        skipped = ", ".join(a.name for a in chosen if a.family in ("white-box", "divergence"))
        warnings.append(f"{artifact.label}: {skipped} skipped: {artifact.twin_error}; the other columns still ran")
    warnings += _zero_gradient_checks(chosen, targets, source_models, x, y, batch_size)
    static_batch = getattr(runner, "static_batch", None)
    if static_batch and any(attack.family in ("transfer", "query") for attack in chosen):
        notes.append(f"{artifact.label} has a static batch of {static_batch}: each Square query and transfer "
                     f"evaluation is split into batches of {static_batch}, slower than a dynamic-batch export")

    # The evaluator: every run crafts and is judged the same way; only here do judgments become per-sample flags.
    settings = _Settings(eps=eps, batch_size=batch_size, seed=seed)
    divergence: DivergenceStats | None = None
    attack_seconds: dict[str, float] = {}
    reused: list[str] = []  # the reference's columns taken from reference_measured
    for attack in chosen:
        attack_started = time.perf_counter()
        spec = _spec(attack, aa_version=aa_version, seed=seed, square_queries=square_queries,
                     square_schedule=square_schedule)
        for run in _runs(attack, spec, targets, source_models):
            if _take_measured(run, reference_measured, targets):
                reused.append(attack.name)
                continue
            with autoattack_warnings(warnings, run.crafted_on[0].label):
                outcome = _attack(run, x, y, settings, progress)
            for target, correct in zip(run.scored, outcome.correct[: len(run.scored)], strict=True):
                flags = target.result.clean_correct.clone()  # (N,) a sample not attacked was wrong on the clean image
                flags[outcome.index] &= correct
                columns = target.result.robust_correct
                columns[attack.name] = columns[attack.name] & flags if attack.name in columns else flags
                if attack.family == "transfer":
                    target.result.per_source.setdefault(attack.name, {})[run.crafted_on[0].label] = (
                        int(flags.sum()) / len(y))
                if outcome.queries is not None:
                    target.result.queries[attack.name] = _query_stats(run.spec, outcome)
            if attack.family == "divergence":
                divergence = _divergence_stats(run, outcome)
        attack_seconds[attack.name] = time.perf_counter() - attack_started
        _log_attack(attack.name, [target.result for target in targets], attack_seconds[attack.name])

    if reused:
        assert ref is not None
        notes.append(f"{ref.label}: {', '.join(reused)} taken from its own verify on these images (same eps, seed "
                     "and attack settings), not run again")
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
        config={**(config or {}), "attacks": [a.name for a in chosen], "eps": eps, "square_queries": square_queries,
                "square_schedule": square_schedule, "batch_size": batch_size, "seed": seed, "aa_version": aa_version},
        divergence=divergence,
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


# --------------------------------------------------------------------------------------------------- the attacks


@dataclass(eq=False)
class _Target:
    """A model verify reports on (the artifact or the reference) and its result, which only the loop of
    :func:`verify` writes: its clean flags, then its flags per attack."""

    model: Model
    result: ModelResult


@dataclass(frozen=True, eq=False)
class _Run:
    """One crafting of an attack: the models it is crafted on, the targets whose column it counts toward
    (``scored``), and any target that judges it only to be counted (``observed``: divergence's float reference)."""

    attack: VerifyAttack
    spec: AttackSpec  # the attack's preset with verify's options
    crafted_on: tuple[Model, ...]  # white-box, Square: the target; transfer: a source; divergence: (reference, twin)
    scored: tuple[_Target, ...]
    observed: tuple[_Target, ...] = ()
    task: str = ""  # how the progress bar names it

    @property
    def judges(self) -> tuple[_Target, ...]:
        return self.scored + self.observed


class _Settings(NamedTuple):
    eps: float  # L-inf budget, pixel units
    batch_size: int  # images per crafting batch
    seed: int  # PGD's random starts, divergence's, Square's and AutoAttack's


class _Outcome(NamedTuple):
    """What one run did: the samples it attacked, what it crafted for them, and how every judge classifies that."""

    index: Tensor  # (M,) int64: the samples attacked
    x_adv: Tensor  # (M, C, H, W) on the CPU: the adversarial images
    correct: list[Tensor]  # per judge of the run, in order: (M,) bool, still classified correctly
    queries: Tensor | None  # (M,) int64: Square's queries per sample; None for the gradient attacks
    seconds: float  # wall time of the run, crafting and judging
    runtime_seconds: float  # of which inside the predict of the models it was crafted on


_TaskProgress = Callable[[int, int], None] | None  # (completed, total) of one task
_Crafted = tuple[Tensor, Tensor | None]  # (x_adv, Square's queries per sample or None)


def _runs(attack: VerifyAttack, spec: AttackSpec, targets: list[_Target], sources: list[Model]) -> list[_Run]:
    """The runs of ``attack``. White-box and Square: one per target, on the target itself (none for an artifact
    without a twin: warned). Transfer: one per source, judged by the artifact, and by the reference unless the source
    is the reference (on itself it is its white-box PGD / CW again, already a column). Divergence: one, crafted on
    the reference and the artifact's twin, counted for the artifact and judged by the reference for its statistics."""
    artifact, *reference = targets
    if attack.family == "transfer":
        return [_Run(attack, spec, (source,), tuple(t for t in targets if t is artifact or t.model is not source),
                     task=f"{attack.name}: crafting on {source.label}") for source in sources]
    if attack.family == "divergence":
        if artifact.model.model_fn is None:
            return []
        (float_target,) = reference  # _check_runnable: divergence needs the reference
        return [_Run(attack, spec, (float_target.model, artifact.model), (artifact,), observed=(float_target,),
                     task=f"{attack.name}: {float_target.model.label} vs {artifact.model.label}")]
    return [_Run(attack, spec, (target.model,), (target,), task=f"{attack.name} on {target.model.label}")
            for target in targets if attack.family == "query" or target.model.model_fn is not None]


def _take_measured(run: _Run, measured: ModelResult | None, targets: list[_Target]) -> bool:
    """Fill the reference's column of ``run`` from ``measured`` when the run is the reference's own white-box or
    Square run and ``measured`` has that column; True when it did (the run is skipped)."""
    if measured is None or len(targets) < 2 or run.attack.name not in measured.robust_correct:
        return False
    reference = targets[1]
    if run.scored != (reference,) or run.crafted_on != (reference.model,) or run.observed:
        return False
    reference.result.robust_correct[run.attack.name] = measured.robust_correct[run.attack.name].clone()
    if run.attack.name in measured.queries:
        reference.result.queries[run.attack.name] = measured.queries[run.attack.name]
    return True


def _attack(run: _Run, x: Tensor, y: Tensor, settings: _Settings, progress: ProgressFn | None) -> _Outcome:
    """Craft ``run`` on the samples that a target it counts toward classifies correctly, then judge the crafted images
    by each judge's own runtime, in one call each (the runtime batches it)."""
    index = torch.stack([t.result.clean_correct for t in run.scored]).any(dim=0).nonzero().flatten()
    started, runtime_before = time.perf_counter(), sum(model.runtime_seconds for model in run.crafted_on)
    task = None if progress is None else lambda completed, total: progress(run.task, completed, total)
    x_adv, queries = _CRAFTERS[run.attack.family](run, x[index], y[index], settings, task)
    correct = [judge.model.labels(x_adv) == y[index] for judge in run.judges]
    return _Outcome(index, x_adv, correct, queries, seconds=time.perf_counter() - started,
                    runtime_seconds=sum(model.runtime_seconds for model in run.crafted_on) - runtime_before)


# The crafters, one per family, one signature: (run, x, y, settings, progress) -> (x_adv, queries or None).


def _gradient_examples(run: _Run, x: Tensor, y: Tensor, settings: _Settings, progress: _TaskProgress) -> _Crafted:
    """FGSM / PGD / CW / AutoAttack on one model's gradients (its own or its twin's), in batches on its device: a
    white-box attack on a target, or the transfer examples of a source."""
    (model,) = run.crafted_on
    assert model.model_fn is not None  # _check_runnable, _runs
    generator = torch.Generator(device=model.device).manual_seed(settings.seed)  # PGD's random starts
    return adversarial_examples(model.model_fn, x, y, run.spec, eps=settings.eps, batch_size=settings.batch_size,
                                generator=generator, device=model.device, progress=progress), None


def _divergence_examples(run: _Run, x: Tensor, y: Tensor, settings: _Settings, progress: _TaskProgress) -> _Crafted:
    """DIVA on the float reference and the artifact's twin together, on the twin's device."""
    float_model, edge = run.crafted_on
    assert float_model.model_fn is not None and edge.model_fn is not None  # _check_runnable, _runs
    float_fn = _on_device(float_model.model_fn, float_model.device, edge.device)
    generator = torch.Generator(device=edge.device).manual_seed(settings.seed)
    return divergence_examples(float_fn, edge.model_fn, x, y, run.spec, eps=settings.eps,
                               batch_size=settings.batch_size, generator=generator, device=edge.device,
                               progress=progress), None


def _square_examples(run: _Run, x: Tensor, y: Tensor, settings: _Settings, progress: _TaskProgress) -> _Crafted:
    """Square against the model's own predictions: every still-unfooled image goes to the runtime in one call."""
    (model,) = run.crafted_on
    if len(x) == 0:
        return x, torch.zeros(0, dtype=torch.long)
    result = square(model.logits, x, y, eps=settings.eps, n_queries=run.spec.n_queries, p_init=run.spec.p_init,
                    seed=run.spec.seed, progress=progress, schedule=run.spec.square_schedule)
    return result.x_adv, result.queries


_CRAFTERS = {"white-box": _gradient_examples, "transfer": _gradient_examples, "divergence": _divergence_examples,
             "query": _square_examples}


def _spec(attack: VerifyAttack, *, aa_version: str, seed: int, square_queries: int, square_schedule: str) -> AttackSpec:
    """The attack's preset with verify's options: AutoAttack's version and seed; Square's budget, schedule and seed."""
    if attack.spec.kind == "autoattack":
        return replace(attack.spec, version=aa_version, seed=seed)
    if attack.spec.kind == "square":
        return replace(attack.spec, n_queries=square_queries, seed=seed, square_schedule=square_schedule)
    return attack.spec


def _query_stats(spec: AttackSpec, outcome: _Outcome) -> QueryStats:
    """Square's cost on the model it queried."""
    assert outcome.queries is not None  # (M,) per attacked sample
    return QueryStats(total=int(outcome.queries.sum()), attacked=len(outcome.index), budget=spec.n_queries,
                      seconds=outcome.seconds, runtime_seconds=outcome.runtime_seconds,
                      median=float(outcome.queries.float().median()) if len(outcome.index) else 0.0,
                      schedule=spec.square_schedule, p_init=spec.p_init)


def _divergence_stats(run: _Run, outcome: _Outcome) -> DivergenceStats:
    """Of the attacked images that the float reference classifies correctly too, how many the divergence images make
    the artifact get wrong, the reference, and the artifact alone (DIVA's outcome)."""
    artifact_right, float_right = outcome.correct  # the judges: the artifact (scored), the reference (observed)
    (float_target,) = run.observed
    both = float_target.result.clean_correct[outcome.index]  # (M,) the artifact's are all right: they were attacked
    return DivergenceStats(both_correct=int(both.sum()), artifact_fooled=int((both & ~artifact_right).sum()),
                           artifact_fooled_float_not=int((both & ~artifact_right & float_right).sum()),
                           float_fooled=int((both & ~float_right).sum()))


def _on_device(model_fn: ModelFn, model_device: torch.device, device: torch.device) -> ModelFn:
    """``model_fn`` (on ``model_device``) as a function of tensors on ``device``; gradients flow through the moves."""
    if model_device == device:
        return model_fn
    return lambda images: model_fn(images.to(model_device)).to(device)


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
    check_image_shape(model.input_shape, tuple(x.shape[1:]), model=model.label, images="the verify images",
                      fix="verify on the dataset the model was trained on (--dataset), or export it for that "
                      "input size")
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
    a warning, the others still run.
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
    attacks: list[VerifyAttack], targets: list[_Target], sources: list[Model], x: Tensor, y: Tensor, batch_size: int
) -> list[str]:
    """Check the input gradients of every model an attack will differentiate, on up to one batch of the images it
    classifies correctly (the ones its attacks will start from)."""
    differentiated = [target.model for target in targets] if _uses_gradients(attacks) else []
    differentiated += sources if any(a.family == "transfer" for a in attacks) else []
    warnings: list[str] = []
    for model in {id(model): model for model in differentiated}.values():  # each model once, in order
        target = next((target for target in targets if target.model is model), None)
        correct = target.result.clean_correct if target is not None else model.labels(x) == y
        index = correct.nonzero().flatten()[:batch_size]
        warnings += _some(zero_gradient_warning(model, x[index], y[index]))
    return warnings


def _white_and_black_box(attacks: list[VerifyAttack], model: Model, sources: list[Model]) -> tuple[set, set]:
    """Which attacks used ``model``'s own gradients or its twin's (white-box for it) and which only its outputs or
    another model's (black-box for it): a transfer attack from the model itself is white-box, and so is divergence
    (crafted on the artifact's twin)."""
    own_transfer = {"transfer"} if any(source.same_as(model) for source in sources) else set()
    white = {a.name for a in attacks if a.family in {"white-box", "divergence", *own_transfer}}
    return white, {a.name for a in attacks} - white


def _attack_detail(attack: VerifyAttack, sources: list[Model], ref: Model | None, artifact: Model) -> AttackDetail:
    """What ``attack`` ran, on whose gradients and judged by what; for a transfer attack, which models its examples
    were crafted on."""
    crafted_on = tuple(TransferSource(label=source.label, path=source.info.path, sha256=source.info.sha256,
                                      role="reference" if source is ref else "source")
                       for source in sources if attack.family == "transfer")
    gradients = artifact.gradients if artifact.differentiable else None
    judged_by = f"{artifact.info.backend} ({artifact.info.provider})"
    return AttackDetail(attack.family, attack.spec.name, crafted_on, artifact_gradients=gradients, judged_by=judged_by)


def _log_attack(name: str, results: list[ModelResult], seconds: float) -> None:
    figures = ", ".join(f"{Path(r.info.path).name if r.info.path else r.info.backend}: {r.robust_acc[name]:.1%}"
                        for r in results if name in r.robust_correct)
    logger.info("%s: %s (%.1f s)", name, figures, seconds)


def _some(warning: str | None) -> list[str]:
    return [warning] if warning else []
