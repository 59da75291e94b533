"""`rslad-edge distill` on the command line: --resume refuses every changed option but the few it may change."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from rslad_edge.cli import app
from rslad_edge.distill.config import RESUME_OVERRIDES, DistillConfig, resume_config
from rslad_edge.models import create_model, save_checkpoint
from rslad_edge.options import specs

runner = CliRunner()

TINY = ["--preset", "smoke", "--train-subset", "128", "--epochs", "1", "--batch-size", "64", "--val-n", "64",
        "--attack-steps", "1", "--eval-steps", "1", "--precision", "fp32", "--device", "cpu"]

# For every option a resumed run may not change: a value other than the tiny run's own (the option's text; None
# for a flag that takes none).
CHANGED = {
    "student": "smallcnn-wide", "student_kwargs": "width=2", "teacher": "other.pt", "teacher_arch": "resnet18",
    "teacher_kwargs": "width=2", "teacher_input_size": "48", "train_teacher": "smallcnn-wide",
    "teacher_dataset": "imagenet",
    "class_map": "classes.yaml", "class_map_reduce": "max", "method": "sat", "dataset": "cifar10",
    "data_root": "elsewhere", "num_classes": "5", "input_size": "48", "augment": "rrc-flip", "memory_budget": "1.5",
    "batch_size": "32", "lr": "0.5", "momentum": "0.5", "weight_decay": "0.001", "milestones": "2,3",
    "lr_gamma": "0.5", "loss_scale": "batchmean", "eps": "4/255", "step_size": "1/255", "attack_steps": "2",
    "alpha": "0.5", "temperature": "2", "beta": "3", "train_subset": "64", "val_n": "128", "select": "last",
    "eval_steps": "3", "precision": "bf16", "compile": None, "sync_bn": None, "seed": "1", "preset": "fast",
    "bn_momentum": "0.5",
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One finished tiny run (seconds on a CPU), shared by every test here, which must leave it as it is."""
    root = tmp_path_factory.mktemp("resume")
    torch.manual_seed(0)
    teacher = save_checkpoint(root / "teacher.pt", create_model("smallcnn-wide"), "smallcnn-wide", num_classes=10,
                              input_size=(32, 32))
    out = root / "run"
    result = runner.invoke(app, ["distill", *TINY, "--teacher", str(teacher), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "checkpoints" / "last.pt").is_file()
    return out


def snapshot(folder):
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_the_changed_values_cover_every_option_a_resumed_run_may_not_change():
    fixed = {name for name in specs(DistillConfig) if name not in RESUME_OVERRIDES} - {"out"}  # --out names the run
    assert set(CHANGED) == fixed
    assert set(RESUME_OVERRIDES) == {"epochs", "device", "eval_every", "eval_n"}


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_resume_refuses_any_changed_option_in_one_line_exit_2_and_leaves_the_run_as_it_was(run_dir, name):
    spec = specs(DistillConfig)[name]
    text = CHANGED[name]
    before = snapshot(run_dir)
    args = ["distill", "--out", str(run_dir), "--resume", spec.flag, *([] if text is None else [text])]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {spec.flag} cannot change when resuming"), lines
    assert snapshot(run_dir) == before


def test_resume_accepts_the_runs_own_values_and_changes_only_what_it_may(run_dir):
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    same = {name: saved[name] for name in CHANGED if name in saved}
    cfg = resume_config(run_dir, **same, epochs=3, eval_every=2, eval_n=32, device="cpu")
    assert (cfg.epochs, cfg.eval_every, cfg.eval_n) == (3, 2, 32)
    assert {k: v for k, v in cfg.to_dict().items() if k in same} == same


def test_resume_with_the_starting_command_line_and_more_epochs_continues_the_run(run_dir, monkeypatch):
    import rslad_edge.distill.run

    continued = []

    def distill_student(cfg, **kwargs):  # the check is what is tested here, not another epoch of training
        continued.append((cfg, kwargs))
        return SimpleNamespace(student=SimpleNamespace(path=run_dir / "student.pt"), metrics_file="metrics.jsonl")

    monkeypatch.setattr(rslad_edge.distill.run, "distill_student", distill_student)
    teacher = str(run_dir.parent / "teacher.pt")
    result = runner.invoke(app, ["distill", *TINY, "--teacher", teacher, "--out", str(run_dir), "--resume",
                                 "--epochs", "2"])
    assert result.exit_code == 0, result.output
    [(cfg, kwargs)] = continued
    assert cfg.epochs == 2 and kwargs["resume"] is True and cfg.lr == 0.2  # the run's own (smoke) lr
