"""distill -> export -> verify -> bench -> report, composed from each stage's public function.

The whole configuration is checked first (:func:`check_pipeline_config`): nothing is written before every section
is a valid typed config. Each stage function returns a typed result; the pipeline keeps them in a
:class:`~rslad_edge.record.RunRecord` and writes ``run.json`` after every stage. The next stages, the gate and the
report read that record, never a glob of a stage's folder.

Every stage has a key: the hash of its own config and of the files it reads (their sha256). ``--resume`` skips a
stage whose key is unchanged and whose outputs exist, so an interrupted pipeline continues where it stopped
(distillation itself resumes from its last checkpoint). A stage that runs again first removes the files it wrote
last time (as listed in the record), so a changed configuration never leaves stale results beside the new ones.
A failed gate does not stop the pipeline: an int8 export whose search ships nothing is recorded and the other
artifacts go on, a failed verify gate lets bench run; the report shows the verdicts (and every search's table), and
the command exits 3 at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rslad_edge.errors import GateFailedError, RunDirError
from rslad_edge.pipeline.config import STAGES, PipelineConfig, check_pipeline_config
from rslad_edge.record import RECORD_FILE, Artifact, BenchEntry, GateVerdict, RunRecord, StageEntry, VerifyEntry

if TYPE_CHECKING:
    from rslad_edge.verify import VerifyConfig

logger = logging.getLogger(__name__)

PIPELINE_OUTPUTS = ("export", "verify", "bench", "report.md", "report.html", "report_files", RECORD_FILE)


@dataclass
class PipelineResult:
    out: Path
    report_html: Path
    report_md: Path
    record: RunRecord
    skipped: list[str] = field(default_factory=list)
    gate_failures: list[str] = field(default_factory=list)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_pipeline(
    sections: dict[str, dict[str, Any]],
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    distill_observer: Any = None,
    on_stage: Callable[[str, str], None] | None = None,
) -> PipelineResult:
    """Run every stage into ``out``; ``on_stage(stage, status)`` is told "run" or "skip" for each."""
    out = Path(out)
    say = on_stage or (lambda stage, status: None)
    cfg = check_pipeline_config(sections, out, with_fp16=_cuda_available(), engines=_tensorrt_available())
    record = _open_record(out, resume=resume, force=force)
    record.dataset = cfg.dataset
    result = PipelineResult(out=out, report_html=out / "report.html", report_md=out / "report.md", record=record)

    def stage(name: str, key: str, run: Callable[[], list[Path]]) -> None:
        previous = record.stages.get(name)
        if previous and previous.key == key and previous.finished and all(
                (out / p).exists() for p in previous.outputs):
            say(name, "skip")
            result.skipped.append(name)
            return
        say(name, "run")
        if previous and previous.finished and name != "distill":  # distill resumes or restarts its own run dir
            _remove(out, previous.outputs)
        record.stages[name] = StageEntry(key)
        record.save()
        started = time.perf_counter()
        outputs = run()
        record.stages[name] = StageEntry(key, finished=True, seconds=round(time.perf_counter() - started, 1),
                                         outputs=[str(Path(p).resolve().relative_to(out.resolve())) for p in outputs])
        record.save()

    _run_distill(cfg, record, stage, distill_observer)
    _run_export(cfg, record, stage)
    _run_verify(cfg, record, stage)
    result.gate_failures = record.gate_failures()
    _run_bench(cfg, record, stage)

    from rslad_edge.pipeline.report import write_report  # always: it is cheap and reads the record

    say("report", "run")
    write_report(record, sections)
    if result.gate_failures:
        raise GateFailedError(
            "gate failed: " + "; ".join(result.gate_failures) + f". The report is {result.report_html}"
        )
    return result


StageFn = Callable[[str, str, Callable[[], list[Path]]], None]


def _run_distill(cfg: PipelineConfig, record: RunRecord, stage: StageFn, observer: Any) -> None:
    from rslad_edge.distill import distill_student

    out = record.root
    key = _key({k: v for k, v in cfg.distill.to_dict().items() if k != "out"})

    def run() -> list[Path]:
        previous = record.stages.get("distill")
        can_resume = bool(previous and previous.key == key and (out / "checkpoints" / "last.pt").exists())
        distilled = distill_student(cfg.distill, resume=can_resume, force=not can_resume, observer=observer)
        record.student, record.teacher = distilled.student, distilled.teacher
        record.metrics_files = {"student": distilled.metrics_file}
        if distilled.teacher_metrics_file is not None:
            record.metrics_files["teacher"] = distilled.teacher_metrics_file
        return [distilled.student.path, distilled.metrics_file]

    stage("distill", key, run)
    assert record.student is not None
    record.student = _current(record.student)  # the file as it is now (a skipped stage: as the record left it)


def _run_export(cfg: PipelineConfig, record: RunRecord, stage: StageFn) -> None:
    """Every export of the plan; one whose int8 search ships nothing is recorded (its closest candidate kept under
    its failed-gate name, not verified or benched) and the rest go on: the report shows its search, and the run
    ends with exit 3 as for a failed verify gate."""
    from rslad_edge.export import export
    from rslad_edge.export.search import SearchFailedError, SearchResult
    from rslad_edge.runtime import sidecar_path

    assert record.student is not None

    def run() -> list[Path]:
        record.exports, record.export_failures, files = [], [], []
        for export_cfg in cfg.exports:
            try:
                exported = export(export_cfg)
            except SearchFailedError as exc:  # the other artifacts go on; the report shows the search, exit 3
                logger.warning("%s", exc)
                search = exc.result.to_json() if isinstance(exc.result, SearchResult) else exc.result
                kept = str(Path(exc.kept).resolve().relative_to(record.root.resolve())) if exc.kept else None
                record.export_failures.append({"artifact": kept or export_cfg.onnx_name, "message": str(exc),
                                               "search": search})
                files += [exc.kept, sidecar_path(exc.kept)] if exc.kept is not None else []
                continue
            record.exports += exported.artifacts()
            files += exported.files
        return files

    made = [(export_cfg.precision, export_cfg.format) for export_cfg in cfg.exports]
    stage("export", _key(cfg.sections["export"], cfg.dataset, record.student.sha256, made), run)
    record.exports = [_current(artifact) for artifact in record.exports]


def _run_verify(cfg: PipelineConfig, record: RunRecord, stage: StageFn) -> None:
    """Every artifact on the same seeded images; each export against the student checkpoint, its reference."""
    from rslad_edge.verify import verify_artifact
    from rslad_edge.verify.report import WORST_CASE_ROW

    student = record.student
    assert student is not None
    artifacts = record.artifacts

    def run() -> list[Path]:
        record.verify = []
        student_row = None  # the checkpoint's own result: each export's reference row, when settings allow
        for artifact in artifacts:
            is_student = artifact.sha256 == student.sha256 and artifact.kind == "checkpoint"
            template = cfg.verify_checkpoint if is_student else cfg.verify_export
            verify_cfg = dataclasses.replace(template, artifact=artifact.path,
                                             json_path=record.root / "verify" / f"{artifact.name}.json")
            reuse = not is_student and _same_attack_settings(cfg.verify_checkpoint, cfg.verify_export)
            report = verify_artifact(verify_cfg, reference_measured=student_row if reuse else None)
            if is_student:
                student_row = report.artifact
            gate = report.gate_verdict(verify_cfg.max_drop) if verify_cfg.max_drop is not None else None
            record.verify.append(VerifyEntry(
                artifact_sha256=artifact.sha256, json_path=verify_cfg.json_path, clean_acc=report.clean_acc,
                robust_acc=dict(report.robust_acc), worst_case_acc=report.worst_case_acc,
                worst_case_ci95=list(report.artifact.ci95(WORST_CASE_ROW)),
                drop_pp=report.drop_pp(WORST_CASE_ROW), drop_ci95_pp=report.drop_ci95_pp(WORST_CASE_ROW),
                reference_sha256=None if is_student else student.sha256,
                gate=GateVerdict(**gate) if gate is not None else None, warnings=list(report.warnings),
                twin_agreement=report.artifact.twin.agreement if report.artifact.twin is not None else None,
                divergence_rate=report.divergence.rate if report.divergence is not None else None,
            ))
        return [entry.json_path for entry in record.verify]

    stage("verify", _key(cfg.sections["verify"], cfg.dataset, [a.sha256 for a in artifacts]), run)


def _same_attack_settings(checkpoint: VerifyConfig, export: VerifyConfig) -> bool:
    """Whether the checkpoint's verify attacked it exactly as an export's verify would attack its reference (same
    images, eps, seeds, budgets, device): then the exports reuse the checkpoint's columns instead of re-running them."""
    ignored = ("artifact", "reference", "sources", "attacks", "json_path", "max_drop")

    def settings(cfg: VerifyConfig) -> dict[str, Any]:
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in ignored}

    return settings(checkpoint) == settings(export)


