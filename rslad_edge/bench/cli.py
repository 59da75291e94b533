"""`rslad-edge bench`: parses options, calls ``bench_artifacts``, prints one table. No timing logic here.

Progress is printed as plain lines, not a spinner: an animated display redraws from a thread while the timed loop
runs, which is exactly the kind of noise a benchmark must not add.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from rslad_edge.bench.core import BenchReport, BenchResult
from rslad_edge.bench.suite import BenchConfig
from rslad_edge.console import console, err_console
from rslad_edge.options import command

app = typer.Typer(rich_markup_mode="rich", subcommand_metavar="")


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _accuracy(row: BenchResult) -> str:
    if row.clean_acc is None and row.robust_acc is None:
        return "-"
    clean = f"{100 * row.clean_acc:.1f}" if row.clean_acc is not None else "?"
    robust = f"{100 * row.robust_acc:.1f}" if row.robust_acc is not None else "?"
    return f"{clean}/{robust}"


def runtime_label(row: BenchResult) -> str:
    """Short name of what ran: "ort CPU", "ort TensorRT", "torch cpu", "executorch XNNPACK (68 of 68 nodes
    delegated)", "trtexec (TensorRT 10.3.0) on Orin"."""
    if row.backend == "onnxruntime":
        return "ort " + row.provider.removesuffix("ExecutionProvider")
    if row.backend in ("torch", "executorch"):
        return f"{row.backend} {row.provider}"
    return row.provider


def results_table(report: BenchReport) -> Table:
    """One row per artifact and batch size; the power columns appear when any row has a power reading."""
    with_power = any(r.power_w is not None for r in report.results)
    table = Table(title="rslad-edge bench: latency in ms per batch, img/s = batch / p50", box=box.SIMPLE_HEAD)
    table.add_column("artifact", style="bold", overflow="fold", min_width=10)
    table.add_column("prec")
    table.add_column("runtime", overflow="fold", min_width=7)
    table.add_column("MB", justify="right", no_wrap=True)
    table.add_column("clean/robust %", justify="right", min_width=6)
    for name in ("batch", "p50", "p99", "img/s", "outliers"):
        table.add_column(name, justify="right", no_wrap=True)
    if with_power:
        table.add_column("W", justify="right", no_wrap=True)
        table.add_column("mJ/img", justify="right", no_wrap=True)
    previous = None
    for row in report.results:
        group = (row.artifact, row.precision, row.provider, row.host)
        first = group != previous
        if first and previous is not None:
            table.add_section()
        previous = group
        cells = [
            Path(row.artifact).name if first else "",
            row.precision if first else "",
            (runtime_label(row) + (f", {row.threads} thr" if row.threads else "")) if first else "",
            f"{row.size_mb:.1f}" if first and row.size_mb is not None else "",
            _accuracy(row) if first else "",
            str(row.batch), _ms(row.p50_ms), _ms(row.p99_ms), f"{row.images_per_s:,.0f}",
            f"{row.outliers}/{row.iterations}",
        ]
        if with_power:
            cells += [f"{row.power_w:.2f}" if row.power_w is not None else "-",
                      f"{row.energy_per_image_mj:.3g}" if row.energy_per_image_mj is not None else "-"]
        table.add_row(*cells)
    return table


