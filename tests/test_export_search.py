"""export --precision int8 --search (ONNX, and .pte with --format executorch): a model whose default int8 fails on
purpose is rescued; a passing one costs one candidate; a gate nothing meets keeps the best under a failed-gate name
(exit 3); bad flags are one line (exit 2).

The failing model is function-preserving: one BatchNorm channel of a ridge-fitted smallcnn scaled up 100x and the
next convolution's weights for that channel scaled down 100x. The float model computes the same function, but the
per-tensor activation range of that layer grows 100x, so int8 rounds every other channel of it to a few levels.
"""

import json

import numpy as np
import onnx
import pytest
import torch
from fitted_models import outlier_model, ridge_fitted_smallcnn
from typer.testing import CliRunner

from rslad_edge.cli import app
from rslad_edge.data import load_sample, to_float
from rslad_edge.export import ExportConfig, export
from rslad_edge.export.precision import keep_float, quantizable_nodes, quantize_int8
from rslad_edge.export.search import SearchFailedError, fallback_counts, first_recipes
from rslad_edge.models import save_checkpoint
from rslad_edge.runtime import OnnxRunner
from rslad_edge.runtime.executorch_runner import MOBILE_EXTRA, executorch_missing
from rslad_edge.runtime.twin import OnnxTwin

runner = CliRunner()
# Small splits keep the test quick; the ridge-fitted model's own int8 agrees on ~95% of images, so the bar is 90%.
SEARCH = dict(precision="int8", search=True, calib_n=128, search_n=200, confirm_n=300, parity_n=1000,
              min_agreement=0.9)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    meta = {"dataset": "shapes", "eps": 8 / 255}
    plain = save_checkpoint(folder / "plain" / "student.pt", ridge_fitted_smallcnn(), "smallcnn", num_classes=10,
                            input_size=(32, 32), meta=meta)
    outlier = save_checkpoint(folder / "outlier" / "student.pt", outlier_model(), "smallcnn", num_classes=10,
                              input_size=(32, 32), meta=meta)
    return {"plain": plain, "outlier": outlier, "folder": folder}


def test_the_outlier_model_is_the_same_function():
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(outlier_model().eval()(x), ridge_fitted_smallcnn().eval()(x), atol=1e-4)


def test_keep_float_removes_the_rounding_of_that_layer_and_the_twin_follows(checkpoints, tmp_path):
    fp32 = export(ExportConfig(checkpoint=checkpoints["outlier"], out=tmp_path / "fp32")).onnx_path
    calib = to_float(load_sample("shapes", None, "train", 128, 0).read()).numpy()
    x = to_float(load_sample("shapes", None, "test", 256, 0).read()).numpy()
    quantize_int8(fp32, tmp_path / "q.onnx", calib, target="cpu", method="minmax", static_batch=None,
                  workdir=tmp_path, keep_activations=True)
    quantized, prepared = onnx.load(tmp_path / "q.onnx"), onnx.load(tmp_path / "prepared.onnx")
    layers = quantizable_nodes(quantized)
    assert len(layers) == 4  # the four convolutions; the classifier is float already

    reference = OnnxRunner(fp32).predict(x).argmax(1)
    agreement = {}
    for layer in [None, *layers]:
        model = quantized if layer is None else keep_float(quantized, prepared, [layer])
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, tmp_path / "k.onnx")
        logits = OnnxRunner(tmp_path / "k.onnx").predict(x)
        agreement[layer] = float((logits.argmax(1) == reference).mean())
        with torch.no_grad():
            twin = OnnxTwin(model).eval()(torch.from_numpy(x)).numpy()
        assert (twin.argmax(1) == logits.argmax(1)).mean() >= 0.99  # the twin emulates the rewritten graph
    assert agreement[None] < 0.5  # the default int8 fails: every layer rounded
    # Only the convolution after the outlier channel repairs it (that layer's input path back to the previous conv).
    assert agreement[layers[2]] > agreement[None] + 0.4
    assert max(agreement[layer] for layer in (layers[0], layers[1], layers[3])) < agreement[None] + 0.1
    everything = keep_float(quantized, prepared, layers)
    assert not any(node.op_type == "DequantizeLinear" and node.input[0].endswith("_quantized")
                   for node in everything.graph.node)  # no integer weight left


