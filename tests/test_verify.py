"""Verify: which attacks run against what, per-sample worst case, drops and the gate, sanity checks, bad input, CLI.

Real models on the synthetic ``shapes`` data, offline: a smallcnn whose classifier is fitted by ridge regression on
random features (~40 % clean in 2 s, small margins), its real fp32 ONNX export, and small budgets (eps 1/255, tens
of Square queries) so that accuracies land between 0 and clean and every figure can move.
"""

from __future__ import annotations

import json
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
from rslad_edge.runtime import load_runner
from rslad_edge.verify import (
    CHECKPOINT_DEFAULT_ATTACKS,
    EXPORTED_DEFAULT_ATTACKS,
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
def files(tmp_path_factory) -> dict[str, Path]:
    """student.pt (rslad-edge checkpoint), its fp32 ONNX export, and an unrelated tiny ONNX model."""
    from rslad_edge.export import ExportConfig, export

    folder = tmp_path_factory.mktemp("verify")
    checkpoint = save_checkpoint(folder / "student.pt", ridge_fitted_smallcnn(), "smallcnn", num_classes=10,
                                 meta={"dataset": "shapes"})
    exported = export(ExportConfig(checkpoint=checkpoint, out=folder / "export", parity_n=32))
    return {"pt": checkpoint, "onnx": exported.onnx_path, "other": tiny_onnx(folder / "other.onnx")}


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    from rslad_edge.data import load_dataset, subset, to_float

    test = subset(load_dataset("shapes", None, "test", seed=0), N, seed=0)
    return to_float(test.images), test.labels


@pytest.fixture(scope="module")
def runners(files) -> dict:
    return {"pt": load_runner(files["pt"], "cpu"), "onnx": load_runner(files["onnx"], "cpu", threads=1),
            "other": load_runner(files["other"], "cpu", threads=1)}


class RecordingRunner:
    """Wraps a Runner and records the batch size of every predict call (what reaches the runtime)."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.calls: list[int] = []
        for name in ("backend", "provider", "precision", "input_shape", "num_classes", "path"):
            setattr(self, name, getattr(runner, name))

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(len(x))
        return self.runner.predict(x)


def _text(output: str) -> str:
    """CLI output with Rich's borders and line wrapping removed."""
    return " ".join(output.replace("│", " ").split())


# --------------------------------------------------------------------------------------------- what runs on what


def test_exported_twin_measures_what_its_reference_measures_on_every_attack(runners, images):
    x, y = images
    report = verify(runners["onnx"], x, y, reference=runners["pt"], eps=EPS, square_queries=QUERIES)
    assert report.attacks == list(EXPORTED_DEFAULT_ATTACKS)
    assert 0 < report.clean_acc == report.reference.clean_acc
    one_sample = 100 / N
    for row in report.rows:  # the same function in two runtimes: drops within one sample, never noise-sized
        assert abs(report.drop_pp(row)) <= one_sample + 1e-6, (row, report.drop_pp(row))
    # Transfer: the very same adversarial images on both, crafted on the reference (= white-box for it).
    assert report.robust_acc["transfer_pgd"] < report.clean_acc
    assert report.artifact.per_source["transfer_pgd"] == {"student.pt": report.robust_acc["transfer_pgd"]}
    square = report.artifact.queries["square"]
    assert square.attacked == round(report.clean_acc * N) and 0 < square.total <= square.attacked * QUERIES
    assert square.per_second > 0 and 0 < square.runtime_seconds <= square.seconds
    assert report.warnings == []


def test_checkpoint_gets_the_white_box_suite_and_a_robust_sample_is_always_clean_correct(runners, images):
    x, y = images
    report = verify(runners["pt"], x, y, eps=EPS, batch_size=32)  # two batches of attacked images at most
    assert report.attacks == list(CHECKPOINT_DEFAULT_ATTACKS) and report.reference is None
    result = report.artifact
    for name, flags in result.robust_correct.items():
        assert not (flags & ~result.clean_correct).any(), name
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


def test_white_box_attacks_on_an_exported_artifact_are_refused_with_what_to_use(runners, images):
    with pytest.raises(ConfigError, match="pgd_sat need gradients") as refusal:
        verify(runners["onnx"], *images, attacks=["square", "pgd_sat"], reference=runners["pt"], eps=EPS)
    assert "transfer_pgd" in str(refusal.value) and "square" in str(refusal.value)


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
        ({"aa_version": "fast"}, "--aa-version must be one of standard, plus, rand, got 'fast'"),
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


def test_transfer_without_a_source_says_what_to_pass_and_the_default_falls_back_to_square(runners, images):
    x, y = images
    with pytest.raises(ConfigError, match="--reference CKPT"):
        verify(runners["onnx"], x, y, attacks=["transfer_cw"], eps=EPS)
    report = verify(runners["onnx"], x[:8], y[:8], eps=EPS, square_queries=5)
    assert report.attacks == ["square"] and "transfer_pgd and transfer_cw were skipped" in report.notes[0]


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


# --------------------------------------------------------------------------------------------- CLI


def test_cli_verifies_an_export_against_its_checkpoint_into_json_that_bench_reads(files, tmp_path):
    out = tmp_path / "verify" / "student.json"
    result = cli.invoke(app, ["verify", str(files["onnx"]), "--reference", str(files["pt"]), "--n", "32",
                              "--eps", "1/255", "--square-queries", "20", "--threads", "1", "--json", str(out),
                              "--max-drop", "5"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = _text(result.output)
    for expected in ("transfer_pgd", "transfer_cw", "square", "worst case", "drop (pp)", "queries/s", "gate passed"):
        assert expected in text, expected
    # Each transfer row says what it was crafted on, and the caption what that means for comparing with the paper.
    assert text.count("from student.pt (reference)") == 2
    assert "transfer_pgd, transfer_cw: crafted on the reference" in text
    record = json.loads(out.read_text())
    reference = {"label": "student.pt", "artifact": str(files["pt"]), "sha256": sha256_file(files["pt"]),
                 "role": "reference"}
    for transfer in ("transfer_pgd", "transfer_cw"):
        assert record["attack_details"][transfer]["crafted_on"] == [reference]
    assert record["attack_details"]["square"] == {"family": "query", "preset": "square"}
    assert ISSUE_KEYS <= set(record) and record["n"] == 32 and record["config"]["dataset"] == "shapes"
    assert set(record["robust_acc"]) == set(EXPORTED_DEFAULT_ATTACKS) == set(record["reference"]["robust_acc"])
    assert record["sha256"] == sha256_file(files["onnx"]) and record["queries"]["budget"] == 20
    found = find_accuracies([(files["onnx"], record["sha256"])], [out])
    assert found.warnings == [] and found.by_sha256[record["sha256"]].robust_acc == record["worst_case_acc"]


def test_cli_gate_exits_3_naming_the_attack_and_0_within(files):
    args = ["verify", str(files["other"]), "--reference", str(files["pt"]), "--dataset", "shapes", "--n", "24",
            "--eps", "1/255", "--attacks", "square", "--square-queries", "10", "--threads", "1"]
    failed = cli.invoke(app, [*args, "--max-drop", "5"], terminal_width=200)
    assert failed.exit_code == 3, failed.output
    assert "dropped by more than 5 points" in _text(failed.output) and "square" in _text(failed.output)
    passed = cli.invoke(app, [*args, "--max-drop", "100"], terminal_width=200)
    assert passed.exit_code == 0 and "gate passed" in passed.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attacks", "pgd_sta"], "Did you mean 'pgd_sat'"),
        (["--eps", "8"], "write --eps 8/255"),
        (["--max-drop", "2"], "--max-drop needs --reference"),
        (["--attacks", "cw"], "need gradients"),
        (["--reference", "missing.pt"], "--reference missing.pt does not exist"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_1(files, args, message):
    result = cli.invoke(app, ["verify", str(files["onnx"]), "--n", "4", *args], terminal_width=250)
    assert result.exit_code == 1, result.output
    assert message in _text(result.output) and "Traceback" not in result.output
