"""Quantization-aware training of the exported int8 graph (export --search --qat-epochs): it trains exactly the graph
ONNX Runtime runs, brings a broken int8 model closer to its float model, resumes where it stopped, and takes its
place in the int8 search after the all-int8 recipes.

The model is the outlier smallcnn of the search tests: one BatchNorm channel 100x larger (and the next convolution
100x smaller for it), the same function in float, whose default int8 agrees with it on about a quarter of images.
"""

import json
import logging

import numpy as np
import onnx
import pytest
import torch
from fitted_models import outlier_model
from onnx import numpy_helper
from typer.testing import CliRunner

from rslad_edge.cli import app
from rslad_edge.data import load_sample, to_float
from rslad_edge.errors import TrainingInterrupted
from rslad_edge.export import ExportConfig, export
from rslad_edge.export.precision import quantize_int8
from rslad_edge.export.qat import QatSettings, train_int8
from rslad_edge.export.search import first_recipes
from rslad_edge.models import save_checkpoint
from rslad_edge.runtime import OnnxRunner
from rslad_edge.runtime.executorch_runner import MOBILE_EXTRA, executorch_missing
from rslad_edge.runtime.twin import OnnxTwin

runner = CliRunner()


@pytest.fixture(scope="module")
def broken_int8(tmp_path_factory):
    """The outlier model, its checkpoint, its default int8 graph, training images and a held-out judging split."""
    folder = tmp_path_factory.mktemp("qat")
    model = outlier_model().eval()
    checkpoint = save_checkpoint(folder / "student.pt", model, "smallcnn", num_classes=10, input_size=(32, 32),
                                 meta={"dataset": "shapes", "eps": 8 / 255})
    fp32 = export(ExportConfig(checkpoint=checkpoint, out=folder / "fp32")).onnx_path
    train = to_float(load_sample("shapes", None, "train", 1024, 0).read()).numpy()
    quantize_int8(fp32, folder / "int8.onnx", train[:128], target="cpu", method="minmax", static_batch=None,
                  workdir=folder)
    judge = train[128:428]
    with torch.no_grad():
        predictions = model(torch.from_numpy(judge)).argmax(1).numpy()
    return {"model": model, "checkpoint": checkpoint, "int8": folder / "int8.onnx", "images": train[428:],
            "judge": (judge, predictions)}


def _agreement(path, judge) -> float:
    images, predictions = judge
    return float((OnnxRunner(path).predict(images).argmax(1) == predictions).mean())


def test_qat_trains_the_int8_graph_toward_the_float_model_and_onnx_runtime_runs_what_it_learned(broken_int8, tmp_path):
    settings = QatSettings(epochs=2, alpha=0.0, scale_lr=0.0)  # the calibrated activation ranges kept
    result = train_int8(broken_int8["int8"], broken_int8["model"], broken_int8["images"], broken_int8["judge"],
                        settings, tmp_path / "state")
    before, after = _agreement(broken_int8["int8"], broken_int8["judge"]), _agreement(result.path,
                                                                                      broken_int8["judge"])
    assert [entry["epoch"] for entry in result.history] == [1, 2]
    assert after == result.history[result.best_epoch - 1]["search_agreement"]
    assert after >= before + 0.05, (before, after)  # the broken int8 moved toward its float model
    base, trained = onnx.load(broken_int8["int8"]), onnx.load(result.path)
    original = {i.name: numpy_helper.to_array(i) for i in base.graph.initializer}
    written = {i.name: numpy_helper.to_array(i) for i in trained.graph.initializer}
    assert written.keys() == original.keys()
    assert [n.op_type for n in trained.graph.node] == [n.op_type for n in base.graph.node]  # the same graph
    scales = {name for node in base.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
              for name in node.input[1:3]}
    assert all(np.array_equal(written[name], original[name]) for name in scales & written.keys())  # same grid
    assert any(not np.array_equal(written[name], original[name]) for name in written if written[name].dtype == np.int8)
    images = torch.from_numpy(broken_int8["judge"][0])
    with torch.no_grad():
        twin = OnnxTwin(trained)(images).numpy()
    assert (twin.argmax(1) == OnnxRunner(result.path).predict(images.numpy()).argmax(1)).mean() >= 0.99


