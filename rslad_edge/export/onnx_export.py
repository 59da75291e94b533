"""PyTorch -> ONNX (fp32), and the graph-level steps every artifact shares: simplify, check, sort.

The exporter is ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript). On torch 2.14 it gives the
cleaner graph of the two paths: BatchNorm folded into the convolutions, no Identity nodes (ResNet-18: 48 nodes vs
64 from the TorchScript path, which is deprecated), a named dynamic batch dimension, and errors that name the aten
operator that has no ONNX conversion.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import re
from typing import Any

import onnx
import torch
from torch import nn

from rslad_edge.errors import ExportError

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='([\w.]+)'"),  # "No ONNX function found for <OpOverload(op='aten._linalg_svd', ...)>"
    re.compile(r"target=torch\.ops\.([\w.]+?)(?:\.default)?\]"),
    re.compile(r"torch\.ops\.([\w]+\.[\w]+)"),
)


def torch_to_onnx(
    model: nn.Module, input_shape: tuple[int, int, int], *, opset: int, batch: int | None, arch: str = "model"
) -> onnx.ModelProto:
    """Export ``model`` (eval mode, float32 CPU) to an fp32 ONNX model with input ``input`` and output ``logits``.

    ``batch=None`` makes the batch dimension dynamic (named ``batch``); an int fixes it. An operator with no ONNX
    conversion raises ExportError naming it.
    """
    if importlib.util.find_spec("onnxscript") is None:
        raise ExportError("ONNX export needs onnxscript (torch's ONNX exporter): pip install 'rslad-edge[export]'")
    model.eval()  # not chained: an exported graph's eval (allow_exported_model_train_eval) returns None
    model = model.float().cpu()
    example = torch.rand(batch or 2, *input_shape)  # 2, not 1: torch.export specialises a size-1 dimension
    dynamic_shapes = None if batch else ({0: torch.export.Dim("batch")},)
    # The exporter prints its progress on stdout; route it to the debug log instead of the CLI's output.
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), torch.no_grad():
            program = torch.onnx.export(
                model, (example,), None, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic_shapes, opset_version=opset, verbose=False, optimize=True,
            )
    except Exception as exc:  # torch.export and the ONNX translator raise many unrelated types
        raise ExportError(describe_export_failure(exc, arch, opset=opset)) from exc
    finally:
        if printed.getvalue().strip():
            logger.debug("torch.onnx.export: %s", printed.getvalue().strip())
    proto = program.model_proto
    inputs, outputs = [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise ExportError(f"{arch} exported with inputs {inputs} and outputs {outputs}; rslad-edge models take one "
                          f"image tensor and return logits")
    return proto


def describe_export_failure(exc: BaseException, arch: str, *, target: str = "ONNX", opset: int | None = None) -> str:
    """One line: which operator failed to export to ONNX at ``opset`` (when the exporter says), else the root cause
    and where it was. ``target`` names what the export was for (ONNX, ExecuTorch): both start with torch.export."""
    chain = _exception_chain(exc)
    text = _ANSI.sub("", "\n".join(str(e) for e in chain))
    for pattern in _OP_PATTERNS if opset is not None else ():
        match = pattern.search(text)
        if match:
            return (f"cannot export {arch} to ONNX: operator '{match.group(1)}' has no ONNX conversion at opset "
                    f"{opset} in torch {torch.__version__}; replace it in the model (or try another --opset)")
    root = chain[-1]
    lines = [line.strip() for line in _ANSI.sub("", str(root)).splitlines() if line.strip()]
    reason = f"{type(root).__name__}: {lines[0][:200]}" if lines else type(root).__name__
    where = next((line for line in text.splitlines() if line.strip().startswith("File ")), "")
    at = f" at {where.strip()}" if where else ""
    return f"cannot export {arch} to {target} ({reason}){at}; change that code so torch.export can trace it"


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim: constant folding and fusions. The dynamo exporter already folds most, so this is optional."""
    try:
        import onnxslim
    except ImportError as exc:
        raise ExportError("--simplify needs onnxslim: pip install 'rslad-edge[export]'") from exc
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # onnxslim prints a summary table
        slimmed = onnxslim.slim(model)
    logger.debug("onnxslim: %s", printed.getvalue().strip())
    return slimmed


def sort_topologically(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes in dependency order (the ONNX checker requires it; some converters append nodes at the end)."""
    import onnx_ir as ir

    ir_model = ir.from_proto(model)
    ir_model.graph.sort()
    return ir.to_proto(ir_model)


def drop_unused_opsets(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove opset imports no node uses (ONNX Runtime's optimizer, run by quantization pre-processing, declares
    com.microsoft, nchwc, aten...): TensorRT's parser and other runtimes need not know those domains."""
    used = {node.domain for node in model.graph.node} | {f.domain for f in model.functions}
    keep = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return model


def check(model: onnx.ModelProto, where: str) -> None:
    """``onnx.checker`` with the full check (strict shape inference), as an ExportError naming the artifact."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{where} fails onnx.checker: {first_line[:300]}") from exc


def graph_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Node counts by type and the opset: what a reader of the sidecar wants to know about the graph."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"nodes": len(model.graph.node), "op_types": dict(sorted(counts.items())), "opset": opset}
