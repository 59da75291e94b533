"""Runner layer: one predict contract over a checkpoint, an ONNX model (real ONNX Runtime sessions) and engines."""

from __future__ import annotations

import json
import shlex
import warnings

import numpy as np
import onnx
import pytest
import torch

from rslad_edge.errors import CheckpointError, ConfigError, DatasetError, ExportError, RuntimeUnavailableError
from rslad_edge.export.onnx_export import torch_to_onnx
from rslad_edge.models import create_model, save_checkpoint
from rslad_edge.runtime import OnnxRunner, Runner, TorchRunner, choose_provider, load_runner, sidecar_path
from rslad_edge.runtime import onnx_runner as onnx_runner_module
from rslad_edge.runtime.onnx_info import inspect_onnx
from rslad_edge.runtime.trt_build import plan_build, trtexec_build_args, trtexec_command


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A smallcnn checkpoint, its dynamic-batch ONNX and a static-batch (4) ONNX, plus torch's own logits."""
    folder = tmp_path_factory.mktemp("runtime")
    torch.manual_seed(0)
    model = create_model("smallcnn").eval()
    checkpoint = save_checkpoint(folder / "student.pt", model, "smallcnn", num_classes=10, input_size=(32, 32))
    onnx.save(torch_to_onnx(model, (3, 32, 32), opset=18, batch=None), folder / "dynamic.onnx")
    onnx.save(torch_to_onnx(model, (3, 32, 32), opset=18, batch=4), folder / "static4.onnx")
    images = np.random.default_rng(0).random((7, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    return {"checkpoint": checkpoint, "dynamic": folder / "dynamic.onnx", "static": folder / "static4.onnx",
            "images": images, "logits": logits, "folder": folder}


def test_checkpoint_runner_reproduces_the_model(artifacts):
    runner = load_runner(artifacts["checkpoint"])
    assert isinstance(runner, TorchRunner) and isinstance(runner, Runner)
    assert (runner.backend, runner.provider, runner.precision) == ("torch", "cpu", "fp32")
    assert runner.input_shape == (3, 32, 32) and runner.num_classes == 10
    logits = runner.predict(artifacts["images"])
    assert logits.dtype == np.float32 and logits.shape == (7, 10)
    np.testing.assert_allclose(logits, artifacts["logits"], atol=1e-5)
    assert runner.metadata["arch"] == "smallcnn"


def test_onnx_runner_matches_torch_at_batch_1_and_7(artifacts):
    runner = load_runner(artifacts["dynamic"], threads=1)
    assert isinstance(runner, OnnxRunner) and isinstance(runner, Runner)
    assert runner.provider == "CPUExecutionProvider"  # read back from the session, not assumed
    assert runner.static_batch is None and runner.precision == "fp32"
    np.testing.assert_allclose(runner.predict(artifacts["images"]), artifacts["logits"], atol=1e-4)
    np.testing.assert_allclose(runner.predict(artifacts["images"][:1]), artifacts["logits"][:1], atol=1e-4)
    assert runner.predict(artifacts["images"][:0]).shape == (0, 10)


def test_runner_batches_inside_with_the_same_result(artifacts):
    runner = OnnxRunner(artifacts["dynamic"], batch_size=3)  # 7 images -> batches of 3, 3, 1
    np.testing.assert_allclose(runner.predict(artifacts["images"]), artifacts["logits"], atol=1e-4)
    torch_runner = load_runner(artifacts["checkpoint"], batch_size=2)
    np.testing.assert_allclose(torch_runner.predict(artifacts["images"]), artifacts["logits"], atol=1e-5)


def test_static_batch_model_gets_exactly_its_batch_padded(artifacts):
    runner = load_runner(artifacts["static"], batch_size=64)
    assert runner.static_batch == 4 and runner.batch_size == 4  # a static batch wins over the cap asked for
    np.testing.assert_allclose(runner.predict(artifacts["images"]), artifacts["logits"], atol=1e-4)  # 4 + 3 padded


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda x: x[0], "must be NCHW"),
        (lambda x: x.transpose(0, 2, 3, 1).copy(), "looks NHWC"),
        (lambda x: x[:, :, :16, :16].copy(), "takes 32x32 images, got 16x16"),
        (lambda x: (x * 255).astype(np.uint8), "uint8 pixels"),
        (lambda x: x.astype(np.float64), "must be float32, got float64"),
        (lambda x: x * 255, "0-255 pixels: divide by 255"),
        (lambda x: (x - 0.5) / 0.25, "mean/std-normalised"),
        (lambda x: np.where(x > 0.5, np.nan, x).astype(np.float32), "NaN"),
        (lambda x: torch.from_numpy(x), "takes a numpy array"),
    ],
    ids=["3d", "nhwc", "size", "uint8", "float64", "0-255", "normalised", "nan", "torch"],
)
def test_runner_input_checks_say_what_to_change(artifacts, make_input, message):
    for runner in (load_runner(artifacts["dynamic"]), load_runner(artifacts["checkpoint"])):
        with pytest.raises(DatasetError, match=message):
            runner.predict(make_input(artifacts["images"]))


