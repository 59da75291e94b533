"""Verify: which attacks run against what, per-sample worst case, drops and the gate, sanity checks, bad input, CLI.

Real models on the synthetic ``shapes`` data, offline: a smallcnn whose classifier is fitted by ridge regression on
random features (~40 % clean in 2 s, small margins), its real fp32 and int8 ONNX exports (``tiny_exports``), and
small budgets (eps 1/255, tens of Square queries) so that accuracies land between 0 and clean and every figure can
move.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_support import tiny_onnx
from fitted_models import ridge_fitted_smallcnn
from typer.testing import CliRunner

from rslad_edge.bench.accuracy import find_accuracies
from rslad_edge.cli import app
from rslad_edge.errors import ConfigError, DatasetError, GateFailedError
from rslad_edge.io import sha256_file
from rslad_edge.models import save_checkpoint
from rslad_edge.runtime import OnnxTwin, load_runner
from rslad_edge.verify import (
    CHECKPOINT_DEFAULT_ATTACKS,
    ArtifactInfo,
    ModelResult,
    VerifyConfig,
    VerifyReport,
    as_model,
    load_verify_images,
    parse_attacks,
    verify,
)

EPS = 1 / 255  # small enough that the weak test model keeps some robust samples
QUERIES = 40
# Everything but AutoAttack (its own test below): the columns every artifact faces.
SUITE = ["fgsm", "pgd_sat", "pgd_trades", "cw", "transfer_pgd", "transfer_cw", "divergence", "square"]
N = 48
cli = CliRunner()

ISSUE_KEYS = {"artifact", "sha256", "backend", "provider", "precision", "n", "eps", "seed", "clean_acc", "robust_acc",
              "worst_case_acc", "reference", "seconds", "queries"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these models are tiny, and a second thread only contends with whatever else runs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def files(tiny_exports, tmp_path_factory) -> dict[str, Path]:
    """student.pt (rslad-edge checkpoint), its fp32 and int8 ONNX exports, an unrelated tiny ONNX model (another
    architecture), and the fp32 export of a weaker smallcnn (same architecture, scrambled classifier)."""
    from rslad_edge.export import ExportConfig, export

    folder = tmp_path_factory.mktemp("verify")
    weak = ridge_fitted_smallcnn()
    torch.nn.init.normal_(weak.linear.weight, std=0.1)  # a different model: mostly wrong, with the same layers
    weak_checkpoint = save_checkpoint(folder / "weak.pt", weak, "smallcnn", num_classes=10,
        input_size=(32, 32), meta={"dataset": "shapes"})
    weak_onnx = export(ExportConfig(checkpoint=weak_checkpoint, out=folder / "weak", parity_n=32)).onnx_path
    return {"pt": tiny_exports["pt"], "onnx": tiny_exports["fp32"], "int8": tiny_exports["int8"],
            "other": tiny_onnx(folder / "other.onnx"), "weak": weak_onnx}


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    from rslad_edge.data import load_dataset, subset, to_float

    test = subset(load_dataset("shapes", None, "test", seed=0), N, seed=0)
    return to_float(test.images), test.labels


@pytest.fixture(scope="module")
def runners(files) -> dict:
    onnx_files = {key: load_runner(files[key], "cpu", threads=1) for key in ("onnx", "int8", "other")}
    return {"pt": load_runner(files["pt"], "cpu"), **onnx_files}


class RecordingRunner:
    """Wraps a Runner and records the batch size of every predict call (what reaches the runtime)."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.calls: list[int] = []
        for name in ("backend", "provider", "precision", "input_shape", "num_classes", "path"):
            setattr(self, name, getattr(runner, name))
        self.metadata = dict(getattr(runner, "metadata", {}))

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(len(x))
        return self.runner.predict(x)

    def twin(self) -> OnnxTwin:
        return self.runner.twin()


def _text(output: str) -> str:
    """CLI output with Rich's borders and line wrapping removed."""
    return " ".join(output.replace("│", " ").split())


# --------------------------------------------------------------------------------------------- what runs on what


