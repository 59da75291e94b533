"""PyTorch -> ExecuTorch program (``.pte``) lowered to XNNPACK, fp32 or int8 (PT2E with the XNNPACK quantizer).

The flow is ExecuTorch's documented one: ``torch.export`` -> (int8: ``prepare_pt2e`` with the ``XNNPACKQuantizer``,
calibration, ``convert_pt2e``, ``torch.export`` again) -> ``to_edge_transform_and_lower(partitioner=
[XnnpackPartitioner()])`` -> ``to_executorch()``. ExecuTorch and torchao come with the ``mobile`` extra and are
imported here only, inside the functions.

The program is static in the batch: the batch is chosen at export (1 by default) and recorded in the sidecar; the
runner splits and pads other batches. int8 calibration runs on a program whose batch is dynamic (batches of
CALIB_BATCH, every image used), and the converted graph is exported again at the program's batch; the calibrated
graph also gives the int8 program's differentiable twin (:func:`fake_quantized`), which the int8 search attacks.

int8 follows our ONNX int8 where the formats allow: per-channel symmetric int8 weights, static int8 activations
calibrated on training images, and the classifier (the layer that computes the logits) left in float, for the
reason given in :func:`rslad_edge.export.precision.quantize_int8`; here too it matters: on the shared ResNet-18
teacher (minmax, 512 training images), top-1 agreement with PyTorch on 256 test images is 98.8% with the classifier
float and 97.3% with it quantized. Activation ranges: minmax by default, as our ONNX int8 (the XNNPACK quantizer's
own default, a HistogramObserver, gave 98.0% and clipped: max |logit diff| 1.01 against 0.084).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rslad_edge.errors import ExportError
from rslad_edge.export.onnx_export import describe_export_failure
from rslad_edge.export.precision import ImageReader
from rslad_edge.runtime.executorch_runner import BACKEND_NAMES, ExecuTorchRunner, quiet_imports, read_delegation

logger = logging.getLogger(__name__)

CALIB_BATCH = 64  # images per calibration batch
LOWERING = "torch.export -> executorch.exir.to_edge_transform_and_lower(XnnpackPartitioner) -> to_executorch"


@dataclass
class PteProgram:
    """A lowered program and what export knows about it (for the sidecar)."""

    data: bytes  # the .pte file's bytes
    delegation: dict[str, Any]  # node counts in and out of the delegates, and the program's own calls
    quantization: dict[str, Any] | None  # None for fp32
    calibrated: torch.fx.GraphModule | None = None  # int8: the calibrated PT2E graph (fake_quantized: its twin)
    # What the program computes, as a torch module for any batch (int8: the converted PT2E graph; fp32: the model);
    # twin_onnx writes it as the ONNX that verify attacks the program through. None: the batch is static.
    graph: nn.Module | None = None


def torch_to_pte(
    model: nn.Module, input_shape: tuple[int, int, int], *, batch: int, precision: str, arch: str = "model",
    calib_images: np.ndarray | None = None, calib_method: str = "minmax", per_channel: bool = True,
    float_nodes: tuple[str, ...] = (),
) -> PteProgram:
    """Export ``model`` (eval mode, float32 CPU) for batches of ``batch`` to a ``.pte`` lowered to XNNPACK.

    ``precision`` int8 needs ``calib_images``: float32 (N, C, H, W) in [0, 1] training images. ``calib_method``:
    minmax or histogram (the activation observer); ``per_channel``: per-channel int8 weights (else per tensor);
    ``float_nodes``: nodes of the exported graph the quantizer leaves in float32, besides the classifier (a group
    of :func:`float_groups`).
    """
    model = model.eval().float().cpu()
    example = (torch.rand(batch, *input_shape),)
    quantization, calibrated, graph = None, None, model
    try:
        with _quiet(), torch.no_grad():
            if precision == "int8":
                if calib_images is None:
                    raise ExportError("int8 needs calibration images")
                quantized = _quantize(model, example, calib_images, calib_method, per_channel, float_nodes)
                program, quantization, calibrated = (torch.export.export(quantized.converted, example),
                                                     quantized.info, quantized.calibrated)
                graph = quantized.converted if calibrated is not None else None
            else:
                program = torch.export.export(model, example)
            lowered, delegation = _lower(program)
    except ExportError:
        raise
    except Exception as exc:  # torch.export, the quantizer and the partitioner raise many unrelated types
        raise ExportError(describe_export_failure(exc, arch, target="ExecuTorch (XNNPACK)")) from exc
    delegation["program"] = read_delegation(lowered).to_dict()
    return PteProgram(data=lowered, delegation=delegation, quantization=quantization, calibrated=calibrated,
                      graph=graph)


def twin_onnx(graph: nn.Module | None, input_shape: tuple[int, int, int], *, opset: int, arch: str = "model") -> Any:
    """The ONNX of what a ``.pte`` computes (its :attr:`PteProgram.graph`), for its differentiable twin
    (``runtime/twin.py``): the fp32 model, or the int8 program's converted PT2E graph as Q/DQ (its own int8 weights,
    scales and zero points; XNNPACK runs the same arithmetic in int8 kernels). Dynamic batch. ExportError when there
    is no such graph (None: the model's batch could not be made dynamic)."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    from rslad_edge.export.onnx_export import torch_to_onnx

    if graph is None:
        raise ExportError("torch.export could not make the model's batch dynamic, so the program has no twin")
    if isinstance(graph, torch.fx.GraphModule):
        graph = allow_exported_model_train_eval(copy.deepcopy(graph))  # torch_to_onnx calls .eval()
    with _quiet():
        return torch_to_onnx(graph, input_shape, opset=opset, batch=None, arch=arch)


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


@dataclass
class _Quantized:
    converted: torch.fx.GraphModule  # quantize / dequantize ops with the calibrated parameters, to export again
    calibrated: torch.fx.GraphModule | None  # the observed graph before conversion (any batch; None: static batch)
    info: dict[str, Any]


def _quantize(
    model: nn.Module, example: tuple[torch.Tensor], calib_images: np.ndarray, calib_method: str, per_channel: bool,
    float_nodes: tuple[str, ...],
) -> _Quantized:
    """PT2E post-training quantization with the XNNPACK quantizer, calibrated in batches of CALIB_BATCH on a program
    whose batch is dynamic (else, when torch.export cannot make it so, on the program's own batch)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = _quantizer(model, per_channel=per_channel, calib_method=calib_method, float_nodes=float_nodes)
    classifier = _classifier_name(model)
    batch = min(CALIB_BATCH, len(calib_images))
    try:
        program = torch.export.export(model, (example[0][:1].expand(batch, *example[0].shape[1:]).clone(),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
        dynamic = True
    except Exception as exc:  # a batch-dependent model: calibrate on the program's own batch
        logger.debug("int8 .pte: calibrating at the program's batch (torch.export: %s)", exc)
        program, batch, dynamic = torch.export.export(model, example), example[0].shape[0], False
    prepared = prepare_pt2e(program.module(), quantizer)
    reader = ImageReader(calib_images, batch, static=not dynamic)
    while (inputs := reader.get_next()) is not None:
        prepared(torch.from_numpy(next(iter(inputs.values()))))
    calibrated = copy.deepcopy(prepared) if dynamic else None  # convert_pt2e rewrites its argument
    converted = convert_pt2e(prepared)
    observer = "MinMaxObserver" if calib_method == "minmax" else "HistogramObserver"
    return _Quantized(converted, calibrated, {
        "flow": "PT2E (torchao prepare_pt2e / convert_pt2e)",
        "quantizer": f"XNNPACKQuantizer, get_symmetric_quantization_config(is_per_channel={per_channel})",
        "activations": f"int8 per tensor, asymmetric, {observer}",
        "weights": "int8 symmetric, " + ("per channel" if per_channel else "per tensor"),
        "calib_method": calib_method,
        "calib_n": reader.count,
        "calib_batch": batch,
        "float_nodes": [*([f"{classifier} (the classifier: float logits)"] if classifier else []), *float_nodes],
    })


def _quantizer(model: nn.Module, *, per_channel: bool, calib_method: str = "minmax", float_nodes: tuple[str, ...] = (),
               qat: bool = False) -> Any:
    """The XNNPACK quantizer: int8 symmetric weights (per channel or per tensor), int8 activations observed by
    ``calib_method``'s observer (QAT: its fake quantizers), the classifier and ``float_nodes`` left in float."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.quantizer.utils import get_module_name_filter

    config = get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=qat)
    if calib_method == "minmax" and not qat:  # the quantizer's default activation observer is a HistogramObserver
        activation = dataclasses.replace(config.input_activation,
                                         observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
        config = dataclasses.replace(config, input_activation=activation, output_activation=activation)
    quantizer = XNNPACKQuantizer().set_global(config)
    classifier = _classifier_name(model)
    in_classifier = get_module_name_filter(classifier) if classifier else lambda node: False
    unquantized = set(float_nodes)
    quantizer.filter_fn = lambda node: not in_classifier(node) and node.name not in unquantized
    return quantizer


def fake_quantized(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The differentiable twin of an int8 ``.pte``, from the PT2E graph it was made from: a calibrated graph (each
    observer replaced by fake quantization at its scale and zero point: what ``convert_pt2e`` writes) or a converted
    one (each quantize / dequantize pair of an activation replaced by the same fake quantization; weights stay the
    int8 constants dequantized). Rounding half to even, saturating, gradients straight through inside the range; it
    runs any batch its graph does."""
    from torchao.quantization.pt2e import ObserverBase

    twin = copy.deepcopy(graph)
    for name, module in list(twin.named_children()):
        if isinstance(module, ObserverBase):
            setattr(twin, name, _FakeQuantize(module))
    decomposed = torch.ops.quantized_decomposed
    for node in list(twin.graph.nodes):
        if node.op == "call_function" and node.target == decomposed.quantize_per_tensor.default:
            for user in list(node.users):
                if user.target == decomposed.dequantize_per_tensor.default:
                    user.replace_all_uses_with(node)
                    twin.graph.erase_node(user)
            node.target = _fake_quantize_per_tensor
    twin.recompile()
    return twin


def _fake_quantize_per_tensor(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int,
                              dtype: torch.dtype) -> torch.Tensor:
    """``quantize_per_tensor`` then ``dequantize_per_tensor`` of the same parameters, differentiably."""
    del dtype  # the range says it
    return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), int(quant_min), int(quant_max))


class _FakeQuantize(nn.Module):
    """One observer's quantization, as ``torch.fake_quantize_per_{tensor,channel}_affine``."""

    def __init__(self, observer: Any) -> None:
        super().__init__()
        self.quantized = observer.dtype in (torch.int8, torch.uint8)
        self.axis = getattr(observer, "ch_axis", None) if observer.qscheme in (
            torch.per_channel_symmetric, torch.per_channel_affine) else None
        scale, zero_point = observer.calculate_qparams() if self.quantized else (torch.ones(1), torch.zeros(1))
        self.register_buffer("scale", scale.float().reshape(-1))
        self.register_buffer("zero_point", zero_point.int().reshape(-1))
        self.qmin, self.qmax = int(observer.quant_min), int(observer.quant_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantized:
            return x
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)
        return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis, self.qmin, self.qmax)


WEIGHTED_OPS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)


