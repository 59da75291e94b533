"""Differentiable twins: a torch module per exported artifact that computes what ONNX Runtime computes, with gradients.

Real exports of a tiny model (``tiny_exports``: fp32, fp16, int8 for --target cpu and trt, made with ``export()``),
real ONNX Runtime sessions, and hand-built Q/DQ graphs for the rounding and saturation rules.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from rslad_edge.device import cpu_saturates_u8s8
from rslad_edge.io import sha256_file
from rslad_edge.models import load_checkpoint
from rslad_edge.runtime import (
    MIN_TWIN_AGREEMENT,
    OnnxRunner,
    OnnxTwin,
    TwinUnavailableError,
    load_runner,
    onnx_twin,
    twin_agreement,
)
from rslad_edge.runtime.tensorrt_runner import TensorRTRunner

N = 64


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    from rslad_edge.data import load_dataset, subset, to_float

    test = subset(load_dataset("shapes", None, "test", seed=0), N, seed=3)
    return to_float(test.images), test.labels


def _ort_logits(path, x: torch.Tensor) -> torch.Tensor:
    """ONNX Runtime's logits; for TensorRT's S8S8 graph on an x86 CPU without VNNI, whose fused S8S8 kernels saturate
    where TensorRT does not, its Q/DQ semantics (graph optimizations off), as export checks it there."""
    if cpu_saturates_u8s8() and _signed_activations(path):
        return torch.from_numpy(OnnxRunner(path, threads=1, reference=True).predict(x.numpy()))
    return torch.from_numpy(load_runner(path, "cpu", threads=1).predict(x.numpy()))


def _signed_activations(path) -> bool:
    graph = onnx.load(str(path)).graph
    zero_points = {init.name: init.data_type for init in graph.initializer}
    return any(zero_points.get(node.input[2]) == onnx.TensorProto.INT8 for node in graph.node
               if node.op_type == "QuantizeLinear" and len(node.input) > 2)


# Largest |logit difference| twin vs ONNX Runtime. fp32: summation order only. fp16: the runtime's own float16
# kernels round inside a convolution too. int8: a value within float32 rounding of a half step can land on the other
# side (ORT requantizes a convolution's int32 sum with one float multiplier): one step of one activation.
TOLERANCE = {"fp32": 1e-4, "fp16": 0.05, "int8": 0.1, "int8-trt": 0.1}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int8-trt"])
def test_twin_computes_what_onnx_runtime_computes_for_every_export(tiny_exports, images, precision):
    x, _ = images
    path = tiny_exports[precision]
    agreement = twin_agreement(onnx_twin(path), _ort_logits(path, x), x)
    assert agreement.n == N and agreement.agreement == 1.0 and agreement.trusted
    assert agreement.max_abs_logit_diff <= TOLERANCE[precision], agreement


def test_fp32_twin_has_the_checkpoints_input_gradient(tiny_exports, images):
    x, y = images
    model, _ = load_checkpoint(tiny_exports["pt"])
    twin = onnx_twin(tiny_exports["fp32"])

    def input_gradient(function) -> torch.Tensor:
        inputs = x[:16].clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(function(inputs), y[:16], reduction="sum")
        return torch.autograd.grad(loss, [inputs])[0]

    expected = input_gradient(model.eval())
    assert torch.allclose(input_gradient(twin), expected, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("precision", ["int8", "int8-trt"])
def test_int8_twin_gradients_flow_through_the_rounding(tiny_exports, images, precision):
    x, y = images
    twin = onnx_twin(tiny_exports[precision])
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(twin.op_types) or "FakeQuantize" in twin.op_types
    inputs = x[:16].clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(twin(inputs), y[:16], reduction="sum")
    (gradient,) = torch.autograd.grad(loss, [inputs])
    assert (gradient.flatten(1).abs().sum(dim=1) > 0).all()  # no image is left without a direction


def _qdq_model(scale: np.ndarray, zero_point: np.ndarray, axis: int = 1) -> onnx.ModelProto:
    """input (N, 3, 2, 2) -> QuantizeLinear -> DequantizeLinear -> output, with the given scale and zero point."""
    initializers = [numpy_helper.from_array(scale.astype(np.float32), "scale"),
                    numpy_helper.from_array(zero_point, "zero_point")]
    nodes = [helper.make_node("QuantizeLinear", ["input", "scale", "zero_point"], ["q"], axis=axis),
             helper.make_node("DequantizeLinear", ["q", "scale", "zero_point"], ["output"], axis=axis)]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 2, 2])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", 3, 2, 2])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(
    ("scale", "zero_point"),
    [(np.array(0.5), np.array(10, np.uint8)),  # uint8 asymmetric, per tensor: the --target cpu activations
     (np.array(0.25), np.array(0, np.int8)),  # int8 symmetric, per tensor: the --target trt activations
     (np.array([0.5, 0.25, 1.0]), np.array([0, -3, 5], np.int8))],  # per channel (axis 1)
)
@pytest.mark.parametrize("fuse", [True, False])
def test_quantize_rounds_half_to_even_and_saturates_as_onnx_runtime_does(scale, zero_point, fuse):
    import onnxruntime as ort

    model = _qdq_model(scale, zero_point)
    steps = np.arange(-300, 300, dtype=np.float32) / 2  # every half step: exact ties, and far past both ends
    channel_scale = np.broadcast_to(scale, (3,)).astype(np.float32).reshape(1, 3, 1, 1)
    x = (np.resize(steps, (150, 3, 2, 2)) * channel_scale).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x})[0]
    twin = OnnxTwin(model, fuse_fake_quant=fuse)
    assert np.array_equal(twin(torch.from_numpy(x)).detach().numpy(), expected)


def test_quantize_passes_the_gradient_straight_through_inside_the_range_and_not_where_it_saturates():
    twin = OnnxTwin(_qdq_model(np.array(0.5), np.array(10, np.uint8)))  # represents [-5, 122.5]
    x = torch.tensor([-20.0, -1.3, 0.2, 60.1, 200.0]).reshape(1, 1, 1, 5).expand(1, 3, 2, 5).contiguous()
    x.requires_grad_(True)
    (gradient,) = torch.autograd.grad(twin(x).sum(), [x])
    assert gradient[0, 0, 0].tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_a_twin_with_wrong_scales_is_caught_by_the_agreement_check(tiny_exports, images):
    x, _ = images
    path = tiny_exports["int8"]
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for initializer in model.graph.initializer:
        if initializer.name.endswith("weight_scale"):  # the per-channel weight scales, as if read wrongly
            scale = numpy_helper.to_array(initializer)
            initializer.CopyFrom(numpy_helper.from_array(scale * rng.uniform(0.3, 3.0, scale.shape).astype(np.float32),
                                                         initializer.name))
    agreement = twin_agreement(OnnxTwin(model, source=str(path)), _ort_logits(path, x), x)
    assert agreement.agreement < MIN_TWIN_AGREEMENT and not agreement.trusted
    assert agreement.to_json()["trusted"] is False


def test_an_op_the_twin_cannot_emulate_is_named(tmp_path):
    from bench_support import tiny_onnx

    model = onnx.load(str(tiny_onnx(tmp_path / "tiny.onnx")))
    model.graph.node[1].op_type = "LeakyRelu"  # the activation after the convolution
    model.graph.node[1].name = "act"
    with pytest.raises(TwinUnavailableError, match="cannot emulate op LeakyRelu \\(node act\\)"):
        OnnxTwin(model, source="tiny.onnx")


def test_an_engine_twin_is_the_twin_of_the_onnx_it_was_built_from(tiny_exports, tmp_path):
    onnx_path = tiny_exports["int8"]
    engine = TensorRTRunner.__new__(TensorRTRunner)  # no GPU here: only what twin() reads
    engine.path = str(onnx_path.with_name("student.int8.engine"))
    engine.metadata = {"onnx": onnx_path.name, "onnx_sha256": sha256_file(onnx_path)}
    assert engine.twin().conv_kernel_shapes == onnx_twin(onnx_path).conv_kernel_shapes
    engine.metadata["onnx_sha256"] = "0" * 64
    with pytest.raises(TwinUnavailableError, match="changed since"):
        engine.twin()
    engine.path = str(tmp_path / "elsewhere.engine")
    with pytest.raises(TwinUnavailableError, match="is not beside it"):
        engine.twin()


@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=pytest.mark.slow), "int8"])
def test_twin_emulates_mobilenetv3s_hard_swish_and_squeeze_excite(tmp_path, images, precision):
    """torchvision's MobileNetV3 exports HardSwish, and HardSigmoid in its squeeze-excite blocks."""
    from rslad_edge.export import ExportConfig, export
    from rslad_edge.models import create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model("torchvision:mobilenet_v3_small", 10, {"width_mult": 0.25}).eval()
    checkpoint = save_checkpoint(tmp_path / "mnv3.pt", model, "torchvision:mobilenet_v3_small", num_classes=10,
                                 input_size=(32, 32), arch_kwargs={"width_mult": 0.25}, meta={"dataset": "shapes"})
    path = export(ExportConfig(checkpoint=checkpoint, precision=precision, out=tmp_path, calib_n=32, parity_n=32,
                               min_agreement=0.0)).artifacts()[0].path
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ops & {"HardSwish", "HardSigmoid"}  # int8 preprocessing may rewrite HardSwish as x * HardSigmoid(x)
    x, _ = images
    agreement = twin_agreement(onnx_twin(path), _ort_logits(path, x), x)
    assert agreement.max_abs_logit_diff <= TOLERANCE[precision], agreement