@pytest.mark.slow  # 40 s: seven candidates, then PGD through the twin on both splits
def test_search_rescues_the_outlier_model(checkpoints, tmp_path):
    # on this 4-layer toy a float layer between int8 ones costs more than int8 saves (14 vs 8.6 ms at batch 64):
    # the default --min-speedup 1 refuses such candidates, so the rescue is checked with any speed allowed
    result = export(ExportConfig(checkpoint=checkpoints["outlier"], out=tmp_path, **SEARCH, min_speedup=0))
    search = result.metadata["quantization"]["search"]
    chosen = search["candidates"][search["chosen"]]
    assert chosen["passed"] and chosen["recipe"]["float_nodes"], "rescued by a float layer, not a calibration"
    assert len(search["candidates"]) > len(first_recipes("cpu"))  # every all-int8 recipe was tried and failed first
    assert all(not c["passed"] for c in search["candidates"][: len(first_recipes("cpu"))])
    confirmation = chosen["confirmation"]
    assert confirmation["n"] == 300 and confirmation["agreement_ci95"][0] >= 0.9
    assert confirmation["drop_pp"] <= 1.0 + 1e-9
    assert search["sensitivity"][0][0] == "node_Conv_72"  # the conv that reads the outlier channel ranks first
    assert result.parity.agreement >= 0.9 and result.parity.passed  # and the usual parity check on test images
    assert result.metadata["quantization"]["float_nodes"][1:] == [
        f"{name} (fp32: chosen by the int8 search)" for name in chosen["recipe"]["float_nodes"]]
    assert json.loads((tmp_path / "student.int8.onnx.json").read_text())["quantization"]["search"] == search


def test_a_candidate_under_the_min_speedup_is_not_judged(checkpoints, tmp_path):
    """--min-speedup X: a candidate less than X times as fast as the fp32 ONNX at batch 64 is refused before any
    judging (here X is out of reach, so every candidate is), and nothing ships."""
    with pytest.raises(SearchFailedError, match="no int8 recipe passed"):
        export(ExportConfig(checkpoint=checkpoints["outlier"], out=tmp_path, **{**SEARCH, "search_budget": 2,
                                                                               "min_speedup": 100.0}))
    search = json.loads((tmp_path / "student.int8.failed-gate.onnx.json").read_text())["quantization"]["search"]
    assert len(search["candidates"]) == 2
    for candidate in search["candidates"]:
        assert candidate["search"] is None and "< --min-speedup 100" in candidate["verdict"]
        assert candidate["latency_ms"]["64"] > 0


@pytest.mark.slow  # 30 s: PGD through the twin on both splits
def test_a_model_that_passes_costs_one_candidate(checkpoints, tmp_path):
    result = export(ExportConfig(checkpoint=checkpoints["plain"], out=tmp_path, **{**SEARCH, "min_agreement": 0.8}))
    search = result.metadata["quantization"]["search"]
    assert len(search["candidates"]) == 1 and search["chosen"] == 0
    assert search["candidates"][0]["label"] == "minmax"
    assert search["candidates"][0]["confirmation"]["robust"] is not None  # judged on robustness too


def test_a_gate_nothing_meets_keeps_the_best_under_a_failed_gate_name(checkpoints, tmp_path):
    (tmp_path / "student.int8.onnx").write_text("stale")
    args = ["export", str(checkpoints["outlier"]), "--out", str(tmp_path), "--precision", "int8", "--search",
            "--search-budget", "2", "--calib-n", "128", "--search-n", "100", "--confirm-n", "100",
            "--min-agreement", "0.9"]
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    assert "no int8 recipe passed the gate in 2 candidate(s)" in result.output
    assert not (tmp_path / "student.int8.onnx").exists()  # the stale file went too
    kept = tmp_path / "student.int8.failed-gate.onnx"
    metadata = json.loads((tmp_path / "student.int8.failed-gate.onnx.json").read_text())
    assert metadata["gate"] == "failed" and len(metadata["quantization"]["search"]["candidates"]) == 2
    assert OnnxRunner(kept).predict(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 10)
    assert "search" in result.output and "agreement" in result.output  # the table was printed


@pytest.mark.parametrize("args, message, code", [
    (["--search"], "--search looks for an int8 recipe; --precision is fp32", 2),
    (["--search", "--precision", "fp16"], "--precision is fp16", 2),
    (["--search", "--precision", "int8", "--search-budget", "0"], "--search-budget must be at least 1", 2),
    (["--search", "--precision", "int8", "--eps", "8"], "write --eps 8/255", 1),
    (["--search", "--precision", "int8", "--min-speedup", "-1"], "--min-speedup is a ratio", 2),
])
def test_bad_search_flags_are_one_line(checkpoints, args, message, code):
    result = runner.invoke(app, ["export", str(checkpoints["plain"]), *args])
    assert result.exit_code == code, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_fallback_counts_double_and_never_take_all():
    """Every layer in float32 is the fp32 model with extra Q/DQ conversions: slower and no more exact."""
    assert list(fallback_counts(0)) == []
    assert list(fallback_counts(1)) == []
    assert list(fallback_counts(5)) == [1, 2, 4]
    assert list(fallback_counts(8)) == [1, 2, 4]
    assert list(fallback_counts(57)) == [1, 2, 4, 8, 16, 32]