def test_an_export_faces_the_checkpoints_white_box_columns_through_its_twin_judged_by_itself(runners, images):
    x, y = images
    recording = RecordingRunner(runners["onnx"])
    report = verify(recording, x, y, reference=runners["pt"], attacks=SUITE, eps=EPS, square_queries=QUERIES)
    assert report.attacks == SUITE and report.artifact.gradients == "twin"
    assert report.artifact.twin.agreement == 1.0 and report.artifact.twin.n == N and report.artifact.twin.trusted
    assert 0 < report.clean_acc == report.reference.clean_acc
    one_sample = 100 / N
    for row in report.rows:  # the same function in two runtimes: drops within one sample, never noise-sized
        if row in ("transfer_pgd", "transfer_cw", "divergence"):  # crafted on the reference: not a column of it
            assert report.drop_pp(row) is None and report.accuracy(row, reference=True) is None
        else:
            assert abs(report.drop_pp(row)) <= one_sample + 1e-6, (row, report.drop_pp(row))
    # Crafted on the twin, judged by the artifact's runtime: every white-box batch of images reached ONNX Runtime.
    correct = round(report.clean_acc * N)
    assert recording.calls.count(correct) >= 4  # fgsm, pgd_sat, pgd_trades, cw: one call each (batch 256 > N)
    assert report.robust_acc["pgd_sat"] < report.clean_acc
    assert report.robust_acc["transfer_pgd"] < report.clean_acc
    assert report.artifact.per_source["transfer_pgd"] == {"student.pt": report.robust_acc["transfer_pgd"]}
    square = report.artifact.queries["square"]
    assert square.attacked == correct and 0 < square.total <= square.attacked * QUERIES
    assert square.per_second > 0 and 0 < square.runtime_seconds <= square.seconds
    record = report.to_json()
    assert record["gradients"] == "twin" and record["twin"]["trusted"] and record["twin_unavailable"] is None
    assert record["attack_details"]["pgd_sat"]["artifact_gradients"] == "twin"
    assert record["attack_details"]["pgd_sat"]["judged_by"] == "onnxruntime (CPUExecutionProvider)"
    assert record["divergence"]["both_correct"] == correct  # same function: both right on the same images
    assert report.warnings == []


def test_the_worst_case_drop_is_the_checkpoints_worst_case_minus_the_artifacts(runners, images):
    """The reference faces what the checkpoint faces on its own, so its worst case equals the checkpoint's own
    verify on the same images; the drop of the worst case is measured against that."""
    x, y = images
    attacks = ["fgsm", "pgd_sat", "transfer_pgd", "divergence", "square"]
    report = verify(runners["int8"], x, y, reference=runners["pt"], attacks=attacks, eps=EPS, square_queries=QUERIES)
    alone = verify(runners["pt"], x, y, attacks=["fgsm", "pgd_sat", "square"], eps=EPS, square_queries=QUERIES)
    assert torch.equal(report.reference.worst_case_correct, alone.artifact.worst_case_correct)
    expected = 100 * (alone.worst_case_acc - report.worst_case_acc)
    assert report.drop_pp("worst_case") == pytest.approx(expected)
    assert set(report.reference.robust_acc) == {"fgsm", "pgd_sat", "square"}
    assert report.artifact.gradients == "twin" and report.artifact.twin.agreement >= 0.99


