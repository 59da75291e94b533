"""Phone formats: ExecuTorch programs (.pte, XNNPACK) and ONNX Runtime Mobile (.ort), exported, run and checked.

Real ExecuTorch and ONNX Runtime sessions on a ridge-fitted smallcnn and the synthetic ``shapes`` data. The .ort
tests need only the core install; the .pte tests need the ``mobile`` extra and skip with that reason without it.
The behaviour without the extra (one line naming it) is tested either way, by hiding ExecuTorch from the import
system.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fitted_models import ridge_fitted_smallcnn
from typer.testing import CliRunner

from rslad_edge.cli import app
from rslad_edge.device import cpu_saturates_u8s8
from rslad_edge.errors import ConfigError, ExportError, ExportParityError, RuntimeUnavailableError
from rslad_edge.export import ExportConfig, export
from rslad_edge.io import sha256_file
from rslad_edge.models import save_checkpoint
from rslad_edge.record import Artifact, artifact_kind
from rslad_edge.runtime import load_runner, sidecar_path
from rslad_edge.runtime.executorch_runner import MOBILE_EXTRA, executorch_missing

PARITY_N = 64
CALIB_N = 64
INT8_AGREEMENT = 0.8  # the ridge-fitted test model's margins are small (see tests/test_export.py); production: 97%
cli = CliRunner()
needs_executorch = pytest.mark.skipif(executorch_missing() is not None,
                                      reason=f"ExecuTorch is not installed (the mobile extra: {MOBILE_EXTRA})")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "student.pt"
    return save_checkpoint(path, ridge_fitted_smallcnn("smallcnn"), "smallcnn", num_classes=10, input_size=(32, 32),
                           meta={"dataset": "shapes", "method": "rslad", "eps": 8 / 255})


@pytest.fixture(scope="module")
def images():
    from rslad_edge.data import load_dataset, subset, to_float

    test = subset(load_dataset("shapes", None, "test", seed=0), 7, seed=1)
    return to_float(test.images).numpy()


def _config(checkpoint, out, **overrides) -> ExportConfig:
    return ExportConfig(**{"checkpoint": checkpoint, "out": out, "parity_n": PARITY_N, "calib_n": CALIB_N,
                           **overrides})


def _torch_logits(checkpoint, x: np.ndarray) -> np.ndarray:
    return load_runner(checkpoint).predict(x)


def _one_line_error(result) -> str:
    """The CLI's error: exit 1, one line (after bench's progress lines, if any), nothing else, no traceback."""
    lines = [line for line in result.output.strip().splitlines() if not line.startswith("[1/1] loading")]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


# --- no extra needed -------------------------------------------------------------------------------------------


def test_phone_formats_have_their_own_artifact_kinds():
    assert artifact_kind("export/student.pte") == "executorch"
    assert artifact_kind("export/student.int8.ort") == "ort"
    assert artifact_kind("export/student.onnx") == "onnx"


def test_without_the_extra_executorch_is_one_line_naming_it(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "executorch", None)  # what an install without the extra looks like
    assert executorch_missing() == f"ExecuTorch is not installed: {MOBILE_EXTRA}"
    with pytest.raises(ConfigError, match=r"--format executorch needs the mobile extra .*rslad-edge\[mobile\]"):
        ExportConfig(checkpoint=checkpoint, format="executorch")
    line = _one_line_error(cli.invoke(app, ["export", str(checkpoint), "--format", "executorch", "--out",
                                            str(tmp_path)]))
    assert "pip install 'rslad-edge[mobile]'" in line
    program = tmp_path / "student.pte"
    program.write_bytes(b"\0" * 64)
    with pytest.raises(RuntimeUnavailableError, match=r"rslad-edge\[mobile\]"):
        load_runner(program)


@pytest.fixture(scope="module")
def ort_fp32(checkpoint, tmp_path_factory):
    return export(_config(checkpoint, tmp_path_factory.mktemp("ort"), format="ort"))


@pytest.fixture(scope="module")
def ort_int8(checkpoint, tmp_path_factory):
    return export(_config(checkpoint, tmp_path_factory.mktemp("ort8"), format="ort", precision="int8",
                          min_agreement=INT8_AGREEMENT))


def test_ort_export_writes_the_onnx_then_its_ort_form_each_checked(ort_fp32, checkpoint, images):
    assert [w.path.name for w in ort_fp32.written] == ["student.onnx", "student.ort"]
    ort_file = ort_fp32.final
    assert ort_file.parity.passed and ort_file.parity.max_abs_diff <= 1e-4 and ort_file.parity.agreement == 1.0
    sidecar = json.loads(sidecar_path(ort_file.path).read_text())
    assert sidecar["artifact"] == "student.ort" and sidecar["onnx"] == "student.onnx"
    assert sidecar["ort_conversion"]["target_platform"] == "arm" and sidecar["parity"]["passed"]
    runner = load_runner(ort_file.path, threads=1)
    assert (runner.backend, runner.provider, runner.precision) == ("onnxruntime", "CPUExecutionProvider", "fp32")
    assert runner.input_shape == (3, 32, 32) and runner.num_classes == 10 and runner.static_batch is None
    # the metadata travels inside the .ort (ONNX Runtime's custom_metadata_map), not only in the sidecar
    sidecar_path(ort_file.path).unlink()
    from_file = load_runner(ort_file.path)
    assert from_file.metadata["artifact"] == "student.ort" and from_file.metadata["parity"]["passed"]
    np.testing.assert_allclose(from_file.predict(images), _torch_logits(checkpoint, images), atol=1e-4)
    assert [a.kind for a in ort_fp32.artifacts()] == ["onnx", "ort"]


def test_ort_int8_is_the_quantized_onnx_converted(ort_int8):
    assert [w.path.name for w in ort_int8.written] == ["student.int8.onnx", "student.int8.ort"]
    assert ort_int8.parity.agreement >= INT8_AGREEMENT
    runner = load_runner(ort_int8.path)
    assert runner.precision == "int8" and runner.metadata["quantization"]["target"] == "cpu"


def test_an_ort_twin_is_the_twin_of_the_onnx_it_was_converted_from(ort_int8, images):
    """The .ort holds ORT's fused operators, so its white-box attacks are crafted on the twin of its ONNX; the twin
    agrees with the converted file itself (the agreement check verify runs), and a changed ONNX is refused."""
    from rslad_edge.runtime.twin import TwinUnavailableError, twin_agreement

    runner = load_runner(ort_int8.path, threads=1)
    twin = runner.twin()
    assert Path(twin.source).name == "student.int8.onnx"
    x = torch.from_numpy(images)
    agreement = twin_agreement(twin, torch.from_numpy(runner.predict(images)), x)
    assert agreement.trusted and agreement.agreement >= 0.99
    onnx_path = ort_int8.onnx_path
    saved = onnx_path.read_bytes()
    try:
        onnx_path.write_bytes(saved + b"\0")
        with pytest.raises(TwinUnavailableError, match="changed since"):
            runner.twin()
    finally:
        onnx_path.write_bytes(saved)


def test_a_truncated_ort_is_one_line_naming_the_file(ort_fp32, tmp_path):
    truncated = tmp_path / "student.ort"
    data = ort_fp32.path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    line = _one_line_error(cli.invoke(app, ["bench", str(truncated), "--batch", "1", "--iters", "3"]))
    assert str(truncated) in line and "ONNX Runtime cannot load" in line


def test_ort_and_executorch_run_on_the_cpu_only(ort_fp32, tmp_path):
    with pytest.raises(ConfigError, match="ORT-format model"):
        load_runner(ort_fp32.path, device="cuda")
    program = tmp_path / "student.pte"
    program.write_bytes(b"\0" * 64)
    line = _one_line_error(cli.invoke(app, ["bench", str(program), "--device", "cuda"]))
    assert "ExecuTorch program" in line and "--device cpu" in line


@pytest.mark.parametrize(("overrides", "message"), [
    ({"format": "executorch", "precision": "fp16"}, "--format executorch takes --precision fp32 or int8"),
    ({"format": "ort", "precision": "fp16"}, "--format ort takes --precision fp32 or int8"),
    ({"format": "ort", "precision": "int8", "target": "trt"}, "--target trt builds int8 for TensorRT"),
    ({"format": "onnx", "precision": "int8", "calib_method": "histogram"}, "use minmax or entropy or percentile"),
])
def test_phone_format_options_are_checked_naming_the_flag(checkpoint, overrides, message):
    with pytest.raises(ConfigError, match=message):
        ExportConfig(checkpoint=checkpoint, **overrides)


def test_a_dynamic_batch_program_is_a_usage_error(checkpoint):
    result = cli.invoke(app, ["export", str(checkpoint), "--format", "executorch", "--dynamic"])
    assert result.exit_code == 2 and "static in the batch" in " ".join(result.output.split())


def test_pipeline_lists_phone_formats_and_checks_them_up_front(tmp_path, monkeypatch):
    from rslad_edge.errors import PipelineConfigError
    from rslad_edge.pipeline.config import check_pipeline_config, load_pipeline_config

    def sections(**export):
        return load_pipeline_config("smoke", overrides={"export": export})

    cfg = check_pipeline_config(sections(formats=["onnx", "ort"]), tmp_path)
    assert [(e.format, e.precision) for e in cfg.exports] == [("ort", "fp32"), ("ort", "int8")]  # ort makes the ONNX
    with pytest.raises(PipelineConfigError, match="'ornx' is not one of onnx, ort, executorch. Did you mean 'onnx'"):
        check_pipeline_config(sections(formats=["ornx"]), tmp_path)
    monkeypatch.setitem(sys.modules, "executorch", None)
    with pytest.raises(PipelineConfigError, match=r"pipeline section 'export'.*rslad-edge\[mobile\]"):
        check_pipeline_config(sections(formats=["onnx", "executorch"]), tmp_path)


def test_pipeline_refuses_to_bench_phone_formats_on_a_gpu(tmp_path):
    from rslad_edge.errors import PipelineConfigError
    from rslad_edge.pipeline.config import check_pipeline_config, load_pipeline_config

    sections = load_pipeline_config("smoke", overrides={"export": {"formats": ["ort"]}, "bench": {"device": "cuda"}})
    with pytest.raises(PipelineConfigError, match="device cuda cannot run the ort exports"):
        check_pipeline_config(sections, tmp_path)


# --- ExecuTorch (the mobile extra) ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pte_fp32(checkpoint, tmp_path_factory):
    return export(_config(checkpoint, tmp_path_factory.mktemp("pte"), format="executorch"))


@pytest.fixture(scope="module")
def pte_int8(checkpoint, tmp_path_factory):
    return export(_config(checkpoint, tmp_path_factory.mktemp("pte8"), format="executorch", precision="int8",
                          min_agreement=INT8_AGREEMENT))


@needs_executorch
def test_pte_fp32_agrees_with_torch_on_the_executorch_runtime(pte_fp32, checkpoint, images):
    assert [w.path.name for w in pte_fp32.written] == ["student.pte"]
    assert pte_fp32.parity.passed and pte_fp32.parity.agreement == 1.0 and pte_fp32.parity.max_abs_diff <= 1e-4
    runner = load_runner(pte_fp32.path, threads=1)
    assert (runner.backend, runner.precision, runner.static_batch, runner.threads) == ("executorch", "fp32", 1, 1)
    assert runner.input_shape == (3, 32, 32) and runner.num_classes == 10
    # any batch through a batch-1 program: 7 calls, the same logits as PyTorch
    np.testing.assert_allclose(runner.predict(images), _torch_logits(checkpoint, images), atol=1e-4)
    assert runner.predict(images[:0]).shape == (0, 10)
    artifact = Artifact.from_file(pte_fp32.path, precision="fp32")
    assert artifact.kind == "executorch"


@needs_executorch
def test_pte_provider_says_what_the_program_delegates(pte_fp32, tmp_path):
    runner = load_runner(pte_fp32.path)
    delegation = pte_fp32.metadata["delegation"]
    assert delegation["delegated_nodes"] == delegation["graph_nodes"] > 0 and delegation["outside_nodes"] == {}
    assert runner.provider == f"XNNPACK ({delegation['graph_nodes']} of {delegation['graph_nodes']} nodes delegated)"
    assert runner.delegation.delegate_calls == {"XnnpackBackend": 1} and runner.delegation.outside_ops == {}
    # without the export's sidecar, the program's own counts
    copy = tmp_path / "copy.pte"
    copy.write_bytes(pte_fp32.path.read_bytes())
    assert load_runner(copy).provider == "XNNPACK (1 delegate call, 0 ops outside)"


@needs_executorch
def test_the_thread_pool_is_resized_only_while_no_program_is_loaded(pte_fp32, images):
    first = load_runner(pte_fp32.path, threads=1)
    with pytest.raises(ConfigError, match="thread pool is shared by the whole process and has 1 threads"):
        load_runner(pte_fp32.path, threads=2)  # resizing now would pull the pool from under `first`
    expected = first.predict(images)
    del first
    second = load_runner(pte_fp32.path, threads=2)
    assert second.threads == 2
    np.testing.assert_allclose(second.predict(images), expected, atol=1e-5)
    del second
    assert load_runner(pte_fp32.path, threads=1).threads == 1


@needs_executorch
def test_a_program_nothing_was_delegated_in_says_so(tmp_path, checkpoint):
    from executorch.exir import to_edge

    model = load_runner(checkpoint).model
    program = to_edge(torch.export.export(model, (torch.rand(1, 3, 32, 32),))).to_executorch()
    path = tmp_path / "portable.pte"
    path.write_bytes(program.buffer)
    runner = load_runner(path)
    assert runner.provider.startswith("portable kernels (") and runner.delegation.delegate_calls == {}
    assert sum(runner.delegation.outside_ops.values()) > 0


@needs_executorch
def test_pte_sidecar_records_batch_delegation_versions_and_parity(pte_fp32):
    sidecar = json.loads(pte_fp32.final.sidecar.read_text())
    assert sidecar["artifact"] == "student.pte" and sidecar["batch"] == 1 and sidecar["precision"] == "fp32"
    assert sidecar["input_size"] == [32, 32] and sidecar["input_range"] == [0.0, 1.0]
    assert sidecar["versions"]["executorch"] and sidecar["parity"]["passed"]
    assert sidecar["delegation"]["program"] == {"delegate_calls": {"XnnpackBackend": 1}, "outside_ops": {}}
    assert "XnnpackPartitioner" in sidecar["exporter"]


@needs_executorch
def test_pte_int8_through_pt2e_keeps_the_classifier_float(pte_int8, pte_fp32):
    assert pte_int8.path.name == "student.int8.pte" and pte_int8.parity.agreement >= INT8_AGREEMENT
    quantization = pte_int8.metadata["quantization"]
    assert quantization["calib_n"] == CALIB_N and "MinMaxObserver" in quantization["activations"]
    assert quantization["float_nodes"] == ["linear (the classifier: float logits)"]
    assert pte_int8.path.stat().st_size < pte_fp32.path.stat().st_size
    runner = load_runner(pte_int8.path)
    assert runner.precision == "int8" and runner.provider.startswith("XNNPACK (")


@needs_executorch
def test_a_static_batch_program_serves_any_batch_split_and_padded(checkpoint, tmp_path, images):
    result = export(_config(checkpoint, tmp_path, format="executorch", batch=4))
    assert result.path.name == "student.b4.pte" and result.metadata["batch"] == 4
    runner = load_runner(result.path)
    assert runner.static_batch == 4
    np.testing.assert_allclose(runner.predict(images), _torch_logits(checkpoint, images), atol=1e-4)  # 4 + 3 padded


@needs_executorch
def test_a_pte_missing_parity_writes_nothing_under_its_name(checkpoint, tmp_path, pte_fp32):
    stale = tmp_path / "student.pte"
    stale.write_bytes(b"an earlier run")
    sidecar_path(stale).write_text("{}")
    with pytest.raises(ExportParityError, match="Nothing written; removed the stale student.pte"):
        export(_config(checkpoint, tmp_path, format="executorch", max_abs_diff=0.0))  # XNNPACK sums in its own order
    assert not stale.exists() and not sidecar_path(stale).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@needs_executorch
@pytest.mark.parametrize("content", ["onnx", "truncated", "zeros"])
def test_a_file_that_is_no_executorch_program_is_one_line_naming_it(pte_fp32, ort_fp32, tmp_path, content):
    program = tmp_path / "broken.pte"
    data = pte_fp32.path.read_bytes()
    program.write_bytes({"onnx": ort_fp32.onnx_path.read_bytes(), "truncated": data[: len(data) // 3],
                         "zeros": b"\0" * 4096}[content])
    line = _one_line_error(cli.invoke(app, ["verify", str(program), "--dataset", "shapes", "--n", "4"]))
    assert str(program) in line and "is not an ExecuTorch program" in line


@needs_executorch
def test_a_pte_that_does_not_take_images_is_one_line_naming_it(tmp_path):
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    linear = torch.nn.Linear(10, 3).eval()
    program = to_edge_transform_and_lower(torch.export.export(linear, (torch.rand(1, 10),)),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    path = tmp_path / "linear.pte"
    path.write_bytes(program.buffer)
    line = _one_line_error(cli.invoke(app, ["bench", str(path), "--batch", "1", "--iters", "3"]))
    assert str(path) in line and "takes a tensor of shape (1, 10)" in line and "not float32 NCHW images" in line
    with pytest.raises(ExportError, match="not an rslad-edge model"):
        load_runner(path)


@needs_executorch
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_verify_attacks_a_pte_through_its_twin_and_judges_on_the_executorch_runtime(
        pte_fp32, pte_int8, checkpoint, tmp_path, precision):
    pte = {"fp32": pte_fp32, "int8": pte_int8}[precision]
    out = tmp_path / "verify.json"
    result = cli.invoke(app, ["verify", str(pte.path), "--reference", str(checkpoint), "--dataset", "shapes",
                              "--n", "8", "--square-queries", "10", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["backend"] == "executorch" and report["provider"].startswith("XNNPACK (")
    assert {"pgd_sat", "cw", "transfer_pgd", "transfer_cw", "square"} <= set(report["robust_acc"])
    assert report["gradients"] == "twin" and report["twin_unavailable"] is None
    # XNNPACK requantizes in fixed point, the twin in float: logits differ by a few hundredths, which flips an image
    # of this test model (its margins are tiny, see INT8_AGREEMENT) but not a trained one's
    assert report["twin"]["max_abs_logit_diff"] < (0.05 if precision == "int8" else 1e-4)
    assert report["twin"]["trusted"] or precision == "int8"
    assert report["versions"]["executorch"]
    assert any("static batch of 1" in note for note in report["notes"])


@needs_executorch
def test_a_pte_twin_is_the_onnx_of_its_graph_written_beside_it(pte_int8, pte_fp32, images, tmp_path):
    """A .pte's scales live inside the XNNPACK delegate, so export writes what it computes as an ONNX beside it (int8:
    the converted PT2E graph as Q/DQ); its twin follows the program and gives gradients; a changed or missing twin
    ONNX is refused, naming it."""
    import onnx
    import onnxruntime as ort

    from rslad_edge.runtime.twin import TwinUnavailableError, twin_agreement

    for pte, quantized in ((pte_int8, True), (pte_fp32, False)):
        sidecar = json.loads(pte.final.sidecar.read_text())
        twin_path = pte.path.with_name(sidecar["twin_onnx"])
        assert twin_path.name == pte.path.name.removesuffix(".pte") + ".twin.onnx"
        assert sidecar["twin_onnx_sha256"] == sha256_file(twin_path)
        ops = {node.op_type for node in onnx.load(twin_path).graph.node}
        assert ("QuantizeLinear" in ops) == quantized
        runner = load_runner(pte.path)
        twin = runner.twin()
        x = torch.from_numpy(images)
        program_logits = torch.from_numpy(runner.predict(images))
        agreement = twin_agreement(twin, program_logits, x)
        assert agreement.agreement == 1.0 and agreement.max_abs_logit_diff < (0.05 if quantized else 1e-4)
        # a second int8 runtime reads the same file: ONNX Runtime on the twin's Q/DQ graph
        options = ort.SessionOptions()  # on an x86 CPU without VNNI the fused S8S8 kernels saturate: Q/DQ semantics
        if cpu_saturates_u8s8():
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(twin_path), options, providers=["CPUExecutionProvider"])
        assert (session.run(None, {"input": images})[0].argmax(1) == program_logits.numpy().argmax(1)).all()
        x = x.clone().requires_grad_(True)
        twin(x).logsumexp(1).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0

    copy = tmp_path / pte_int8.path.name
    copy.write_bytes(pte_int8.path.read_bytes())
    sidecar_path(copy).write_text(pte_int8.final.sidecar.read_text())
    with pytest.raises(TwinUnavailableError, match="student.int8.twin.onnx, is not beside it"):
        load_runner(copy).twin()
    twin_copy = copy.with_name("student.int8.twin.onnx")
    twin_copy.write_bytes(pte_int8.path.with_name("student.int8.twin.onnx").read_bytes() + b"\0")
    with pytest.raises(TwinUnavailableError, match="changed since student.int8.pte was exported"):
        load_runner(copy).twin()


@needs_executorch
def test_bench_times_the_pte_and_says_how_batches_were_split(pte_fp32, tmp_path):
    out = tmp_path / "bench.json"
    result = cli.invoke(app, ["bench", str(pte_fp32.path), "--batch", "1,4", "--iters", "5", "--warmup", "1",
                              "--warmup-seconds", "0", "--threads", "1", "--json", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    assert [(r["backend"], r["batch"], r["threads"]) for r in rows] == [("executorch", 1, 1), ("executorch", 4, 1)]
    assert rows[0]["provider"].startswith("XNNPACK (") and rows[0]["notes"] == [
        n for n in rows[0]["notes"] if "static-batch" not in n]
    assert "static-batch model (1): batch 4 runs as 4 call(s) of 1" in rows[1]["notes"]


@needs_executorch
def test_export_cli_prints_the_delegation(checkpoint, tmp_path):
    result = cli.invoke(app, ["export", str(checkpoint), "--format", "executorch", "--out", str(tmp_path),
                              "--parity-n", "16"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "student.pte" in result.output and "nodes delegated; outside it: none" in result.output
