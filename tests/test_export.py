"""Export: fp32 / fp16 / int8 ONNX with parity against PyTorch, metadata, TensorRT plans and the CLI.

Real torch.onnx exports and ONNX Runtime sessions on a smallcnn and the synthetic ``shapes`` data (offline, fast).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch
from fitted_models import ridge_fitted_smallcnn
from onnx import numpy_helper
from typer.testing import CliRunner

from rslad_edge.cli import app
from rslad_edge.device import cpu_saturates_u8s8
from rslad_edge.errors import ConfigError, DatasetError, ExportError, ExportParityError
from rslad_edge.export import ExportConfig, compare_logits, export
from rslad_edge.export.onnx_export import torch_to_onnx
from rslad_edge.io import sha256_file
from rslad_edge.models import save_checkpoint
from rslad_edge.runtime import OnnxRunner, decode_props, load_runner

PARITY_N = 64  # shapes test images per parity check: enough to see a flip, small enough for two shared cores
CALIB_N = 128
INT8_AGREEMENT = 0.8  # for the random-feature test model below; the production default is 97%
cli = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A smallcnn that predicts every class, in 2 s without training: BatchNorm statistics measured on shapes images,
    then the classifier fitted by ridge regression on the random features (~22% accuracy on 10 classes).

    Its predictions spread over the classes with real margins, so an agreement figure means something; a random
    net predicts one class for nearly everything and agrees with anything. Random features separate the classes
    by small differences, so int8 flips more predictions here (93-95% agreement on 256 images) than on a trained
    model (98.4% on the shared ResNet-18 teacher): the int8 tests ask for "most", not the production default 97%.
    """
    model = ridge_fitted_smallcnn("smallcnn-wide")
    path = tmp_path_factory.mktemp("ckpt") / "student.pt"
    return save_checkpoint(path, model, "smallcnn-wide", num_classes=10, input_size=(32, 32),
                           meta={"dataset": "shapes", "method": "rslad", "eps": 8 / 255})


def config(checkpoint, out, **overrides) -> ExportConfig:
    return ExportConfig(**{"checkpoint": checkpoint, "out": out, "parity_n": PARITY_N, "calib_n": CALIB_N,
                           **overrides})


def _text(output: str) -> str:
    """CLI output with Rich's panel borders and line wrapping removed."""
    return " ".join(output.replace("│", " ").split())


@pytest.fixture(scope="module")
def fp32(checkpoint, tmp_path_factory):
    return export(config(checkpoint, tmp_path_factory.mktemp("fp32")))


@pytest.fixture(scope="module")
def int8_cpu(checkpoint, tmp_path_factory):
    return export(config(checkpoint, tmp_path_factory.mktemp("int8"), precision="int8", min_agreement=INT8_AGREEMENT))


@pytest.fixture(scope="module")
def int8_trt(checkpoint, tmp_path_factory):
    return export(config(checkpoint, tmp_path_factory.mktemp("int8trt"), precision="int8", target="trt",
                         min_agreement=INT8_AGREEMENT))


def _shapes_test_images(n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    from rslad_edge.data import load_dataset, subset, to_float

    test = subset(load_dataset("shapes", None, "test", seed=0), n, seed=1)
    return to_float(test.images).numpy(), test.labels.numpy()


def _quantize_nodes(path) -> tuple[onnx.ModelProto, list[np.ndarray], dict[str, onnx.TensorProto]]:
    model = onnx.load(path)
    initializers = {init.name: init for init in model.graph.initializer}
    zero_points = [numpy_helper.to_array(initializers[node.input[2]])
                   for node in model.graph.node if node.op_type == "QuantizeLinear"]
    return model, zero_points, initializers


# --- fp32 ----------------------------------------------------------------------------------------------------


def test_fp32_export_passes_parity_at_1e_4_and_runs_like_torch(fp32, checkpoint):
    assert fp32.onnx_path.name == "student.onnx" and fp32.onnx_path.is_file()
    assert fp32.parity.passed and fp32.parity.n == PARITY_N
    assert fp32.parity.max_abs_diff <= 1e-4 and fp32.parity.agreement == 1.0
    images, _ = _shapes_test_images()
    onnx_logits = load_runner(fp32.onnx_path).predict(images)
    torch_logits = load_runner(checkpoint).predict(images)
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)
    assert (onnx_logits.argmax(1) == torch_logits.argmax(1)).all()