@pytest.mark.parametrize("precision", ["int8", "int8-trt"])
def test_a_trainable_twin_trains_the_graphs_integers_and_onnx_runtime_runs_what_it_learned(
        tiny_exports, images, precision, tmp_path):
    """Quantization-aware training on the exported graph itself: the weights are parameters on the graph's own grid,
    a few steps change the integers, and the written-back graph in ONNX Runtime computes what the trained twin does."""
    x, y = images
    path = tiny_exports[precision]
    model = onnx.load(str(path))
    fixed, twin = OnnxTwin(model), OnnxTwin(model, trainable=True)
    weights = [p for p in twin.parameters()]
    assert weights and all(p.requires_grad for p in weights) and not list(fixed.parameters())
    with torch.no_grad():
        assert torch.equal(twin(x), fixed(x))  # at the start: the exported graph exactly
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.01)
    before = [p.detach().clone() for p in weights]
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(twin(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, weights, strict=True))
    trained = tmp_path / "trained.onnx"
    onnx.save(twin.quantized_onnx(model), str(trained))
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    written = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(trained)).graph.initializer}
    changed = [name for name in written if not np.array_equal(written[name], original[name])]
    assert changed and all(written[name].dtype == original[name].dtype for name in changed)
    integer = [name for name in changed if written[name].dtype in (np.int8, np.uint8, np.int32)]
    layer_inputs = {name for node in model.graph.node if node.op_type in ("Conv", "Gemm", "MatMul")
                    for name in node.input[1:3]}
    assert integer  # the quantized layers' integers move, and besides them only float layers' weights (the
    assert set(changed) - set(integer) <= layer_inputs  # classifier stays float): never a scale or zero point
    with torch.no_grad():
        agreement = twin_agreement(OnnxTwin(onnx.load(str(trained))), _ort_logits(trained, x), x)
        assert agreement.agreement == 1.0
        ort = _ort_logits(trained, x)
        assert (twin(x) - ort).abs().max() <= TOLERANCE[precision]


