"""Differentiable twins: a torch module that computes what an exported artifact computes, with gradients.

An ONNX Runtime session or a TensorRT engine gives logits but no gradients, so a white-box attack cannot run on it
directly. Its twin is a small interpreter over the artifact's own ONNX graph: the artifact's weights, and for an int8
Q/DQ model its own scales and zero points, read from the file. What the twin computes is therefore the artifact's
computation, not the checkpoint's:

- **fp32**: the graph's own float weights and ops.
- **fp16**: the graph's float16 weights (exact in float32), every float16 tensor rounded to float16 where the graph
  has one (Cast, and each op whose inputs are float16), so activations carry half precision as in the runtime.
- **int8 Q/DQ**: fake quantization. ``QuantizeLinear`` is ``saturate(round(x / scale) + zero_point)``, rounding
  half to even as ONNX specifies and ONNX Runtime does, saturating to the zero point's type (uint8 [0, 255], int8
  [-128, 127]); per tensor or per channel (``axis``). The rounding passes gradients straight through (STE), the
  saturation does not (its true derivative: zero where the value is clipped). ``DequantizeLinear`` is
  ``(q - zero_point) * scale``.
- **TensorRT engine**: the twin of the ONNX it was built from (named in the engine's sidecar); TensorRT's own fused
  kernels differ slightly more, which the agreement check measures.

Only the op set rslad-edge exports is emulated (:data:`TWIN_OPS`); any other op makes :func:`onnx_twin` raise
:class:`TwinUnavailableError` naming it, and verify then skips the white-box columns with a one-line warning.

A twin is only as good as its agreement with the artifact: :func:`twin_agreement` measures top-1 agreement and the
largest logit difference on the images it will be used on, every time (verify reports both and flags a twin below
:data:`MIN_TWIN_AGREEMENT`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rslad_edge.errors import RsladEdgeError

logger = logging.getLogger(__name__)

MIN_TWIN_AGREEMENT = 0.99  # top-1 agreement with the artifact below which a twin's gradients are not trusted

# ONNX TensorProto element types -> the integer range a QuantizeLinear saturates to.
_QUANT_RANGES = {2: (0, 255), 3: (-128, 127), 4: (0, 65535), 5: (-32768, 32767), 6: (-(2**31), 2**31 - 1)}
_FLOAT16, _FLOAT, _DOUBLE, _BFLOAT16 = 10, 1, 11, 16
_UINT8, _INT8, _INT32 = 2, 3, 6


class TwinUnavailableError(RsladEdgeError):
    """An artifact has no differentiable twin (an op the twin cannot emulate, or no ONNX to build it from)."""


@dataclass(frozen=True)
class TwinAgreement:
    """How closely a twin follows its artifact on some images: top-1 agreement and the largest logit difference."""

    n: int
    agreement: float  # fraction of images where twin and artifact predict the same class
    max_abs_logit_diff: float
    threshold: float = MIN_TWIN_AGREEMENT

    @property
    def trusted(self) -> bool:
        return self.agreement >= self.threshold

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "agreement": self.agreement, "max_abs_logit_diff": round(self.max_abs_logit_diff, 6),
                "threshold": self.threshold, "trusted": self.trusted}


def twin_agreement(
    twin: Callable[[torch.Tensor], torch.Tensor],
    artifact_logits: torch.Tensor,
    x: torch.Tensor,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> TwinAgreement:
    """Compare the twin's logits on ``x`` (CPU, float32 NCHW) with the artifact's ``artifact_logits`` (N, classes)."""
    twin_logits = torch.empty_like(artifact_logits)
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            part = slice(start, start + batch_size)
            twin_logits[part] = twin(x[part].to(device)).float().cpu()
    same = twin_logits.argmax(dim=1) == artifact_logits.argmax(dim=1)
    difference = float((twin_logits - artifact_logits).abs().max()) if x.shape[0] else 0.0
    return TwinAgreement(n=int(x.shape[0]), agreement=float(same.float().mean()) if x.shape[0] else 1.0,
                         max_abs_logit_diff=difference)


# --------------------------------------------------------------------------------------------------- building


def onnx_twin(path: str | Path) -> OnnxTwin:
    """The twin of the ONNX model at ``path``; TwinUnavailableError naming the first op it cannot emulate."""
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError / ValueError / OSError
        raise TwinUnavailableError(f"cannot read '{path}' to build its twin ({exc})") from exc
    return OnnxTwin(model, source=str(path))


def built_from_onnx_twin(artifact: str | Path, metadata: dict[str, Any], *, key: str = "onnx") -> OnnxTwin:
    """The twin of an artifact that is not an ONNX itself: the twin of an ONNX beside it, named by the artifact's
    sidecar under ``key`` with its sha256 under ``KEY_sha256``. ``onnx``: the ONNX it was built from (a TensorRT
    engine, a ``.ort``); ``twin_onnx``: the graph a ``.pte`` computes, written by export for this purpose."""
    from rslad_edge.io import sha256_file

    name = Path(artifact).name
    what = "the ONNX it was built from" if key == "onnx" else "its twin's ONNX"
    onnx_name = metadata.get(key)
    if not onnx_name:
        raise TwinUnavailableError(f"{name} has no sidecar naming {what}, so it has no twin")
    onnx_path = Path(artifact).with_name(str(onnx_name))
    if not onnx_path.is_file():
        raise TwinUnavailableError(f"{what[0].upper()}{what[1:]} for {name}, {onnx_path.name}, is not beside it: its "
                                   "twin is built from that file")
    expected = metadata.get(f"{key}_sha256")
    if expected and sha256_file(onnx_path) != expected:
        since, fix = ("was built from it", "rebuild it") if key == "onnx" else ("was exported", "export again")
        raise TwinUnavailableError(f"{onnx_path.name} changed since {name} {since} (sha256 differs from the "
                                   f"sidecar's): {fix}")
    return onnx_twin(onnx_path)


class OnnxTwin(nn.Module):
    """Interprets an ONNX graph with torch ops, so that autograd gives input gradients of what the graph computes.

    Nodes whose inputs are all constants (the DequantizeLinear of int8 weights, shape arithmetic) are evaluated once
    here; ``forward`` runs the rest in the graph's (topological) order. Constants are buffers: ``.to(device)`` moves
    them. ``fuse_fake_quant``: each activation's QuantizeLinear -> DequantizeLinear pair (same scale and zero point)
    runs as one fused torch fake-quantize kernel, 2-3x faster than the two ops; see :func:`_fake_quantize`.

    ``round_activations=False`` (a diagnosis, not an emulation): each activation's Q/DQ pair only clips to its
    quantized range, without rounding, so comparing with the default twin separates the error activation rounding
    causes from the weights'.

    ``trainable``: the integer weights and biases of a Q/DQ graph (each DequantizeLinear of an integer initializer)
    become parameters, held dequantized and quantized again on every forward on the graph's own grid (its scales and
    zero points, rounding straight-through), and so do the float weights and biases of layers the graph keeps in
    float (the classifier, layers an int8 search left in fp32): training them is quantization-aware training of
    exactly the graph ONNX Runtime runs, and :meth:`quantized_onnx` writes them back into that graph.

    ``learn_scales`` (with ``trainable``): each per-tensor activation scale (the scale initializer a QuantizeLinear
    and its DequantizeLinear share) becomes a parameter too, as in LSQ (Esser et al., 2020): held as the log of its
    ratio to the calibrated value (0 at the start, so the twin starts as the graph), its gradient torch's learnable
    fake-quantize gives. The int32 bias of each layer whose input scale learns stays on that layer's grid, input scale
    x weight scale, as ONNX Runtime's int8 kernels assume; :meth:`quantized_onnx` writes the scales and the biases'
    scales back.
    """

    def __init__(
        self, model: Any, *, source: str = "model", fuse_fake_quant: bool = True, trainable: bool = False,
        round_activations: bool = True, learn_scales: bool = False,
    ) -> None:
        super().__init__()
        import onnx
        from onnx import numpy_helper

        self.source = source
        graph = model.graph
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        constants: dict[str, torch.Tensor] = {}
        self._half: set[str] = set()  # values the graph holds in float16
        self._quant_type: dict[str, int] = {}  # integer constants -> their ONNX element type (zero points)
        for initializer in graph.initializer:
            constants[initializer.name] = _to_tensor(numpy_helper.to_array(initializer))
            self._quant_type[initializer.name] = initializer.data_type
            if initializer.data_type == _FLOAT16:
                self._half.add(initializer.name)
        initializer_names = set(constants)
        inputs = [value.name for value in graph.input if value.name not in initializer_names]
        if len(inputs) != 1:
            raise TwinUnavailableError(f"{Path(source).name} has {len(inputs)} inputs; a twin takes one image batch")
        self.input_name = inputs[0]
        self.output_name = graph.output[0].name

        self._nodes: list[_Node] = []
        self._weights: dict[str, _Node] = {}  # trainable: dequantized weight / bias name -> its DequantizeLinear
        for index, node in enumerate(graph.node):
            if node.domain not in ("", "ai.onnx"):
                raise _cannot(source, f"{node.domain}.{node.op_type}", node.name)
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            plan = _Node(node.op_type, node.name or f"#{index}", list(node.input), list(node.output), attrs, opset)
            _check_supported(plan, source, constants)
            half = self._output_is_half(plan)
            foldable = all(name == "" or (name in constants and name not in self._weights) for name in plan.inputs)
            if foldable:
                with torch.no_grad():
                    outputs = _run(plan, [constants.get(name) if name else None for name in plan.inputs],
                                   self._quant_type)
                for name, value in zip(plan.outputs, outputs, strict=False):
                    constants[name] = _round_half(value) if half and value.is_floating_point() else value
                    if plan.op_type == "Constant":
                        self._quant_type[name] = attrs["value"].data_type if "value" in attrs else _FLOAT
                if trainable and plan.op_type == "DequantizeLinear" and self._quant_type.get(plan.inputs[0]) in (
                        _INT8, _UINT8, _INT32):
                    self._weights[plan.outputs[0]] = plan
            else:
                self._nodes.append(plan)
            if half:
                self._half.update(plan.outputs)
            plan.half_output = half

        if fuse_fake_quant or not round_activations:
            self._nodes = _fuse_quantize_dequantize(self._nodes, constants, self._quant_type, self.output_name)
        if not round_activations:  # a diagnosis: what the graph would compute with exact activations in its ranges
            for plan in self._nodes:
                if plan.op_type == "FakeQuantize":
                    plan.op_type = "ClipToRange"
        self._scales: dict[str, str] = {}  # learnable activation scale initializer -> its parameter (log ratio)
        if learn_scales and not trainable:
            raise ValueError("learn_scales needs trainable=True: the biases' grids follow the scales")
        if learn_scales:
            self._learn_scales(constants)
        needed = {name for plan in self._nodes for name in plan.inputs} | {self.output_name}
        # trainable: float weights and biases read directly by a layer (not through a DequantizeLinear)
        self._float_weights: set[str] = {
            name for plan in self._nodes if trainable and plan.op_type in _LAYER_OPS for name in plan.inputs[1:3]
            if name in initializer_names and self._quant_type.get(name) == _FLOAT and name not in self._weights}
        self._constant_attr: dict[str, str] = {}
        self._grid: dict[str, tuple[torch.Tensor, torch.Tensor, int, int, int]] = {}  # weight -> its quantization
        for position, (name, value) in enumerate(constants.items()):
            if name in needed:
                attribute = f"constant_{position}"
                if name in self._weights:
                    self.register_parameter(attribute, nn.Parameter(value.float().clone()))
                    plan = self._weights[name]
                    low, high = _QUANT_RANGES[self._quant_type[plan.inputs[0]]]
                    zero = constants[plan.inputs[2]] if len(plan.inputs) > 2 and plan.inputs[2] else torch.zeros(())
                    self._grid[name] = (constants[plan.inputs[1]].float(), zero.float(),
                                        int(plan.attrs.get("axis", 1)), low, high)
                elif name in self._float_weights:
                    self.register_parameter(attribute, nn.Parameter(value.float().clone()))
                else:
                    self.register_buffer(attribute, value, persistent=False)
                self._constant_attr[name] = attribute
        self._bias_scale: dict[str, tuple[str, torch.Tensor]] = {}  # bias -> (its layer's input scale, weight scale)
        if self._scales:
            self._follow_input_scales()
        # Free each intermediate value after its last use: without gradients (the agreement check, predictions) a
        # ResNet-18 batch would otherwise hold every activation of the graph at once.
        last_use = {name: index for index, plan in enumerate(self._nodes) for name in plan.inputs}
        self._release: list[list[str]] = [[] for _ in self._nodes]
        for name, index in last_use.items():
            if name and name != self.output_name and name not in self._constant_attr:
                self._release[index].append(name)
        self.op_types = sorted({plan.op_type for plan in self._nodes})
        self.conv_kernel_shapes = [tuple(constants[plan.inputs[1]].shape) for plan in self._nodes
                                   if plan.op_type == "Conv" and plan.inputs[1] in constants]

    def _output_is_half(self, plan: _Node) -> bool:
        if plan.op_type == "Cast":
            return plan.attrs.get("to") == _FLOAT16
        if plan.op_type == "DequantizeLinear":
            return len(plan.inputs) > 1 and plan.inputs[1] in self._half
        if plan.op_type == "QuantizeLinear":
            return False
        if plan.op_type == "Constant":
            return "value" in plan.attrs and plan.attrs["value"].data_type == _FLOAT16
        return any(name in self._half for name in plan.inputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W) float32 in [0, 1]
        return self._execute(x, ())[self.output_name].float()

    def trace(self, x: torch.Tensor, names: Collection[str]) -> dict[str, torch.Tensor]:
        """The graph's intermediate values ``names`` on ``x`` (a diagnosis: compare them with a runtime's)."""
        values = self._execute(x, set(names))
        return {name: values[name] for name in names}

    def _execute(self, x: torch.Tensor, keep: Collection[str]) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = {self.input_name: x}
        for plan, released in zip(self._nodes, self._release, strict=True):
            arguments = [self._value(name, values) for name in plan.inputs]
            outputs = _run(plan, arguments, self._quant_type)
            for name, value in zip(plan.outputs, outputs, strict=False):
                values[name] = _round_half(value) if plan.half_output and value.is_floating_point() else value
            for name in released:
                if name not in keep:
                    values.pop(name, None)
        values[self.output_name] = self._value(self.output_name, values)
        return values

    def _value(self, name: str, values: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if not name:
            return None
        if name in values:
            return values[name]
        if name in self._grid:
            return self._on_grid(name)[1]
        if name in self._scales:
            return getattr(self, f"{self._scales[name]}_calibrated") * torch.exp(getattr(self, self._scales[name]))
        return getattr(self, self._constant_attr[name])

    def _learn_scales(self, constants: dict[str, torch.Tensor]) -> None:
        """Make each per-tensor activation scale a parameter (see the class's ``learn_scales``)."""
        for plan in self._nodes:
            if plan.op_type == "FakeQuantize" and plan.attrs["axis"] is None and plan.attrs["scale_name"]:
                name = plan.attrs["scale_name"]
                plan.inputs = [plan.inputs[0], name]  # the fused op then reads its scale from the parameter
            elif plan.op_type in ("QuantizeLinear", "DequantizeLinear") and len(plan.inputs) > 1:
                name = plan.inputs[1]
            else:
                continue
            if name in constants and constants[name].numel() == 1 and name not in self._scales:
                attribute = f"scale_{len(self._scales)}"
                self.register_parameter(attribute, nn.Parameter(torch.zeros(())))
                self.register_buffer(f"{attribute}_calibrated", constants[name].float().reshape(()).clone(),
                                     persistent=False)
                self._scales[name] = attribute

    def _follow_input_scales(self) -> None:
        """Tie each int32 bias whose grid is (its layer's learnable input scale) x (its weight scale) to that scale."""
        producers = {output: plan for plan in self._nodes for output in plan.outputs}
        for plan in self._nodes:
            if plan.op_type not in _LAYER_OPS or len(plan.inputs) < 3 or plan.inputs[2] not in self._grid:
                continue
            bias, weight, source = plan.inputs[2], plan.inputs[1], producers.get(plan.inputs[0])
            if source is None or weight not in self._grid:
                continue
            scale_name = source.inputs[1] if source.op_type in ("FakeQuantize", "DequantizeLinear") and len(
                source.inputs) > 1 else None
            if scale_name not in self._scales:
                continue
            weight_scale = self._grid[weight][0]
            calibrated = getattr(self, f"{self._scales[scale_name]}_calibrated")
            if torch.allclose(calibrated * weight_scale, self._grid[bias][0].reshape(weight_scale.shape),
                              rtol=1e-6, atol=0):
                self._bias_scale[bias] = (scale_name, weight_scale)
            else:  # a bias on a grid of its own: int8 kernels would not follow a learned input scale, so it stays
                getattr(self, self._scales[scale_name]).requires_grad_(False)
                logger.warning("twin of %s: the bias of %s is not on input scale x weight scale; its input scale "
                               "stays as calibrated", Path(self.source).name, plan.name)

    def scale_parameters(self) -> list[nn.Parameter]:
        """The learnable activation scales' parameters (``learn_scales``); empty otherwise."""
        return [getattr(self, attribute) for attribute in self._scales.values()]

    def _on_grid(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A trainable weight's integers (float-valued, straight-through) and their dequantized value."""
        weight = getattr(self, self._constant_attr[name])
        scale, zero, axis, low, high = self._grid[name]
        if name in self._bias_scale:  # the bias grid follows its layer's learnable input scale
            input_scale, weight_scale = self._bias_scale[name]
            scale = self._value(input_scale, {}) * weight_scale.to(weight.device)
        scale = _broadcast_axis(scale.to(weight.device), weight, axis)
        zero = _broadcast_axis(zero.to(weight.device), weight, axis)
        integers = torch.clamp(_round_ste(weight / scale) + zero, low, high)
        return integers, (integers - zero) * scale

    def quantized_onnx(self, model: Any) -> Any:
        """A copy of ``model`` (the graph this twin was built from, with ``trainable=True``) whose integer weights and
        biases are this twin's trained ones, on the same grid, and whose float layers carry their trained weights:
        ONNX Runtime then computes what the twin does."""
        import onnx
        from onnx import numpy_helper

        if not self._weights:
            raise ValueError("quantized_onnx needs a twin built with trainable=True from a Q/DQ graph")
        out = onnx.ModelProto()
        out.CopyFrom(model)
        trained = {}
        with torch.no_grad():
            for name, plan in self._weights.items():
                if name in self._grid:
                    trained[plan.inputs[0]] = self._on_grid(name)[0].cpu().numpy()
                if name in self._bias_scale:  # its grid: the input's trained scale x the weight's
                    input_scale, weight_scale = self._bias_scale[name]
                    trained[plan.inputs[1]] = (self._value(input_scale, {}).cpu() * weight_scale).numpy()
            for name in self._float_weights:
                if name in self._constant_attr:
                    trained[name] = getattr(self, self._constant_attr[name]).cpu().numpy()
            for name in self._scales:
                trained[name] = self._value(name, {}).cpu().numpy()
        for initializer in out.graph.initializer:
            if initializer.name in trained:
                array = numpy_helper.to_array(initializer)
                value = trained[initializer.name].astype(array.dtype).reshape(array.shape)
                initializer.CopyFrom(numpy_helper.from_array(value, initializer.name))
        return out

    def extra_repr(self) -> str:
        return f"{Path(self.source).name}: {len(self._nodes)} nodes, ops {', '.join(self.op_types)}"


@dataclass
class _Node:
    op_type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    opset: int
    half_output: bool = False


def _cannot(source: str, op: str, node: str, detail: str = "") -> TwinUnavailableError:
    return TwinUnavailableError(f"the twin of {Path(source).name} cannot emulate op {op} (node {node}"
                                f"{': ' + detail if detail else ''})")


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """Float initializers become float32 (float16 values are exact in float32); integer ones int64 for shapes and
    float32 for quantized data (int8 / uint8 / int32 values are exact in float32 up to 2^24)."""
    if array.dtype in (np.int64, np.bool_):
        return torch.from_numpy(np.array(array, copy=True))
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))  # float16 / float32 / int8 / uint8 / int32


