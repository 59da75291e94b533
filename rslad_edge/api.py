"""The Python API: the four stages as functions of the typed configs the CLI builds, returning the run record's
typed results. What ``rslad-edge distill / export / verify / bench`` do, without the terminal::

    from rslad_edge.api import BenchConfig, DistillConfig, ExportConfig, VerifyConfig, bench, distill, export, verify

    run = distill(DistillConfig(student="torchvision:mobilenet_v3_small", train_teacher="torchvision:resnet18",
                                dataset="imagefolder", data_root="my_images", input_size=[96, 96], out="runs/mine"))
    int8 = export(ExportConfig(checkpoint=run.student.path, precision="int8", out="runs/mine/export"))
    report = verify(VerifyConfig(artifact=int8.artifacts()[0].path, reference=run.student.path, n=500))
    timing = bench([run.student.path, *(a.path for a in int8.artifacts())], BenchConfig(batch=[1, 64]))

Errors are :class:`rslad_edge.errors.RsladEdgeError` subclasses with the CLI's one-line messages. ``distill``
builds its config with the preset's values under yours when given a dict: ``distill({"preset": "smoke"})``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rslad_edge.bench.core import BenchReport
from rslad_edge.bench.suite import BenchConfig
from rslad_edge.distill.config import DistillConfig, resolve_config
from rslad_edge.distill.run import DistillResult
from rslad_edge.export import ExportConfig
from rslad_edge.export.exporter import ExportResult
from rslad_edge.verify.report import VerifyReport
from rslad_edge.verify.run import VerifyConfig

__all__ = [
    "BenchConfig", "DistillConfig", "ExportConfig", "VerifyConfig", "bench", "distill", "export", "verify",
]


def distill(cfg: DistillConfig | Mapping[str, Any], *, resume: bool = False, force: bool = False) -> DistillResult:
    """Train a student (``rslad-edge distill``); a mapping is read as the CLI's options over its ``preset``."""
    from rslad_edge.distill.run import distill_student

    if not isinstance(cfg, DistillConfig):
        values = dict(cfg)
        cfg = resolve_config(values.pop("preset", None), cli_values=values, source="distill()")
    return distill_student(cfg, resume=resume, force=force)


def export(cfg: ExportConfig) -> ExportResult:
    """Export a checkpoint (``rslad-edge export``); ``.artifacts()`` of the result are the files written."""
    from rslad_edge.export.exporter import export as export_stage

    return export_stage(cfg)


def verify(cfg: VerifyConfig) -> VerifyReport:
    """Attack an artifact and its reference (``rslad-edge verify``). The gate is yours to apply:
    ``report.check_gate(cfg.max_drop)`` raises GateFailedError as the CLI does (exit 3)."""
    from rslad_edge.verify.run import verify_artifact

    return verify_artifact(cfg)


def bench(artifacts: Sequence[str | Path], cfg: BenchConfig | None = None, *,
          json_path: str | Path | None = None) -> BenchReport:
    """Time artifacts on this machine (``rslad-edge bench``)."""
    from rslad_edge.bench.suite import bench_artifacts

    return bench_artifacts(artifacts, cfg or BenchConfig(), json_path=json_path)