def test_fp32_graph_has_named_io_and_a_dynamic_batch(fp32):
    model = onnx.load(fp32.onnx_path)
    onnx.checker.check_model(model, full_check=True)
    (graph_input,), (graph_output,) = model.graph.input, model.graph.output
    assert (graph_input.name, graph_output.name) == ("input", "logits")
    batch_dim = graph_input.type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic
    runner = load_runner(fp32.onnx_path)
    images, _ = _shapes_test_images(7)
    assert runner.predict(images[:1]).shape == (1, 10) and runner.predict(images).shape == (7, 10)


def test_metadata_round_trips_through_metadata_props_and_sidecar(fp32, checkpoint):
    props = decode_props({p.key: p.value for p in onnx.load(fp32.onnx_path).metadata_props})
    sidecar = json.loads(fp32.onnx_sidecar.read_text())
    assert fp32.onnx_sidecar.name == "student.onnx.json"
    assert props == sidecar  # the same description inside the file and beside it
    assert sidecar["arch"] == "smallcnn-wide" and sidecar["num_classes"] == 10 and len(sidecar["classes"]) == 10
    assert sidecar["input_size"] == [32, 32] and sidecar["input_range"] == [0.0, 1.0]
    assert sidecar["eps"] == pytest.approx(8 / 255) and sidecar["method"] == "rslad"
    assert sidecar["source_sha256"] == sha256_file(checkpoint)
    assert sidecar["precision"] == "fp32" and sidecar["opset"] == 18 and sidecar["batch"] == "dynamic"
    assert sidecar["parity"]["passed"] and sidecar["parity"]["n"] == PARITY_N
    assert sidecar["versions"]["onnxruntime"] and sidecar["versions"]["torch"]
    runner = load_runner(fp32.onnx_path)
    assert runner.metadata["source_sha256"] == sidecar["source_sha256"] and runner.precision == "fp32"


def test_static_batch_export_fixes_the_batch(checkpoint, tmp_path):
    result = export(config(checkpoint, tmp_path, batch=4))
    dim = onnx.load(result.onnx_path).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 4
    runner = load_runner(result.onnx_path)
    images, _ = _shapes_test_images(7)
    np.testing.assert_allclose(runner.predict(images), load_runner(checkpoint).predict(images), atol=1e-4)


# --- fp16 / int8 ---------------------------------------------------------------------------------------------


def test_fp16_export_keeps_float32_io_and_agrees(checkpoint, tmp_path):
    result = export(config(checkpoint, tmp_path, precision="fp16"))
    assert result.onnx_path.name == "student.fp16.onnx"
    model = onnx.load(result.onnx_path)
    float32 = onnx.TensorProto.FLOAT
    assert model.graph.input[0].type.tensor_type.elem_type == float32
    assert model.graph.output[0].type.tensor_type.elem_type == float32
    weights = [init for init in model.graph.initializer if init.dims and len(init.dims) == 4]  # conv kernels
    assert weights and all(init.data_type == onnx.TensorProto.FLOAT16 for init in weights)
    assert result.parity.passed and result.parity.agreement >= 0.99
    runner = load_runner(result.onnx_path)
    assert runner.precision == "fp16"
    assert runner.predict(_shapes_test_images(3)[0]).dtype == np.float32


def test_int8_cpu_export_is_qdq_with_uint8_activations_and_int8_weights(int8_cpu):
    assert int8_cpu.onnx_path.name == "student.int8.onnx"
    model, zero_points, initializers = _quantize_nodes(int8_cpu.onnx_path)
    assert zero_points and all(z.dtype == np.uint8 for z in zero_points)  # U8S8: asymmetric uint8 activations
    conv_weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                    and initializers.get(n.input[0]) is not None and len(initializers[n.input[0]].dims) == 4]
    assert conv_weights
    for node in conv_weights:  # int8 weights, one scale per output channel
        assert initializers[node.input[0]].data_type == onnx.TensorProto.INT8
        assert numpy_helper.to_array(initializers[node.input[1]]).size == initializers[node.input[0]].dims[0]
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}  # no ORT-only domains left declared
    assert int8_cpu.metadata["quantization"]["activations"] == "uint8 asymmetric"


def _weight_codes(path) -> np.ndarray:
    """Every int8 weight code of the convolutions of an int8 graph."""
    model = onnx.load(path)
    initializers = {init.name: init for init in model.graph.initializer}
    return np.concatenate([numpy_helper.to_array(initializers[n.input[0]]).ravel() for n in model.graph.node
                           if n.op_type == "DequantizeLinear" and n.input[0] in initializers
                           and len(initializers[n.input[0]].dims) == 4])


