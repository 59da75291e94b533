"""distill -> export -> verify -> bench -> report, composed from each stage's public function.

Every stage has a key: the hash of its own config and of the files it reads. ``pipeline.json`` in the run directory
records the key each finished stage ran with; a re-run with ``--resume`` skips a stage whose key is unchanged and
whose outputs exist, so an interrupted pipeline continues where it stopped (distillation itself resumes from its
last checkpoint). A failed verify gate does not stop the pipeline: bench and the report still run, the report shows
the verdict, and the command exits 3 at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rslad_edge.errors import ConfigError, GateFailedError, RunDirError
from rslad_edge.io import sha256_file, write_json
from rslad_edge.pipeline.config import STAGES

logger = logging.getLogger(__name__)

STATE_FILE = "pipeline.json"
PIPELINE_OUTPUTS = ("export", "verify", "bench", "report.md", "report.html", "report_files", STATE_FILE)


@dataclass
class PipelineResult:
    out: Path
    report_html: Path
    report_md: Path
    skipped: list[str] = field(default_factory=list)
    gate_failures: list[str] = field(default_factory=list)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _State:
    """``pipeline.json``: per stage, the key it last finished with and its outputs."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out / STATE_FILE
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}

    def done(self, stage: str, key: str) -> bool:
        entry = self.data["stages"].get(stage)
        return bool(entry and entry.get("key") == key and entry.get("finished")
                    and all((self.out / p).exists() for p in entry.get("outputs", [])))

    def outputs(self, stage: str) -> list[str]:
        return [str(self.out / p) for p in self.data["stages"][stage].get("outputs", [])]

    def started(self, stage: str, key: str) -> bool:
        entry = self.data["stages"].get(stage)
        return bool(entry and entry.get("key") == key)

    def mark(self, stage: str, key: str, *, finished: bool, outputs: list[str] | None = None, **extra: Any) -> None:
        # Outputs relative to the run directory, so a moved or copied run still resumes.
        relative = [str(Path(p).resolve().relative_to(self.out.resolve())) for p in outputs or []]
        self.data["stages"][stage] = {"key": key, "finished": finished, "outputs": relative, **extra}
        write_json(self.path, self.data)