def test_qat_learns_activation_scales_and_keeps_each_bias_on_its_layers_grid(broken_int8, tmp_path):
    """LSQ (the default): activation scales move; every int32 bias stays on input scale x weight scale, exactly in
    float32, as ONNX Runtime's int8 kernels assume; zero points and weight scales do not move."""
    result = train_int8(broken_int8["int8"], broken_int8["model"], broken_int8["images"], broken_int8["judge"],
                        QatSettings(epochs=2, alpha=0.0), tmp_path / "state")
    before, after = _agreement(broken_int8["int8"], broken_int8["judge"]), _agreement(result.path,
                                                                                      broken_int8["judge"])
    assert after >= before + 0.05, (before, after)
    base, trained = onnx.load(broken_int8["int8"]), onnx.load(result.path)
    original = {i.name: numpy_helper.to_array(i) for i in base.graph.initializer}
    written = {i.name: numpy_helper.to_array(i) for i in trained.graph.initializer}
    activation_scales = {node.input[1] for node in base.graph.node if node.op_type == "QuantizeLinear"}
    assert any(not np.array_equal(written[name], original[name]) for name in activation_scales)
    zero_points = {node.input[2] for node in base.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert all(np.array_equal(written[name], original[name]) for name in zero_points)
    producers = {output: node for node in trained.graph.node for output in node.output}
    layers = [node for node in trained.graph.node if node.op_type == "Conv"]
    assert layers
    for layer in layers:
        x_scale, w_scale, b_scale = (producers[name].input[1] for name in layer.input[:3])
        assert np.array_equal(written[w_scale], original[w_scale])
        assert np.array_equal(written[b_scale], (written[x_scale] * written[w_scale]).astype(np.float32)), layer.name
    images = torch.from_numpy(broken_int8["judge"][0])
    with torch.no_grad():
        twin = OnnxTwin(trained)(images).numpy()
    assert (twin.argmax(1) == OnnxRunner(result.path).predict(images.numpy()).argmax(1)).mean() >= 0.99


def test_qat_with_pgd_inside_trains_too(broken_int8, tmp_path):
    """RSLAD's form (the default): an adversarial term crafted by PGD through the int8 graph's twin."""
    images = broken_int8["images"][:128]
    result = train_int8(broken_int8["int8"], broken_int8["model"], images, broken_int8["judge"],
                        QatSettings(epochs=1, attack_steps=2), tmp_path / "state")
    assert result.history[0]["loss"] > 0 and np.isfinite(result.history[0]["loss"])
    assert _agreement(result.path, broken_int8["judge"]) == result.history[0]["search_agreement"]


def test_qat_stopped_by_ctrl_c_resumes_after_the_last_finished_epoch_and_ends_where_an_uninterrupted_run_does(
        broken_int8, tmp_path, monkeypatch):
    images, settings = broken_int8["images"][:256], QatSettings(epochs=2, alpha=0.0)  # 4 steps per epoch
    args = (broken_int8["int8"], broken_int8["model"], images, broken_int8["judge"], settings)
    straight = train_int8(*args, tmp_path / "straight")
    steps, step = [], torch.optim.SGD.step

    def interrupted(self, *a, **k):
        steps.append(1)
        if len(steps) == 6:  # Ctrl-C in the middle of epoch 2
            raise KeyboardInterrupt
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", interrupted)
    with pytest.raises(TrainingInterrupted, match="interrupted in epoch 2; epoch 1 saved in"):
        train_int8(*args, tmp_path / "stopped")
    monkeypatch.undo()
    resumed = train_int8(*args, tmp_path / "stopped")
    assert resumed.resumed_from == 1
    assert [h["search_agreement"] for h in resumed.history] == [h["search_agreement"] for h in straight.history]
    weights = [torch.load(folder / "state.pt", weights_only=True)["twin"] for folder in
               (tmp_path / "straight", tmp_path / "stopped")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    more = train_int8(*args[:-1], QatSettings(epochs=3, alpha=0.0), tmp_path / "stopped")  # more epochs: trains on
    assert more.resumed_from == 2 and [h["epoch"] for h in more.history] == [1, 2, 3]


def test_a_state_saved_for_other_settings_is_not_resumed(broken_int8, tmp_path, caplog):
    images = broken_int8["images"][:128]
    args = (broken_int8["int8"], broken_int8["model"], images, broken_int8["judge"])
    train_int8(*args, QatSettings(epochs=1, alpha=0.0), tmp_path)
    with caplog.at_level(logging.WARNING, logger="rslad_edge.export.qat"):
        again = train_int8(*args, QatSettings(epochs=1, alpha=0.0, lr=1e-3), tmp_path)
    assert again.resumed_from == 0 and "lr changed" in caplog.text
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="rslad_edge.export.qat"):
        assert train_int8(*args, QatSettings(epochs=1, alpha=0.0, lr=1e-3), tmp_path).resumed_from == 0
    assert "cannot read" in caplog.text


@pytest.mark.slow  # 20 s: five all-int8 recipes, then QAT
def test_the_search_tries_qat_after_the_all_int8_recipes_and_keeps_its_state_when_nothing_passes(broken_int8,
                                                                                                 tmp_path):
    budget = len(first_recipes("cpu")) + 1
    args = ["export", str(broken_int8["checkpoint"]), "--out", str(tmp_path), "--precision", "int8", "--search",
            "--search-budget", str(budget), "--calib-n", "128", "--search-n", "100", "--confirm-n", "100",
            "--qat-epochs", "1", "--qat-n", "128", "--qat-alpha", "0", "--min-agreement", "0.9",
            "--min-speedup", "0"]  # every candidate judged: on this toy a busy machine's timings may rank them
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    metadata = json.loads((tmp_path / "student.int8.failed-gate.onnx.json").read_text())
    candidates = metadata["quantization"]["search"]["candidates"]
    first, qat = candidates[:-1], candidates[-1]
    best = max(first, key=lambda c: c["search"]["agreement"])  # QAT trains the best all-int8 recipe's graph
    assert len(candidates) == budget and qat["label"] == f"{best['label']} +QAT 1 ep"
    assert qat["recipe"]["qat_epochs"] == 1 and not qat["recipe"]["float_nodes"]
    assert "+QAT 1 ep" in result.output  # in the printed table
    state = tmp_path / ".student.int8.onnx.qat"
    assert (state / "state.pt").is_file()  # kept: the same command with more epochs continues from it


@pytest.mark.parametrize("args, message", [
    (["--precision", "int8", "--qat-epochs", "2"], "--qat-epochs trains a candidate of the int8 search: add --search"),
    (["--precision", "int8", "--search", "--qat-epochs", "2", "--qat-alpha", "5"], "--qat-alpha is a weight in [0, 1]"),
    (["--precision", "int8", "--search", "--qat-epochs", "-1"], "--qat-epochs must be >= 0"),
    (["--precision", "int8", "--search", "--qat-epochs", "1", "--qat-lr", "0"], "--qat-lr must be > 0"),
])
def test_bad_qat_flags_are_one_line(broken_int8, args, message):
    result = runner.invoke(app, ["export", str(broken_int8["checkpoint"]), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.slow  # 15 s
def test_a_qat_candidate_that_passes_ships_with_its_training_recorded_and_its_state_removed(
        broken_int8, tmp_path, monkeypatch):
    """With only the default recipe to try (the others patched away) and a bar between what it and its QAT reach, the
    QAT candidate ships: its graph under the final name, its epochs in the sidecar, the state folder gone."""
    from rslad_edge.export import search as search_module

    monkeypatch.setattr(search_module, "first_recipes", lambda target: [search_module.Recipe()])
    result = export(ExportConfig(checkpoint=broken_int8["checkpoint"], out=tmp_path, precision="int8", search=True,
                                 calib_n=128, search_n=200, confirm_n=300, qat_epochs=3, qat_n=512, qat_alpha=0.0,
                                 min_agreement=0.3, max_drop=100.0, parity_n=256))
    search = result.metadata["quantization"]["search"]
    minmax, qat = search["candidates"]
    assert not minmax["passed"] and minmax["search"]["agreement"] < 0.3
    assert qat["passed"] and search["chosen"] == 1 and qat["label"] == "minmax +QAT 3 ep"
    assert qat["confirmation"]["agreement_ci95"][0] >= 0.3
    assert [entry["epoch"] for entry in qat["qat"]["history"]] == [1, 2, 3]
    assert result.metadata["quantization"]["qat"]["best_epoch"] == qat["qat"]["best_epoch"]
    assert not (tmp_path / ".student.int8.onnx.qat").exists()


needs_executorch = pytest.mark.skipif(executorch_missing() is not None,
                                      reason=f"ExecuTorch is not installed (the mobile extra: {MOBILE_EXTRA})")


@needs_executorch
@pytest.mark.slow  # 60 s: two epochs, each lowered to a .pte and run by ExecuTorch
def test_qat_of_a_pte_trains_its_pt2e_graph_and_executorch_runs_what_it_learned(broken_int8, tmp_path):
    """The same training on a .pte candidate: PT2E's QAT graph of the outlier model (its ranges from the
    calibration images, then tracked), each epoch lowered and judged on ExecuTorch's runtime; the trained graph with
    its conversion made differentiable (the candidate's twin) predicts what the program does."""
    from rslad_edge.export.executorch_export import QatProgram
    from rslad_edge.export.qat import train_graph
    from rslad_edge.runtime.executorch_runner import ExecuTorchRunner

    images, predictions = broken_int8["judge"]
    graph = QatProgram(broken_int8["model"], (3, 32, 32), broken_int8["images"][:128], batch=1)
    before_path = tmp_path / "before.pte"
    graph.write(before_path)
    before = float((ExecuTorchRunner(before_path).predict(images).argmax(1) == predictions).mean())
    result = train_graph(graph, broken_int8["model"], broken_int8["images"], broken_int8["judge"],
                         QatSettings(epochs=2, alpha=0.0), tmp_path / "state")
    assert result.path.suffix == ".pte" and [entry["epoch"] for entry in result.history] == [1, 2]
    trained = ExecuTorchRunner(result.path).predict(images)
    after = float((trained.argmax(1) == predictions).mean())
    assert after == result.history[result.best_epoch - 1]["search_agreement"]
    assert after >= before + 0.05, (before, after)
    with torch.no_grad():
        twin = graph.twin()(torch.from_numpy(images)).numpy()
    assert (twin.argmax(1) == trained.argmax(1)).mean() >= 0.97  # this model is chaotic: 98-99% here
