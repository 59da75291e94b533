"""The pipeline's report at the sizes people read it: report.html in a 1280-pixel window with the paper's nine-attack
suite (20 columns), and the bench figure's labels when artifacts tie on accuracy and latency.

A record is built in memory (no pipeline run): the report only reads it, so these tests take a second.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rslad_edge.pipeline.report import write_report
from rslad_edge.record import Artifact, GateVerdict, RunRecord, VerifyEntry

ATTACKS = ["fgsm", "pgd_sat", "pgd_trades", "cw", "autoattack", "transfer_pgd", "transfer_cw", "divergence", "square"]


def nine_attack_run(root: Path) -> RunRecord:
    """A checkpoint and three exports, each with every column filled: the widest artifacts table a run makes."""
    student = Artifact(root / "student.pt", "a" * 64, "checkpoint", "fp32", 9.12)
    exports = [Artifact(root / "export" / name, sha * 64, "onnx", precision, size)
               for name, sha, precision, size in [("student.onnx", "b", "fp32", 9.05),
                                                  ("student.int8.onnx", "c", "int8", 2.41),
                                                  ("student.fp16.onnx", "d", "fp16", 4.6)]]
    verify = [VerifyEntry(student.sha256, root / "verify" / "student.pt.json", 0.823,
                          {name: 0.512 for name in ATTACKS if not name.startswith(("transfer", "divergence"))},
                          0.441, [0.373, 0.509])]
    verify += [VerifyEntry(export.sha256, root / "verify" / f"{export.name}.json", 0.821, dict.fromkeys(ATTACKS, 0.473),
                           0.398, [0.333, 0.467], drop_pp=4.3, drop_ci95_pp=2.1, reference_sha256=student.sha256,
                           gate=GateVerdict(2.0, False, "dropped"), twin_agreement=0.996, divergence_rate=0.031)
               for export in exports]
    return RunRecord(root=root, student=student, exports=exports, verify=verify)


def test_report_html_puts_every_table_in_a_sideways_scroll_box_with_unbroken_cells(tmp_path):
    _, html_path = write_report(nine_attack_run(tmp_path), {"verify": {"n": 1000}})
    page = html_path.read_text()
    css = page[page.index("<style>") + len("<style>"):page.index("</style>")]
    rules = {selector.strip(): body for selector, body in re.findall(r"([^{}]+)\{([^}]*)\}", css)}
    assert page.count("<table") == 2 and page.count('<div class="scroll"><table') == 2  # no table outside a box
    assert "overflow-x:auto" in rules[".scroll"] and "white-space:nowrap" in rules["td"]
    artifacts = re.search(r'<table class="artifacts">.*?</table>', page).group(0)
    headers = re.findall(r"<th><span>(.*?)</span></th>", artifacts)
    assert len(headers) == 20 and "twin agreement %" in headers  # every column is there, each header in a span
    assert "writing-mode:vertical-rl" in rules[".artifacts th:not(:first-child) span"]
    assert "<td>student.int8.onnx</td>" in artifacts  # the cells themselves stay plain


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_html_fits_a_1280_pixel_chromium_window(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium)")
    _, html_path = write_report(nine_attack_run(tmp_path), {})
    measure = ("<script>const box = document.querySelector('table.artifacts').getBoundingClientRect();"
               "document.title = JSON.stringify({right: box.right, window: innerWidth, "
               "page: document.documentElement.scrollWidth});</script></body>")
    probe = html_path.with_name("probe.html")
    probe.write_text(html_path.read_text().replace("</body>", measure))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--window-size=1280,900", "--dump-dom"]
    dom = subprocess.run([browser, *flags, probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    sizes = json.loads(re.search(r"<title>(.*?)</title>", dom).group(1).replace("&quot;", '"'))
    assert sizes["page"] <= sizes["window"] and sizes["right"] <= sizes["window"], sizes


# --------------------------------------------------------------------------------------------- the bench figure


def test_labels_of_points_at_equal_coordinates_are_stacked_apart_and_a_lone_label_stays():
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from rslad_edge.bench.plot import spread_labels

    figure = Figure(figsize=(6, 4))
    canvas = FigureCanvasAgg(figure)
    axes = figure.subplots()
    points = [(2.0, 40.0), (2.0, 40.0), (2.0, 40.0), (9.0, 10.0)]
    axes.scatter(*zip(*points, strict=True))
    axes.set(xlim=(0, 10), ylim=(0, 50))
    labels = [axes.annotate(f"student {i} (int8, onnxruntime, cpu)", point, xytext=(4, 4),
                            textcoords="offset points") for i, point in enumerate(points)]
    renderer = canvas.get_renderer()
    spread_labels(labels, renderer)
    offsets = [label.xyann for label in labels]
    assert len(set(offsets[:3])) == 3 and offsets[3] == (4, 4) and offsets[0] == (4, 4)
    boxes = [label.get_window_extent(renderer) for label in labels]
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(4) for j in range(i))


def test_the_bench_figure_spreads_the_labels_of_artifacts_that_tie(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from rslad_edge.bench import plot
    from rslad_edge.bench.core import BenchReport, BenchResult

    def row(name: str, precision: str) -> BenchResult:
        return BenchResult(artifact=name, sha256=name, backend="onnxruntime", provider="CPUExecutionProvider",
                           precision=precision, batch=1, p50_ms=1.5, p90_ms=1.6, p99_ms=1.8, mean_ms=1.5, std_ms=0.1,
                           min_ms=1.4, max_ms=1.9, images_per_s=667, images_per_s_wall=650, iterations=100,
                           outliers=0, outlier_threshold_ms=3.0, device="cpu", timed="predict", clock="perf_counter",
                           robust_acc=0.41)

    spread, spread_labels = [], plot.spread_labels

    def recording(labels, renderer) -> None:
        spread.extend(labels)
        spread_labels(labels, renderer)

    monkeypatch.setattr(plot, "spread_labels", recording)
    png = plot.plot_report(BenchReport([row("student.onnx", "fp32"), row("student.pt", "fp32")], {}),
                           tmp_path / "bench.png")
    assert png.read_bytes().startswith(b"\x89PNG")
    assert len(spread) == 2 and spread[0].xy == spread[1].xy and spread[0].xyann != spread[1].xyann


def test_an_int8_search_behind_an_export_is_shown_with_every_candidate_and_the_one_shipped(tmp_path):
    record = nine_attack_run(tmp_path)
    judged = {"n": 1000, "agreement": 0.985, "agreement_ci95": [0.976, 0.991], "accuracy": 0.4, "robust": 0.17,
              "float_robust": 0.172, "drop_pp": 0.2, "drop_ci95_pp": 0.6, "twin_agreement": 1.0}
    failed = {"recipe": {}, "label": "minmax", "latency_ms": {"1": 0.36, "64": 16.6}, "confirmation": None,
              "search": {**judged, "n": 500, "agreement": 0.93, "robust": None}, "verdict": "agreement < 97% (search)",
              "passed": False}
    qat = {**failed, "label": "minmax +QAT 2 ep", "qat": {
        "base": "minmax", "images": 4096, "loss": "KL to the float model's soft labels on clean images",
        "best_epoch": 2, "history": [{"epoch": 1, "search_agreement": 0.95, "seconds": 170.0},
                                     {"epoch": 2, "search_agreement": 0.962, "seconds": 172.0}]}}
    shipped = {**failed, "label": "minmax +2 fp32", "latency_ms": {"1": 0.41, "64": 19.0}, "confirmation": judged,
               "verdict": "passed", "passed": True}
    search = {"splits": {"cifar10 train, search": 500, "cifar10 train, confirmation": 1000},
              "candidates": [failed, qat, shipped], "chosen": 2, "fp32_latency_ms": {"1": 0.53, "64": 43.6}}
    record.exports[1] = dataclasses.replace(record.exports[1], metadata={"quantization": {"search": search}})
    md_path, html_path = write_report(record, {})
    md = md_path.read_text()
    section = md[md.index("## int8 search: student.int8.onnx"):]
    assert "| 1 | minmax | 0.36 | 16.60 | 93.0" in section and "agreement < 97% (search)" in section
    assert "| 3 | minmax +2 fp32 | 0.41 | 19.00 | 98.5 (≥97.6) | 17.0 / 17.2 (-0.2±0.6) | shipped |" in section
    assert ("- minmax +QAT 2 ep: QAT of minmax on 4,096 training images (KL to the float model's soft labels on clean "
            "images), agreement % on the search split by epoch: 95.0, 96.2 (best: epoch 2); 171 s per epoch") in section
    assert "| fp32 (no int8) | 0.53 | 43.60 |" in section
    assert html_path.read_text().count("int8 search: student.int8.onnx") == 1