@app.callback(invoke_without_command=True, context_settings={"allow_interspersed_args": True})
@command(BenchConfig)
def bench(
    given: dict[str, Any],
    artifacts: Annotated[list[Path], typer.Argument(
        metavar="ARTIFACT", help="Checkpoints (.pt), ONNX models (.onnx, .ort), ExecuTorch programs (.pte) or TensorRT "
        "engines (.engine) to compare.",
        show_default=False)],
    host: Annotated[str | None, typer.Option(
        help="user@address of a Jetson: copy the ONNX there, build and time it with its trtexec over SSH "
        "(host key checked against known_hosts).")] = None,
    port: Annotated[int | None, typer.Option(help="SSH port of --host.")] = None,
    identity: Annotated[Path | None, typer.Option(help="SSH private key for --host.")] = None,
    known_hosts: Annotated[Path | None, typer.Option(
        help="known_hosts file to check --host's key against (when not given: ssh's own).")] = None,
    connect_timeout: Annotated[float, typer.Option(help="Seconds to wait for --host to answer.")] = 10.0,
    arch: Annotated[str | None, typer.Option(help="Architecture of a bare-state-dict checkpoint.")] = None,
    num_classes: Annotated[int | None, typer.Option(help="Class count of a bare-state-dict checkpoint.")] = None,
    verify_json: Annotated[list[Path] | None, typer.Option(
        "--verify-json", help="Verify results to take accuracies from (besides the run record of a pipeline run "
        "holding the artifact); repeatable.")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here (JSON).")] = None,
    plot: Annotated[bool, typer.Option("--plot", help="Also write a PNG next to the JSON (needs matplotlib).")
    ] = False,
    keep_remote: Annotated[bool, typer.Option("--keep-remote", help="Keep the work directory on --host.")] = False,
    remote_timeout: Annotated[float, typer.Option(
        help="Seconds allowed per artifact on --host (engine builds included).")] = 1800.0,
) -> None:
    """Latency and throughput of artifacts on this machine or a Jetson, with their accuracy, in one table.

      rslad-edge bench runs/mnv2/student.pt runs/mnv2/export/student.onnx runs/mnv2/export/student.int8.onnx --threads 2

      rslad-edge bench runs/mnv2/export/student.fp16.onnx --device jetson --host nvidia@jetson.local --json bench.json

    Per batch size: warm-up, then timed calls on one preallocated batch; outliers are counted, never dropped.

    Accuracies come from the verify result of the same file (matched by sha256): --verify-json files, or the run
    record (run.json) of the pipeline run that holds the artifact.
    """
    from rslad_edge.bench.accuracy import find_accuracies
    from rslad_edge.bench.remote import SshTarget
    from rslad_edge.bench.suite import bench_artifacts
    from rslad_edge.io import sha256_file

    if "iters" in given and "seconds" in given:
        raise typer.BadParameter("give --iters or --seconds, not both", param_hint="'--iters' / '--seconds'")
    if host is None and any(v is not None for v in (port, identity, known_hosts)):
        raise typer.BadParameter("--port, --identity and --known-hosts go with --host", param_hint="'--host'")
    cfg = BenchConfig(**given, **({"seconds": None} if "iters" in given else {}))
    target = (SshTarget(host, port=port, identity=identity, known_hosts=known_hosts, connect_timeout=connect_timeout)
              if host else None)
    existing = [path for path in artifacts if path.is_file()]  # bench_artifacts names a missing one
    accuracies = find_accuracies([(path, sha256_file(path)) for path in existing], verify_json or [])
    report = bench_artifacts(
        artifacts, cfg, target=target, arch=arch, num_classes=num_classes, accuracies=accuracies, json_path=json_out,
        plot=plot, keep_remote=keep_remote, remote_timeout=remote_timeout,
        on_step=lambda message: err_console.print(f"[dim]{message}[/]", highlight=False),
    )
    console.print(results_table(report))
    notes: dict[tuple[str, str], list[int]] = {}  # the same note for several batch sizes is printed once
    for row in report.results:
        for note in row.notes:
            notes.setdefault((Path(row.artifact).name, note), []).append(row.batch)
    for (name, note), batches in notes.items():
        sizes = ", ".join(str(b) for b in dict.fromkeys(batches))
        err_console.print(f"[dim]note: {name} (batch {sizes}): {note}[/]", highlight=False, soft_wrap=True)
    for warning in report.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if json_out is not None:
        console.print(f"[bold green]wrote[/] {json_out}" + (f" and {json_out.with_suffix('.png')}" if plot else ""))
