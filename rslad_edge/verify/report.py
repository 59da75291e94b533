"""What verify measured: per-sample flags per model, the accuracies and drops derived from them, the gate, the JSON.

Flags are kept per sample (not just accuracies) because the worst case is a per-sample AND across attacks
(AutoAttack's rule: a sample is robust only if it survives every attack), and because the artifact and the reference
are measured on the same images: the drop's 95 % interval is that of a paired difference, much tighter than two
independent binomials, which is what "within noise" should mean.

JSON (accuracies as fractions, drops in points)::

    {"artifact", "sha256", "backend", "provider", "precision", "n", "eps", "seed",
     "clean_acc", "robust_acc": {attack: acc}, "worst_case_acc", "ci95": {row: [low, high]} (95 % Wilson),
     "reference": {same keys for the reference model} | null,
     "seconds", "queries": {Square on the artifact} | null,
     "drop_pp", "drop_ci95_pp", "attacks", "sources", "attack_details", "attack_seconds", "transfer_sources",
     "runtime_seconds", "gradients", "twin", "twin_unavailable", "divergence", "warnings", "notes", "config",
     "versions"}

``attack_details`` names, per attack, its family and preset, whose gradients crafted it on the artifact
(``artifact_gradients``: ``own``, ``twin``, or null where it did not run) and what judged it (``judged_by``: always
the artifact's own runtime), and for each transfer column the models its examples were crafted on (``crafted_on``:
label, artifact path, sha256, role ``reference`` or ``source``).

``twin``: the differentiable twin's agreement with the artifact on the verify images (``agreement``,
``max_abs_logit_diff``, ``trusted``: at least ``threshold``), null for a checkpoint (its own gradients);
``twin_unavailable``: why an exported artifact has no twin (then its white-box columns are missing).
``divergence``: of the images both the artifact and the float reference classify correctly, how many the divergence
attack made the artifact get wrong while the float model stays right (``artifact_fooled_float_not``).

Drops: per row, reference minus artifact where both faced the attack; the worst case always (the reference's worst
case over what it faced: white-box, Square, and transfer from other sources, which is the checkpoint's own worst
case, against the artifact's over everything it faced).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rslad_edge.errors import ConfigError, GateFailedError
from rslad_edge.runtime.twin import TwinAgreement
from rslad_edge.stats import paired_drop_ci95_pp, wilson_ci95
from rslad_edge.verify.targets import ArtifactInfo
from rslad_edge.versions import package_versions

CLEAN_ROW, WORST_CASE_ROW = "clean", "worst_case"
# What computes verify's figures: the attack implementations and the runtimes change results.
VERIFY_PACKAGES = ("torch", "numpy", "onnxruntime", "executorch", "pyautoattack")


@dataclass(frozen=True)
class QueryStats:
    """Square's cost on one model: queries summed over the attacked samples, and the wall time they took."""

    total: int
    attacked: int  # clean-correct samples Square searched on
    budget: int  # --square-queries
    seconds: float  # wall time of the attack on this model
    runtime_seconds: float  # of which inside the backend's predict
    median: float = 0.0  # queries per attacked image
    schedule: str = "budget"  # Square's p schedule (budget | paper)
    p_init: float = 0.8

    @property
    def mean(self) -> float:
        return self.total / self.attacked if self.attacked else 0.0

    @property
    def per_second(self) -> float:
        return self.total / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "attacked": self.attacked, "mean": round(self.mean, 2), "median": self.median,
                "budget": self.budget, "schedule": self.schedule, "p_init": self.p_init,
                "seconds": round(self.seconds, 3), "per_s": round(self.per_second, 1),
                "runtime_seconds": round(self.runtime_seconds, 3)}


@dataclass(frozen=True)
class TransferSource:
    """A model transfer examples were crafted on, as the JSON and the table name it."""

    label: str
    path: str | None
    sha256: str | None
    role: str  # "reference": the artifact's own float model (--reference); "source": another model (--source)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "artifact": self.path, "sha256": self.sha256, "role": self.role}


@dataclass(frozen=True)
class AttackDetail:
    """What one column measured: its family, the preset it ran, and for a transfer attack the models it was crafted
    on (a transfer column means nothing without them: crafted on the reference, it is the float model's own
    white-box attack, not the paper's transfer row crafted on a separate robust ResNet-50)."""

    family: str  # white-box | transfer | divergence | query
    preset: str  # the attack preset run (on the model itself, or on each source); its budgets are in "config"
    crafted_on: tuple[TransferSource, ...] = ()  # transfer attacks only
    artifact_gradients: str | None = None  # white-box / divergence: "own" or "twin" (None: not run on the artifact)
    judged_by: str = ""  # the runtime whose predictions decide: the artifact's own

    @property
    def crafted_on_reference(self) -> bool:
        return any(source.role == "reference" for source in self.crafted_on)

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"family": self.family, "preset": self.preset, "judged_by": self.judged_by}
        if self.family in ("white-box", "divergence"):
            record["artifact_gradients"] = self.artifact_gradients
        if self.family == "transfer":
            record["crafted_on"] = [source.to_json() for source in self.crafted_on]
        return record


