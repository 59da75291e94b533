"""`rslad-edge export`: parses options, calls ``export``, prints what was written. No export logic here.

Its options are ExportConfig's fields (rslad_edge.options derives them); only --dynamic is the command's own.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from rslad_edge.console import console
from rslad_edge.export.config import ExportConfig
from rslad_edge.options import command

app = typer.Typer(rich_markup_mode="rich", subcommand_metavar="")


@app.callback(invoke_without_command=True, context_settings={"allow_interspersed_args": True})
@command(ExportConfig)
def export_command(
    given: dict[str, Any],
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Dynamic batch (the default; excludes --batch).")
                       ] = False,
) -> None:
    """Export a checkpoint to ONNX (fp32 / fp16 / int8), a TensorRT engine, ONNX Runtime Mobile (.ort) or
    ExecuTorch (.pte), checked against PyTorch on the artifact's own runtime.

    Each artifact is compared with PyTorch on --parity-n test images; a miss exits 1 and writes nothing.

    Examples:

      rslad-edge export runs/mnv2/student.pt --out runs/mnv2/export

      rslad-edge export student.pt --precision int8 --dataset imagefolder --data-root data/cifar10

      rslad-edge export student.pt --format trt --precision fp16      (on the Jetson / GPU that will run it)

      rslad-edge export student.pt --format executorch --precision int8 --dataset imagefolder --data-root data
    """
    from rslad_edge.export.exporter import export
    from rslad_edge.export.search import SearchFailedError
    from rslad_edge.export.trt_engine import TensorRTUnavailableError

    if "batch" in given and dynamic:
        raise typer.BadParameter("--batch N and --dynamic exclude each other")
    if dynamic and given.get("format") == "executorch":
        raise typer.BadParameter("an ExecuTorch program is static in the batch: give --batch N (default 1), not "
                                 "--dynamic")
    cfg = ExportConfig(**given)
    with console.status(f"exporting {cfg.checkpoint} ({cfg.format}, {cfg.precision})"):
        try:
            result = export(cfg)
        except SearchFailedError as exc:
            console.print(search_table(exc.result))
            raise
        except TensorRTUnavailableError as exc:
            console.print(f"[bold]ONNX written:[/] {exc.onnx_path}")
            for version, command in exc.commands.items():
                console.print(f"# build the engine on the target ({version}):", style="dim", highlight=False)
                console.print(command, markup=False, highlight=False, soft_wrap=True)
            raise

    table = Table(title=f"rslad-edge export -> {cfg.out}", show_header=True)
    for column in ("artifact", "max |diff|", "agreement", "accuracy torch / artifact", "MiB"):
        table.add_column(column, justify="left" if column == "artifact" else "right")
    for written in result.written:
        parity = written.parity
        table.add_row(written.path.name, f"{parity.max_abs_diff:.2e}", f"{parity.agreement:.2%}",
                      f"{parity.torch_accuracy:.2%} / {parity.artifact_accuracy:.2%}",
                      f"{written.path.stat().st_size / 2**20:.1f}")
    console.print(table)
    search = (result.written[0].metadata.get("quantization") or {}).get("search")
    if search is not None:
        console.print(search_table(search))
    sidecars = ", ".join(str(written.sidecar) for written in result.written)
    console.print(f"parity vs PyTorch on {result.parity.data}; metadata in {sidecars}", style="dim",
                  highlight=False, soft_wrap=True)
    delegation = result.metadata.get("delegation")
    if delegation:
        outside = ", ".join(f"{op} x{count}" for op, count in delegation["outside_nodes"].items()) or "none"
        console.print(f"{delegation['backend']}: {delegation['delegated_nodes']} of {delegation['graph_nodes']} "
                      f"nodes delegated; outside it: {outside}", style="dim", highlight=False, soft_wrap=True)


def search_table(search: Any) -> Table:
    """The int8 search's trade-off table (a SearchResult, or its JSON from a sidecar)."""
    from rslad_edge.export.search import SEARCH_TABLE_HEADER, SearchResult, qat_lines, table_rows

    data = search.to_json() if isinstance(search, SearchResult) else search
    splits = ", ".join(f"{n} {name.rsplit(' ', 1)[-1]}" for name, n in data["splits"].items())
    table = Table(title=f"int8 search on training images ({splits}); robust change ± 95% in points",
                  show_header=True, title_justify="left")
    for column in SEARCH_TABLE_HEADER:
        table.add_column(column, justify="right" if column.startswith(("#", "ms")) else "left")
    for row in table_rows(data):
        table.add_row(*row)
    qat = qat_lines(data)
    if qat:
        table.caption = "\n".join(qat)
        table.caption_justify = "left"
    return table
