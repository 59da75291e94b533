"""A user's own model and data end to end: an image folder of mixed-size JPEGs, a torchvision student at 96x96 and a
torchvision teacher the pipeline trains first, through distill, export (ONNX fp32 / int8, .pte), verify and bench."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from rslad_edge.cli import app
from rslad_edge.pipeline import run_pipeline
from rslad_edge.record import RunRecord
from rslad_edge.runtime import load_runner

runner = CliRunner()
CLASSES = ("circle", "square", "stripes", "cross", "dots")
HAS_EXECUTORCH = importlib.util.find_spec("executorch") is not None


def _draw(kind: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A class-typical pattern on a random colour, at the given size (so every class has mixed sizes)."""
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    cy, cx = 0.5 * height / max(width, height), 0.5 * width / max(width, height)
    masks = {
        "circle": (yy - cy) ** 2 + (xx - cx) ** 2 < 0.09,
        "square": (abs(yy - cy) < 0.25) & (abs(xx - cx) < 0.25),
        "stripes": (xx * 12).astype(int) % 2 == 0,
        "cross": (abs(yy - cy) < 0.08) | (abs(xx - cx) < 0.08),
        "dots": ((yy * 8).astype(int) % 2 == 0) & ((xx * 8).astype(int) % 2 == 0),
    }
    background, foreground = rng.uniform(0, 0.4, 3), rng.uniform(0.6, 1.0, 3)
    pixels = np.where(masks[kind][..., None], foreground, background) + rng.normal(0, 0.04, (height, width, 3))
    return Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))


def make_image_folder(root: Path, train_per_class: int = 48, test_per_class: int = 12, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for kind in CLASSES:
            folder = root / split / kind
            folder.mkdir(parents=True)
            for index in range(count):
                width, height = (int(v) for v in rng.integers(80, 121, 2))  # around 96x96, never the same twice
                _draw(kind, width, height, rng).save(folder / f"{index:03d}.jpg", quality=90)
    return root


def own_model_sections(data_root: Path, **changes) -> dict:
    """The whole pipeline in about a minute on 2 cores: one epoch of 200 images at 96x96, tiny attack budgets."""
    sections = {
        "distill": {"student": "torchvision:mobilenet_v3_small", "train_teacher": "torchvision:resnet18",
                    "method": "rslad", "dataset": "imagefolder", "data_root": str(data_root), "input_size": 96,
                    "epochs": 1, "milestones": [2], "batch_size": 32, "lr": 0.05, "loss_scale": "batchmean",
                    "val_n": 40, "eval_steps": 2, "attack_steps": 1, "eps": "4/255", "step_size": "4/255",
                    "precision": "fp32", "device": "cpu"},
        "export": {"formats": ["onnx", "executorch"] if HAS_EXECUTORCH else ["onnx"], "precisions": ["fp32", "int8"],
                   "calib_n": 32, "parity_n": 32, "min_agreement": 0.0},
        "verify": {"n": 16, "square_queries": 10, "device": "cpu", "attacks": ["pgd_sat", "transfer_pgd", "square"]},
        "bench": {"device": "cpu", "batch": [1, 4], "seconds": 0.1, "warmup": 1, "warmup_seconds": 0.02,
                  "min_iters": 3, "threads": 1},
    }
    for stage, values in changes.items():
        sections[stage].update(values)
    return sections


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def own_run(tmp_path_factory, image_folder):
    """The whole pipeline at 96x96 (two minutes on 2 cores: the tests that need it are ``slow``)."""
    torch.manual_seed(0)
    data_root = image_folder
    out = tmp_path_factory.mktemp("own") / "run"
    result = run_pipeline(own_model_sections(data_root), out)
    return out, result, data_root


@pytest.mark.slow
def test_torchvision_student_and_trained_teacher_go_through_every_stage_at_96(own_run):
    out, _, _ = own_run
    record = RunRecord.load(out)
    teacher = torch.load(out / "teacher" / "student.pt", weights_only=True)
    student = torch.load(out / "student.pt", weights_only=True)
    assert teacher["arch"] == "torchvision:resnet18" and teacher["meta"]["method"] == "sat"
    assert student["arch"] == "torchvision:mobilenet_v3_small" and student["num_classes"] == 5
    assert student["input"]["size"] == [96, 96] and student["input"]["preprocess"]["center_crop"] == [96, 96]
    assert student["meta"]["augment"] == "rrc-flip"
    exports = sorted(p.name for p in (out / "export").iterdir() if p.suffix in (".onnx", ".pte"))
    phone = {"student.pte", "student.int8.pte"} if HAS_EXECUTORCH else set()
    expected = {"student.onnx", "student.int8.onnx"} | phone
    assert set(exports) == expected
    for artifact in [out / "student.pt", *(out / "export" / name for name in exports)]:
        assert load_runner(artifact).input_shape == (3, 96, 96), artifact.name
    graph_input = onnx.load(out / "export" / "student.int8.onnx").graph.input[0]
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim][1:] == [3, 96, 96]
    assert {Path(v.json_path).name for v in record.verify} == {f"{n}.json" for n in ["student.pt", *exports]}
    bench = json.loads((out / "bench" / "cpu.json").read_text())
    assert {r["batch"] for r in bench["results"]} == {1, 4}
    assert (out / "report.md").is_file()