def test_cpu_saturates_u8s8_reads_the_cpus_int8_dot_product_flags():
    avx2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma avx512f\n"
    assert cpu_saturates_u8s8(avx2, "x86_64")  # AVX2 / AVX-512 without VNNI: vpmaddubsw, 16-bit saturation
    for flag in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert not cpu_saturates_u8s8(avx2.replace("fma", f"fma {flag}"), "x86_64"), flag
    assert not cpu_saturates_u8s8("processor\t: 0\nFeatures\t: fp asimd asimddp\n", "aarch64")


@pytest.mark.skipif(not cpu_saturates_u8s8(), reason="needs an x86 CPU without VNNI (whose U8S8 kernels saturate)")
def test_on_this_cpu_8bit_weights_saturate_onnx_runtimes_fused_kernels_and_the_default_7bit_ones_do_not(
        checkpoint, tmp_path):
    """Real ONNX Runtime on a CPU without VNNI: the int8 graph with 8-bit weights computes something else through
    its fused kernels than its own Q/DQ semantics; the default export here has 7-bit weights, which fit."""
    from rslad_edge.runtime import OnnxRunner

    eight = export(config(checkpoint, tmp_path / "8", precision="int8", reduce_range=False, min_agreement=0))
    seven = export(config(checkpoint, tmp_path / "7", precision="int8", min_agreement=INT8_AGREEMENT))
    assert int(np.abs(_weight_codes(seven.onnx_path)).max()) <= 64 < int(np.abs(_weight_codes(eight.onnx_path)).max())
    images, _ = _shapes_test_images(256)

    def fused_vs_reference(path) -> tuple[float, float]:
        fused = OnnxRunner(path, reference=False).predict(images)
        exact = OnnxRunner(path, reference=True).predict(images)
        return float(np.abs(fused - exact).max()), float((fused.argmax(1) == exact.argmax(1)).mean())

    (eight_diff, _), (seven_diff, seven_agreement) = fused_vs_reference(eight.onnx_path), fused_vs_reference(
        seven.onnx_path)
    assert eight_diff > 10 * seven_diff, (eight_diff, seven_diff)
    assert seven_agreement >= 0.97


def test_int8_cpu_export_takes_7bit_weights_where_the_cpu_saturates_and_records_why(checkpoint, tmp_path,
                                                                                   monkeypatch):
    import rslad_edge.device

    monkeypatch.setattr(rslad_edge.device, "cpu_saturates_u8s8", lambda *args, **kwargs: True)
    auto = export(config(checkpoint, tmp_path / "auto", precision="int8", min_agreement=0))
    quantization = auto.metadata["quantization"]
    assert quantization["weights"].startswith("int7") and "without VNNI" in quantization["reduce_range"]
    assert int(np.abs(_weight_codes(auto.onnx_path)).max()) <= 64
    off = export(config(checkpoint, tmp_path / "off", precision="int8", reduce_range=False, min_agreement=0))
    assert off.metadata["quantization"]["weights"].startswith("int8") and "reduce_range" not in off.metadata[
        "quantization"]
    monkeypatch.setattr(rslad_edge.device, "cpu_saturates_u8s8", lambda *args, **kwargs: False)
    on = export(config(checkpoint, tmp_path / "on", precision="int8", reduce_range=True, min_agreement=0))
    assert on.metadata["quantization"]["weights"].startswith("int7") and "reduce_range" not in on.metadata[
        "quantization"]
    assert not config(checkpoint, tmp_path / "x", precision="int8").seven_bit_weights  # a VNNI or ARM CPU: 8-bit


def test_an_int8_graph_for_tensorrt_is_checked_on_its_qdq_semantics_where_the_cpu_saturates(checkpoint, tmp_path,
                                                                                           monkeypatch):
    """ONNX Runtime's CPU stands in for TensorRT in the parity check; on an x86 CPU without VNNI its fused S8S8
    kernels saturate where TensorRT does not, so the graph is run with optimizations off (the reference)."""
    import rslad_edge.device
    from rslad_edge.runtime import onnx_runner

    monkeypatch.setattr(rslad_edge.device, "cpu_saturates_u8s8", lambda *args, **kwargs: True)
    created = []
    real = onnx_runner.OnnxRunner.__init__

    def recording(self, path, **kwargs):
        created.append(kwargs.get("reference", False))
        real(self, path, **kwargs)

    monkeypatch.setattr(onnx_runner.OnnxRunner, "__init__", recording)
    result = export(config(checkpoint, tmp_path / "trt", precision="int8", target="trt",
                           min_agreement=INT8_AGREEMENT))
    assert created and all(created)
    assert "optimizations off" in result.metadata["quantization"]["checked_on"]
    assert result.metadata["quantization"]["weights"].startswith("int8")  # TensorRT's weights keep their 8 bits