def _round_half(x: torch.Tensor) -> torch.Tensor:
    """Round to float16 in value (kept float32), straight-through for the gradient."""
    return x + (x.half().float() - x).detach()


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even (torch.round, as ONNX QuantizeLinear), straight-through for the gradient."""
    return x + (torch.round(x) - x).detach()


def _fuse_quantize_dequantize(
    nodes: list[_Node], constants: dict[str, torch.Tensor], quant_type: dict[str, int], graph_output: str
) -> list[_Node]:
    """Replace each QuantizeLinear whose only consumer is a DequantizeLinear with the same scale and zero point by
    one ``FakeQuantize`` node computing ``DQ(Q(x))``."""
    consumers: dict[str, list[_Node]] = {}
    for plan in nodes:
        for name in plan.inputs:
            consumers.setdefault(name, []).append(plan)
    fused: list[_Node] = []
    removed: set[int] = set()
    for plan in nodes:
        if id(plan) in removed:
            continue
        users = consumers.get(plan.outputs[0], []) if plan.op_type == "QuantizeLinear" else []
        if len(users) == 1 and users[0].op_type == "DequantizeLinear" and plan.outputs[0] != graph_output:
            dequantize = users[0]
            parameters = _fake_quant_parameters(plan, dequantize, constants, quant_type)
            if parameters is not None:
                fused.append(_Node("FakeQuantize", f"{plan.name}+{dequantize.name}", [plan.inputs[0]],
                                   list(dequantize.outputs), parameters, plan.opset, dequantize.half_output))
                removed.add(id(dequantize))
                continue
        fused.append(plan)
    return fused


def _fake_quant_parameters(
    quantize: _Node, dequantize: _Node, constants: dict[str, torch.Tensor], quant_type: dict[str, int]
) -> dict[str, Any] | None:
    """Scale, zero point, axis and integer range of a Q -> DQ pair, or None when the two do not match (or the
    parameters are not constants)."""
    names = [quantize.inputs[1:3], dequantize.inputs[1:3]]
    if any(len(pair) < 2 or any(name not in constants for name in pair) for pair in names):
        return None
    (q_scale, q_zero), (dq_scale, dq_zero) = ([constants[name] for name in pair] for pair in names)
    same_axis = int(quantize.attrs.get("axis", 1)) == int(dequantize.attrs.get("axis", 1))
    if not (same_axis and torch.equal(q_scale, dq_scale) and torch.equal(q_zero.float(), dq_zero.float())):
        return None
    low, high = _QUANT_RANGES.get(quant_type.get(quantize.inputs[2], 2), (0, 255))
    if q_scale.numel() == 1:  # scale_name: the initializer both share, which learn_scales may make a parameter
        shared = quantize.inputs[1] if quantize.inputs[1] == dequantize.inputs[1] else None
        return {"scale": float(q_scale), "zero_point": int(q_zero), "range": (low, high), "axis": None,
                "scale_name": shared}
    return {"scale": q_scale.float().flatten(), "zero_point": q_zero.flatten().int(), "range": (low, high),
            "axis": int(quantize.attrs.get("axis", 1))}


# --------------------------------------------------------------------------------------------------- the op set


def _check_supported(plan: _Node, source: str, constants: dict[str, torch.Tensor]) -> None:
    """Refuse at build time what :func:`_run` would get wrong, naming the op."""
    if plan.op_type not in TWIN_OPS:
        raise _cannot(source, plan.op_type, plan.name)
    attrs = plan.attrs
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise _cannot(source, plan.op_type, plan.name, f"auto_pad {auto_pad}")
    if plan.op_type in ("Conv", "MaxPool", "AveragePool"):
        kernel = attrs.get("kernel_shape")
        weight = constants.get(plan.inputs[1]) if plan.op_type == "Conv" and len(plan.inputs) > 1 else None
        rank = len(kernel) if kernel else (weight.ndim - 2 if weight is not None else 2)
        if rank != 2:
            raise _cannot(source, plan.op_type, plan.name, f"{rank}-d kernels (only 2-d)")
    if plan.op_type == "MaxPool" and len(plan.outputs) > 1 and plan.outputs[1]:
        raise _cannot(source, plan.op_type, plan.name, "the Indices output")
    if plan.op_type in ("QuantizeLinear", "DequantizeLinear") and attrs.get("block_size", 0):
        raise _cannot(source, plan.op_type, plan.name, "blocked quantization")
    if plan.op_type == "BatchNormalization" and attrs.get("training_mode", 0):
        raise _cannot(source, plan.op_type, plan.name, "training mode")
    if plan.op_type == "Cast" and attrs.get("to") not in (_FLOAT, _FLOAT16, _DOUBLE, 7):
        raise _cannot(source, plan.op_type, plan.name, f"a cast to element type {attrs.get('to')}")


def _run(plan: _Node, inputs: list[torch.Tensor | None], quant_type: dict[str, int]) -> list[torch.Tensor]:
    return _OPS[plan.op_type](plan, inputs, quant_type)


def _pads_2d(pads: list[int] | None) -> tuple[int, int, int, int] | None:
    """ONNX pads [top, left, bottom, right] -> F.pad's (left, right, top, bottom); None when there is no padding."""
    if not pads or not any(pads):
        return None
    top, left, bottom, right = pads
    return left, right, top, bottom


