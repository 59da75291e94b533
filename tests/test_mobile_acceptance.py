"""Acceptance (slow; the mobile extra, ../shared and real CIFAR-10): the shared ResNet-18 teacher as an
ExecuTorch program, checked on ExecuTorch's own runtime.

    .venv/bin/python -m pytest -m slow tests/test_mobile_acceptance.py -s

- ``export --format executorch``: fp32 agrees with PyTorch on every one of 256 test images (max |logit diff|
  printed), int8 (PT2E, XNNPACK quantizer) on at least 97%;
- ``verify x.pte`` runs transfer and Square against the ExecuTorch runtime;
- ``bench x.pte`` p50 at batch 1 is within 15% of a bare loop over the ExecuTorch runtime (2 threads each).

Real data: ``RSLAD_EDGE_CIFAR10`` or /tmp/rslad-data/cifar10 (``train/`` and ``test/`` class folders), else the test
split and the first 2,000 training images of ../shared/data/cifar10-jpeg.tar.gz, extracted here.
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rslad_edge.cli import app
from rslad_edge.export import ExportConfig, export
from rslad_edge.runtime.executorch_runner import MOBILE_EXTRA, executorch_missing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from mobile_export import bare_executorch_p50_ms  # noqa: E402 - the figures' bare loop, so both measure the same

SHARED = Path(__file__).resolve().parents[2] / "shared"
THREADS = 2
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(executorch_missing() is not None, reason=f"needs the mobile extra: {MOBILE_EXTRA}"),
]


@pytest.fixture(scope="module")
def teacher() -> Path:
    path = SHARED / "models" / "resnet18-cifar10-fastat.pt"
    if not path.is_file():
        pytest.skip("../shared/models/resnet18-cifar10-fastat.pt is not present")
    return path


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory) -> Path:
    for candidate in (os.environ.get("RSLAD_EDGE_CIFAR10"), "/tmp/rslad-data/cifar10"):
        if candidate and (Path(candidate) / "train").is_dir() and (Path(candidate) / "test").is_dir():
            return Path(candidate)
    archive = SHARED / "data" / "cifar10-jpeg.tar.gz"
    if not archive.is_file():
        pytest.skip("no CIFAR-10 folder and no ../shared/data/cifar10-jpeg.tar.gz")
    root = tmp_path_factory.mktemp("cifar")
    with tarfile.open(archive) as tar:
        members, train_taken = [], Counter()  # 200 train images per class (the archive is ordered by class)
        for member in tar.getmembers():
            name = member.name.removeprefix("./")
            if name.startswith("cifar10/test/"):
                members.append(member)
            elif name.startswith("cifar10/train/") and member.isfile():
                label = name.split("/")[2]
                if train_taken[label] < 200:
                    members.append(member)
                    train_taken[label] += 1
        tar.extractall(root, members=members, filter="data")
    return root / "cifar10"


def _export(teacher: Path, cifar10: Path, out: Path, precision: str):
    return export(ExportConfig(checkpoint=teacher, arch="resnet18", format="executorch", precision=precision,
                               dataset="imagefolder", data_root=str(cifar10), out=out))


def test_shared_teacher_as_pte_agrees_with_torch_verifies_and_benches_like_a_bare_loop(teacher, cifar10, tmp_path):
    fp32 = _export(teacher, cifar10, tmp_path, "fp32")
    print(f"\nfp32 .pte: {fp32.parity.summary()}")
    assert fp32.parity.n == 256 and fp32.parity.agreement == 1.0 and fp32.parity.max_abs_diff <= 1e-4
    int8 = _export(teacher, cifar10, tmp_path, "int8")
    print(f"int8 .pte: {int8.parity.summary()}")
    assert int8.parity.n == 256 and int8.parity.agreement >= 0.97

    cli = CliRunner()
    verify_json = tmp_path / "verify.json"
    result = cli.invoke(app, ["verify", str(int8.path), "--reference", str(teacher), "--arch", "resnet18",
                              "--dataset", "imagefolder", "--data-root", str(cifar10), "--n", "16",
                              "--attacks", "pgd_sat,transfer_pgd,square", "--square-queries", "20",
                              "--threads", str(THREADS), "--json", str(verify_json)])
    assert result.exit_code == 0, result.output
    report = json.loads(verify_json.read_text())
    print(f"int8 .pte verify: twin {report['twin']}, robust {report['robust_acc']}")
    assert report["backend"] == "executorch" and report["provider"].startswith("XNNPACK (")
    assert {"pgd_sat", "transfer_pgd", "square"} <= set(report["robust_acc"])
    assert report["gradients"] == "twin" and report["twin"]["agreement"] >= 15 / 16  # the .twin.onnx beside it

    bench_json = tmp_path / "bench.json"
    result = cli.invoke(app, ["bench", str(fp32.path), "--batch", "1", "--threads", str(THREADS), "--seconds", "5",
                              "--json", str(bench_json)], terminal_width=200)
    assert result.exit_code == 0, result.output
    bench_p50 = json.loads(bench_json.read_text())["results"][0]["p50_ms"]
    bare_p50 = bare_executorch_p50_ms(fp32.path, batch=1, threads=THREADS, seconds=5.0)
    print(f"bench p50 {bench_p50:.3f} ms, bare ExecuTorch loop p50 {bare_p50:.3f} ms, ratio {bench_p50 / bare_p50:.3f}")
    assert abs(bench_p50 - bare_p50) / bare_p50 < 0.15
