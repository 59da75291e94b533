"""The ``rslad-edge`` command: mounts each stage's Typer app and turns user errors into one red line.

Exit codes: 0 success, 1 a user-facing error (RsladEdgeError), 2 a usage error, 3 a failed gate.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from rslad_edge import __version__
from rslad_edge.bench.cli import app as bench_app
from rslad_edge.console import console, err_console, setup_logging
from rslad_edge.distill.cli import app as distill_app
from rslad_edge.errors import RsladEdgeError
from rslad_edge.export.cli import app as export_app
from rslad_edge.pipeline.cli import app as pipeline_app
from rslad_edge.verify.cli import app as verify_app


class _UserErrorGroup(TyperGroup):
    """Every RsladEdgeError raised under any command ends here: message on stderr, its exit code, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RsladEdgeError as exc:
            # escaped: messages name things in brackets (pip install 'rslad-edge[mobile]') that Rich would eat
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=exc.exit_code) from None


app = typer.Typer(
    cls=_UserErrorGroup,
    name="rslad-edge",
    help="From a big robust model to a small robust model on your device, with robustness checked at every step.\n\n"
    "distill -> export -> verify -> bench, or all of it with `pipeline`. Inputs are float32 NCHW in [0, 1]; "
    "eps is in pixel units (write 8/255).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        console.print(f"rslad-edge {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    setup_logging(verbose)


@app.command("models")
def models_command(
    source: Annotated[str | None, typer.Option(
        help="List another source's names instead: torchvision or timm (the timm extra).")] = None,
) -> None:
    """List the architectures, with parameter counts (for 10 classes unless noted).

    Any torchvision or timm classifier works too, as torchvision:NAME or timm:NAME, and your own model as
    package.module:factory (called with num_classes=N): normalisation goes inside the model, inputs stay [0, 1].
    """
    from rslad_edge.models import MODELS, count_parameters

    if source is not None:
        from rslad_edge.models import external

        if source not in external.SOURCES:
            raise typer.BadParameter(f"--source must be one of {', '.join(external.SOURCES)}, got '{source}'")
        names = external.torchvision_names() if source == "torchvision" else external.timm_names()
        console.print(" ".join(f"{source}:{name}" for name in names), soft_wrap=True)
        return
    table = Table(title="rslad-edge architectures (input: float32 NCHW in [0, 1]; the CIFAR variants at 32x32)",
                  caption="also: torchvision:NAME, timm:NAME (rslad-edge models --source ...), package.module:factory")
    table.add_column("name", style="bold")
    table.add_column("parameters", justify="right")
    table.add_column("classes", justify="right")
    table.add_column("what it is")
    for spec in MODELS.values():
        table.add_row(
            spec.name, f"{count_parameters(spec.name):,}", str(spec.default_num_classes), spec.description
        )
    console.print(table)


app.add_typer(distill_app, name="distill")
app.add_typer(export_app, name="export")
app.add_typer(verify_app, name="verify")
app.add_typer(bench_app, name="bench")
app.add_typer(pipeline_app, name="pipeline")


if __name__ == "__main__":  # `python -m rslad_edge.cli` (torchrun uses this)
    app()