def test_range_check_tolerates_float_rounding(artifacts):
    runner = load_runner(artifacts["dynamic"])
    nudged = np.clip(artifacts["images"], 0, 1) + np.float32(5e-4)  # just above 1 after an attack's clamp + noise
    assert runner.predict(nudged).shape == (7, 10)


def test_torch_runner_restores_the_thread_count(artifacts):
    before = torch.get_num_threads()
    load_runner(artifacts["checkpoint"], threads=1).predict(artifacts["images"])
    assert torch.get_num_threads() == before


def test_torch_runner_bf16_autocast_returns_float32_logits(artifacts):
    runner = load_runner(artifacts["checkpoint"], precision="bf16")
    logits = runner.predict(artifacts["images"])
    assert runner.precision == "bf16" and logits.dtype == np.float32
    assert np.abs(logits - artifacts["logits"]).max() < 0.1  # bf16 keeps 8 bits of mantissa


def test_choose_provider_maps_devices_and_refuses_missing_providers():
    cpu_only = ["CPUExecutionProvider"]
    assert choose_provider("cpu", available=cpu_only) == ("CPUExecutionProvider", 0)
    assert choose_provider("auto", available=cpu_only) == ("CPUExecutionProvider", 0)
    with_cuda = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_provider("auto", available=with_cuda) == ("CUDAExecutionProvider", 0)
    assert choose_provider("cuda:1", available=with_cuda) == ("CUDAExecutionProvider", 1)
    assert choose_provider("trt", available=with_cuda) == ("TensorrtExecutionProvider", 0)
    assert choose_provider("cpu", "trt", available=with_cuda) == ("TensorrtExecutionProvider", 0)
    assert choose_provider("cpu", "CUDAExecutionProvider", available=with_cuda)[0] == "CUDAExecutionProvider"
    with pytest.raises(RuntimeUnavailableError, match="no CUDAExecutionProvider.*onnxruntime-gpu"):
        choose_provider("cuda", available=cpu_only)
    with pytest.raises(ConfigError, match="--device"):
        choose_provider("gpu", available=cpu_only)
    with pytest.raises(ConfigError, match="--provider"):
        choose_provider("cpu", "openvino", available=cpu_only)


