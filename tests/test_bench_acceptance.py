"""Acceptance (slow, run on a quiet machine): `rslad-edge bench` of a MobileNetV2 checkpoint and its fp32 and
int8 ONNX exports prints one table and writes JSON whose p50 at batch 64 agrees with an independent ONNX Runtime loop.

    .venv/bin/python -m pytest -m slow tests/test_bench_acceptance.py -s

The whole path runs through the CLI (export, then bench) on a MobileNetV2 with random weights (the time does not
depend on them; the int8 parity bound is relaxed for the same reason). The figure compared is p50 at batch 64 with 2
intra-op threads.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from rslad_edge.cli import app

THREADS = 2
BATCH = 64


def _independent_p50_ms(path, iters: int = 100) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).random((BATCH, 3, 32, 32), dtype=np.float32)
    for _ in range(10):
        session.run(None, {"input": x})
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        session.run(None, {"input": x})
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


@pytest.mark.slow
def test_bench_cli_p50_at_batch_64_matches_an_independent_onnx_runtime_loop(tmp_path):
    import torch

    from rslad_edge.models import create_model, save_checkpoint

    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "mobilenetv2.pt", create_model("mobilenetv2").eval(), "mobilenetv2",
                                 num_classes=10, input_size=(32, 32))
    runner = CliRunner()
    export = ["export", str(checkpoint), "--out", str(tmp_path / "export"), "--dataset", "shapes", "--parity-n", "64"]
    assert runner.invoke(app, export).exit_code == 0
    result = runner.invoke(app, [*export, "--precision", "int8", "--calib-n", "128", "--min-agreement", "0"])
    assert result.exit_code == 0, result.output
    fp32, int8 = tmp_path / "export" / "mobilenetv2.onnx", tmp_path / "export" / "mobilenetv2.int8.onnx"

    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", str(checkpoint), str(fp32), str(int8), "--batch", f"1,{BATCH}",
                                 "--threads", str(THREADS), "--seconds", "10", "--json", str(out)],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    print(result.output)
    rows = json.loads(out.read_text())["results"]
    assert {(row["artifact"].rsplit("/", 1)[-1], row["batch"]) for row in rows} >= {
        (name, batch) for name in ("mobilenetv2.pt", "mobilenetv2.onnx", "mobilenetv2.int8.onnx") for batch in (1, 64)}
    for path in (fp32, int8):
        bench_p50 = next(r["p50_ms"] for r in rows if r["artifact"].endswith(path.name) and r["batch"] == BATCH)
        independent = _independent_p50_ms(path)
        print(f"{path.name}: bench p50 {bench_p50:.2f} ms, independent session.run p50 {independent:.2f} ms, "
              f"ratio {bench_p50 / independent:.3f}")
        assert abs(bench_p50 - independent) / independent < 0.15