@dataclass(frozen=True)
class DivergenceStats:
    """What the divergence attack did on the images both the artifact and the float reference classify correctly."""

    both_correct: int  # images the artifact and the reference both classify correctly (clean)
    artifact_fooled: int  # of those, the artifact is wrong on the divergence image
    artifact_fooled_float_not: int  # ... while the float reference is still right: the DIVA outcome
    float_fooled: int  # the reference is wrong on the divergence image

    @property
    def rate(self) -> float:
        """How often the artifact is fooled where the float model is not, among the images both got right."""
        return self.artifact_fooled_float_not / self.both_correct if self.both_correct else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"both_correct": self.both_correct, "artifact_fooled": self.artifact_fooled,
                "artifact_fooled_float_not": self.artifact_fooled_float_not, "float_fooled": self.float_fooled,
                "rate": round(self.rate, 6)}


@dataclass
class ModelResult:
    """Per-sample flags of one model on the verify images: clean-correct, and correct-and-robust per attack."""

    info: ArtifactInfo
    clean_correct: torch.Tensor  # (N,) bool
    robust_correct: dict[str, torch.Tensor] = field(default_factory=dict)  # attack -> (N,) bool, implies clean
    queries: dict[str, QueryStats] = field(default_factory=dict)  # query attacks only
    per_source: dict[str, dict[str, float]] = field(default_factory=dict)  # transfer attack -> source -> acc
    runtime_seconds: float = 0.0  # wall time inside the backend's predict, whole run
    gradients: str = "own"  # whose gradients its white-box attacks used: own | twin | none
    twin: TwinAgreement | None = None  # the twin's agreement with the model, when a twin crafted its attacks
    twin_error: str | None = None  # why an exported model has no twin

    @property
    def clean_acc(self) -> float:
        return _mean(self.clean_correct)

    @property
    def robust_acc(self) -> dict[str, float]:
        return {name: _mean(flags) for name, flags in self.robust_correct.items()}

    @property
    def worst_case_correct(self) -> torch.Tensor:
        """(N,) bool: correct on the clean image and under every attack."""
        flags = self.clean_correct.clone()
        for attack_flags in self.robust_correct.values():
            flags &= attack_flags
        return flags

    @property
    def worst_case_acc(self) -> float:
        return _mean(self.worst_case_correct)

    def has(self, row: str) -> bool:
        """Whether this model has a figure for ``row`` (it may not have faced every attack of the table)."""
        return row in (CLEAN_ROW, WORST_CASE_ROW) or row in self.robust_correct

    def flags(self, row: str) -> torch.Tensor:
        if row == CLEAN_ROW:
            return self.clean_correct
        if row == WORST_CASE_ROW:
            return self.worst_case_correct
        return self.robust_correct[row]

    def ci95(self, row: str) -> tuple[float, float]:
        """The 95 % Wilson interval of this model's accuracy on ``row`` (fractions)."""
        flags = self.flags(row)
        return wilson_ci95(int(flags.sum()), len(flags))

    def to_json(self) -> dict[str, Any]:
        square = self.queries.get("square")
        rows = [CLEAN_ROW, *self.robust_correct, WORST_CASE_ROW]
        return {
            **self.info.to_json(),
            "clean_acc": self.clean_acc,
            "robust_acc": self.robust_acc,
            "worst_case_acc": self.worst_case_acc,
            "ci95": {row: [round(bound, 4) for bound in self.ci95(row)] for row in rows},
            "queries": square.to_json() if square else None,
            "transfer_sources": self.per_source,
            "runtime_seconds": round(self.runtime_seconds, 3),
            "gradients": self.gradients,
            "twin": self.twin.to_json() if self.twin is not None else None,
        }