def _dataclass_kwargs(cls: type, section: dict[str, Any], stage: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = [k for k in section if k not in names and k not in skip]
    if unknown:
        raise ConfigError(f"pipeline section '{stage}': unknown option '{unknown[0]}'")
    return {k: v for k, v in section.items() if k in names}


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
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out '{out}' is a file, not a directory")
    if (out / STATE_FILE).exists() and not (resume or force):
        raise RunDirError(f"--out '{out}' already holds a pipeline run: pass --resume to continue it (finished stages "
                          "are skipped) or --force to start over (which deletes it)")
    if force:
        for name in PIPELINE_OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    state = _State(out)
    result = PipelineResult(out=out, report_html=out / "report.html", report_md=out / "report.md")
    timings: dict[str, float] = {}

    def stage(name: str, key: str, run: Callable[[], list[str]]) -> list[str]:
        if state.done(name, key):
            say(name, "skip")
            result.skipped.append(name)
            return state.outputs(name)
        say(name, "run")
        started = time.perf_counter()
        outputs = run()
        timings[name] = time.perf_counter() - started
        state.mark(name, key, finished=True, outputs=outputs, seconds=timings[name])
        return outputs

    # -- distill
    from rslad_edge.distill.config import resolve_config
    from rslad_edge.distill.trainer import train

    distill_section = dict(sections["distill"])
    distill_cfg = resolve_config(distill_section.pop("preset", None), cli_values={**distill_section, "out": str(out)})
    distill_key = _key({k: v for k, v in distill_cfg.to_dict().items() if k != "out"})

    def run_distill() -> list[str]:
        can_resume = state.started("distill", distill_key) and (out / "checkpoints" / "last.pt").exists()
        state.mark("distill", distill_key, finished=False)
        student = train(distill_cfg, resume=can_resume, force=not can_resume, observer=distill_observer)
        return [str(student)]

    (student_path,) = stage("distill", distill_key, run_distill)
    student_path = Path(student_path)
    student_sha = sha256_file(student_path)

    # -- export
    artifacts = [student_path] + [Path(p) for p in stage(
        "export", _key(sections["export"], student_sha),
        lambda: _export_all(sections["export"], student_path, out / "export", distill_cfg),
    )]

    # -- verify
    artifact_shas = [sha256_file(p) for p in artifacts]
    verify_outputs = stage(
        "verify", _key(sections["verify"], artifact_shas),
        lambda: _verify_all(sections["verify"], artifacts, student_path, out / "verify", distill_cfg),
    )
    result.gate_failures = _gate_failures(verify_outputs)

    # -- bench
    stage("bench", _key(sections["bench"], artifact_shas, verify_outputs),
          lambda: _bench_all(sections["bench"], artifacts, verify_outputs, out / "bench"))

    # -- report (always: it is cheap and reads everything above)
    from rslad_edge.pipeline.report import write_report

    say("report", "run")
    write_report(out, sections, result.gate_failures)
    if result.gate_failures:
        raise GateFailedError(
            "verify gate failed: " + "; ".join(result.gate_failures) + f". The report is {result.report_html}"
        )
    return result


def _export_all(section: dict[str, Any], student: Path, export_dir: Path, distill_cfg: Any) -> list[str]:
    import torch

    from rslad_edge.export import ExportConfig, export

    options = dict(section)
    precisions = list(options.pop("precisions", ["fp32", "int8"]))
    if torch.cuda.is_available() and "fp16" not in precisions:
        precisions.append("fp16")  # fp16 pays off on GPUs only
    build_engines = _tensorrt_available()
    kwargs = _dataclass_kwargs(ExportConfig, options, "export")
    kwargs.setdefault("dataset", distill_cfg.dataset)
    kwargs.setdefault("data_root", distill_cfg.data_root)
    outputs = []
    for precision in precisions:
        result = export(ExportConfig(checkpoint=student, precision=precision, out=export_dir,
                                     format="trt" if build_engines else "onnx", **kwargs))
        outputs.append(str(result.onnx_path))
        if result.engine_path is not None:
            outputs.append(str(result.engine_path))
    return outputs


def _tensorrt_available() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None


def _verify_all(section: dict[str, Any], artifacts: list[Path], student: Path, verify_dir: Path,
                distill_cfg: Any) -> list[str]:
    """Verify every artifact on the same seeded images; exports against the student checkpoint (their reference).
    The gate's verdict goes into each JSON (``"gate"``) for the report and the final exit code."""
    from rslad_edge.verify import VerifyConfig, verify_artifact

    section = dict(section)
    # The checkpoint and the exports get different attacks (white-box vs transfer + Square): one list each.
    checkpoint_attacks = section.pop("checkpoint_attacks", None)
    export_attacks = section.pop("export_attacks", None)
    options = _dataclass_kwargs(VerifyConfig, section, "verify")
    options.setdefault("dataset", distill_cfg.dataset)
    options.setdefault("data_root", distill_cfg.data_root)
    max_drop = options.pop("max_drop", None)
    outputs = []
    for artifact in artifacts:
        is_student = artifact == student
        attacks = options.get("attacks") or (checkpoint_attacks if is_student else export_attacks)
        cfg = VerifyConfig(artifact=artifact, reference=None if is_student else student,
                           max_drop=None if is_student else max_drop, **{**options, "attacks": attacks})
        report = verify_artifact(cfg)
        record = report.to_json()
        if cfg.max_drop is not None:
            record["gate"] = report.gate_verdict(cfg.max_drop)
        json_path = verify_dir / f"{artifact.name}.json"
        write_json(json_path, record)
        outputs.append(str(json_path))
    return outputs


def _gate_failures(verify_jsons: list[str]) -> list[str]:
    failures = []
    for path in verify_jsons:
        record = json.loads(Path(path).read_text())
        gate = record.get("gate") or {}
        if gate.get("passed") is False:
            failures.append(f"{Path(record['artifact']).name}: {gate.get('message', 'drop above --max-drop')}")
    return failures


def _bench_all(section: dict[str, Any], artifacts: list[Path], verify_jsons: list[str], bench_dir: Path) -> list[str]:
    import importlib.util

    from rslad_edge.bench import bench_artifacts

    options = dict(section)
    device = options.pop("device", "cpu")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    batches = options.pop("batch", [1, 64])
    json_path = bench_dir / f"{device}.json"
    plot = importlib.util.find_spec("matplotlib") is not None
    bench_artifacts(artifacts, device=device, batches=batches, verify_jsons=verify_jsons, json_path=json_path,
                    plot=plot, **options)
    return [str(json_path)]


__all__ = ["STAGES", "PipelineResult", "run_pipeline"]
