"""benchmarks/gpu_check.py, the prepared GPU check, run as a CPU dry run so that it cannot rot between GPU runs.

The dry run is the same script with tiny settings: every stage through the real CLI, on a tiny imagefolder archive
made here from the synthetic shapes data (so the unpack and decode path runs too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from rslad_edge.data import load_dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
PHASES = ["env", "data", "teacher", "student", "export_fp32", "export_fp16", "bench", "verify", "window_eager",
          "window_fp16", "autoattack", "window_compiled"]


def _run_check(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_archive(tmp_path_factory) -> Path:
    """cifar10/{train,test}/<class>/NNNN.png from shapes: 10 train and 4 test images per class, as a .tar.gz."""
    root = tmp_path_factory.mktemp("archive")
    for split, per_class in (("train", 10), ("test", 4)):
        images = load_dataset("shapes", split=split)
        written: dict[int, int] = {}
        for image, label in zip(images.images, images.labels.tolist(), strict=True):
            if written.get(label, 0) == per_class:
                continue
            folder = root / "cifar10" / split / images.classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{written.get(label, 0):04d}.png")
            written[label] = written.get(label, 0) + 1
    archive = root / "tiny-cifar10.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root / "cifar10", arcname="cifar10")
    return archive


@pytest.mark.slow  # a minute on 2 cores; `make test-all` runs it
def test_dry_run_passes_every_phase_through_the_cli_and_writes_its_record(tmp_path, tiny_archive):
    started = time.monotonic()
    result = _run_check("--dry-run", "--threads", "2", "--data", str(tiny_archive), "--out", str(tmp_path / "out"),
                        "--work", str(tmp_path / "work"), timeout=400)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "rslad-edge GPU check on cpu: passed" in result.stdout  # the one table
    record = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert record["format"] == "rslad-edge/gpu-check/1" and record["passed"] is True
    assert list(record["phases"]) == PHASES
    phases = record["phases"]
    expected_skips = {"window_fp16", "autoattack"}  # fp16 training needs CUDA; AutoAttack takes minutes on a CPU
    for name, phase in phases.items():
        assert phase["status"] == ("skipped" if name in expected_skips else "ok"), (name, phase["error"])
        assert 0 <= phase["seconds"] <= phase["budget_s"] + 35, name  # + the SIGTERM grace
    assert record["seconds"] < seconds

    assert phases["data"]["figures"]["dataset"] == "imagefolder"
    assert phases["data"]["figures"]["train"]["images"] == 100 and phases["data"]["figures"]["test"]["images"] == 40
    for name, epochs in (("teacher", 1), ("student", 1), ("window_eager", 2), ("window_compiled", 2)):
        rows = phases[name]["figures"]["epochs"]
        assert [row["epoch"] for row in rows] == list(range(1, epochs + 1)), name
        assert all(row["images_per_s"] > 0 for row in rows), name
    student = phases["student"]["figures"]
    assert 0 <= student["pgd20_acc"] <= student["clean_acc"] <= 1 and student["val_n"] == 32
    for name in ("export_fp32", "export_fp16"):
        assert phases[name]["figures"]["parity"]["passed"] is True, name
    rows = phases["bench"]["figures"]["rows"]
    assert {(row["precision"], row["batch"]) for row in rows} == {(p, b) for p in ("fp32", "bf16") for b in (1, 8)}
    verify = phases["verify"]["figures"]
    assert set(verify["robust_acc"]) == {"pgd_sat", "cw"} and verify["n"] == 16
    compiled, eager = phases["window_compiled"]["figures"], phases["window_eager"]["figures"]
    assert compiled["speedup_vs_eager"] == pytest.approx(compiled["images_per_s"] / eager["images_per_s"])
    assert compiled["images_per_s"] == compiled["epochs"][1]["images_per_s"]  # the timed epoch, not the warm-up
    assert "Traceback" not in (tmp_path / "out" / "gpu_check.log").read_text()


def test_a_failed_phase_is_one_line_its_dependents_are_skipped_and_the_exit_status_is_1(tmp_path):
    result = _run_check("--dry-run", "--data", str(tmp_path / "missing.tar.gz"), "--out", str(tmp_path / "out"),
                        "--work", str(tmp_path / "work"), timeout=120)
    assert result.returncode == 1, result.stdout[-3000:]
    phases = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["phases"]
    assert phases["env"]["status"] == "ok"
    assert phases["data"]["status"] == "failed" and "missing.tar.gz" in phases["data"]["error"]
    assert "\n" not in phases["data"]["error"]
    assert phases["teacher"]["status"] == "skipped" and "data" in phases["teacher"]["error"]
    assert all(phases[name]["status"] == "skipped" for name in PHASES[3:]), phases
    assert "FAILED" in result.stdout


def test_a_phase_is_stopped_at_the_time_limit_and_recorded_as_a_timeout(tmp_path):
    started = time.monotonic()
    result = _run_check("--dry-run", "--time-limit", "1", "--out", str(tmp_path / "out"), "--work",
                        str(tmp_path / "work"), timeout=120)
    assert result.returncode == 1
    assert time.monotonic() - started < 60  # 1 s of work, the SIGTERM grace at most, start-up
    phases = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["phases"]
    timeouts = [name for name, phase in phases.items() if phase["status"] == "timeout"]
    assert timeouts and timeouts[0] in ("env", "data")
    assert "the check's 1 s limit" in phases[timeouts[0]]["error"]