@pytest.mark.parametrize("precision", ["int8", "int8-trt"])
def test_a_twin_without_activation_rounding_separates_the_activations_error_from_the_weights(
        tiny_exports, images, precision):
    """round_activations=False keeps the int8 weights and each activation's clipping but not its rounding: its logits
    differ from the int8 graph's, are closer to the float model's, and not equal to them (the weights are int8)."""
    x, _ = images
    model = onnx.load(str(tiny_exports[precision]))
    with torch.no_grad():
        quantized, unrounded = OnnxTwin(model)(x), OnnxTwin(model, round_activations=False)(x)
        exact = OnnxTwin(onnx.load(str(tiny_exports["fp32"])))(x)
    assert not torch.equal(unrounded, quantized)
    assert (unrounded - exact).abs().mean() < (quantized - exact).abs().mean()
    assert (unrounded - exact).abs().max() > 1e-5  # the weights are still int8


@pytest.mark.parametrize("precision", ["int8", "int8-trt"])
def test_a_twin_that_learns_activation_scales_keeps_each_bias_on_its_layers_grid_and_onnx_runtime_follows(
        tiny_exports, images, precision, tmp_path):
    """learn_scales (LSQ): the twin starts as the graph exactly; a few steps move the activation scales; written
    back, every int32 bias's scale is its layer's input scale x weight scale (float32), and ONNX Runtime computes
    what the trained twin does."""
    x, y = images
    model = onnx.load(str(tiny_exports[precision]))
    with pytest.raises(ValueError, match="trainable"):
        OnnxTwin(model, learn_scales=True)
    twin = OnnxTwin(model, trainable=True, learn_scales=True)
    scales = twin.scale_parameters()
    assert scales and all(float(p.detach()) == 0.0 for p in scales)
    with torch.no_grad():
        assert torch.equal(twin(x), OnnxTwin(model)(x))
    optimizer = torch.optim.Adam(scales, lr=0.05)
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(twin(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert any(float(p.detach()) != 0.0 for p in scales)
    trained = onnx.load_from_string(twin.quantized_onnx(model).SerializeToString())
    written = {i.name: numpy_helper.to_array(i) for i in trained.graph.initializer}
    original = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    moved = {node.input[1] for node in model.graph.node if node.op_type == "QuantizeLinear"
             and not np.array_equal(written[node.input[1]], original[node.input[1]])}
    assert moved
    producers = {output: node for node in trained.graph.node for output in node.output}
    checked = 0
    for layer in trained.graph.node:
        if layer.op_type == "Conv" and len(layer.input) > 2 and layer.input[2] in producers:
            x_scale, w_scale, b_scale = (producers[name].input[1] for name in layer.input[:3])
            assert np.array_equal(written[b_scale], (written[x_scale] * written[w_scale]).astype(np.float32))
            checked += x_scale in moved
    assert checked  # some layer's input scale moved and its bias followed
    path = tmp_path / "trained.onnx"
    onnx.save(trained, str(path))
    with torch.no_grad():
        assert (twin(x) - _ort_logits(path, x)).abs().max() <= TOLERANCE[precision]


def test_a_bias_off_its_layers_grid_keeps_that_input_scale_as_calibrated(tiny_exports, caplog):
    """int8 kernels take a bias as input scale x weight scale: a bias whose own scale says otherwise cannot follow a
    learned input scale, so that scale does not learn (with a warning naming the layer)."""
    model = onnx.load(str(tiny_exports["int8"]))
    producers = {output: node for node in model.graph.node for output in node.output}
    layer = next(node for node in model.graph.node if node.op_type == "Conv" and len(node.input) > 2)
    bias_scale = producers[layer.input[2]].input[1]
    initializer = next(i for i in model.graph.initializer if i.name == bias_scale)
    initializer.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(initializer) * 2, bias_scale))
    with caplog.at_level("WARNING", logger="rslad_edge.runtime.twin"):
        twin = OnnxTwin(model, trainable=True, learn_scales=True)
    assert f"the bias of {layer.name} is not on input scale x weight scale" in caplog.text
    frozen = [p for p in twin.scale_parameters() if not p.requires_grad]
    assert len(frozen) == 1 and len(twin.scale_parameters()) > 1