def test_test_images_may_refute_a_searched_recipe_but_not_re_decide_it_near_the_bar():
    from rslad_edge.export.parity import compare_logits

    reference = np.eye(10, dtype=np.float32)[np.arange(256) % 10]
    labels = np.arange(256) % 10

    def agreeing(count, rule):
        candidate = reference.copy()
        candidate[count:] = np.roll(candidate[count:], 1, axis=1)  # the last 256 - count predictions differ
        return compare_logits(reference, candidate, labels, max_abs_diff=None, min_agreement=0.97, data="t",
                              agreement_rule=rule)

    assert not agreeing(245, "point").passed  # 95.7%: below the bar
    near = agreeing(245, "not contradicted")
    assert near.passed and 0.97 < near.agreement_high < 0.98  # its interval reaches 97%: not refuted
    refuted = agreeing(230, "not contradicted")  # 89.8%: the interval stops short of 97%
    assert not refuted.passed and "95% interval up to" in refuted.failures[0]


# --format executorch: the same search over .pte programs (PT2E with the XNNPACK quantizer; the mobile extra).
needs_executorch = pytest.mark.skipif(executorch_missing() is not None,
                                      reason=f"ExecuTorch is not installed (the mobile extra: {MOBILE_EXTRA})")


@needs_executorch
def test_a_pte_layer_left_in_float_is_what_its_twin_predicts_and_repairs_the_outlier(tmp_path):
    """The .pte's twin (its calibrated PT2E graph with fake quantization) emulates the program ExecuTorch runs; the
    group of the conv after the outlier channel takes in the conv, ReLU and MaxPool that make its input (else that
    input stays rounded by their annotation), and the twin's probe of that group predicts the program built with
    it in float."""
    from rslad_edge.export.executorch_export import fake_quantized, float_groups, layers_in_float, torch_to_pte
    from rslad_edge.runtime.executorch_runner import ExecuTorchRunner

    model = outlier_model().eval()
    calib = to_float(load_sample("shapes", None, "train", 128, 0).read()).numpy()
    x = to_float(load_sample("shapes", None, "test", 256, 0).read()).numpy()
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy().argmax(1)

    def run(float_nodes=()):
        program = torch_to_pte(model, (3, 32, 32), batch=1, precision="int8", calib_images=calib,
                               float_nodes=float_nodes)
        path = tmp_path / f"{len(float_nodes)}.pte"
        path.write_bytes(program.data)
        assert program.delegation["outside_nodes"] == {}  # float nodes run in XNNPACK too
        return ExecuTorchRunner(path).predict(x).argmax(1), fake_quantized(program.calibrated)

    default, twin = run()
    with torch.no_grad():
        assert (twin(torch.from_numpy(x)).numpy().argmax(1) == default).mean() >= 0.98
    assert (default == reference).mean() < 0.5  # the default int8 fails: the outlier's range rounds the rest
    groups = float_groups(twin)
    assert list(groups) == ["features.0", "features.3", "features.7", "features.11"]  # the classifier is float
    assert groups["features.0"] == ("conv2d",)  # reads the graph's input
    assert groups["features.7"] == ("conv2d_2", "max_pool2d", "relu_1", "conv2d_1")
    with torch.no_grad(), layers_in_float(twin, groups["features.7"]) as probe:
        predicted = probe(torch.from_numpy(x)).numpy().argmax(1)
    rescued, _ = run(groups["features.7"])
    assert (predicted == rescued).mean() >= 0.95
    assert (rescued == reference).mean() > (default == reference).mean() + 0.4