def _conv(plan: _Node, inputs: list, _: dict) -> list[torch.Tensor]:
    x, weight, bias = inputs[0], inputs[1], inputs[2] if len(inputs) > 2 else None
    attrs = plan.attrs
    padding: Any = 0
    pads = _pads_2d(attrs.get("pads"))
    if pads is not None:
        left, right, top, bottom = pads
        if left == right and top == bottom:
            padding = (top, left)
        else:
            x = F.pad(x, pads)
    return [F.conv2d(x, weight, bias, stride=tuple(attrs.get("strides", (1, 1))), padding=padding,
                     dilation=tuple(attrs.get("dilations", (1, 1))), groups=int(attrs.get("group", 1)))]


def _pool(plan: _Node, inputs: list, _: dict) -> list[torch.Tensor]:
    x = inputs[0]
    attrs = plan.attrs
    kernel = tuple(attrs["kernel_shape"])
    stride = tuple(attrs.get("strides", (1, 1)))
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    pads = _pads_2d(attrs.get("pads"))
    if plan.op_type == "MaxPool":
        padding: Any = 0
        if pads is not None:
            left, right, top, bottom = pads
            if left == right and top == bottom and 2 * top <= kernel[0] and 2 * left <= kernel[1]:
                padding = (top, left)
            else:
                x = F.pad(x, pads, value=float("-inf"))
        return [F.max_pool2d(x, kernel, stride, padding, tuple(attrs.get("dilations", (1, 1))), ceil_mode)]
    count_include_pad = bool(attrs.get("count_include_pad", 0))
    if pads is None:
        return [F.avg_pool2d(x, kernel, stride, 0, ceil_mode, count_include_pad)]
    left, right, top, bottom = pads
    if left == right and top == bottom:
        return [F.avg_pool2d(x, kernel, stride, (top, left), ceil_mode, count_include_pad)]
    padded = F.pad(x, pads)
    if count_include_pad:
        return [F.avg_pool2d(padded, kernel, stride, 0, ceil_mode)]
    ones = F.pad(torch.ones_like(x[:1, :1]), pads)
    return [F.avg_pool2d(padded, kernel, stride, 0, ceil_mode) / F.avg_pool2d(ones, kernel, stride, 0, ceil_mode)]


