"""`rslad-edge verify`: parses options, calls ``verify_artifact``, prints one table, applies the gate. No attack logic.

Its options are VerifyConfig's fields (rslad_edge.options derives them).

The progress bar goes to stderr and disappears when done, so stdout holds only the table.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from rslad_edge.console import console, err_console
from rslad_edge.options import command, levels_text
from rslad_edge.verify.report import CLEAN_ROW, WORST_CASE_ROW, AttackDetail, VerifyReport
from rslad_edge.verify.run import VerifyConfig

app = typer.Typer(rich_markup_mode="rich", subcommand_metavar="")




def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _accuracy(report: VerifyReport, row: str, *, reference: bool = False) -> str:
    """``47.3 (44-51)``: the accuracy and its 95 % Wilson interval, in %.

    The bounds are rounded outward to whole points: to 0.1 (``[44.2, 50.4]``) they take 5 more columns per model, so
    at 80 columns (piped output, CI) every row broke over two lines; outward rounding never narrows the interval,
    and the JSON keeps the exact bounds (``ci95``).
    """
    value, interval = report.accuracy(row, reference=reference), report.accuracy_ci95(row, reference=reference)
    if value is None or interval is None:
        return "-"
    low, high = math.floor(100 * interval[0] + 1e-9), math.ceil(100 * interval[1] - 1e-9)
    return f"{100 * value:.1f} [dim]({low}-{high})[/]"


def _drop(report: VerifyReport, row: str) -> str:
    drop, interval = report.drop_pp(row), report.drop_ci95_pp(row)
    if drop is None:
        return "-"
    text = f"{drop:+.1f}"
    return text + (f" ± {interval:.1f}" if interval else "")


def results_table(report: VerifyReport) -> Table:
    """Rows: clean, each attack (under a transfer attack, the models it was crafted on), worst case; columns:
    artifact, reference, drop. The sanity-check warnings and what the transfer columns are make the caption."""
    info = report.artifact.info
    name = Path(info.path).name if info.path else info.backend
    dataset = report.config.get("dataset")
    reference_path = report.reference.info.path if report.reference is not None else None
    table = Table(
        title=f"rslad-edge verify: {name} ({info.backend} {info.provider}, {info.precision})"
        + (f" against {Path(reference_path).name}" if reference_path else ""),
        caption=f"{report.n} {dataset + ' ' if dataset else ''}test images, seed {report.seed}, "
        f"L-inf eps {levels_text(report.eps)}; accuracy in % (its 95% Wilson interval, rounded outward)"
        + ("; drop = reference - artifact in points on the same images (worst case: the checkpoint's worst case - "
           "the artifact's), ± its paired 95% interval; - where a model did not face the attack"
           if report.reference else "")
        + _gradients_caption(report)
        + _transfer_caption(report)
        + "".join(f"\n[yellow]warning:[/] {escape(warning)}" for warning in report.warnings),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        # Two spaces between columns (the separator and a left pad), none at the edges: 80 columns then hold the
        # label "  from student.pt (reference)" next to two accuracies with their intervals, a drop and seconds.
        show_edge=False, pad_edge=False, padding=(0, 0, 0, 1),
    )
    # Figures never wrap (a row per line); only the label column gives way when a source's name is long.
    table.add_column("", style="bold")
    table.add_column("artifact", justify="right", no_wrap=True)
    if report.reference is not None:
        table.add_column("reference", justify="right", no_wrap=True)
        table.add_column("drop (pp)", justify="right", no_wrap=True)
    table.add_column("seconds", justify="right", no_wrap=True)
    with_reference = report.reference is not None
    for row in report.rows:
        label = {CLEAN_ROW: "clean", WORST_CASE_ROW: "worst case"}.get(row, row)
        cells = [label, _accuracy(report, row)]
        if with_reference:
            cells += [_accuracy(report, row, reference=True), _drop(report, row)]
        seconds = report.attack_seconds.get(row)
        cells.append(f"{seconds:.1f}" if seconds is not None else "")
        if row == WORST_CASE_ROW:
            table.add_section()
        table.add_row(*cells, style="bold" if row == WORST_CASE_ROW else None)
        detail = report.attack_details.get(row)
        if detail is not None and detail.family == "transfer":
            _add_transfer_sources(table, report, row, detail, with_reference=with_reference)
    return table


def _add_transfer_sources(table: Table, report: VerifyReport, row: str, detail: AttackDetail, *,
                          with_reference: bool) -> None:
    """One dim line per model the transfer examples were crafted on, under the attack's row: a transfer figure is
    only meaningful next to its source. With several sources the row above is their AND; each line shows its own."""
    several = len(detail.crafted_on) > 1
    artifact_sources = report.artifact.per_source.get(row, {})
    reference_sources = report.reference.per_source.get(row, {}) if report.reference else {}
    for source in detail.crafted_on:
        role = " (reference)" if source.role == "reference" else ""
        sub = [f"  from {escape(source.label)}{role}",
               _percent(artifact_sources.get(source.label)) if several else ""]
        if with_reference:
            sub += [_percent(reference_sources.get(source.label)) if several else "", ""]
        table.add_row(*sub, "", style="dim")


def _gradients_caption(report: VerifyReport) -> str:
    """What crafted the artifact's white-box columns (its own gradients or its twin's, and how well the twin agrees)
    and what judged them (always the artifact's runtime)."""
    result = report.artifact
    white_box = [name for name, detail in report.attack_details.items() if detail.family in ("white-box", "divergence")]
    if not white_box:
        return ""
    judged = f"judged by {result.info.backend}"
    if result.gradients == "twin" and result.twin is not None:
        twin = result.twin
        verdict = "" if twin.trusted else " [red](below the trusted threshold: upper bounds only)[/]"
        return (f"\n{', '.join(white_box)}: crafted on the artifact's differentiable twin (its own graph, weights and "
                f"quantization), {judged}; twin agreement {twin.agreement:.1%} top-1 on {twin.n} images, max "
                f"|logit difference| {twin.max_abs_logit_diff:.3g}{verdict}")
    if result.gradients == "own":
        return f"\n{', '.join(white_box)}: crafted on the model's own gradients, {judged}"
    return ""


def divergence_line(report: VerifyReport) -> str | None:
    """How often the divergence attack fooled the artifact while the float model stayed right."""
    stats = report.divergence
    if stats is None:
        return None
    return (f"divergence: {report.artifact.info.precision} artifact fooled where the float reference is not on "
            f"{stats.artifact_fooled_float_not} of {stats.both_correct} images both classify correctly "
            f"({stats.rate:.1%}); artifact fooled on {stats.artifact_fooled}, reference on {stats.float_fooled}")


def _transfer_caption(report: VerifyReport) -> str:
    """Said under the table when a transfer column was crafted on the reference, so that no one reads it as the
    paper's black-box transfer row (crafted on a separate robust ResNet-50)."""
    on_reference = [name for name, detail in report.attack_details.items() if detail.crafted_on_reference]
    if not on_reference:
        return ""
    return (f"\n{', '.join(on_reference)}: crafted on the reference, the artifact's own float model (the float "
            "model's white-box attack, transferred); the paper's transfer row crafts on a separate robust model: "
            "add one with --source")


def square_lines(report: VerifyReport) -> list[str]:
    """Square's cost per model: queries, queries/s and the share spent inside the runtime."""
    lines = []
    results = [("artifact", report.artifact)] + ([("reference", report.reference)] if report.reference else [])
    for role, result in results:
        stats = result.queries.get("square")
        if stats is None:
            continue
        share = stats.runtime_seconds / stats.seconds if stats.seconds else 0.0
        lines.append(f"square on the {role}: {stats.total:,} queries on {stats.attacked} images (per image: mean "
                     f"{stats.mean:.0f}, median {stats.median:.0f}; budget {stats.budget}, {stats.schedule} schedule"
                     f") in {stats.seconds:.1f} s = {stats.per_second:,.0f} queries/s, {share:.0%} of it inside "
                     f"{result.info.backend}")
    return lines


def _progress_callback(progress: Progress):
    tasks: dict[str, int] = {}

    def update(task: str, completed: int, total: int) -> None:
        if task not in tasks:
            tasks[task] = progress.add_task(task, total=total)
        progress.update(tasks[task], completed=completed, total=total)

    return update


@app.callback(invoke_without_command=True, context_settings={"allow_interspersed_args": True})
@command(VerifyConfig)
def verify_command(given: dict[str, Any]) -> None:
    """Robust accuracy of an artifact, measured on the artifact itself, next to the model it came from.

      rslad-edge verify runs/mnv2/student.pt --dataset cifar10 --n 1000

      rslad-edge verify runs/mnv2/export/student.int8.onnx --reference runs/mnv2/student.pt --max-drop 2

    Every artifact gets the white-box suite (an exported one through its differentiable twin, judged by its own
    runtime) and Square; with --reference / --source also transfer attacks and the divergence attack. A sample
    counts as robust in the worst case only if it survives every attack. Exit 3 when --max-drop is crossed.
    """
    from rslad_edge.verify.run import verify_artifact

    cfg = VerifyConfig(**given)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        report = verify_artifact(cfg, progress=_progress_callback(progress))

    console.print(results_table(report))
    for line in [*([divergence_line(report)] if report.divergence else []), *square_lines(report)]:
        console.print(line, style="dim", highlight=False, soft_wrap=True)
    for note in report.notes:
        err_console.print(f"[dim]note: {note}[/]", highlight=False, soft_wrap=True)
    if cfg.json_path is not None:
        console.print(f"[bold green]wrote[/] {cfg.json_path}", highlight=False)
    report.check_gate(cfg.max_drop)
    if cfg.max_drop is not None:
        console.print(f"[bold green]gate passed:[/] no robust accuracy dropped by more than {cfg.max_drop:g} points",
                      highlight=False)