@pytest.mark.parametrize("args", [["--precision", "int8", "--target", "trt"], ["--precision", "fp32"]])
def test_reduce_range_outside_int8_for_the_cpu_is_one_line(checkpoint, args):
    result = cli.invoke(app, ["export", str(checkpoint), *args, "--reduce-range"])
    assert result.exit_code == 2, result.output
    assert "--reduce-range applies to int8 ONNX for --target cpu" in _text(result.output)


def test_int8_trt_export_is_symmetric_int8_with_zero_point_0(int8_trt):
    assert int8_trt.onnx_path.name == "student.int8-trt.onnx"
    _, zero_points, _ = _quantize_nodes(int8_trt.onnx_path)
    assert zero_points and all(z.dtype == np.int8 for z in zero_points)
    assert all(int(np.abs(z).max()) == 0 for z in zero_points)  # what TensorRT's explicit quantization needs
    assert int8_trt.metadata["target"] == "trt"


@pytest.mark.parametrize("saturates", [True, False])
def test_a_tensorrt_graph_runs_on_its_qdq_semantics_on_a_cpu_whose_fused_kernels_saturate(
        int8_cpu, int8_trt, monkeypatch, saturates):
    import rslad_edge.device

    monkeypatch.setattr(rslad_edge.device, "cpu_saturates_u8s8", lambda *args, **kwargs: saturates)
    assert load_runner(int8_trt.onnx_path).reference is saturates  # verify and bench open it so
    assert load_runner(int8_cpu.onnx_path).reference is False  # ONNX Runtime's CPU is that graph's own target
    assert OnnxRunner(int8_trt.onnx_path, reference=False).reference is False  # asked for: the fused kernels
    if saturates:  # the same session options, the same numbers
        images, _ = _shapes_test_images(32)
        np.testing.assert_array_equal(load_runner(int8_trt.onnx_path).predict(images),
                                      OnnxRunner(int8_trt.onnx_path, reference=True).predict(images))


def test_int8_exports_agree_with_torch_on_most_images(int8_cpu, int8_trt, checkpoint):
    images, _ = _shapes_test_images(64)
    torch_top1 = load_runner(checkpoint).predict(images).argmax(1)
    assert len(np.unique(torch_top1)) >= 5  # predictions spread over the classes: agreement is not trivial
    for result in (int8_cpu, int8_trt):
        assert result.parity.passed and result.parity.agreement >= INT8_AGREEMENT
        runner = load_runner(result.onnx_path)  # TensorRT's graph on a saturating CPU: its Q/DQ semantics
        assert runner.precision == "int8" and runner.reference == (result is int8_trt and cpu_saturates_u8s8())
        assert (runner.predict(images).argmax(1) == torch_top1).mean() >= INT8_AGREEMENT


def _activation_scales(path) -> dict[str, float]:
    model = onnx.load(path)
    initializers = {init.name: init for init in model.graph.initializer}
    return {node.input[0]: float(numpy_helper.to_array(initializers[node.input[1]]))
            for node in model.graph.node if node.op_type == "QuantizeLinear"}


@pytest.mark.slow
def test_int8_entropy_calibration_ranges_are_never_wider_than_minmax(checkpoint, tmp_path, int8_cpu):
    # ORT's quantize_static entropy default degenerates to min / max; ours computes ranges of its own, never wider.
    entropy = export(config(checkpoint, tmp_path, precision="int8", calib_method="entropy", min_agreement=0.5))
    assert entropy.parity.passed and entropy.metadata["quantization"]["calib_method"] == "entropy"
    minmax_scales, entropy_scales = _activation_scales(int8_cpu.onnx_path), _activation_scales(entropy.onnx_path)
    assert minmax_scales.keys() == entropy_scales.keys()
    shared = [name for name in minmax_scales if name != "input"]
    assert all(entropy_scales[n] <= minmax_scales[n] * 1.001 for n in shared)
    # (Whether it clips: test_entropy_ranges_of_a_relu_output_ignore_its_exact_zeros; this model has no outliers.)