@pytest.mark.slow
def test_export_verify_and_bench_need_no_flags_for_the_checkpoint(own_run, tmp_path):
    out, _, _ = own_run
    exported = runner.invoke(app, ["export", str(out / "student.pt"), "--out", str(tmp_path), "--parity-n", "8"])
    assert exported.exit_code == 0, exported.output
    verified = runner.invoke(app, ["verify", str(tmp_path / "student.onnx"), "--reference", str(out / "student.pt"),
                                   "--n", "8", "--attacks", "pgd_sat", "--json", str(tmp_path / "v.json")])
    assert verified.exit_code == 0, verified.output
    assert json.loads((tmp_path / "v.json").read_text())["n"] == 8


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("timm") is None,
                    reason="the timm extra is not installed (pip install 'rslad-edge[timm]')")
def test_a_timm_student_distils_from_a_torchvision_teacher(own_run, tmp_path):
    out, _, data_root = own_run
    result = runner.invoke(app, [
        "distill", "--student", "timm:mobilenetv3_small_050", "--teacher", str(out / "teacher" / "student.pt"),
        "--dataset", "imagefolder", "--data-root", str(data_root), "--input-size", "64", "--epochs", "1",
        "--milestones", "2", "--batch-size", "32", "--val-n", "40", "--attack-steps", "1", "--precision", "fp32",
        "--device", "cpu", "--loss-scale", "batchmean", "--out", str(tmp_path / "timm")])
    assert result.exit_code == 0, result.output
    student = torch.load(tmp_path / "timm" / "student.pt", weights_only=True)
    assert student["arch"] == "timm:mobilenetv3_small_050" and student["input"]["size"] == [64, 64]
    assert load_runner(tmp_path / "timm" / "student.pt").input_shape == (3, 64, 64)


def test_an_unknown_torchvision_name_is_one_line_exit_2(tmp_path):
    result = runner.invoke(app, ["distill", "--student", "torchvision:mobilenet_v3_smal", "--preset", "smoke",
                                 "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "torchvision:mobilenet_v3_small" in result.output and "Traceback" not in result.output


def _distill_args(data_root: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--student", "smallcnn", "--dataset", "imagefolder", "--data-root", str(data_root),
            "--input-size", "32", "--epochs", "1", "--milestones", "2", "--batch-size", "32", "--val-n", "40",
            "--attack-steps", "1", "--precision", "fp32", "--device", "cpu", "--loss-scale", "batchmean",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def imagenet_class_teacher(tmp_path_factory):
    """A locally built 1,000-class torchvision teacher at 64x64 (random weights: the class map is what is tested)."""
    from rslad_edge.models import create_model, save_checkpoint

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("imagenet_teacher")
    model = create_model("torchvision:resnet18", 1000)
    path = save_checkpoint(folder / "teacher1000.pt", model, "torchvision:resnet18", num_classes=1000,
                           input_size=(64, 64))
    class_map = folder / "map.yaml"
    class_map.write_text("circle: [1, 2]\nsquare: [10]\nstripes: [100, 101, 102]\ncross: [500]\ndots: [999]\n")
    return path, class_map


def test_a_1000_class_teacher_distils_into_our_classes_through_a_class_map(
        image_folder, imagenet_class_teacher, tmp_path):
    data_root = image_folder
    teacher, class_map = imagenet_class_teacher
    refused = runner.invoke(app, _distill_args(data_root, tmp_path / "refused", "--teacher", str(teacher)))
    assert refused.exit_code == 1 and "has 1000 classes" in refused.output and "--class-map" in refused.output
    assert not (tmp_path / "refused" / "student.pt").exists()
    result = runner.invoke(app, _distill_args(data_root, tmp_path / "mapped", "--teacher", str(teacher),
                                              "--class-map", str(class_map), "--class-map-reduce", "max"))
    assert result.exit_code == 0, result.output
    student = torch.load(tmp_path / "mapped" / "student.pt", weights_only=True)
    assert student["num_classes"] == 5 and student["input"]["size"] == [32, 32]


@pytest.mark.slow  # 13 s
def test_robustbench_imagenet_teacher_is_loaded_for_its_dataset_with_a_stand_in_loader(
    image_folder, imagenet_class_teacher, tmp_path, monkeypatch
):
    """RobustBench downloads its weights, which nothing here may do: a stand-in ``robustbench.utils.load_model``
    returns a local 1,000-class model and records what it was asked for."""
    import sys
    import types

    from rslad_edge.models import create_model

    data_root = image_folder
    _, class_map = imagenet_class_teacher
    asked = {}

    def load_model(model_name, dataset, threat_model):
        asked.update(model_name=model_name, dataset=dataset, threat_model=threat_model)
        return create_model("torchvision:resnet18", 1000 if dataset == "imagenet" else 10)

    utils = types.ModuleType("robustbench.utils")
    utils.load_model = load_model
    monkeypatch.setitem(sys.modules, "robustbench", types.ModuleType("robustbench"))
    monkeypatch.setitem(sys.modules, "robustbench.utils", utils)
    args = _distill_args(data_root, tmp_path / "rb", "--teacher", "robustbench:Salman2020Do_R18",
                         "--teacher-dataset", "imagenet", "--class-map", str(class_map), "--epochs", "1")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert asked == {"model_name": "Salman2020Do_R18", "dataset": "imagenet", "threat_model": "Linf"}
