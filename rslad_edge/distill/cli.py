"""`rslad-edge distill`: parses options, calls ``train``, shows progress. No training logic here.

Its options are DistillConfig's fields (rslad_edge.options derives them); only --config, --resume and --force are
the command's own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from rslad_edge.console import console
from rslad_edge.distill.config import DEFAULT_NOTES, DistillConfig, load_yaml, resolve_config, resume_config
from rslad_edge.distill.progress import RichObserver
from rslad_edge.options import command

app = typer.Typer(rich_markup_mode="rich")


@app.callback(invoke_without_command=True)
@command(DistillConfig, notes=DEFAULT_NOTES)
def distill(
    given: dict[str, Any],
    config: Annotated[Path | None, typer.Option(
        help="YAML whose keys are these options (a pipeline file's distill section works too).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from checkpoints/last.pt.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Delete the run already in --out and start over.")] = False,
) -> None:
    """Train a small robust student from a robust teacher (RSLAD and the paper's baselines).

    The defaults are the authors' recipe (--preset paper). Quick starts:

      rslad-edge distill --preset smoke --out runs/smoke        (CPU, minutes, no files needed)

      rslad-edge distill --student mobilenetv2 --teacher wrn34.pt --teacher-arch wrn-34-10
      --data-root data/ --out runs/mnv2

    Multi-GPU: torchrun --nproc-per-node 4 -m rslad_edge.cli distill ...

    Beside each default: where another preset, or a method's own recipe (under --preset paper), differs.
    """
    if resume and force:
        raise typer.BadParameter("--resume and --force exclude each other")
    if resume and "out" not in given:
        raise typer.BadParameter("--resume needs --out, the run directory to continue")
    file_values = load_yaml(config) if config else {}
    if resume:  # every value given must equal the run's own, except the few a resumed run may change
        values = {**file_values, **given}
        out = values.pop("out")
        _run(resume_config(out, **values), resume=True, force=False)
        return
    _run(resolve_config(given.get("preset"), file_values, given), resume=False, force=force)


def _run(cfg: DistillConfig, *, resume: bool, force: bool) -> None:
    from rslad_edge.distill.run import distill_student

    observer = RichObserver()
    try:
        result = distill_student(cfg, resume=resume, force=force, observer=observer)
    finally:
        observer.close()
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        console.print(f"[bold green]done[/]: {result.student.path}  (metrics: {result.metrics_file})")