def quantized_layers(graph: torch.fx.GraphModule) -> dict[str, tuple[torch.fx.Node, list[int]]]:
    """The weighted layers of a prepared (or fake-quantized) PT2E graph that read an observed input or weight:
    module name -> (its node, the positions of those arguments), in graph order."""
    layers = {}
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target not in WEIGHTED_OPS:
            continue
        observed = [i for i, arg in enumerate(node.args[:2])
                    if isinstance(arg, torch.fx.Node) and arg.op == "call_module"]
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        if observed and stack:
            layers[stack[-1][0]] = (node, observed)
    return layers


def float_groups(graph: torch.fx.GraphModule) -> dict[str, tuple[str, ...]]:
    """For each layer of :func:`quantized_layers` with int8 weights (by module name), the graph nodes to leave
    unquantized for it to compute in float on a float input: its own node and, back through ops with one input
    (ReLU, pooling) whose output only the next reads, those ops and the weighted layer that makes its input. Where
    an add, a concatenation or the graph's input comes first, its input stays rounded (the quantizer rounds a
    node's output by that node's own annotation, whoever reads it)."""
    groups = {}
    for name, (node, observed) in quantized_layers(graph).items():
        if 1 not in observed:  # float weights: a module the quantizer skips (the classifier)
            continue
        group, chain, current = [node], [], node.args[0]
        while isinstance(current, torch.fx.Node) and len(current.users) == 1:
            if current.op == "call_module":  # an observer: look through it
                current = current.args[0]
                continue
            if current.op != "call_function":
                break
            if current.target in WEIGHTED_OPS:
                group += [*chain, current]
                break
            inputs = [arg for arg in current.args if isinstance(arg, torch.fx.Node)]
            if len(inputs) != 1:
                break
            chain.append(current)
            current = inputs[0]
        groups[name] = tuple(n.name for n in group)
    return groups