def test_silent_cpu_fallback_is_an_error_not_a_label(artifacts, monkeypatch):
    # ONNX Runtime given a provider it lacks warns and runs on the CPU; the runner must notice.
    monkeypatch.setattr(onnx_runner_module, "choose_provider", lambda *args, **kwargs: ("CUDAExecutionProvider", 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeUnavailableError, match="runs on CPUExecutionProvider"):
            OnnxRunner(artifacts["dynamic"], device="cuda")


def test_load_runner_rejects_what_it_cannot_run(artifacts, tmp_path):
    with pytest.raises(ConfigError, match="suffix '.txt'"):
        load_runner(tmp_path / "model.txt")
    with pytest.raises(ConfigError, match="--precision bf16 applies to checkpoints"):
        load_runner(artifacts["dynamic"], precision="bf16")
    with pytest.raises(ConfigError, match="--provider is for ONNX"):
        load_runner(artifacts["checkpoint"], provider="cpu")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not an onnx model" * 10)
    with pytest.raises(ExportError, match="garbage.onnx"):
        load_runner(garbage)
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text('{"weights": [1, 2, 3]}')
    with pytest.raises(CheckpointError, match="notes.pt"):
        load_runner(not_a_checkpoint)


def test_engine_without_a_gpu_says_so(tmp_path):
    engine = tmp_path / "student.engine"
    engine.write_bytes(b"plan")
    with pytest.raises(ConfigError, match="runs on a GPU"):
        load_runner(engine, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeUnavailableError, match="needs a CUDA GPU"):
            load_runner(engine, device="cuda")


# --- ONNX inspection (the runner and bench read a file the same way) ------------------------------------------


def identity_onnx(path, input_dims, *, elem_type=onnx.TensorProto.FLOAT, extra_input=False, quantized=False):
    """An Identity (or QuantizeLinear -> DequantizeLinear) graph over one input of ``input_dims``."""
    from onnx import helper, numpy_helper

    nodes, weights = [helper.make_node("Identity", ["input"], ["logits"])], []
    if quantized:
        weights = [numpy_helper.from_array(np.array(0.1, np.float32), "scale"),
                   numpy_helper.from_array(np.array(0, np.uint8), "zero")]
        nodes = [helper.make_node("QuantizeLinear", ["input", "scale", "zero"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["logits"])]
    inputs = [helper.make_tensor_value_info("input", elem_type, input_dims)]
    if extra_input:
        inputs.append(helper.make_tensor_value_info("mask", onnx.TensorProto.FLOAT, input_dims))
    graph = helper.make_graph(nodes, "identity", inputs,
                              [helper.make_tensor_value_info("logits", elem_type, input_dims)], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_inspect_onnx_reads_input_batch_classes_and_precision_from_the_graph(artifacts, tmp_path):
    dynamic = inspect_onnx(artifacts["dynamic"])
    assert (dynamic.input_name, dynamic.output_name, dynamic.input_shape) == ("input", "logits", (3, 32, 32))
    assert dynamic.static_batch is None and dynamic.num_classes == 10 and dynamic.precision == "fp32"
    assert inspect_onnx(artifacts["static"]).static_batch == 4
    quantized = inspect_onnx(identity_onnx(tmp_path / "q.onnx", ["n", 3, 8, 8], quantized=True))
    assert quantized.precision == "int8" and quantized.input_shape == (3, 8, 8) and quantized.num_classes == 8


def test_inspect_onnx_fills_symbolic_sizes_from_the_export_metadata_only(tmp_path):
    symbolic = identity_onnx(tmp_path / "any_size.onnx", ["n", 3, "h", "w"])
    bare = inspect_onnx(symbolic)
    assert bare.input_shape == (3, 0, 0) and bare.num_classes is None  # unknown stays "any"; the runner asks
    sidecar_path(symbolic).write_text(json.dumps({"input_size": [24, 20], "precision": "fp16", "num_classes": 7}))
    described = inspect_onnx(symbolic)
    assert described.input_shape == (3, 24, 20) and described.precision == "fp16"  # the metadata's word wins
    assert described.num_classes == 7  # the output's width is symbolic: the metadata's class count


@pytest.mark.parametrize(
    ("options", "message"),
    [({"extra_input": True}, "has 2 inputs"), ({"elem_type": onnx.TensorProto.INT64}, "takes int64, not float32")],
)
def test_inspect_onnx_refuses_what_is_no_image_classifier_naming_the_file(tmp_path, options, message):
    path = identity_onnx(tmp_path / "odd.onnx", ["n", 3, 8, 8], **options)
    with pytest.raises(ExportError, match=message) as refusal:
        inspect_onnx(path)
    assert "odd.onnx" in str(refusal.value)
    with pytest.raises(ExportError, match=message):
        load_runner(path)  # the runner refuses it the same way


# --- TensorRT build plans and the trtexec command (no GPU needed) --------------------------------------------


def test_trt10_uses_precision_flags_on_a_weakly_typed_network():
    fp16 = plan_build("10.3.0", "fp16", (3, 32, 32))
    assert not fp16.strongly_typed and fp16.network_flags == () and fp16.builder_flags == ("FP16",)
    int8 = plan_build("10.16.1", "int8", (3, 32, 32))
    assert int8.builder_flags == ("INT8", "FP16")  # Q/DQ int8, fp16 for what the Q/DQ graph leaves float
    fp32 = plan_build(10, "fp32", (3, 32, 32))
    assert fp32.builder_flags == () and fp32.cleared_flags == ("TF32",)


def test_trt11_is_strongly_typed_without_precision_flags():
    for precision in ("fp16", "int8"):
        plan = plan_build("11.4.0", precision, (3, 32, 32))
        assert plan.strongly_typed and plan.network_flags == ("STRONGLY_TYPED",) and plan.builder_flags == ()


def test_trt_profile_spans_batch_1_to_max_unless_static():
    plan = plan_build(10, "fp16", (3, 32, 32), opt_batch=32, max_batch=128)
    assert plan.profile == ((1, 3, 32, 32), (32, 3, 32, 32), (128, 3, 32, 32))
    assert plan_build(10, "fp16", (3, 32, 32), batch=8).profile is None
    assert plan_build(10, "fp16", (3, 32, 32), workspace_gib=0.5).workspace_bytes == 1 << 29


def test_trt_dla_and_version_checks():
    dla = plan_build(10, "int8", (3, 32, 32), dla_core=1)
    assert dla.dla_core == 1 and "GPU_FALLBACK" in dla.builder_flags
    with pytest.raises(ConfigError, match="DLA has no fp32"):
        plan_build(10, "fp32", (3, 32, 32), dla_core=0)
    with pytest.raises(RuntimeUnavailableError, match="TensorRT 8.6.1 is not supported"):
        plan_build("8.6.1", "fp16", (3, 32, 32))


def test_trtexec_commands_per_version():
    trt10 = trtexec_command(plan_build(10, "int8", (3, 32, 32), dla_core=0), "out/s.int8-trt.onnx",
                            "out/s.int8.engine")
    assert trt10 == (
        "trtexec --onnx=out/s.int8-trt.onnx --saveEngine=out/s.int8.engine --memPoolSize=workspace:2048M "
        "--minShapes=input:1x3x32x32 --optShapes=input:64x3x32x32 --maxShapes=input:256x3x32x32 "
        "--useDLACore=0 --int8 --fp16 --allowGPUFallback"
    )
    trt11 = trtexec_command(plan_build(11, "fp16", (3, 32, 32), batch=16), "m.fp16.onnx", "m.fp16.engine")
    assert trt11 == "trtexec --onnx=m.fp16.onnx --saveEngine=m.fp16.engine --memPoolSize=workspace:2048M"
    trt10_fp32 = trtexec_command(plan_build(10, "fp32", (3, 32, 32), batch=16), "my model.onnx", "m.engine")
    assert trt10_fp32.endswith("--noTF32") and "'--onnx=my model.onnx'" in trt10_fp32  # shell-quoted


def test_bench_builds_one_engine_per_batch_with_the_same_plan_version_agnostic():
    plan = plan_build(10, "int8", (3, 32, 32), min_batch=8, opt_batch=8, max_batch=8, workspace_gib=None,
                      input_name="images")
    args = trtexec_build_args(plan, "m.onnx", "b8.engine", timing_cache="timing.cache", skip_inference=True)
    assert args == ["--onnx=m.onnx", "--saveEngine=b8.engine", "--minShapes=images:8x3x32x32",
                    "--optShapes=images:8x3x32x32", "--maxShapes=images:8x3x32x32", "--int8", "--fp16",
                    "--timingCacheFile=timing.cache", "--skipInference"]  # no --memPoolSize: trtexec 8.2 lacks it
    assert trtexec_command(plan, "m.onnx", "b8.engine") == shlex.join(["trtexec", *args[:-2]])
    with pytest.raises(ConfigError, match="1 <= min <= opt <= max"):
        plan_build(10, "fp16", (3, 32, 32), min_batch=8, opt_batch=4)


@pytest.mark.gpu
def test_onnx_runner_on_cuda_matches_cpu(artifacts):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has no CUDA execution provider")
    runner = load_runner(artifacts["dynamic"], device="cuda")
    assert runner.provider == "CUDAExecutionProvider"
    np.testing.assert_allclose(runner.predict(artifacts["images"]), artifacts["logits"], atol=1e-3)
