"""The distill stage around train(): the smoke preset's own teacher, the run directory, torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rslad_edge.distill import distill_student, resolve_config
from rslad_edge.errors import RunDirError
from rslad_edge.models import read_checkpoint

SMOKE_BUDGET = {"train_subset": 96, "batch_size": 32, "epochs": 1, "eval_n": 32, "attack_steps": 1,
                "precision": "fp32", "device": "cpu"}
SMOKE_ARGS = ["--preset", "smoke", "--train-subset", "96", "--batch-size", "32", "--epochs", "1", "--eval-n", "32",
              "--attack-steps", "1", "--precision", "fp32", "--device", "cpu"]


def _smoke(out: Path):
    return resolve_config("smoke", cli_values={**SMOKE_BUDGET, "out": str(out)})


def test_smoke_preset_trains_its_teacher_first_then_distills_from_it(tmp_path):
    result = distill_student(_smoke(tmp_path / "run"))
    teacher = tmp_path / "run" / "teacher" / "student.pt"
    assert result.teacher is not None and result.teacher.path == teacher
    assert result.config.teacher == str(teacher)
    assert read_checkpoint(teacher)["meta"]["method"] == "sat"
    meta = read_checkpoint(result.student.path)["meta"]
    assert meta["method"] == "rslad" and meta["teacher"] == str(teacher)
    assert result.student.kind == "checkpoint" and len(result.student.sha256) == 64
    assert result.metrics_file.is_file() and result.teacher_metrics_file.is_file()


def test_an_existing_run_is_refused_before_its_teacher_is_trained_and_force_deletes_the_teacher(tmp_path):
    out = tmp_path / "run"
    (out / "teacher").mkdir(parents=True)
    (out / "teacher" / "stale.txt").write_text("from an earlier run")
    with pytest.raises(RunDirError, match="--resume"):
        distill_student(_smoke(out))
    assert not (out / "teacher" / "checkpoints").exists()  # nothing was trained
    distill_student(_smoke(out), force=True)
    assert not (out / "teacher" / "stale.txt").exists() and (out / "teacher" / "student.pt").exists()


def test_torchrun_two_gloo_processes_run_the_smoke_preset_with_its_own_teacher(tmp_path):
    """The nested train() used to shut the process group down under the student's run: both ranks then died."""
    torchrun = Path(sys.executable).with_name("torchrun")
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp"
    result = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), "-m", "rslad_edge.cli", "distill",
         *SMOKE_ARGS, "--out", str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert (out / "teacher" / "student.pt").is_file() and (out / "student.pt").is_file()
    assert read_checkpoint(out / "student.pt")["meta"]["method"] == "rslad"