@contextlib.contextmanager
def layers_in_float(graph: torch.fx.GraphModule, nodes: tuple[str, ...]) -> Any:
    """Within the block, the fake-quantized ``graph`` computes ``nodes`` (a group of :func:`float_groups`) as
    :func:`torch_to_pte` builds them with ``float_nodes=nodes``: weights, and tensors passed between them, unrounded
    (a tensor from a quantized node stays rounded)."""
    group = set(nodes)
    saved = {}
    for node in graph.graph.nodes:
        if node.name in group:
            saved[node] = node.args
            node.args = tuple(arg.args[0] if isinstance(arg, torch.fx.Node) and arg.op == "call_module" and (
                arg.args[0].op == "get_attr" or arg.args[0].name in group) else arg for arg in node.args)
    graph.recompile()
    try:
        yield graph
    finally:
        for node, args in saved.items():
            node.args = args
        graph.recompile()


class QatProgram:
    """A ``.pte`` candidate prepared for quantization-aware training (export/qat.py's TrainableGraph): PT2E's
    ``prepare_qat_pt2e`` with the XNNPACK quantizer's QAT configuration (fake quantization of int8 weights and of
    activations with moving-average min / max ranges, BatchNorm folded into the weights it scales), the classifier
    float as in every int8 export; BatchNorm in eval mode throughout (``move_exported_model_to_eval``: fine-tuning
    keeps the float model's statistics). Each epoch is written as ExecuTorch will run it: a copy converted
    (``convert_pt2e``), exported at the program's batch and lowered to XNNPACK."""

    suffix = ".pte"

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], calib_images: np.ndarray, *,
                 batch: int, per_channel: bool = True, threads: int | None = None) -> None:
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

        self.input_shape, self.batch, self.threads = input_shape, batch, threads
        model = model.eval().float().cpu()
        with _quiet():
            quantizer = _quantizer(model, per_channel=per_channel, qat=True)
            program = torch.export.export(model, (torch.rand(min(CALIB_BATCH, len(calib_images)), *input_shape),),
                                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
            self.module = move_exported_model_to_eval(prepare_qat_pt2e(program.module(), quantizer))
            with torch.no_grad():  # the ranges start from the calibration images, as post-training int8's do
                for batch_images in torch.from_numpy(calib_images).split(CALIB_BATCH):
                    self.module(batch_images)
        digest = hashlib.sha256(repr(("qat", per_channel, batch, input_shape)).encode())
        for value in model.state_dict().values():
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        self.sha256 = digest.hexdigest()

    def scale_parameters(self) -> list[nn.Parameter]:
        return []  # PT2E's fake quantizers track their ranges; they do not learn them

    def converted(self) -> torch.fx.GraphModule:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

        with _quiet():
            return convert_pt2e(copy.deepcopy(self.module))

    def twin(self) -> torch.fx.GraphModule:
        """What the written program computes, differentiably: :func:`fake_quantized` of the converted graph. (The
        QAT graph itself is not it: its BatchNorm-folding arithmetic and PT2E's conversion disagree on a few
        percent of the tests' outlier model's predictions.)"""
        return fake_quantized(self.converted())

    def program(self) -> PteProgram:
        example = (torch.rand(self.batch, *self.input_shape),)
        converted = self.converted()
        with _quiet(), torch.no_grad():
            lowered, delegation = _lower(torch.export.export(converted, example))
        delegation["program"] = read_delegation(lowered).to_dict()
        return PteProgram(data=lowered, delegation=delegation, quantization=None, graph=converted)

    def write(self, path: Path) -> None:
        path.write_bytes(self.program().data)

    def predict(self, path: Path, images: np.ndarray) -> np.ndarray:
        return ExecuTorchRunner(path, threads=self.threads).predict(images)


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



__all__ = ["LOWERING", "PteProgram", "QatProgram", "fake_quantized", "float_groups", "layers_in_float",
           "quantized_layers", "torch_to_pte", "twin_onnx"]
