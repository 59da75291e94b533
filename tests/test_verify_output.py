"""What verify prints where most people read it: piped or in CI, at 80 columns (Rich's width when stdout is not a
terminal). Whatever form the accuracies take, each row of the table must stay on one line."""

from __future__ import annotations

from typer.testing import CliRunner

from rslad_edge.cli import app
from rslad_edge.console import console

ROW_LABELS = ("clean", "fgsm", "transfer_pgd", "from student.pt (reference)", "square", "worst case")


def test_the_verify_table_keeps_one_row_per_line_at_80_columns(tiny_exports, monkeypatch):
    monkeypatch.setattr(console, "width", 80)
    result = CliRunner().invoke(app, ["verify", str(tiny_exports["fp32"]), "--reference", str(tiny_exports["pt"]),
                                      "--n", "16", "--eps", "1/255", "--attacks", "fgsm,transfer_pgd,square",
                                      "--square-queries", "10", "--threads", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = next(i for i, line in enumerate(lines) if set(line.strip()) == {"─"}) + 1  # below the header's rule
    end = next(i for i, line in enumerate(lines) if "test images, seed" in line)  # the caption
    rows = [line.strip() for line in lines[start:end] if line.strip()]
    assert [next(label for label in ROW_LABELS if row.startswith(label)) for row in rows if
            row.startswith(ROW_LABELS)] == list(ROW_LABELS)
    assert all(row.startswith(ROW_LABELS) for row in rows), rows  # no line holds the rest of a row above it
    assert all(len(line) <= 80 for line in lines[:end])