def _run_bench(cfg: PipelineConfig, record: RunRecord, stage: StageFn) -> None:
    from rslad_edge.bench import bench_artifacts
    from rslad_edge.bench.accuracy import accuracies_from_record
    from rslad_edge.models.external import is_factory_spec

    artifacts = record.artifacts
    accuracies = accuracies_from_record(record)
    bench_cfg = cfg.bench

    def run() -> list[Path]:
        device = bench_cfg.resolved_device()
        json_path = record.root / "bench" / f"{device}.json"
        plot = bench_cfg.plot and importlib.util.find_spec("matplotlib") is not None
        bench_artifacts([a.path for a in artifacts], bench_cfg, accuracies=accuracies, json_path=json_path, plot=plot,
                        arch=cfg.distill.student if is_factory_spec(cfg.distill.student) else None)
        record.bench = BenchEntry(device=device, batches=list(bench_cfg.batch), json_path=json_path,
                                  plot_path=json_path.with_suffix(".png") if plot else None)
        return [json_path] + ([record.bench.plot_path] if record.bench.plot_path else [])

    accuracy_key = {sha: (a.clean_acc, a.robust_acc) for sha, a in accuracies.by_sha256.items()}
    stage("bench", _key(cfg.sections["bench"], [a.sha256 for a in artifacts], accuracy_key), run)