def test_entropy_ranges_of_a_relu_output_ignore_its_exact_zeros(tmp_path):
    # A ReLU output is half exact zeros: ONNX Runtime's KL search, fed that spike, pinned such ranges at its
    # narrowest candidate (1/8 of the max), clipping a large share of the values. Zeros are exact in any range.
    from onnx import TensorProto, helper
    from onnxruntime.quantization import CalibrationDataReader

    from rslad_edge.export.precision import _entropy_ranges

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = np.random.default_rng(0).standard_t(3, (16, 256, 64)).astype(np.float32)  # heavy tails, like activations

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(x)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return {"x": batch} if (batch := next(self.batches, None)) is not None else None

    ranges = _entropy_ranges(path, Reader(), symmetric=False, workdir=tmp_path)
    low, high = (float(ranges["y"][0][key]) for key in ("rmin", "rmax"))
    positive = x[x > 0]
    assert low == 0.0
    assert high < 0.9 * positive.max()  # the far tail clipped: not minmax
    assert (positive > high).mean() < 0.001  # pinned at max / 8 (the spike in the search): 0.45% clipped


def test_int8_static_batch_calibrates_in_full_batches(checkpoint, tmp_path):
    result = export(config(checkpoint, tmp_path, precision="int8", batch=16, calib_n=40, min_agreement=INT8_AGREEMENT))
    assert result.metadata["quantization"]["calib_n"] == 32  # two full batches of 16; the last 8 dropped
    assert load_runner(result.onnx_path).static_batch == 16


# --- parity failure, bad input -------------------------------------------------------------------------------


