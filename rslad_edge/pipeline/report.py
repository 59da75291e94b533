"""report.md and a self-contained report.html (inline CSS, figures as data URIs) from the run record.

Everything shown comes from the :class:`~rslad_edge.record.RunRecord` (accuracies, drops and gate verdicts as
verify measured them) and the files it names: the training metrics, the bench JSON (+ its PNG). Nothing is
recomputed and nothing is found by globbing, so the report shows exactly this run's results.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from rslad_edge.export import SEARCH_TABLE_HEADER, qat_lines, table_rows
from rslad_edge.io import atomic_write
from rslad_edge.record import RunRecord, VerifyEntry

logger = logging.getLogger(__name__)


def _read_jsonl(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _collect(record: RunRecord) -> dict[str, Any]:
    bench: dict[str, Any] = {"results": [], "env": {}, "warnings": []}
    if record.bench is not None and record.bench.json_path.is_file():
        bench = json.loads(record.bench.json_path.read_text())
    bench_png = record.bench.plot_path if record.bench is not None else None
    return {
        "metrics": _read_jsonl(record.metrics_files.get("student")),
        "teacher_metrics": _read_jsonl(record.metrics_files.get("teacher")),
        "artifacts": [(artifact, record.verify_entry(artifact)) for artifact in record.artifacts],
        "export_failures": record.export_failures,
        "bench": bench,
        "bench_png": bench_png if bench_png and bench_png.exists() else None,
        "stages": record.stages,
    }


def _attack_names(verify: list[VerifyEntry]) -> list[str]:
    names: list[str] = []
    for entry in verify:
        for name in entry.robust_acc:
            if name not in names:
                names.append(name)
    return names


def _artifact_rows(data: dict[str, Any], *, intervals: bool = True) -> tuple[list[str], list[list[str]]]:
    """One row per artifact: size, accuracies, drop against the checkpoint (as verify measured it), latency;
    ``intervals``: the worst case with its 95 % interval and the drop with its paired one."""
    attacks = _attack_names([entry for _, entry in data["artifacts"] if entry is not None])
    header = ["artifact", "precision", "size MB", "clean %", *[f"{a} %" for a in attacks],
              WORST_CASE_COLUMN + (" [95% CI]" if intervals else ""),
              DROP_COLUMN + (" ± paired 95%" if intervals else ""), "twin agreement %", "fooled, .pt not %",
              "p50 ms (b=1)", "p99 ms (b=1)", "img/s (largest batch)"]
    bench_rows = data["bench"].get("results", [])
    rows = []
    for artifact, entry in data["artifacts"]:
        mine = [r for r in bench_rows if r.get("sha256") == artifact.sha256]
        mine = [r for r in mine if r.get("precision") == artifact.precision] or mine  # a checkpoint's fp32 rows
        smallest = min(mine, key=lambda r: r["batch"]) if mine else {}
        largest = max(mine, key=lambda r: r["batch"]) if mine else {}
        rows.append([
            artifact.name, artifact.precision, f"{artifact.size_mb:.2f}",
            _pct(entry.clean_acc if entry else None),
            *[_pct(entry.robust_acc.get(a) if entry else None) for a in attacks],
            _worst_case(entry, intervals), _drop(entry, intervals),
            _pct(entry.twin_agreement if entry else None), _pct(entry.divergence_rate if entry else None),
            _ms(smallest.get("p50_ms")), _ms(smallest.get("p99_ms")),
            "–" if not largest else f"{largest['images_per_s']:.0f} (b={largest['batch']})",
        ])
    return header, rows


def _worst_case(entry: VerifyEntry | None, interval: bool) -> str:
    """The worst case, with its 95 % Wilson interval when asked: ``44.0 [37.3, 50.9]``."""
    if entry is None:
        return "–"
    if not interval or entry.worst_case_ci95 is None:
        return _pct(entry.worst_case_acc)
    low, high = entry.worst_case_ci95
    return f"{_pct(entry.worst_case_acc)} [{_pct(low)}, {_pct(high)}]"


def _drop(entry: VerifyEntry | None, interval: bool) -> str:
    """The drop against the checkpoint, with its paired 95 % half-width when asked: ``+0.5 ± 1.2``."""
    if entry is None or entry.drop_pp is None:
        return "–"
    return f"{entry.drop_pp:+.1f}" + (f" ± {entry.drop_ci95_pp:.1f}" if interval and entry.drop_ci95_pp else "")


WORST_CASE_COLUMN, DROP_COLUMN = "worst case %", "drop vs .pt (pp)"
SUMMARY_COLUMNS = ("artifact", "precision", "size MB", "clean %", WORST_CASE_COLUMN, DROP_COLUMN, "p50 ms (b=1)",
                   "img/s (largest batch)")


def summary_table(record: RunRecord) -> tuple[list[str], list[list[str]]]:
    """The report's artifact table cut to the columns that fit a terminal (what the pipeline prints at the end),
    without the intervals (report.md / report.html have them)."""
    header, rows = _artifact_rows(_collect(record), intervals=False)
    keep = [header.index(name) for name in SUMMARY_COLUMNS]
    return [header[i] for i in keep], [[row[i] for i in keep] for row in rows]


def _latency_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["artifact", "backend", "provider", "precision", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ms",
              "std ms", "img/s", "outliers"]
    rows = [[Path(r["artifact"]).name, r["backend"], r["provider"], r["precision"], str(r["batch"]),
             _ms(r["p50_ms"]), _ms(r["p90_ms"]), _ms(r["p99_ms"]), _ms(r["mean_ms"]), _ms(r["std_ms"]),
             f"{r['images_per_s']:.0f}", f"{r.get('outliers', 0)}/{r.get('iterations', '?')}"]
            for r in data["bench"].get("results", [])]
    return header, rows


def _training_png(metrics: list[dict[str, Any]], teacher: list[dict[str, Any]]) -> bytes | None:
    if not metrics:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed: the report has no training-curve figure")
        return None
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    epochs = [m["epoch"] for m in metrics]
    for key, label in [("clean_acc", "student clean"), ("robust_acc", "student PGD")]:
        points = [(m["epoch"], 100 * m[key]) for m in metrics if m.get(key) is not None]
        if points:
            acc_ax.plot(*zip(*points, strict=True), marker="o", label=label)
    for key, label in [("clean_acc", "teacher clean"), ("robust_acc", "teacher PGD")]:
        points = [(m["epoch"], 100 * m[key]) for m in teacher if m.get(key) is not None]
        if points:
            acc_ax.plot(*zip(*points, strict=True), linestyle="--", alpha=0.6, label=label)
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy on the evaluation sample")
    acc_ax.legend(fontsize=8)
    acc_ax.grid(alpha=0.3)
    loss_ax.plot(epochs, [m["train_loss"] for m in metrics], marker="o", color="tab:red")
    loss_ax.set(xlabel="epoch", ylabel="train loss", title="student training loss")
    loss_ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]], css_class: str) -> str:
    """A table in a box that scrolls sideways when the table is wider than the window, so no column is ever cut off
    at the page's edge; each header's text in a ``<span>`` the CSS may turn sideways."""
    head = "".join(f"<th><span>{html.escape(h)}</span></th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    table = f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return f'<div class="scroll">{table}</div>'


def _searches(data: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]], list[str]]]:
    """(artifact name, header, rows, QAT lines) of every int8 search behind an artifact: every candidate tried, and
    which one shipped."""
    found = []
    for artifact, _ in data["artifacts"]:
        search = ((artifact.metadata or {}).get("quantization") or {}).get("search")
        if search:
            found.append((artifact.name, SEARCH_TABLE_HEADER, table_rows(search), qat_lines(search)))
    for failure in data["export_failures"]:
        if failure.get("search"):
            found.append((f"{Path(failure['artifact']).name} (nothing shipped)", SEARCH_TABLE_HEADER,
                          table_rows(failure["search"]), qat_lines(failure["search"])))
    return found


def _gate_lines(data: dict[str, Any]) -> list[str]:
    lines = [f"FAIL: {Path(failure['artifact']).name}: {failure['message']}" for failure in data["export_failures"]]
    lines += [f"{'PASS' if entry.gate.passed else 'FAIL'}: {artifact.name}: {entry.gate.message}"
              for artifact, entry in data["artifacts"] if entry is not None and entry.gate is not None]
    return lines or ["no gate was set (verify --max-drop)"]


def _warnings(data: dict[str, Any]) -> list[str]:
    return [f"{artifact.name}: {w}" for artifact, entry in data["artifacts"] if entry is not None
            for w in entry.warnings] + list(data["bench"].get("warnings", []))


# The artifacts table has a column per attack (20 in all with the paper's suite): at the body's 1200 px it fits only
# with its numbers unbroken and its headers turned sideways (a column as wide as its figures, not its name); the
# scroll box keeps a narrower window (or longer file names) from cutting columns off, the sticky first column keeps
# the artifact's name in view while scrolling.
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222}
h1{margin-bottom:.2rem} h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.scroll{overflow-x:auto;margin:.5rem 0}
table{border-collapse:collapse;font-size:.88rem} th,td{border:1px solid #ccc;padding:.25rem .5rem}
th{background:#f3f3f3} td{text-align:right;white-space:nowrap} td:first-child{text-align:left;font-family:monospace}
th:first-child,td:first-child{position:sticky;left:0;background:#fff} th:first-child{background:#f3f3f3}
table.artifacts{font-size:.8rem} .artifacts th,.artifacts td{padding:.2rem .35rem} .artifacts th{vertical-align:bottom}
.artifacts th:not(:first-child) span{display:inline-block;writing-mode:vertical-rl;transform:rotate(180deg);
  max-height:8rem;text-align:left}
.pass{color:#1a7f37;font-weight:600} .fail{color:#cf222e;font-weight:600} .warn{color:#9a6700}
pre{background:#f6f8fa;padding:.8rem;overflow:auto;font-size:.82rem} img{max-width:100%;border:1px solid #eee}
.muted{color:#666;font-size:.9rem}
"""