def _open_record(out: Path, *, resume: bool, force: bool) -> RunRecord:
    """The run's record: loaded with --resume, new otherwise; refuses to overwrite a run without --force."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out '{out}' is a file, not a directory")
    has_record = (out / RECORD_FILE).exists()
    if has_record and not (resume or force):
        raise RunDirError(f"--out '{out}' already holds a pipeline run: pass --resume to continue it (finished stages "
                          "are skipped) or --force to start over (which deletes it)")
    if force:
        _remove(out, PIPELINE_OUTPUTS)
    out.mkdir(parents=True, exist_ok=True)
    if force:
        return RunRecord(root=out)
    return RunRecord.load(out) if has_record else RunRecord(root=out)


def _current(artifact: Artifact) -> Artifact:
    """The artifact as its file is now: the same path, precision and metadata, the file's own sha256 and size
    (hashed once per process; a file changed behind the record's back changes the keys of the stages after)."""
    return Artifact.from_file(artifact.path, precision=artifact.precision, metadata=artifact.metadata)


def _remove(out: Path, names: Any) -> None:
    """Delete ``names`` (paths relative to the run directory); never anything outside it."""
    root = out.resolve()
    for name in names:
        path = (out / name).resolve()
        if root not in path.parents:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _tensorrt_available() -> bool:
    return _cuda_available() and importlib.util.find_spec("tensorrt") is not None


__all__ = ["STAGES", "PipelineResult", "run_pipeline"]
