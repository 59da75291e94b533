"""`rslad-edge pipeline`: parses options, calls ``run_pipeline``, says where the report is."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from rslad_edge.console import console
from rslad_edge.distill.config import DistillConfig
from rslad_edge.errors import GateFailedError
from rslad_edge.options import command
from rslad_edge.pipeline.config import PRESET_YAML
from rslad_edge.record import RunRecord

app = typer.Typer(rich_markup_mode="rich", subcommand_metavar="")

# Distill options the command line may set over the preset and --config: what differs from machine to machine.
DISTILL_OVERRIDES = ("teacher", "teacher_arch", "data_root", "device")


@app.callback(invoke_without_command=True)
@command(DistillConfig, only=DISTILL_OVERRIDES, show_defaults=False, help_prefix="Overrides distill.{key}. ",
         own_first=True)
def pipeline_command(
    given: dict[str, Any],
    preset: Annotated[str, typer.Option(help=f"{', '.join(PRESET_YAML)}.")] = "smoke",
    config: Annotated[Path | None, typer.Option(
        help="YAML with sections distill / export / verify / bench whose keys are each stage's options; it "
        "overrides the preset key by key.")] = None,
    out: Annotated[Path, typer.Option(help="Run directory: student, exports, verify/bench JSON, report.")
                   ] = Path("runs/pipeline"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue a run: skip every stage whose config and inputs "
                                         "are unchanged; distillation resumes from its last checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Delete the run in --out and start over.")] = False,
    print_config: Annotated[bool, typer.Option(
        "--print-config", help="Print the preset's complete, commented config and exit.")] = False,
) -> None:
    """distill -> export (ONNX fp32 + int8; fp16 and TensorRT where a GPU can) -> verify every artifact against
    the student checkpoint -> bench on this machine -> report.md / report.html.

      rslad-edge pipeline --preset smoke --out runs/smoke        (offline, minutes on a CPU)

      rslad-edge pipeline --print-config --preset cifar10-rslad > my.yaml   (then edit, and --config my.yaml)
    """
    from rslad_edge.distill import RichObserver
    from rslad_edge.pipeline.config import load_pipeline_config, preset_text
    from rslad_edge.pipeline.run import run_pipeline

    if print_config:
        typer.echo(preset_text(preset), nl=False)
        raise typer.Exit()
    if resume and force:
        raise typer.BadParameter("--resume and --force exclude each other")
    sections = load_pipeline_config(preset, config, {"distill": given})
    observer = RichObserver()

    def on_stage(stage: str, status: str) -> None:
        label = "skipped (unchanged)" if status == "skip" else "running"
        console.print(f"[bold cyan]── {stage}[/] {label}", highlight=False)

    try:
        result = run_pipeline(sections, out, resume=resume, force=force, distill_observer=observer,
                              on_stage=on_stage)
    except GateFailedError:
        _print_summary(RunRecord.load(out))  # the report was written: show what failed before the error line
        raise
    finally:
        observer.close()
    _print_summary(result.record)
    console.print(f"[bold green]done[/]: report {result.report_html} (and {result.report_md.name})")


def _print_summary(record: RunRecord) -> None:
    from rslad_edge.pipeline.report import summary_table

    header, rows = summary_table(record)
    short = {"precision": "prec", "size MB": "MB", "worst case %": "worst %", "drop vs .pt (pp)": "drop pp",
             "p50 ms (b=1)": "p50 ms", "img/s (largest batch)": "img/s"}
    table = Table(title="artifacts: accuracy on the verify sample, latency on this machine", box=box.SIMPLE_HEAD,
                  caption="worst: worst case over the attacks; drop: vs the .pt on the same images; p50 at batch 1; "
                  "their 95% intervals are in report.md / report.html",
                  pad_edge=False)
    for name in header:
        table.add_column(short.get(name, name), no_wrap=name in ("artifact", "img/s (largest batch)"),
                         justify="left" if name in ("artifact", "precision") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