@dataclass
class VerifyReport:
    """The result of :func:`rslad_edge.verify.verify`: the artifact's figures, the reference's, and how they compare."""

    artifact: ModelResult
    reference: ModelResult | None
    attacks: list[str]
    n: int
    eps: float
    seed: int
    sources: list[str] = field(default_factory=list)
    attack_details: dict[str, AttackDetail] = field(default_factory=dict)  # attack -> what it ran, and on what
    attack_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    divergence: DivergenceStats | None = None

    @property
    def rows(self) -> list[str]:
        """The table's rows: clean, each attack in order, the worst case."""
        return [CLEAN_ROW, *self.attacks, WORST_CASE_ROW]

    @property
    def clean_acc(self) -> float:
        return self.artifact.clean_acc

    @property
    def robust_acc(self) -> dict[str, float]:
        return self.artifact.robust_acc

    @property
    def worst_case_acc(self) -> float:
        return self.artifact.worst_case_acc

    def accuracy_ci95(self, row: str, *, reference: bool = False) -> tuple[float, float] | None:
        """The 95 % Wilson interval of :meth:`accuracy` (fractions); None where that model did not face the attack."""
        result = self.reference if reference else self.artifact
        if result is None or not result.has(row):
            return None
        return result.ci95(row)

    def accuracy(self, row: str, *, reference: bool = False) -> float | None:
        """The artifact's (or the reference's) accuracy on ``row``; None where that model did not face the attack."""
        result = self.reference if reference else self.artifact
        if result is None or not result.has(row):
            return None
        return _mean(result.flags(row))

    def _compared(self, row: str) -> bool:
        return self.reference is not None and self.reference.has(row) and self.artifact.has(row)

    def drop_pp(self, row: str) -> float | None:
        """Reference minus artifact accuracy in points (positive: the artifact is worse), on the same images; None
        without a reference or where one of the two did not face the attack.

        On the worst case: the reference's worst case over what it faced (the checkpoint's own worst case: white-box,
        Square, transfer from other models) minus the artifact's over everything it faced.
        """
        if not self._compared(row):
            return None
        assert self.reference is not None
        return 100 * (_mean(self.reference.flags(row)) - _mean(self.artifact.flags(row)))

    def drop_ci95_pp(self, row: str) -> float | None:
        """Half-width of the 95 % interval of the drop, as a paired difference over the same images (points)."""
        if not self._compared(row) or self.n < 2:
            return None
        assert self.reference is not None
        return paired_drop_ci95_pp(self.reference.flags(row), self.artifact.flags(row))

    def gate_failures(self, max_drop_pp: float) -> list[str]:
        """The attacks (and the worst case) whose robust accuracy dropped by more than ``max_drop_pp`` points.

        Clean accuracy is shown but not gated: export's parity check already holds the clean predictions to the
        reference; the gate is about robustness.
        """
        if self.reference is None:
            return []
        # The tolerance keeps float rounding (0.6 - 0.3 = 0.30000000000000004) from failing a drop equal to the bound.
        return [row for row in [*self.attacks, WORST_CASE_ROW] if (self.drop_pp(row) or 0.0) > max_drop_pp + 1e-9]

    def gate_verdict(self, max_drop_pp: float) -> dict[str, Any]:
        """What the ``--max-drop`` gate decided, for the CLI, the verify JSON (``"gate"``) and the pipeline report."""
        failed = self.gate_failures(max_drop_pp)
        if failed:
            message = f"dropped by more than {max_drop_pp:g} points against the reference on: " + ", ".join(
                f"{row} {100 * (self.accuracy(row, reference=True) or 0):.1f}% -> "
                f"{100 * (self.accuracy(row) or 0):.1f}% (-{self.drop_pp(row):.1f} pp)"
                for row in failed
            )
        else:
            message = f"every drop within {max_drop_pp:g} points"
        return {"max_drop_pp": max_drop_pp, "passed": not failed, "message": message}

    def check_gate(self, max_drop_pp: float | None) -> None:
        """Raise GateFailedError (exit 3) naming each attack whose drop exceeds ``max_drop_pp``; None: no gate."""
        if max_drop_pp is None:
            return
        if self.reference is None:
            raise ConfigError("--max-drop needs --reference: there is nothing to measure a drop against")
        verdict = self.gate_verdict(max_drop_pp)
        if not verdict["passed"]:
            raise GateFailedError(f"robust accuracy of {self.artifact.info.path} {verdict['message']}")

    def to_json(self) -> dict[str, Any]:
        """The verify JSON schema (accuracies as fractions), plus drops, warnings, config and versions."""
        square = self.artifact.queries.get("square")
        artifact = self.artifact.to_json()
        return {
            **self.artifact.info.to_json(),
            "n": self.n,
            "eps": self.eps,
            "seed": self.seed,
            "clean_acc": self.clean_acc,
            "robust_acc": self.robust_acc,
            "worst_case_acc": self.worst_case_acc,
            "ci95": artifact["ci95"],
            "reference": self.reference.to_json() if self.reference is not None else None,
            "seconds": round(self.seconds, 3),
            "queries": square.to_json() if square else None,
            "drop_pp": {row: _round(self.drop_pp(row)) for row in self.rows} if self.reference else None,
            "drop_ci95_pp": {row: _round(self.drop_ci95_pp(row)) for row in self.rows} if self.reference else None,
            "attacks": list(self.attacks),
            "sources": list(self.sources),
            "attack_details": {name: detail.to_json() for name, detail in self.attack_details.items()},
            "attack_seconds": {name: round(s, 3) for name, s in self.attack_seconds.items()},
            "transfer_sources": artifact["transfer_sources"],
            "runtime_seconds": artifact["runtime_seconds"],
            "gradients": artifact["gradients"],
            "twin": artifact["twin"],
            "twin_unavailable": self.artifact.twin_error,
            "divergence": self.divergence.to_json() if self.divergence is not None else None,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "config": dict(self.config),
            "versions": versions(),
        }


def versions() -> dict[str, str | None]:
    """Versions of what computed the figures, None for a package that is not installed."""
    return package_versions(VERIFY_PACKAGES)


def _mean(flags: torch.Tensor) -> float:
    return int(flags.sum()) / flags.numel() if flags.numel() else float("nan")  # exact counts, no float32 mean


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