@needs_executorch
@pytest.mark.slow  # 50 s: four programs lowered, PGD through the twin on both splits
def test_search_rescues_the_outlier_model_as_a_pte(checkpoints, tmp_path):
    result = export(ExportConfig(checkpoint=checkpoints["outlier"], out=tmp_path, format="executorch", **SEARCH,
                                 min_speedup=0))
    search = result.metadata["quantization"]["search"]
    assert search["format"] == "executorch"
    chosen = search["candidates"][search["chosen"]]
    assert [c["label"] for c in search["candidates"][:3]] == ["minmax", "histogram", "minmax per-tensor"]
    assert chosen["passed"] and chosen["recipe"]["float_nodes"] == ["features.7"]
    assert search["sensitivity"][0][0] == "features.7"
    assert chosen["confirmation"]["twin_agreement"] >= 0.95  # judged white-box through its twin too
    assert result.parity.passed and result.parity.agreement >= 0.9
    assert result.path.name == "student.int8.pte"
    assert result.metadata["quantization"]["float_nodes"][1].startswith("features.7 (fp32, graph nodes conv2d_2")
    assert json.loads((tmp_path / "student.int8.pte.json").read_text())["quantization"]["search"] == search


@needs_executorch
def test_a_pte_gate_nothing_meets_keeps_the_best_under_a_failed_gate_name(checkpoints, tmp_path):
    (tmp_path / "student.int8.pte").write_text("stale")
    args = ["export", str(checkpoints["outlier"]), "--out", str(tmp_path), "--format", "executorch", "--precision",
            "int8", "--search", "--search-budget", "1", "--calib-n", "128", "--search-n", "100", "--confirm-n", "100",
            "--min-agreement", "0.9"]
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    assert "no int8 recipe passed the gate in 1 candidate(s)" in result.output
    assert not (tmp_path / "student.int8.pte").exists()
    metadata = json.loads((tmp_path / "student.int8.failed-gate.pte.json").read_text())
    assert metadata["gate"] == "failed" and metadata["quantization"]["search"]["format"] == "executorch"
    from rslad_edge.runtime.executorch_runner import ExecuTorchRunner

    kept = ExecuTorchRunner(tmp_path / "student.int8.failed-gate.pte")
    assert kept.predict(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 10)
    assert metadata["twin_onnx"] == "student.int8.failed-gate.twin.onnx"  # the kept program can be verified
    images = np.random.default_rng(0).random((16, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        twin_logits = kept.twin()(torch.from_numpy(images)).numpy()
    assert (twin_logits.argmax(1) == kept.predict(images).argmax(1)).mean() >= 0.9


@needs_executorch
@pytest.mark.slow  # 60 s: three programs, then one QAT epoch lowered
def test_a_pte_search_tries_qat_after_the_all_int8_recipes(checkpoints, tmp_path):
    budget = len(first_recipes("executorch")) + 1
    args = ["export", str(checkpoints["outlier"]), "--out", str(tmp_path), "--format", "executorch", "--precision",
            "int8", "--search", "--search-budget", str(budget), "--calib-n", "128", "--search-n", "100",
            "--confirm-n", "100", "--qat-epochs", "1", "--qat-n", "256", "--qat-alpha", "0", "--min-agreement", "0.99",
            "--min-speedup", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output  # a bar this toy's int8 does not reach
    search = json.loads((tmp_path / "student.int8.failed-gate.pte.json").read_text())["quantization"]["search"]
    *first, qat = search["candidates"]
    best = max(first, key=lambda c: c["search"]["agreement"])
    assert len(search["candidates"]) == budget and qat["label"] == f"{best['label']} +QAT 1 ep"
    assert qat["qat"]["history"][0]["epoch"] == 1 and qat["search"]["agreement"] > best["search"]["agreement"]
    assert (tmp_path / ".student.int8.pte.qat" / "state.pt").is_file()  # kept: more epochs continue from it


def test_the_speed_gate_times_the_candidate_and_the_fp32_model_in_turn():
    """A machine that slows down midway (another process starts) slows both alike: the ratio the gate decides on
    holds (timed one after the other, the slower half would fall on one model only)."""
    import time

    from rslad_edge.export.search import PAIRED_ITERS, PAIRED_ROUNDS, _paired_latency

    calls = []

    class Sleeper:
        def __init__(self, name, ms):
            self.name, self.ms = name, ms

        def predict(self, x):
            calls.append(self.name)
            time.sleep(self.ms * (3 if len(calls) > 2 * (PAIRED_ITERS + 1) else 1) / 1000)

    int8_ms, fp32_ms = _paired_latency(Sleeper("int8", 4), Sleeper("fp32", 8), np.zeros((2, 3, 8, 8), np.float32), 4)
    assert 1.7 < fp32_ms / int8_ms < 2.4, (int8_ms, fp32_ms)
    block = PAIRED_ITERS + 1  # the warm-up call, then the timed ones
    assert calls == (["int8"] * block + ["fp32"] * block) * PAIRED_ROUNDS