def test_failed_parity_raises_and_leaves_nothing_under_the_final_name(checkpoint, tmp_path):
    stale = tmp_path / "student.fp16.onnx"
    stale.write_bytes(b"an fp16 export from an earlier run")
    with pytest.raises(ExportParityError, match=r"student.fp16.onnx.*max \|logit diff\|.*Nothing written"):
        export(config(checkpoint, tmp_path, precision="fp16", max_abs_diff=1e-9))
    assert not stale.exists() and not (tmp_path / "student.fp16.onnx.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp folder or half-written file either


def test_parity_report_names_what_missed():
    reference = np.array([[2.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    flipped = np.array([[2.0, 1.0], [1.5, 1.0]], dtype=np.float32)
    report = compare_logits(reference, flipped, np.array([0, 1]), max_abs_diff=0.1, min_agreement=1.0, data="x")
    assert not report.passed and report.agreement == 0.5 and report.max_abs_diff == pytest.approx(1.5)
    assert len(report.failures) == 2 and "agreement 50.00% < 100.00%" in report.failures[1]
    assert compare_logits(reference, reference, np.array([0, 1]), max_abs_diff=0.0, min_agreement=1.0,
                          data="x").passed


def test_an_op_without_onnx_conversion_is_named():
    class Bessel(torch.nn.Module):
        def forward(self, x):
            return torch.special.bessel_j0(x).mean((2, 3))

    with pytest.raises(ExportError, match="bessel_j0"):
        torch_to_onnx(Bessel(), (3, 8, 8), opset=18, batch=None, arch="bessel-net")


def test_parity_thresholds_take_the_defaults_of_the_artifact_and_the_flags_over_them(checkpoint):
    from rslad_edge.export import ENGINE_PARITY_DEFAULTS
    from rslad_edge.export.config import PARITY_DEFAULTS

    fp32 = ExportConfig(checkpoint=checkpoint)
    assert fp32.thresholds == PARITY_DEFAULTS["fp32"]
    assert fp32.parity_thresholds(ENGINE_PARITY_DEFAULTS) == (1e-3, 1.0)  # a TensorRT engine: its own fp32 tolerance
    flagged = ExportConfig(checkpoint=checkpoint, max_abs_diff=0.5, min_agreement=0.9)
    assert flagged.thresholds == flagged.parity_thresholds(ENGINE_PARITY_DEFAULTS) == (0.5, 0.9)


def test_config_validation_names_the_flag(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="--format 'onx' is not one of onnx, trt, ort, executorch. Did you mean"):
        ExportConfig(checkpoint=checkpoint, format="onx")
    with pytest.raises(ConfigError, match="--target cpu"):
        ExportConfig(checkpoint=checkpoint, format="trt", precision="int8", target="cpu")
    with pytest.raises(ConfigError, match="--dla-core needs --precision fp16 or int8"):
        ExportConfig(checkpoint=checkpoint, format="trt", dla_core=0)
    with pytest.raises(ConfigError, match="--opset"):
        ExportConfig(checkpoint=checkpoint, opset=11)
    with pytest.raises(ConfigError, match="--min-agreement is a fraction"):
        ExportConfig(checkpoint=checkpoint, min_agreement=99)
    assert ExportConfig(checkpoint=checkpoint).out == checkpoint.parent / "export"
    assert ExportConfig(checkpoint=checkpoint, format="trt", precision="int8").onnx_name == "student.int8-trt.onnx"


def test_int8_without_calibration_data_names_the_flags(checkpoint, tmp_path):
    with pytest.raises(DatasetError, match="int8 calibration.*--dataset and --data-root"):
        export(config(checkpoint, tmp_path / "out", precision="int8", dataset="imagefolder",
                      data_root=str(tmp_path / "no-such-folder")))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_cli_format_trt_without_tensorrt_writes_onnx_exits_1_and_prints_trtexec(checkpoint, tmp_path):
    result = cli.invoke(app, ["export", str(checkpoint), "--format", "trt", "--precision", "fp16", "--out",
                              str(tmp_path), "--parity-n", str(PARITY_N)], terminal_width=250)
    assert result.exit_code == 1, result.output
    assert (tmp_path / "student.fp16.onnx").is_file() and not (tmp_path / "student.fp16.engine").exists()
    command = f"trtexec --onnx={tmp_path / 'student.fp16.onnx'} --saveEngine={tmp_path / 'student.fp16.engine'}"
    assert command in result.output and "--fp16" in result.output  # the TensorRT 10 line
    assert "TensorRT is not installed here" in result.output
    sidecar = json.loads((tmp_path / "student.fp16.onnx.json").read_text())
    assert set(sidecar["trtexec"]) == {"TensorRT 10", "TensorRT 11"}


# --- CLI -----------------------------------------------------------------------------------------------------


def test_cli_export_prints_the_parity_table(checkpoint, tmp_path):
    result = cli.invoke(app, ["export", str(checkpoint), "--out", str(tmp_path), "--parity-n", "16", "--simplify"],
                        terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "student.onnx" in result.output and "100.00%" in result.output
    assert json.loads((tmp_path / "student.onnx.json").read_text())["exporter"].endswith("onnxslim")


@pytest.mark.parametrize(
    ("args", "exit_code", "message"),
    [
        (["--format", "onxx"], 2, "Did you mean 'onnx'"),
        (["--precision", "int9"], 2, "Did you mean 'int8'"),
        (["--calib-method", "entropi"], 2, "Did you mean 'entropy'"),
        (["--batch", "4", "--dynamic"], 2, "exclude each other"),
    ],
)
def test_cli_usage_errors(checkpoint, args, exit_code, message):
    result = cli.invoke(app, ["export", str(checkpoint), *args], terminal_width=250)
    assert result.exit_code == exit_code and message in _text(result.output)


def test_cli_not_a_checkpoint_and_out_is_a_file(tmp_path, checkpoint):
    bogus = tmp_path / "student.pt"
    bogus.write_text('{"this": "is json"}')
    result = cli.invoke(app, ["export", str(bogus), "--out", str(tmp_path / "out")], terminal_width=250)
    assert result.exit_code == 1 and "cannot load" in _text(result.output) and "Traceback" not in result.output
    a_file = tmp_path / "taken"
    a_file.write_text("")
    result = cli.invoke(app, ["export", str(checkpoint), "--out", str(a_file)], terminal_width=250)
    assert result.exit_code == 1 and "is a file" in _text(result.output)


# --- real TensorRT (GPU machines only) -----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_trt_engine_builds_runs_and_matches_torch(checkpoint, tmp_path, precision):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    result = export(config(checkpoint, tmp_path, format="trt", precision=precision))
    assert result.engine_path is not None and result.engine_path.is_file()
    assert result.engine_parity is not None and result.engine_parity.passed
    runner = load_runner(result.engine_path, device="cuda")
    assert runner.backend == "tensorrt" and runner.precision == precision
    images, _ = _shapes_test_images(7)
    assert runner.predict(images).shape == (7, 10) and runner.predict(images[:1]).shape == (1, 10)
