"""The Python API: the four stages as functions of their typed configs, returning the run record's types."""

from __future__ import annotations

import torch

from rslad_edge.api import BenchConfig, DistillConfig, ExportConfig, VerifyConfig, bench, distill, export, verify
from rslad_edge.distill.run import DistillResult
from rslad_edge.export.exporter import ExportResult
from rslad_edge.models import create_model, save_checkpoint
from rslad_edge.record import Artifact
from rslad_edge.verify.report import VerifyReport


def test_the_four_stages_chain_in_python(tmp_path):
    torch.manual_seed(0)
    teacher = save_checkpoint(tmp_path / "teacher.pt", create_model("smallcnn-wide"), "smallcnn-wide", num_classes=10,
                              input_size=(32, 32))
    run = distill(DistillConfig(preset="smoke", dataset="shapes", student="smallcnn", teacher=str(teacher),
                                train_subset=128, epochs=1, batch_size=64, val_n=64, attack_steps=1,
                                precision="fp32", device="cpu", out=str(tmp_path / "run")))
    assert isinstance(run, DistillResult) and isinstance(run.student, Artifact) and run.student.path.is_file()
    exported = export(ExportConfig(checkpoint=run.student.path, precision="int8", out=tmp_path / "export",
                                   calib_n=32, parity_n=32, min_agreement=0.0))
    assert isinstance(exported, ExportResult)
    int8 = exported.artifacts()[0]
    assert int8.path.name == "student.int8.onnx" and int8.precision == "int8"
    report = verify(VerifyConfig(artifact=int8.path, reference=run.student.path, n=16, attacks=["pgd_sat"],
                                 device="cpu"))
    assert isinstance(report, VerifyReport) and report.n == 16
    timing = bench([run.student.path, int8.path], BenchConfig(batch=[1], seconds=0.05, warmup=1, warmup_seconds=0.01,
                                                             min_iters=2, threads=1))
    assert {row.batch for row in timing.results} == {1} and len(timing.results) == 2


def test_distill_takes_a_mapping_of_cli_options_over_its_preset(tmp_path):
    run = distill({"preset": "smoke", "train_subset": 128, "epochs": 1, "batch_size": 64, "val_n": 64,
                   "attack_steps": 1, "precision": "fp32", "device": "cpu", "out": str(tmp_path / "smoke")})
    assert run.config.student == "smallcnn" and run.teacher is not None  # the smoke preset trained its teacher
