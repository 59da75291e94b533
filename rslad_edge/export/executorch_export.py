"""PyTorch -> ExecuTorch program (``.pte``) lowered to XNNPACK, fp32 or int8 (PT2E with the XNNPACK quantizer).

The flow is ExecuTorch's documented one: ``torch.export`` -> (int8: ``prepare_pt2e`` with the ``XNNPACKQuantizer``,
calibration, ``convert_pt2e``, ``torch.export`` again) -> ``to_edge_transform_and_lower(partitioner=
[XnnpackPartitioner()])`` -> ``to_executorch()``. ExecuTorch and torchao come with the ``mobile`` extra and are
imported here only, inside the functions.

The program is static in the batch: torch.export specialises the example's batch size (calibrating at another
size fails a shape guard), so the batch is chosen at export (1 by default) and recorded in the sidecar; the runner
splits and pads other batches.

int8 follows our ONNX int8 where the formats allow: per-channel symmetric int8 weights, static int8 activations
calibrated on training images, and the classifier (the layer that computes the logits) left in float, for the
reason given in :func:`rslad_edge.export.precision.quantize_int8`; here too it matters: on the shared ResNet-18
teacher (minmax, 512 training images), top-1 agreement with PyTorch on 256 test images is 98.8% with the classifier
float and 97.3% with it quantized. Activation ranges: minmax by default, as our ONNX int8 (the XNNPACK quantizer's
own default, a HistogramObserver, gave 98.0% and clipped: max |logit diff| 1.01 against 0.084).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from rslad_edge.errors import ExportError
from rslad_edge.export.onnx_export import describe_export_failure
from rslad_edge.export.precision import ImageReader
from rslad_edge.runtime.executorch_runner import BACKEND_NAMES, quiet_imports, read_delegation

logger = logging.getLogger(__name__)

LOWERING = "torch.export -> executorch.exir.to_edge_transform_and_lower(XnnpackPartitioner) -> to_executorch"


@dataclass
class PteProgram:
    """A lowered program and what export knows about it (for the sidecar)."""

    data: bytes  # the .pte file's bytes
    delegation: dict[str, Any]  # node counts in and out of the delegates, and the program's own calls
    quantization: dict[str, Any] | None  # None for fp32


def torch_to_pte(
    model: nn.Module, input_shape: tuple[int, int, int], *, batch: int, precision: str, arch: str = "model",
    calib_images: np.ndarray | None = None, calib_method: str = "minmax",
) -> PteProgram:
    """Export ``model`` (eval mode, float32 CPU) for batches of ``batch`` to a ``.pte`` lowered to XNNPACK.

    ``precision`` int8 needs ``calib_images``: float32 (N, C, H, W) in [0, 1] training images, run in batches of
    ``batch`` (a remainder that does not fill one is dropped). ``calib_method``: minmax or histogram (the
    activation observer).
    """
    model = model.eval().float().cpu()
    example = (torch.rand(batch, *input_shape),)
    quantization = None
    try:
        with _quiet(), torch.no_grad():
            program = torch.export.export(model, example)
            if precision == "int8":
                if calib_images is None:
                    raise ExportError("int8 needs calibration images")
                program, quantization = _quantize(program, model, example, calib_images, calib_method, batch)
            lowered, delegation = _lower(program)
    except ExportError:
        raise
    except Exception as exc:  # torch.export, the quantizer and the partitioner raise many unrelated types
        raise ExportError(describe_export_failure(exc, arch, target="ExecuTorch (XNNPACK)")) from exc
    delegation["program"] = read_delegation(lowered).to_dict()
    return PteProgram(data=lowered, delegation=delegation, quantization=quantization)


@contextlib.contextmanager
def _quiet() -> Any:
    """ExecuTorch's and torchao's import-time and lowering chatter (stdout prints, deprecation warnings) goes to
    the debug log, not the CLI's output."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), quiet_imports():
        try:
            yield
        finally:
            if printed.getvalue().strip():
                logger.debug("executorch export: %s", printed.getvalue().strip())


def _quantize(
    program: torch.export.ExportedProgram, model: nn.Module, example: tuple[torch.Tensor], calib_images: np.ndarray,
    calib_method: str, batch: int,
) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """PT2E post-training quantization with the XNNPACK quantizer; returns the re-exported int8 program."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.utils import get_module_name_filter

    config = get_symmetric_quantization_config(is_per_channel=True)  # weights: int8 symmetric, per channel
    if calib_method == "minmax":  # the quantizer's default activation observer is a HistogramObserver
        activation = dataclasses.replace(config.input_activation,
                                         observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
        config = dataclasses.replace(config, input_activation=activation, output_activation=activation)
    quantizer = XNNPACKQuantizer().set_global(config)
    classifier = _classifier_name(model)
    if classifier is not None:
        in_classifier = get_module_name_filter(classifier)
        quantizer.filter_fn = lambda node: not in_classifier(node)
    prepared = prepare_pt2e(program.module(), quantizer)
    reader = ImageReader(calib_images, batch, static=True)
    while (inputs := reader.get_next()) is not None:
        prepared(torch.from_numpy(next(iter(inputs.values()))))
    converted = convert_pt2e(prepared)
    observer = "MinMaxObserver" if calib_method == "minmax" else "HistogramObserver"
    return torch.export.export(converted, example), {
        "flow": "PT2E (torchao prepare_pt2e / convert_pt2e)",
        "quantizer": "XNNPACKQuantizer, get_symmetric_quantization_config(is_per_channel=True)",
        "activations": f"int8 per tensor, asymmetric, {observer}",
        "weights": "int8 symmetric, per channel",
        "calib_method": calib_method,
        "calib_n": reader.count,
        "float_nodes": [f"{classifier} (the classifier: float logits)"] if classifier else [],
    }


def _classifier_name(model: nn.Module) -> str | None:
    """The last Linear layer: the one that computes the logits in every architecture rslad-edge builds."""
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return linears[-1] if linears else None


def _lower(program: torch.export.ExportedProgram) -> tuple[bytes, dict[str, Any]]:
    """Lower to XNNPACK and serialise; count the graph's compute nodes inside and outside the delegates."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    info = get_delegation_info(edge.exported_program().graph_module)
    # getitem nodes only unpack a delegate's outputs: not compute, left out of both counts
    counts = {op: row for op, row in info.delegation_by_operator.items() if op != "getitem"}
    delegated = sum(row.delegated for row in counts.values())
    outside = {op: row.non_delegated for op, row in sorted(counts.items()) if row.non_delegated}
    return edge.to_executorch().buffer, {
        "backend": BACKEND_NAMES["XnnpackBackend"],
        "delegated_nodes": delegated,
        "graph_nodes": delegated + sum(outside.values()),
        "subgraphs": info.num_delegated_subgraphs,
        "outside_nodes": outside,
    }


__all__ = ["LOWERING", "PteProgram", "torch_to_pte"]
