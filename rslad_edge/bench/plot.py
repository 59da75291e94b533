"""The bench figure: latency vs batch per artifact, and robust accuracy vs latency when verify results exist.

matplotlib is optional (``pip install 'rslad-edge[plot]'``) and imported only here, through its object API
(``Figure``), so no pyplot global state or GUI backend is involved.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from rslad_edge.bench.core import BenchReport, BenchResult
from rslad_edge.errors import RuntimeUnavailableError
from rslad_edge.io import atomic_write

if TYPE_CHECKING:
    from matplotlib.backend_bases import RendererBase
    from matplotlib.text import Annotation


def series_label(row: BenchResult) -> str:
    where = row.host or row.device
    return f"{Path(row.artifact).name} ({row.precision}, {row.backend}, {where})"


def plot_report(report: BenchReport, path: str | Path) -> Path:
    """Write a PNG: p50 (line) and p99 (dashed) latency against batch size per artifact; next to it, when any
    row has a robust accuracy, robust accuracy against p50 latency at the smallest batch benched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeUnavailableError("--plot needs matplotlib: pip install 'rslad-edge[plot]'") from None
    by_series: dict[str, list[BenchResult]] = defaultdict(list)
    for row in report.results:
        by_series[series_label(row)].append(row)
    with_accuracy = [r for r in report.results if r.robust_acc is not None]
    fig = Figure(figsize=(12 if with_accuracy else 7, 4.5), layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if with_accuracy else 1, squeeze=False)[0]

    latency_ax = axes[0]
    for label, rows in by_series.items():
        rows = sorted(rows, key=lambda r: r.batch)
        batches = [r.batch for r in rows]
        (line,) = latency_ax.plot(batches, [r.p50_ms for r in rows], marker="o", label=label)
        latency_ax.plot(batches, [r.p99_ms for r in rows], linestyle="--", color=line.get_color(), alpha=0.6)
    latency_ax.set_xscale("log", base=2)
    all_batches = sorted({r.batch for r in report.results})
    latency_ax.set_xticks(all_batches, [str(b) for b in all_batches])
    latency_ax.minorticks_off()
    latency_ax.set_yscale("log")
    latency_ax.set_xlabel("batch size")
    latency_ax.set_ylabel("latency per batch (ms): p50 solid, p99 dashed")
    latency_ax.set_title("latency vs batch")
    latency_ax.grid(True, which="both", alpha=0.3)
    latency_ax.legend(fontsize="small")

    if with_accuracy:
        batch = min(r.batch for r in with_accuracy)
        acc_ax = axes[1]
        labels = []
        for row in (r for r in with_accuracy if r.batch == batch):
            acc_ax.scatter(row.p50_ms, 100 * row.robust_acc, s=40)
            labels.append(acc_ax.annotate(series_label(row), (row.p50_ms, 100 * row.robust_acc), fontsize="small",
                                          xytext=(4, 4), textcoords="offset points"))
        acc_ax.set_xlabel(f"p50 latency at batch {batch} (ms)")
        acc_ax.set_ylabel("robust accuracy (%)")
        acc_ax.set_title("robust accuracy vs latency")
        acc_ax.grid(True, alpha=0.3)
        fig.draw_without_rendering()  # the layout first: the labels are spread where they will be drawn
        spread_labels(sorted(labels, key=lambda label: label.xy[::-1]), canvas.get_renderer())  # bottom up

    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def spread_labels(labels: list[Annotation], renderer: RendererBase) -> None:
    """Move each label (placed in offset points from its point) that would overlap one placed before it
    up or down by whole label heights, +1, -1, +2, ... in turn, until it overlaps none: artifacts of equal accuracy
    and close latency (an fp32 export and its checkpoint) each keep a readable label."""
    placed = []
    for label in labels:
        x_offset, y_offset = label.xyann
        box = label.get_window_extent(renderer)
        step = 1.1 * box.height * 72 / label.figure.dpi  # a label's height and a little, in points
        for k in itertools.count():
            shift = (k + 1) // 2 * (1 if k % 2 else -1)  # 0, +1, -1, +2, -2, ...
            label.xyann = (x_offset, y_offset + shift * step)
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
        placed.append(box)
