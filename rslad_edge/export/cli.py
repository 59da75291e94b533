"""`rslad-edge export`: parses options, calls ``export``, prints what was written. No export logic here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from rslad_edge.console import console
from rslad_edge.export.config import (
    CALIB_METHODS,
    DEFAULT_OPSET,
    FORMATS,
    PARITY_DEFAULTS,
    PRECISIONS,
    TARGETS,
    not_a_choice,
)

app = typer.Typer(rich_markup_mode="rich", subcommand_metavar="")


def _choice(choices: tuple[str, ...]) -> Callable[[str | None], str | None]:
    """A Typer callback: a typo is a usage error (exit 2) that suggests the close match."""

    def callback(value: str | None) -> str | None:
        if value is None or value.lower() in choices:
            return None if value is None else value.lower()
        raise typer.BadParameter(not_a_choice(value, choices))

    return callback


def _thresholds_help() -> str:
    parts = []
    for precision, (diff, agreement) in PARITY_DEFAULTS.items():
        diff_text = f"max |diff| {diff:g}, " if diff is not None else ""
        parts.append(f"{precision}: {diff_text}agreement {agreement:.0%}")
    return "; ".join(parts)


@app.callback(invoke_without_command=True, context_settings={"allow_interspersed_args": True})
def export_command(
    checkpoint: Annotated[Path, typer.Argument(
        metavar="CHECKPOINT", show_default=False,
        help="Checkpoint to export (rslad-edge format, or a bare state dict with --arch).")],
    format: Annotated[str, typer.Option(
        "--format", callback=_choice(FORMATS),
        help="onnx; trt (the ONNX, then a TensorRT engine built on this GPU); ort (the ONNX, then its ONNX Runtime "
        "Mobile form, .ort); executorch (a .pte lowered to XNNPACK, fp32 or int8; needs the mobile extra).")
    ] = "onnx",
    precision: Annotated[str, typer.Option(callback=_choice(PRECISIONS),
                                           help="fp32, fp16 (float32 I/O kept) or int8 (Q/DQ, calibrated).")
                         ] = "fp32",
    target: Annotated[str | None, typer.Option(
        callback=_choice(TARGETS),
        help="Where the int8 model runs: cpu (uint8 activations, ONNX Runtime's fast path) or trt (symmetric int8, "
        "what TensorRT needs). [default: trt with --format trt, else cpu]")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = DEFAULT_OPSET,
    batch: Annotated[int | None, typer.Option(
        help="A static batch of N. [default: dynamic; 1 for executorch, whose programs are static in the batch]")
    ] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Dynamic batch (the default; excludes --batch).")
                       ] = False,
    simplify: Annotated[bool, typer.Option("--simplify", help="Run onnxslim on the fp32 graph first.")] = False,
    out: Annotated[Path | None, typer.Option(help="Output folder. [default: <checkpoint folder>/export]")] = None,
    name: Annotated[str | None, typer.Option(help="File stem. [default: the checkpoint's]")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="Images for parity (test split) and int8 calibration (train split): cifar10, cifar100, imagefolder, "
        "shapes. [default: the checkpoint's, else cifar10]")] = None,
    data_root: Annotated[str | None, typer.Option(help="Dataset folder. [default: the checkpoint's]")] = None,
    calib_n: Annotated[int, typer.Option(help="Training images to calibrate int8 on.")] = 512,
    calib_method: Annotated[str, typer.Option(
        callback=_choice(CALIB_METHODS),
        help="Activation ranges: minmax, entropy or percentile (ONNX); minmax or histogram (executorch).")
    ] = "minmax",
    parity_n: Annotated[int, typer.Option(help="Test images for the parity check against PyTorch.")] = 256,
    max_abs_diff: Annotated[float | None, typer.Option(
        help=f"Parity: max |logit difference| allowed. Defaults: {_thresholds_help()}.")] = None,
    min_agreement: Annotated[float | None, typer.Option(help="Parity: minimum top-1 agreement, a fraction (0.99).")
                             ] = None,
    arch: Annotated[str | None, typer.Option(help="Architecture of a bare state dict (see `rslad-edge models`).")
                    ] = None,
    num_classes: Annotated[int | None, typer.Option(help="Class count of a bare state dict.")] = None,
    workspace: Annotated[float, typer.Option(help="TensorRT builder workspace, GiB.")] = 2.0,
    dla_core: Annotated[int | None, typer.Option(help="TensorRT: build for this DLA core (GPU fallback on).")
                        ] = None,
    opt_batch: Annotated[int, typer.Option(help="TensorRT profile: the batch size to optimise for.")] = 64,
    max_batch: Annotated[int, typer.Option(help="TensorRT profile: the largest batch (the smallest is 1).")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the parity and calibration samples.")] = 0,
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
    from rslad_edge.export.config import ExportConfig
    from rslad_edge.export.exporter import export
    from rslad_edge.export.trt_engine import TensorRTUnavailableError

    if batch is not None and dynamic:
        raise typer.BadParameter("--batch N and --dynamic exclude each other")
    if dynamic and format == "executorch":
        raise typer.BadParameter("an ExecuTorch program is static in the batch: give --batch N (default 1), not "
                                 "--dynamic")
    cfg = ExportConfig(
        checkpoint=checkpoint, format=format, precision=precision, opset=opset, batch=batch, simplify=simplify,
        out=out, name=name, target=target, calib_n=calib_n, calib_method=calib_method, dataset=dataset,
        data_root=data_root, arch=arch, num_classes=num_classes, parity_n=parity_n, max_abs_diff=max_abs_diff,
        min_agreement=min_agreement, seed=seed, workspace_gib=workspace, dla_core=dla_core, opt_batch=opt_batch,
        max_batch=max_batch,
    )
    with console.status(f"exporting {checkpoint} ({cfg.format}, {cfg.precision})"):
        try:
            result = export(cfg)
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
    sidecars = ", ".join(str(written.sidecar) for written in result.written)
    console.print(f"parity vs PyTorch on {result.parity.data}; metadata in {sidecars}", style="dim",
                  highlight=False, soft_wrap=True)
    delegation = result.metadata.get("delegation")
    if delegation:
        outside = ", ".join(f"{op} x{count}" for op, count in delegation["outside_nodes"].items()) or "none"
        console.print(f"{delegation['backend']}: {delegation['delegated_nodes']} of {delegation['graph_nodes']} "
                      f"nodes delegated; outside it: {outside}", style="dim", highlight=False, soft_wrap=True)