def write_report(record: RunRecord, sections: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``report.md`` (figures in ``report_files/``) and the self-contained ``report.html`` of the run
    ``record`` describes; ``sections``: the configuration it ran with."""
    out = record.root
    data = _collect(record)
    summary_header, summary_rows = _artifact_rows(data)
    latency_header, latency_rows = _latency_rows(data)
    training_png = _training_png(data["metrics"], data["teacher_metrics"])
    bench_png = data["bench_png"].read_bytes() if data["bench_png"] else None
    gates = _gate_lines(data)
    warnings = _warnings(data)
    config_yaml = yaml.safe_dump(sections, sort_keys=False)
    env = data["bench"].get("env", {})
    env_yaml = yaml.safe_dump(env, sort_keys=False) if env else "(no bench results)"
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    final = data["metrics"][-1] if data["metrics"] else {}
    stage_lines = [f"{name}: {entry.seconds or 0:.0f} s" for name, entry in data["stages"].items() if entry.finished]

    figures_dir = out / "report_files"
    md = [f"# rslad-edge report: {out.name}", "", f"Written {stamp}. Stage times: {', '.join(stage_lines) or '–'}.",
          "", "## Artifacts", "", "Accuracies on the verify sample; drop = worst case of the checkpoint minus the "
          "artifact's, on the same images. Every artifact faces the same white-box columns: an export through its "
          "differentiable twin (twin agreement: how often it predicts what the export predicts), judged by the "
          "export's own runtime. fooled, .pt not: the divergence attack's success, of the images both got right.", "",
          _md_table(summary_header, summary_rows), "", "## Gates", ""]
    md += [f"- {line}" for line in gates]
    searches = _searches(data)
    for name, header, rows, qat in searches:
        md += ["", f"## int8 search: {name}", "", "Candidates in the order tried, on held-out training images; the "
               "first to pass the gate shipped.", "", _md_table(header, rows)]
        md += [""] + [f"- {line}" for line in qat] if qat else []
    if warnings:
        md += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    md += ["", "## Training", "", f"Last epoch: clean {_pct(final.get('clean_acc'))}%, PGD "
           f"{_pct(final.get('robust_acc'))}%, loss {final.get('train_loss', float('nan')):.4f}.", ""]
    if training_png:
        md.append("![training curves](report_files/training.png)")
    md += ["", "## Latency", "", _md_table(latency_header, latency_rows), ""]
    if bench_png:
        md.append("![latency and robustness](report_files/bench.png)")
    md += ["", "## Configuration", "", "```yaml", config_yaml.rstrip(), "```", "", "## Environment", "", "```yaml",
           env_yaml.rstrip(), "```", ""]

    def figure(png: bytes | None, alt: str) -> str:
        if not png:
            return f'<p class="muted">({alt}: no figure; install matplotlib)</p>'
        return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'

    gate_html = "".join(
        f'<li class="{"pass" if g.startswith("PASS") else "fail" if g.startswith("FAIL") else "muted"}">'
        f"{html.escape(g)}</li>" for g in gates)
    warn_html = "".join(f'<li class="warn">{html.escape(w)}</li>' for w in warnings)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>rslad-edge report: {html.escape(out.name)}</title>
<style>{CSS}</style></head><body>
<h1>rslad-edge report: {html.escape(out.name)}</h1>
<p class="muted">Written {stamp}. Stage times: {html.escape(', '.join(stage_lines) or '–')}.</p>
<h2>Artifacts</h2>
<p class="muted">Accuracies on the verify sample; drop = worst case of the checkpoint minus the artifact's, on the same
images. Every artifact faces the same white-box columns: an export through its differentiable twin (twin agreement: how
often it predicts what the export predicts), judged by the export's own runtime. fooled, .pt not: the divergence
attack's success, of the images both got right.</p>
{_html_table(summary_header, summary_rows, "artifacts")}
<h2>Gates</h2><ul>{gate_html}</ul>
{"".join(f"<h2>int8 search: {html.escape(name)}</h2><p class='muted'>Candidates in the order tried, on held-out "
         f"training images; the first to pass the gate shipped.</p>{_html_table(header, rows, 'search')}"
         + "".join(f"<p class='muted'>{html.escape(line)}</p>" for line in qat)
         for name, header, rows, qat in searches)}
{f"<h2>Warnings</h2><ul>{warn_html}</ul>" if warnings else ""}
<h2>Training</h2>
<p>Last epoch: clean {_pct(final.get('clean_acc'))}%, PGD {_pct(final.get('robust_acc'))}%.</p>
{figure(training_png, "training curves")}
<h2>Latency</h2>
{_html_table(latency_header, latency_rows, "latency")}
{figure(bench_png, "latency vs batch and robust accuracy vs latency")}
<h2>Configuration</h2><pre>{html.escape(config_yaml)}</pre>
<h2>Environment</h2><pre>{html.escape(env_yaml)}</pre>
</body></html>
"""
    if training_png or bench_png:
        figures_dir.mkdir(exist_ok=True)
        if training_png:
            atomic_write(figures_dir / "training.png", lambda tmp: tmp.write_bytes(training_png))
        if bench_png:
            atomic_write(figures_dir / "bench.png", lambda tmp: tmp.write_bytes(bench_png))
    md_path = atomic_write(out / "report.md", lambda tmp: tmp.write_text("\n".join(md)))
    html_path = atomic_write(out / "report.html", lambda tmp: tmp.write_text(page))
    return md_path, html_path