class CountingModule(torch.nn.Module):
    """Wraps a model and counts its forward calls (each one an attack step or a judgment)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


def test_a_reference_measured_before_is_not_attacked_again_and_gives_the_same_columns(runners, images):
    """The pipeline passes the checkpoint's own row to each export's verify: its white-box and Square columns are
    taken, not re-run (the reference's forward calls drop to the clean pass and transfer crafting), and every figure
    equals a fresh run's."""
    x, y = images
    attacks, queries = ["pgd_sat", "transfer_pgd", "square"], 10
    torch_model = runners["pt"].model
    alone = verify(torch_model, x, y, attacks=["pgd_sat", "square"], eps=EPS, square_queries=queries)
    fresh_ref, reused_ref = CountingModule(torch_model), CountingModule(torch_model)
    fresh = verify(runners["int8"], x, y, reference=fresh_ref, attacks=attacks, eps=EPS, square_queries=queries)
    reused = verify(runners["int8"], x, y, reference=reused_ref, attacks=attacks, eps=EPS, square_queries=queries,
                    reference_measured=alone.artifact)
    for name in ("pgd_sat", "square"):
        assert torch.equal(reused.reference.robust_correct[name], fresh.reference.robust_correct[name])
    assert reused.reference.queries["square"].total == fresh.reference.queries["square"].total
    assert reused.drop_pp("worst_case") == fresh.drop_pp("worst_case")
    assert torch.equal(reused.artifact.worst_case_correct, fresh.artifact.worst_case_correct)
    assert reused_ref.calls < fresh_ref.calls - queries  # Square alone queries it `queries` times when fresh
    assert any("pgd_sat, square taken from its own verify" in note for note in reused.notes)
    other = verify(torch_model, x[: N // 2], y[: N // 2], attacks=["pgd_sat"], eps=EPS)
    with pytest.raises(ValueError, match="measured on other images"):
        verify(runners["int8"], x[N // 2:], y[N // 2:], reference=torch_model, attacks=["pgd_sat"], eps=EPS,
               reference_measured=other.artifact)


def test_checkpoint_gets_the_white_box_suite_and_a_robust_sample_is_always_clean_correct(runners, images):
    x, y = images
    report = verify(runners["pt"], x, y, eps=EPS, batch_size=32, square_queries=10)  # two attacked batches at most
    assert report.attacks == list(CHECKPOINT_DEFAULT_ATTACKS) and report.reference is None
    result = report.artifact
    for name, flags in result.robust_correct.items():
        assert not (flags & ~result.clean_correct).any(), name
        if name != "square":  # Square at 10 queries and 1/255 may fool nothing; every gradient attack fools some
            assert report.robust_acc[name] < report.clean_acc, name
    assert report.robust_acc["autoattack"] <= report.robust_acc["pgd_sat"]
    expected_worst = result.clean_correct & torch.stack(list(result.robust_correct.values())).all(dim=0)
    assert torch.equal(result.worst_case_correct, expected_worst)


def _result(clean: list[int], **attacks: list[int]) -> ModelResult:
    info = ArtifactInfo("a.onnx", "0" * 64, "onnxruntime", "CPUExecutionProvider", "int8")
    return ModelResult(info, torch.tensor(clean, dtype=torch.bool),
                       {name: torch.tensor(flags, dtype=torch.bool) for name, flags in attacks.items()})


def test_worst_case_is_the_per_sample_and_not_the_lowest_attack():
    result = _result([1, 1, 1, 1], transfer_pgd=[1, 1, 0, 0], square=[1, 0, 1, 0])
    assert result.robust_acc == {"transfer_pgd": 0.5, "square": 0.5}
    assert result.worst_case_acc == 0.25  # only the first sample survives both


def test_the_gate_holds_the_artifacts_worst_case_to_the_checkpoints_worst_case():
    # The artifact faced a transfer attack the reference did not (crafted on the reference itself): it has no drop
    # of its own, but it lowers the artifact's worst case, which the gate holds to the checkpoint's.
    artifact = _result([1] * 10, pgd_sat=[1] * 6 + [0] * 4, transfer_pgd=[0] * 3 + [1] * 7)
    reference = _result([1] * 10, pgd_sat=[1] * 6 + [0] * 4)
    report = VerifyReport(artifact, reference, ["pgd_sat", "transfer_pgd"], n=10, eps=EPS, seed=0)
    assert report.drop_pp("pgd_sat") == 0 and report.drop_pp("transfer_pgd") is None
    assert report.drop_pp("worst_case") == pytest.approx(30)  # 60 % (checkpoint) - 30 % (artifact)
    assert report.gate_failures(5) == ["worst_case"]
    assert report.to_json()["drop_pp"]["transfer_pgd"] is None


def test_gate_names_each_attack_beyond_the_bound_and_passes_within():
    artifact = _result([1] * 10, transfer_pgd=[1] * 6 + [0] * 4, square=[1] * 3 + [0] * 7)
    reference = _result([1] * 10, transfer_pgd=[1] * 6 + [0] * 4, square=[1] * 6 + [0] * 4)
    report = VerifyReport(artifact, reference, ["transfer_pgd", "square"], n=10, eps=EPS, seed=0)
    assert report.drop_pp("square") == pytest.approx(30) and report.drop_pp("transfer_pgd") == 0
    with pytest.raises(GateFailedError, match="square 60.0% -> 30.0%") as failure:
        report.check_gate(5)
    assert failure.value.exit_code == 3 and "transfer_pgd" not in str(failure.value)
    assert report.gate_failures(5) == ["square", "worst_case"]
    report.check_gate(30)  # a drop equal to the bound is within it
    report.check_gate(None)
    assert report.drop_ci95_pp("square") > 0 and report.drop_ci95_pp("transfer_pgd") == 0


def test_transfer_and_square_send_whole_arrays_to_the_runtime_and_several_sources_are_anded(runners, images, files):
    x, y = images
    recording = RecordingRunner(runners["onnx"])
    other_source = ridge_fitted_smallcnn()
    torch.nn.init.normal_(other_source.linear.weight, std=0.1)  # a different model: its examples transfer less
    report = verify(recording, x, y, attacks="transfer_pgd,square", reference=runners["pt"],
                    sources=[runners["pt"], other_source], eps=EPS, square_queries=QUERIES)
    correct = round(report.clean_acc * N)
    needed = int((report.artifact.clean_correct | report.reference.clean_correct).sum())
    assert recording.calls[0] == N  # the clean pass
    assert recording.calls[1:3] == [needed, needed]  # one call per transfer source, every crafted image at once
    assert recording.calls[3] == correct  # Square's first query: every clean-correct image in one call
    per_source = report.artifact.per_source["transfer_pgd"]
    assert list(per_source) == ["student.pt", "SmallCNN"]
    assert report.robust_acc["transfer_pgd"] <= min(per_source.values())
    crafted_on = report.to_json()["attack_details"]["transfer_pgd"]["crafted_on"]  # each source named, with its role
    assert [(s["label"], s["role"], s["sha256"]) for s in crafted_on] == [
        ("student.pt", "reference", sha256_file(files["pt"])), ("SmallCNN", "source", None)]
    assert set(report.to_json()["robust_acc"]) == {"transfer_pgd", "square"}  # the columns keep their names


def test_artifact_and_reference_each_own_their_result_even_when_they_are_the_same_model(images):
    x, y = images
    model = as_model(ridge_fitted_smallcnn())
    report = verify(model, x, y, reference=model, attacks="fgsm,square", eps=2 / 255, square_queries=10)
    assert report.artifact is not report.reference  # one result per measured role, not one per model identity
    assert report.robust_acc == report.reference.robust_acc and report.drop_pp("square") == 0
    assert report.artifact.robust_correct["square"] is not report.reference.robust_correct["square"]


# --------------------------------------------------------------------------------------------- sanity checks


def test_probability_outputs_are_flagged_by_verify_and_by_autoattack_in_the_report(images):
    x, y = images
    model = torch.nn.Sequential(ridge_fitted_smallcnn(), torch.nn.Softmax(dim=1))
    report = verify(model, x[:16], y[:16], attacks=["autoattack"], eps=EPS)
    assert any("look like probabilities" in warning for warning in report.warnings)
    assert any("AutoAttack: it seems that the output is a probability" in warning for warning in report.warnings)
    assert report.to_json()["warnings"] == report.warnings


class RoundInput(torch.nn.Module):
    """Quantizes the input to 1/8 steps: a zero gradient everywhere, the textbook gradient masking."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 8) / 8


def test_masked_gradients_show_as_zero_gradients_and_square_beating_white_box(images):
    x, y = images
    model = torch.nn.Sequential(RoundInput(), ridge_fitted_smallcnn())
    report = verify(model, x, y, attacks=["fgsm", "square"], eps=8 / 255, square_queries=60)
    assert report.robust_acc["fgsm"] == report.clean_acc  # FGSM cannot move: sign(0) = 0
    assert report.robust_acc["square"] < report.clean_acc
    assert any("all-zero input gradient" in warning for warning in report.warnings)
    assert any("square" in warning and "gradient masking" in warning for warning in report.warnings)


# --------------------------------------------------------------------------------------------- bad input


def test_an_artifact_with_an_op_the_twin_cannot_emulate_skips_white_box_with_one_warning(runners, images, tmp_path):
    import onnx

    model = onnx.load(str(tiny_onnx(tmp_path / "leaky.onnx")))
    model.graph.node[1].op_type = "LeakyRelu"  # an op rslad-edge never exports
    model.graph.node[1].name = "act"
    onnx.save(model, str(tmp_path / "leaky.onnx"))
    x, y = images
    report = verify(load_runner(tmp_path / "leaky.onnx", "cpu", threads=1), x, y, attacks="pgd_sat,divergence,square",
                    eps=EPS, square_queries=10, reference=runners["pt"])
    assert "pgd_sat" not in report.robust_acc and "square" in report.robust_acc  # black-box still runs
    assert "pgd_sat" in report.reference.robust_acc  # the checkpoint's column: its worst case stays its own
    skipped = [w for w in report.warnings if "skipped" in w]
    assert skipped == ["leaky.onnx: pgd_sat, divergence skipped: the twin of leaky.onnx cannot emulate op LeakyRelu "
                       "(node act); the other columns still ran"]
    assert report.to_json()["twin_unavailable"].endswith("cannot emulate op LeakyRelu (node act)")
    assert report.drop_pp("pgd_sat") is None and report.divergence is None


class WrongTwinRunner(RecordingRunner):
    """The int8 export, but its twin reads every per-channel weight scale wrongly (scaled by 0.3 to 3)."""

    def twin(self) -> OnnxTwin:
        import onnx
        from onnx import numpy_helper

        model = onnx.load(self.path)
        rng = np.random.default_rng(0)
        for initializer in model.graph.initializer:
            if initializer.name.endswith("weight_scale"):
                scale = numpy_helper.to_array(initializer)
                wrong = scale * rng.uniform(0.3, 3.0, scale.shape).astype(np.float32)
                initializer.CopyFrom(numpy_helper.from_array(wrong, initializer.name))
        return OnnxTwin(model, source=self.path)


def test_a_deliberately_wrong_int8_twin_is_caught_by_the_agreement_check(runners, images):
    x, y = images
    report = verify(WrongTwinRunner(runners["int8"]), x, y, attacks="pgd_sat,square", eps=EPS, square_queries=10)
    assert not report.artifact.twin.trusted and report.artifact.twin.agreement < 0.99
    assert any("twin agrees with it on only" in w and "upper bounds" in w for w in report.warnings)
    assert report.to_json()["twin"]["trusted"] is False
    honest = verify(runners["int8"], x, y, attacks="pgd_sat", eps=EPS)
    assert honest.artifact.twin.trusted and not any("twin" in w for w in honest.warnings)


def test_autoattack_runs_on_the_twin_and_is_judged_by_the_artifact(runners, images):
    x, y = images
    report = verify(runners["int8"], x[:16], y[:16], attacks="pgd_sat,autoattack", eps=EPS, batch_size=16)
    assert report.attack_details["autoattack"].artifact_gradients == "twin"
    assert report.robust_acc["autoattack"] <= report.robust_acc["pgd_sat"] < report.clean_acc


class Threshold(torch.nn.Module):
    """Two classes from an image's one pixel ``v``: class 1 above ``threshold``, logits ``±steepness (v - t) / 2``."""

    def __init__(self, threshold: float, steepness: float) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[-steepness / 2], [steepness / 2]]))
            self.linear.bias.copy_(torch.tensor([steepness * threshold / 2, -steepness * threshold / 2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


def test_divergence_counts_where_the_artifact_is_fooled_and_the_float_model_is_not():
    """A steep edge model (threshold 0.5) and a shallow float model (threshold 3/255 lower), on one-pixel images
    placed so that each outcome follows from the eps-ball alone: within 8/255 of the edge's threshold the attack
    crosses it (the edge term of its objective dominates the shallow float's everywhere in the ball, so every signed
    step goes the same way and ends on the ball's edge), beyond 8/255 no image can cross."""
    edge, float_model = Threshold(0.5, steepness=50), Threshold(0.5 - 3 / 255, steepness=1)
    groups = [  # (pixel, label, how many): what happens to each, by construction
        (0.5 + 6 / 255, 1, 3),  # both right; pushed to 0.5 - 2/255: the edge is fooled, the float (lower) is not
        (0.5 - 4 / 255, 0, 2),  # both right; pushed to 0.5 + 4/255, above both thresholds: both fooled
        (0.9, 1, 4),  # both right; out of reach of both: robust
        (0.5 - 1.5 / 255, 1, 1),  # between the thresholds, class 1: the edge is wrong on the clean image: not attacked
        (0.5 - 1.5 / 255, 0, 2),  # between the thresholds, class 0: only the float is wrong; the edge is fooled
    ]
    x = torch.tensor([pixel for pixel, _, count in groups for _ in range(count)]).reshape(-1, 1, 1, 1)
    y = torch.tensor([label for _, label, count in groups for _ in range(count)])
    report = verify(edge, x, y, reference=float_model, attacks=["divergence"], eps=8 / 255)
    stats = report.to_json()["divergence"]
    assert stats == {"both_correct": 9, "artifact_fooled": 5, "artifact_fooled_float_not": 3, "float_fooled": 2,
                     "rate": round(3 / 9, 6)}
    robust = [False] * 5 + [True] * 4 + [False] * 3  # only the out-of-reach images survive
    assert report.artifact.robust_correct["divergence"].tolist() == robust
    assert report.clean_acc == 11 / 12 and report.reference.clean_acc == 10 / 12
    assert "divergence" not in report.reference.robust_correct  # crafted to keep the reference right: no column


class Band(torch.nn.Module):
    """Two classes from an image's one pixel: class 1 within 0.1 of 0.5, class 0 outside."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        margin = 100 * (0.1**2 - (x.flatten(1) - 0.5) ** 2)  # (N, 1)
        return torch.cat([-margin, margin], dim=1)


def test_transfer_from_several_sources_is_the_per_sample_and_of_what_each_source_fools():
    """Two sources whose cross-entropy always climbs the same way (one pushes the pixel down, one up), so that PGD
    ends on the ball's edge; the artifact is right on a band, so each source fools the images near its own edge of
    the band and no other: the AND is known, and it differs from the lower of the two per-source figures."""
    down = as_model(Threshold(0.5, steepness=10), label="down")  # class 1 above 0.5: climbing its loss on 1 lowers v
    up = as_model(Threshold(0.5, steepness=-10), label="up")  # class 1 below 0.5
    groups = [(0.41, 1, 2), (0.59, 1, 3), (0.5, 1, 4), (0.1, 0, 1), (0.5, 0, 2)]  # (pixel, label, how many)
    x = torch.tensor([pixel for pixel, _, count in groups for _ in range(count)]).reshape(-1, 1, 1, 1)
    y = torch.tensor([label for _, label, count in groups for _ in range(count)])
    report = verify(Band(), x, y, sources=[down, up], attacks="transfer_pgd", eps=8 / 255)
    # 0.41 leaves the band only downwards, 0.59 only upwards; 0.5 and 0.1 cannot leave; (0.5, 0) is wrong already
    assert report.artifact.per_source["transfer_pgd"] == {"down": 8 / 12, "up": 7 / 12}
    assert report.artifact.robust_correct["transfer_pgd"].tolist() == [False] * 5 + [True] * 5 + [False] * 2
    assert report.worst_case_acc == 5 / 12


def test_the_report_carries_the_callers_notes_first_and_its_config_under_verifys_settings():
    x = torch.tensor([0.2, 0.8]).reshape(-1, 1, 1, 1)
    report = verify(Threshold(0.5, steepness=50), x, torch.tensor([0, 1]), attacks="fgsm", eps=EPS,
                    notes=["images: the first two"], config={"dataset": "shapes", "eps": 0.5})
    assert report.notes == ["images: the first two"]
    assert report.config["dataset"] == "shapes" and report.config["eps"] == EPS  # what ran wins
    assert report.to_json()["config"] == report.config and report.config["attacks"] == ["fgsm"]


def test_a_reference_of_another_architecture_is_refused_naming_both(runners, images):
    other_arch = RecordingRunner(runners["onnx"])
    other_arch.metadata = {"arch": "mobilenetv2"}
    with pytest.raises(ConfigError, match="--reference student.pt is a smallcnn but student.onnx is a mobilenetv2"):
        verify(other_arch, *images, reference=runners["pt"], attacks="square", eps=EPS)
    with pytest.raises(ConfigError, match="is not the architecture of other.onnx"):
        verify(runners["other"], *images, reference=runners["pt"], attacks="square", eps=EPS)


def test_unknown_attack_names_the_close_one_and_lists_all():
    with pytest.raises(ConfigError, match="Did you mean 'pgd_sat'") as unknown:
        parse_attacks("fgsm,pgd-sta")
    assert "transfer_cw" in str(unknown.value) and "square" in str(unknown.value)
    assert [a.name for a in parse_attacks("PGD-SAT,transfer-pgd,pgd_sat")] == ["pgd_sat", "transfer_pgd"]


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"square_queries": 0}, "--square-queries must be at least 1, got 0"),
        ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
        ({"aa_version": "fast"}, "--aa-version must be one of standard, plus, rand, apgd, got 'fast'"),
        ({"eps": 8}, "write --eps 8/255"),
    ],
)
def test_verify_and_its_config_refuse_a_bad_option_with_the_same_message(runners, images, option, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        verify(runners["pt"], *images, attacks=["fgsm"], **option)
    with pytest.raises(ConfigError, match=re.escape(message)):
        VerifyConfig(artifact=Path("missing.onnx"), **option)  # checked before the files are looked for


def test_eps_in_grey_levels_is_refused_with_the_fraction_to_write(runners, images):
    with pytest.raises(ConfigError, match="8/255"):
        verify(runners["pt"], *images, attacks=["fgsm"], eps=8)


def test_transfer_without_a_source_says_what_to_pass_and_the_default_is_white_box_and_square(runners, images):
    x, y = images
    with pytest.raises(ConfigError, match="--reference CKPT"):
        verify(runners["onnx"], x, y, attacks=["transfer_cw"], eps=EPS)
    with pytest.raises(ConfigError, match="divergence needs the float model"):
        verify(runners["onnx"], x, y, attacks=["divergence"], eps=EPS)
    report = verify(runners["onnx"], x[:8], y[:8], eps=EPS, square_queries=5)
    assert report.attacks == list(CHECKPOINT_DEFAULT_ATTACKS)  # white-box (on the twin) and Square
    assert "transfer_pgd, transfer_cw, divergence were skipped" in report.notes[0]


def test_images_of_another_size_are_refused_naming_both_shapes(runners):
    x = torch.rand(4, 3, 16, 16)
    with pytest.raises(DatasetError, match="takes 3x32x32 images but the verify images are 3x16x16"):
        verify(runners["onnx"], x, torch.zeros(4, dtype=torch.long), attacks=["square"], eps=EPS)


def test_a_dataset_with_another_class_count_is_refused(runners):
    five_classes = RecordingRunner(runners["onnx"])
    five_classes.num_classes = 5
    with pytest.raises(DatasetError, match="predicts 5 classes but --dataset shapes has 10"):
        load_verify_images("shapes", None, 10, 0, five_classes)


def test_n_beyond_the_test_set_is_clipped_and_said(runners):
    data, notes = load_verify_images("shapes", None, 5000, 0, runners["onnx"])
    assert len(data) == 1000 and notes == ["--n 5000 is more than the 1000 test images of shapes: using all 1000"]


@pytest.mark.parametrize("correct, n", [(0, 10), (10, 10), (81, 263), (15, 148), (500, 1000), (1, 200)])
def test_wilson_interval_matches_scipy_and_the_closed_form_at_the_edges(correct, n):
    from rslad_edge.stats import wilson_ci95

    low, high = wilson_ci95(correct, n)
    z2 = 1.959963984540054**2
    if correct == 0:  # closed form: [0, z^2 / (n + z^2)]
        assert low == 0.0 and high == pytest.approx(z2 / (n + z2), abs=1e-12)
    if correct == n:
        assert high == pytest.approx(1.0) and low == pytest.approx(n / (n + z2), abs=1e-12)
    stats = pytest.importorskip("scipy.stats")
    expected = stats.binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert (low, high) == pytest.approx((expected.low, expected.high), abs=1e-9)


# --------------------------------------------------------------------------------------------- CLI


def test_cli_verifies_an_export_against_its_checkpoint_into_json_that_bench_reads(files, tmp_path):
    out = tmp_path / "verify" / "student.json"
    result = cli.invoke(app, ["verify", str(files["onnx"]), "--reference", str(files["pt"]), "--n", "32",
                              "--eps", "1/255", "--attacks", ",".join(SUITE), "--square-queries", "20",
                              "--threads", "1", "--json", str(out), "--max-drop", "5"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = _text(result.output)
    for expected in ("pgd_sat", "transfer_pgd", "transfer_cw", "divergence", "square", "worst case", "drop (pp)",
                     "queries/s", "gate passed", "crafted on the artifact's differentiable twin",
                     "judged by onnxruntime", "twin agreement 100.0% top-1 on 32 images",
                     "fooled where the float reference is not"):
        assert expected in text, expected
    # Each transfer row says what it was crafted on, and the caption what that means for comparing with the paper.
    assert text.count("from student.pt (reference)") == 2
    assert "transfer_pgd, transfer_cw: crafted on the reference" in text
    record = json.loads(out.read_text())
    reference = {"label": "student.pt", "artifact": str(files["pt"]), "sha256": sha256_file(files["pt"]),
                 "role": "reference"}
    for transfer in ("transfer_pgd", "transfer_cw"):
        assert record["attack_details"][transfer]["crafted_on"] == [reference]
    assert record["attack_details"]["square"] == {"family": "query", "preset": "square",
                                                  "judged_by": "onnxruntime (CPUExecutionProvider)"}
    assert ISSUE_KEYS <= set(record) and record["n"] == 32 and record["config"]["dataset"] == "shapes"
    # every accuracy carries its 95 % Wilson interval, in the JSON and in the table
    for model in (record, record["reference"]):
        low, high = model["ci95"]["worst_case"]
        assert low <= model["worst_case_acc"] <= high and high - low > 0.05  # 32 images: wide
    assert set(record["ci95"]) == {"clean", *SUITE, "worst_case"}
    low, high = record["ci95"]["clean"]  # the table rounds the bounds outward to whole points
    assert f"{100 * record['clean_acc']:.1f} ({math.floor(100 * low)}-{math.ceil(100 * high)})" in text
    assert "95% Wilson interval, rounded outward" in text
    assert set(record["robust_acc"]) == set(SUITE)
    assert set(record["reference"]["robust_acc"]) == {"fgsm", "pgd_sat", "pgd_trades", "cw", "square"}
    assert record["twin"]["agreement"] == 1.0 and record["divergence"]["both_correct"] > 0
    assert record["sha256"] == sha256_file(files["onnx"]) and record["queries"]["budget"] == 20
    queries = record["queries"]  # Square's queries per image, and the setting it ran with
    assert queries["schedule"] == "budget" and 1 <= queries["median"] <= 21 and queries["mean"] <= 21
    found = find_accuracies([(files["onnx"], record["sha256"])], [out])
    assert found.warnings == [] and found.by_sha256[record["sha256"]].robust_acc == record["worst_case_acc"]


def test_cli_gate_exits_3_naming_the_attack_and_0_within(files):
    args = ["verify", str(files["weak"]), "--reference", str(files["pt"]), "--dataset", "shapes", "--n", "24",
            "--eps", "1/255", "--attacks", "square", "--square-queries", "10", "--threads", "1"]
    failed = cli.invoke(app, [*args, "--max-drop", "5"], terminal_width=200)
    assert failed.exit_code == 3, failed.output
    assert "dropped by more than 5 points" in _text(failed.output) and "worst_case" in _text(failed.output)
    passed = cli.invoke(app, [*args, "--max-drop", "100"], terminal_width=200)
    assert passed.exit_code == 0 and "gate passed" in passed.output


def test_cli_reference_of_another_architecture_is_one_line_exit_1_and_writes_nothing(files, tmp_path):
    out = tmp_path / "other.json"
    result = cli.invoke(app, ["verify", str(files["other"]), "--reference", str(files["pt"]), "--dataset", "shapes",
                              "--n", "8", "--attacks", "square", "--json", str(out)], terminal_width=250)
    assert result.exit_code == 1, result.output
    assert "is not the architecture of other.onnx" in _text(result.output) and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attacks", "pgd_sta"], "Did you mean 'pgd_sat'"),
        (["--eps", "8"], "write --eps 8/255"),
        (["--max-drop", "2"], "--max-drop needs --reference"),
        (["--attacks", "divergence"], "divergence needs the float model"),
        (["--reference", "missing.pt"], "--reference missing.pt does not exist"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_1(files, args, message):
    result = cli.invoke(app, ["verify", str(files["onnx"]), "--n", "4", *args], terminal_width=250)
    assert result.exit_code == 1, result.output
    assert message in _text(result.output) and "Traceback" not in result.output
