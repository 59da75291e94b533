"""`rslad-edge bench` end to end on this machine: real ONNX Runtime and PyTorch runners on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench_support import tiny_checkpoint, tiny_onnx, write_verify_json
from typer.testing import CliRunner

from rslad_edge.cli import app
from rslad_edge.io import sha256_file

runner = CliRunner()
FAST = ["--warmup", "1", "--warmup-seconds", "0", "--iters", "5"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    run = tmp_path_factory.mktemp("run")
    (run / "export").mkdir()
    return {"onnx": tiny_onnx(run / "export" / "student.onnx"), "pt": tiny_checkpoint(run / "student.pt")}


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """The CLI's Rich console sizes itself once at import (80 columns without a terminal): widen it for tables."""
    from rslad_edge.console import console

    monkeypatch.setattr(console, "width", 200)


def invoke(*args: str):
    return runner.invoke(app, ["bench", *args], terminal_width=200)


def flat(output: str) -> str:
    """Output with Rich's box drawing and line wrapping removed, for matching messages."""
    return " ".join(output.replace("│", " ").split())


def test_bench_onnx_and_checkpoint_in_one_table_and_json(models, tmp_path):
    verify_json = write_verify_json(models["pt"].parent / "verify" / "student_pt.json", models["pt"],
                                    sha256_file(models["pt"]), 0.812, {"pgd20": 0.503, "square": 0.541})
    out = tmp_path / "bench.json"
    result = invoke(str(models["onnx"]), str(models["pt"]), "--batch", "1,4", "--threads", "1", "--json", str(out),
                    "--verify-json", str(verify_json), *FAST)
    assert result.exit_code == 0, result.output
    for text in ["student.onnx", "student.pt", "ort CPU, 1 thr", "torch cpu, 1 thr", "81.2/50.3", f"wrote {out}"]:
        assert text in result.output
    saved = json.loads(out.read_text())
    rows = saved["results"]
    assert [(Path(r["artifact"]).name, r["batch"]) for r in rows] == [
        ("student.onnx", 1), ("student.onnx", 4), ("student.pt", 1), ("student.pt", 4)]
    onnx_row = rows[0]
    assert onnx_row["backend"] == "onnxruntime" and onnx_row["provider"] == "CPUExecutionProvider"
    assert onnx_row["threads"] == 1 and onnx_row["iterations"] == 5 and onnx_row["sha256"] == sha256_file(
        models["onnx"])
    assert rows[2]["backend"] == "torch" and rows[2]["robust_acc"] == 0.503
    assert "CPUExecutionProvider" in saved["env"]["onnxruntime_providers"]


def test_bf16_autocast_rows_for_a_checkpoint(models, tmp_path):
    out = tmp_path / "bench.json"
    result = invoke(str(models["pt"]), "--batch", "2,4", "--precision", "fp32,bf16", "--json", str(out), *FAST)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    # One set of rows per precision, each labelled by what its runner ran (TorchRunner's autocast), not the option.
    assert [(Path(r["artifact"]).name, r["backend"], r["precision"], r["batch"]) for r in rows] == [
        ("student.pt", "torch", "fp32", 2), ("student.pt", "torch", "fp32", 4),
        ("student.pt", "torch", "bf16", 2), ("student.pt", "torch", "bf16", 4)]
    table_rows = [line.split()[:2] for line in result.output.splitlines() if line.strip().startswith("student.pt")]
    assert table_rows == [["student.pt", "fp32"], ["student.pt", "bf16"]]  # the precision column, once per group


@pytest.mark.parametrize("batch", ["0", "1,0,8", "a,b"])
def test_bad_batch_is_a_usage_error(models, batch):
    result = invoke(str(models["onnx"]), "--batch", batch)
    assert result.exit_code == 2
    assert "Invalid value for '--batch'" in flat(result.output)


def test_iters_and_seconds_together_is_a_usage_error(models):
    result = invoke(str(models["onnx"]), "--iters", "5", "--seconds", "1")
    assert result.exit_code == 2 and "give --iters or --seconds, not both" in flat(result.output)


def test_an_engine_on_cpu_is_one_line_saying_why(tmp_path):
    engine = tmp_path / "student.engine"
    engine.write_bytes(b"plan")
    result = invoke(str(engine), "--device", "cpu")
    assert result.exit_code == 1
    assert "is a TensorRT engine: it runs only on the NVIDIA GPU" in flat(result.output)
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error:")


def test_unknown_device_is_a_usage_error(models):
    assert invoke(str(models["onnx"]), "--device", "gpu").exit_code == 2


def test_ssh_options_without_host_are_a_usage_error(models):
    result = invoke(str(models["onnx"]), "--port", "2222")
    assert result.exit_code == 2 and "go with --host" in flat(result.output)


def test_a_checkpoint_cannot_go_to_a_remote_jetson(models):
    result = invoke(str(models["pt"]), "--device", "jetson", "--host", "nvidia@192.0.2.1")
    assert result.exit_code == 1 and "only ONNX models are benched" in flat(result.output)


def test_host_with_cpu_device_is_refused(models):
    result = invoke(str(models["onnx"]), "--device", "cpu", "--host", "nvidia@192.0.2.1")
    assert result.exit_code == 1 and "use --device jetson" in flat(result.output)
