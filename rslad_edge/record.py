"""The run record: what each stage made and measured, typed, and the one file of a pipeline run (``run.json``).

This is the contract between stages. A stage function returns a typed result; the pipeline turns it into the
entries below, passes them along in memory and writes the record atomically after every stage. The report, the
verify gate and bench's accuracy column read these entries, never a glob of another stage's folder. The per-stage
files (``verify/*.json``, ``bench/*.json``, ``export/*.json`` sidecars) stay in the run directory for people to
read; the record names each of them.

- :class:`Artifact`: a file a stage made (checkpoint, ONNX, .ort, .pte, engine): path, sha256, kind, precision,
  metadata.
- :class:`VerifyEntry`: one artifact's accuracies on the verify sample, its drop against the checkpoint (read from
  verify, never recomputed), its twin's agreement, the divergence rate and the gate's verdict.
- :class:`BenchEntry`: one bench run (device, batch sizes, the JSON with every row).
- :class:`StageEntry`: per stage, the key (hash of its config and inputs) it finished with, so ``--resume`` skips it.
- :class:`RunRecord`: all of the above; ``RunRecord.load`` refuses a truncated file or one from a newer version with
  one line naming the file.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rslad_edge.errors import RunDirError
from rslad_edge.io import sha256_file, write_json
from rslad_edge.runtime import CHECKPOINT_SUFFIXES, ENGINE_SUFFIXES, EXECUTORCH_SUFFIXES, ORT_FORMAT_SUFFIXES

RECORD_FILE = "run.json"
RECORD_FORMAT = "rslad-edge/run/1"
RECORD_VERSION = 1


def artifact_kind(path: str | Path) -> str:
    """checkpoint, onnx, ort (ONNX Runtime Mobile's format), executorch (a .pte program) or engine, from the file
    name (what ``load_runner`` dispatches on)."""
    suffix = Path(path).suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        return "checkpoint"
    if suffix in ENGINE_SUFFIXES:
        return "engine"
    if suffix in EXECUTORCH_SUFFIXES:
        return "executorch"
    if suffix in ORT_FORMAT_SUFFIXES:
        return "ort"
    return suffix.lstrip(".") or "file"


@dataclass(frozen=True)
class Artifact:
    """A file one stage made and the next ones consume. ``path`` is absolute while a run is in memory; the record
    stores it relative to the run directory, so a moved or copied run still resumes."""

    path: Path
    sha256: str
    kind: str  # checkpoint | onnx | ort | executorch | engine
    precision: str  # fp32 | fp16 | int8 (the exported graph's; a checkpoint is fp32)
    size_mb: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path, *, precision: str = "fp32", metadata: dict[str, Any] | None = None
                  ) -> Artifact:
        """Hash and measure ``path`` (plus its ONNX ``.data`` external weights for the size)."""
        path = Path(path)
        size = path.stat().st_size
        external = path.with_name(path.name + ".data")
        if external.is_file():
            size += external.stat().st_size
        return cls(path=path, sha256=sha256_file(path), kind=artifact_kind(path), precision=precision,
                   size_mb=size / 1e6, metadata=dict(metadata or {}))

    @property
    def name(self) -> str:
        return self.path.name

    def to_json(self, root: Path) -> dict[str, Any]:
        return {**asdict(self), "path": _relative(self.path, root)}

    @classmethod
    def from_json(cls, data: dict[str, Any], root: Path) -> Artifact:
        return cls(**{**data, "path": root / data["path"]})


@dataclass(frozen=True)
class GateVerdict:
    """The ``--max-drop`` gate on one artifact: the bound, whether it held, and a sentence saying why."""

    max_drop_pp: float
    passed: bool
    message: str


@dataclass(frozen=True)
class VerifyEntry:
    """One artifact's figures on the verify sample (fractions), as verify measured them."""

    artifact_sha256: str
    json_path: Path  # the full verify JSON (every attack, the reference, warnings, config)
    clean_acc: float
    robust_acc: dict[str, float]  # per attack
    worst_case_acc: float
    worst_case_ci95: list[float] | None = None  # its 95 % Wilson interval [low, high]
    drop_pp: float | None = None  # the checkpoint's worst case minus this artifact's, on the same images
    drop_ci95_pp: float | None = None  # paired 95 % half-width of that drop
    reference_sha256: str | None = None
    gate: GateVerdict | None = None
    warnings: list[str] = field(default_factory=list)
    twin_agreement: float | None = None  # top-1 agreement of the twin its white-box attacks were crafted on
    divergence_rate: float | None = None  # fooled where the checkpoint is not, of the images both got right

    def to_json(self, root: Path) -> dict[str, Any]:
        return {**asdict(self), "json_path": _relative(self.json_path, root)}

    @classmethod
    def from_json(cls, data: dict[str, Any], root: Path) -> VerifyEntry:
        gate = data.get("gate")
        return cls(**{**data, "json_path": root / data["json_path"],
                      "gate": GateVerdict(**gate) if gate is not None else None})


@dataclass(frozen=True)
class BenchEntry:
    """One bench run: where it ran, the batch sizes, and the JSON that holds every row (and its plot, if any)."""

    device: str
    batches: list[int]
    json_path: Path
    plot_path: Path | None = None

    def to_json(self, root: Path) -> dict[str, Any]:
        return {**asdict(self), "json_path": _relative(self.json_path, root),
                "plot_path": _relative(self.plot_path, root) if self.plot_path else None}

    @classmethod
    def from_json(cls, data: dict[str, Any], root: Path) -> BenchEntry:
        plot = data.get("plot_path")
        return cls(**{**data, "json_path": root / data["json_path"], "plot_path": root / plot if plot else None})


@dataclass
class StageEntry:
    """A stage's key (hash of its config and inputs), whether it finished, its files and how long it took."""

    key: str
    finished: bool = False
    outputs: list[str] = field(default_factory=list)  # relative to the run directory
    seconds: float | None = None


@dataclass
class RunRecord:
    """Everything a pipeline run made and measured; ``save`` writes ``run.json`` atomically."""

    root: Path
    dataset: dict[str, str | None] = field(default_factory=dict)  # {"name", "root"}: resolved once, used by all
    stages: dict[str, StageEntry] = field(default_factory=dict)
    student: Artifact | None = None
    teacher: Artifact | None = None  # the smoke preset's own teacher, when it trained one
    metrics_files: dict[str, Path] = field(default_factory=dict)  # "student" / "teacher" -> metrics.jsonl
    exports: list[Artifact] = field(default_factory=list)
    # exports whose int8 search shipped nothing: {"artifact": the closest candidate kept under its failed-gate name
    # (relative to root), "message": why, "search": the search's table (export/search.py)}
    export_failures: list[dict[str, Any]] = field(default_factory=list)
    verify: list[VerifyEntry] = field(default_factory=list)
    bench: BenchEntry | None = None
    created: str = field(default_factory=lambda: _now())

    @property
    def path(self) -> Path:
        return self.root / RECORD_FILE

    @property
    def artifacts(self) -> list[Artifact]:
        """The student checkpoint first, then every export, in the order they were made."""
        return ([self.student] if self.student is not None else []) + list(self.exports)

    def verify_entry(self, artifact: Artifact) -> VerifyEntry | None:
        return next((v for v in self.verify if v.artifact_sha256 == artifact.sha256), None)

    def gate_failures(self) -> list[str]:
        """One line per artifact whose gate failed (empty: passed, or no gate set)."""
        names = {a.sha256: a.name for a in self.artifacts}
        return [f"{Path(failure['artifact']).name}: {failure['message']}" for failure in self.export_failures] + [
            f"{names.get(v.artifact_sha256, v.artifact_sha256[:12])}: {v.gate.message}"
            for v in self.verify if v.gate is not None and not v.gate.passed]

    def to_json(self) -> dict[str, Any]:
        root = self.root
        return {
            "format": RECORD_FORMAT,
            "version": RECORD_VERSION,
            "created": self.created,
            "updated": _now(),
            "dataset": dict(self.dataset),
            "stages": {name: asdict(entry) for name, entry in self.stages.items()},
            "student": self.student.to_json(root) if self.student else None,
            "teacher": self.teacher.to_json(root) if self.teacher else None,
            "metrics_files": {name: _relative(path, root) for name, path in self.metrics_files.items()},
            "exports": [a.to_json(root) for a in self.exports],
            "export_failures": list(self.export_failures),
            "verify": [v.to_json(root) for v in self.verify],
            "bench": self.bench.to_json(root) if self.bench else None,
        }

    def save(self) -> Path:
        return write_json(self.path, self.to_json())

    @classmethod
    def load(cls, root: str | Path) -> RunRecord:
        """The record in ``root``; a truncated, foreign or newer file is a RunDirError naming it and what to do."""
        root = Path(root)
        path = root / RECORD_FILE
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RunDirError(f"{path} is truncated or not JSON ({exc.msg} at line {exc.lineno}): restore it, or "
                              "start the run over with --force") from None
        if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
            raise RunDirError(f"{path} is not an rslad-edge run record: move it away, or start over with --force")
        version = data.get("version")
        if not isinstance(version, int) or version > RECORD_VERSION:
            raise RunDirError(f"{path} was written by a newer rslad-edge (record version {version}; this one reads "
                              f"{RECORD_VERSION}): upgrade rslad-edge to resume it, or start over with --force")
        try:
            return cls(
                root=root,
                dataset=dict(data.get("dataset") or {}),
                stages={name: StageEntry(**entry) for name, entry in (data.get("stages") or {}).items()},
                student=Artifact.from_json(data["student"], root) if data.get("student") else None,
                teacher=Artifact.from_json(data["teacher"], root) if data.get("teacher") else None,
                metrics_files={name: root / p for name, p in (data.get("metrics_files") or {}).items()},
                exports=[Artifact.from_json(a, root) for a in data.get("exports") or []],
                export_failures=[dict(failure) for failure in data.get("export_failures") or []],
                verify=[VerifyEntry.from_json(v, root) for v in data.get("verify") or []],
                bench=BenchEntry.from_json(data["bench"], root) if data.get("bench") else None,
                created=str(data.get("created") or _now()),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RunDirError(f"{path} is damaged ({type(exc).__name__}: {exc}): restore it, or start over with "
                              "--force") from None


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(Path(path).resolve())  # outside the run (a user's teacher): absolute


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