def _gemm(plan: _Node, inputs: list, _: dict) -> list[torch.Tensor]:
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    attrs = plan.attrs
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    out = float(attrs.get("alpha", 1.0)) * (a @ b)
    if c is not None:
        out = out + float(attrs.get("beta", 1.0)) * c
    return [out]


def _broadcast_axis(parameter: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-axis parameter (C,) shaped to broadcast along ``axis`` of ``x``; scalars as they are."""
    if parameter.ndim == 0 or parameter.numel() == 1:
        return parameter.reshape(())
    axis = axis % x.ndim
    shape = [1] * x.ndim
    shape[axis] = parameter.numel()
    return parameter.reshape(shape)


def _quantize(plan: _Node, inputs: list, quant_type: dict) -> list[torch.Tensor]:
    x, scale = inputs[0], inputs[1]
    zero_point = inputs[2] if len(inputs) > 2 else None
    axis = int(plan.attrs.get("axis", 1))
    element_type = quant_type.get(plan.inputs[2]) if zero_point is not None else plan.attrs.get("output_dtype", 2)
    low, high = _QUANT_RANGES.get(element_type or 2, (0, 255))
    scale = _broadcast_axis(scale, x, axis)
    zero = _broadcast_axis(zero_point, x, axis) if zero_point is not None else 0.0
    return [torch.clamp(_round_ste(x / scale) + zero, low, high)]


def _dequantize(plan: _Node, inputs: list, _: dict) -> list[torch.Tensor]:
    x, scale = inputs[0], inputs[1]
    zero_point = inputs[2] if len(inputs) > 2 else None
    axis = int(plan.attrs.get("axis", 1))
    scale = _broadcast_axis(scale, x, axis)
    if zero_point is None:
        return [x * scale]
    return [(x - _broadcast_axis(zero_point, x, axis)) * scale]


def _fake_quantize(plan: _Node, inputs: list, _: dict) -> list[torch.Tensor]:
    """``DequantizeLinear(QuantizeLinear(x))`` in one kernel: ``(clamp(round(x * (1 / scale)) + zp) - zp) * scale``,
    rounding half to even (``nearbyint``), gradient passed where the value is not clipped (torch's fake-quantize).

    It multiplies by ``1 / scale`` where the ONNX op divides by ``scale``: the two differ by at most one float32 ulp,
    which changes a rounding only when ``x / scale`` lies within ~1e-7 of a half-integer; ONNX Runtime's fused int8
    kernels requantize with a float multiplier too. The agreement check measures the result on every use.
    """
    x = inputs[0]
    attrs = plan.attrs
    low, high = attrs["range"]
    if len(inputs) > 1:  # a learnable scale (OnnxTwin's learn_scales): LSQ's gradient for it
        zero_point = torch.full((1,), float(attrs["zero_point"]), device=x.device)
        return [torch._fake_quantize_learnable_per_tensor_affine(x, inputs[1].reshape(1), zero_point, low, high, 1.0)]
    if attrs["axis"] is None:
        return [torch.fake_quantize_per_tensor_affine(x, attrs["scale"], attrs["zero_point"], low, high)]
    scale, zero_point = attrs["scale"].to(x.device), attrs["zero_point"].to(x.device)
    return [torch.fake_quantize_per_channel_affine(x, scale, zero_point, attrs["axis"] % x.ndim, low, high)]


def _clip_to_range(plan: _Node, inputs: list, _: dict) -> list[torch.Tensor]:
    """A FakeQuantize without its rounding: ``x`` clipped to the range the quantized tensor can represent."""
    x, attrs = inputs[0], plan.attrs
    low, high = attrs["range"]
    scale = torch.as_tensor(attrs["scale"], dtype=x.dtype, device=x.device)
    zero_point = torch.as_tensor(attrs["zero_point"], device=x.device).to(x.dtype)
    if attrs["axis"] is not None:
        scale, zero_point = (_broadcast_axis(value, x, attrs["axis"]) for value in (scale, zero_point))
    return [torch.minimum(torch.maximum(x, (low - zero_point) * scale), (high - zero_point) * scale)]


def _batch_norm(plan: _Node, inputs: list, _: dict) -> list[torch.Tensor]:
    x, scale, bias, mean, var = inputs[:5]
    return [F.batch_norm(x, mean, var, scale, bias, training=False, eps=float(plan.attrs.get("epsilon", 1e-5)))]


def _clip(plan: _Node, inputs: list, _: dict) -> list[torch.Tensor]:
    if plan.opset < 11:
        low, high = plan.attrs.get("min"), plan.attrs.get("max")
    else:
        low = float(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else None
        high = float(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else None
    return [torch.clamp(inputs[0], low, high)]


def _reduce_mean(plan: _Node, inputs: list, _: dict) -> list[torch.Tensor]:
    x = inputs[0]
    if plan.opset >= 18:
        axes = inputs[1].tolist() if len(inputs) > 1 and inputs[1] is not None else None
    else:
        axes = plan.attrs.get("axes")
    keepdims = bool(plan.attrs.get("keepdims", 1))
    if not axes:
        if plan.attrs.get("noop_with_empty_axes", 0):
            return [x]
        axes = list(range(x.ndim))
    return [x.mean(dim=tuple(int(a) for a in axes), keepdim=keepdims)]


def _reshape(plan: _Node, inputs: list, _: dict) -> list[torch.Tensor]:
    x, shape = inputs[0], [int(d) for d in inputs[1].tolist()]
    if not plan.attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


def _flatten(plan: _Node, inputs: list, _: dict) -> list[torch.Tensor]:
    x = inputs[0]
    axis = int(plan.attrs.get("axis", 1)) % (x.ndim + 1) if x.ndim else 0
    leading = int(np.prod(x.shape[:axis])) if axis else 1
    return [x.reshape(leading, -1)]


def _cast(plan: _Node, inputs: list, _: dict) -> list[torch.Tensor]:
    x = inputs[0]
    if plan.attrs.get("to") == 7:  # int64: shape arithmetic
        return [x.long()]
    return [x.float()]  # float16 targets are rounded by the caller (the output is a float16 value)


def _constant(plan: _Node, inputs: list, _: dict) -> list[torch.Tensor]:
    from onnx import numpy_helper

    if "value" not in plan.attrs:
        raise TwinUnavailableError(f"Constant node {plan.name}: only the 'value' form is emulated")
    return [_to_tensor(numpy_helper.to_array(plan.attrs["value"]))]


def _elementwise(function: Callable[..., torch.Tensor]) -> Callable[[_Node, list, dict], list[torch.Tensor]]:
    return lambda plan, inputs, _: [function(*inputs)]


_LAYER_OPS = ("Conv", "Gemm", "MatMul")  # ops whose second and third inputs are weights and biases
_OPS: dict[str, Callable[[_Node, list, dict], list[torch.Tensor]]] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _elementwise(torch.matmul),
    "Add": _elementwise(torch.add),
    "Sub": _elementwise(torch.sub),
    "Mul": _elementwise(torch.mul),
    "Div": _elementwise(torch.div),
    "Relu": _elementwise(F.relu),
    "Sigmoid": _elementwise(torch.sigmoid),
    "HardSigmoid": lambda plan, inputs, _: [
        (float(plan.attrs.get("alpha", 0.2)) * inputs[0] + float(plan.attrs.get("beta", 0.5))).clamp(0.0, 1.0)],
    "HardSwish": _elementwise(F.hardswish),  # MobileNetV3 and its squeeze-excite (with HardSigmoid)
    "Clip": _clip,
    "BatchNormalization": _batch_norm,
    "GlobalAveragePool": _elementwise(lambda x: x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)),
    "ReduceMean": _reduce_mean,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    "FakeQuantize": _fake_quantize,  # internal: a fused QuantizeLinear -> DequantizeLinear pair, never read from a file
    "ClipToRange": _clip_to_range,  # internal: a FakeQuantize without rounding (round_activations=False)
    "Cast": _cast,
    "Identity": _elementwise(lambda x: x),
    "Dropout": lambda plan, inputs, _: [inputs[0]],  # inference: the identity
    "Constant": _constant,
}
TWIN_OPS: tuple[str, ...] = tuple(sorted(set(_OPS) - {"FakeQuantize", "ClipToRange"}))  # the ONNX ops a twin emulates
