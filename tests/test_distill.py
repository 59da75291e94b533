import dataclasses
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from rslad_edge.cli import app
from rslad_edge.distill.config import DistillConfig, resolve_config, resume_config
from rslad_edge.distill.ddp import DistInfo
from rslad_edge.distill.losses import rslad_loss
from rslad_edge.distill.methods import METHODS
from rslad_edge.distill.schedules import step_lr
from rslad_edge.distill.trainer import _build, train, train_step
from rslad_edge.errors import (
    CheckpointError,
    ConfigError,
    RunDirError,
    TrainingDivergedError,
    TrainingInterrupted,
    UsageError,
)
from rslad_edge.models import create_model, load_checkpoint, read_checkpoint, save_checkpoint

runner = CliRunner()


def tiny(tmp_path, **overrides) -> DistillConfig:
    """A run of seconds: 96 synthetic images (32 more held out), smallcnn, 2-step attacks, fp32 on CPU."""
    values = dict(
        out=str(tmp_path / "run"), student="smallcnn", dataset="shapes", method="sat", epochs=2, batch_size=32,
        lr=0.05, milestones=[2], train_subset=96, val_n=32, attack_steps=2, eval_steps=2, precision="fp32",
        device="cpu", preset="smoke",
    )
    values.update(overrides)
    return DistillConfig(**values)


@pytest.fixture
def teacher_path(tmp_path):
    torch.manual_seed(1)
    return save_checkpoint(tmp_path / "teacher.pt", create_model("smallcnn-wide"), "smallcnn-wide", num_classes=10,
        input_size=(32, 32))


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ losses, schedule


def test_rslad_loss_is_zero_when_student_matches_teacher():
    teacher_logits = torch.randn(8, 10)
    assert rslad_loss(teacher_logits.clone(), teacher_logits.clone(), teacher_logits).abs() < 1e-6


def test_rslad_loss_weights_adversarial_and_clean_terms_five_to_one():
    teacher_logits, far, near = torch.randn(8, 10), torch.randn(8, 10) * 3, torch.randn(8, 10)
    only_adv = rslad_loss(far, teacher_logits, teacher_logits)
    only_clean = rslad_loss(teacher_logits, far, teacher_logits)
    assert only_adv / only_clean == pytest.approx(5.0, rel=1e-5)
    assert rslad_loss(near, near, teacher_logits) > 0


def fixed_batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=generator), torch.randint(0, 10, (n,), generator=generator)


@pytest.mark.parametrize("method", ["rslad", "ard"])
def test_authors_scale_at_ten_times_the_lr_and_a_tenth_of_the_weight_decay_steps_exactly_like_batchmean(
    tmp_path, teacher_path, method
):
    # RSLAD's authors reduce its KL to batchmean / 10, ARD's to batchmean / C (C = 10 here): with SGD, momentum and
    # coupled weight decay, scale s at lr η / wd λ is the unscaled loss at lr η·s / wd λ/s. Two steps, so that the
    # momentum buffer takes part too.
    def two_steps(loss_scale: str, lr: float, weight_decay: float) -> dict[str, torch.Tensor]:
        cfg = tiny(tmp_path / loss_scale, method=method, teacher=str(teacher_path), loss_scale=loss_scale, lr=lr,
                   weight_decay=weight_decay)
        run = _build(cfg, DistInfo())
        x, y = fixed_batch()
        for step in range(2):
            train_step(run, x, y, 1, torch.Generator().manual_seed(step))
        return {k: v.clone() for k, v in run.student.state_dict().items()}

    authors = two_steps("authors", lr=0.5, weight_decay=2e-5)
    batchmean = two_steps("batchmean", lr=0.05, weight_decay=2e-4)
    torch.manual_seed(0)  # as _build seeds (tiny() runs with seed 0): the initialisation both runs started from
    initial = create_model("smallcnn").state_dict()
    assert not torch.allclose(batchmean["linear.weight"], initial["linear.weight"])  # the steps did move it
    for key in authors:
        assert torch.allclose(authors[key].float(), batchmean[key].float(), rtol=1e-4, atol=1e-6), key


def test_loss_scale_choice_is_recorded_in_config_yaml_and_the_student_metadata(tmp_path, teacher_path):
    student_path = train(tiny(tmp_path, method="rslad", teacher=str(teacher_path), epochs=1, loss_scale="batchmean"))
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["loss_scale"] == "batchmean"
    assert read_checkpoint(student_path)["meta"]["loss_scale"] == {"choice": "batchmean", "kl_factor": 1.0}
    assert resolve_config("paper").loss_scale == "authors"


def test_unknown_loss_scale_is_a_usage_error_naming_the_flag(tmp_path):
    with pytest.raises(UsageError, match="--loss-scale 'batchman'. Did you mean 'batchmean'"):
        resolve_config("paper", cli_values={"loss_scale": "batchman"})
    result = runner.invoke(app, ["distill", "--preset", "smoke", "--loss-scale", "paper", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--loss-scale" in result.output
    assert not (tmp_path / "r").exists()


def test_step_lr_milestone_is_the_first_epoch_at_the_lower_rate():
    lrs = [step_lr(e, 0.1, [3, 5]) for e in range(1, 7)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


# ------------------------------------------------------------------------------------------------ config


def test_paper_preset_is_the_authors_recipe():
    cfg = resolve_config("paper")
    assert (cfg.method, cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay) == ("rslad", 300, 128, 0.1, 2e-4)
    assert cfg.eps == pytest.approx(8 / 255) and cfg.loss_scale == "authors"  # schedules: test_distill_reference
    assert (cfg.attack_steps, cfg.step_size) == (10, pytest.approx(2 / 255))


def test_method_recipe_applies_under_paper_preset_but_flags_win():
    assert resolve_config("paper", cli_values={"method": "ard"}).epochs == 200
    assert resolve_config("paper", cli_values={"method": "ard", "epochs": 5}).epochs == 5


def test_config_file_sits_between_preset_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"distill": {"epochs": 7, "batch-size": 64}}))
    from rslad_edge.distill.config import load_yaml

    cfg = resolve_config("paper", load_yaml(path), {"epochs": 9})
    assert (cfg.epochs, cfg.batch_size) == (9, 64)


@pytest.mark.parametrize(
    "overrides,match",
    [({"eps": 8.0}, "write 8/255"), ({"method": "rsald"}, "Did you mean 'rslad'"), ({"student": "mobilenet"}, "Known"),
     ({"precision": "int4"}, "--precision"), ({"epochs": 0}, "--epochs")],
)
def test_bad_options_are_config_errors_naming_the_flag(overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config("paper", cli_values=overrides)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="paper, fast, cpu-30min, smoke"):
        resolve_config("papr")


def test_cpu_30min_preset_is_the_paper_recipe_but_for_the_schedule_and_the_scale():
    paper, cpu = resolve_config("paper").to_dict(), resolve_config("cpu-30min").to_dict()
    differing = {key for key in paper if paper[key] != cpu[key]}
    assert differing == {"epochs", "milestones", "train_subset", "val_n", "eval_n", "loss_scale", "preset"}
    assert cpu["loss_scale"] == "batchmean" and cpu["student"] == "mobilenetv2"
    lrs = [step_lr(epoch, cpu["lr"], cpu["milestones"]) for epoch in range(1, cpu["epochs"] + 1)]
    assert lrs[-1] == pytest.approx(0.01) and lrs.count(0.1) / len(lrs) == pytest.approx(215 / 300, abs=0.1)
    # Within 30 minutes at the ~20 img/s MobileNetV2 RSLAD ran at on the 2-core CPU, evaluation included.
    assert cpu["epochs"] * cpu["train_subset"] / 20 <= 30 * 60


def test_cpu_30min_preset_gives_rslad_sat_and_ard_the_same_images_steps_and_schedule():
    configs = [resolve_config("cpu-30min", cli_values={"method": m}).to_dict() for m in ("rslad", "sat", "ard")]
    for cfg in configs[1:]:
        assert {key for key in cfg if cfg[key] != configs[0][key]} == {"method"}


def test_cli_rejects_eps_given_as_8_with_a_hint():
    result = runner.invoke(app, ["distill", "--eps", "8", "--preset", "smoke"])
    assert result.exit_code == 2
    assert "8/255" in result.output


# ------------------------------------------------------------------------------------------------ training


# The total each method minimises, from the terms metrics.jsonl records (authors' defaults and scale, 10 classes).
TOTAL_FROM_TERMS = {
    "rslad": (lambda t: 0.1 * (5 / 6 * t["kl_adv"] + 1 / 6 * t["kl_clean"]), {"kl_adv", "kl_clean"}),
    "ard": (lambda t: 0.1 * t["kl_adv"], {"kl_adv"}),
    "iad": (lambda t: t["kl_adv"], {"kl_adv"}),  # introspection starts after epoch 60
    "sat": (lambda t: t["ce_adv"], {"ce_adv"}),
    "trades": (lambda t: t["ce_clean"] + 6 * t["kl_adv"], {"ce_clean", "kl_adv"}),
    "kd": (lambda t: 0.9 * t["kl_clean"] + 0.1 * t["ce_clean"], {"kl_clean", "ce_clean"}),
    "natural": (lambda t: t["ce_clean"], {"ce_clean"}),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_an_epoch_and_records_what_its_loss_was_made_of(tmp_path, teacher_path, method):
    cfg = tiny(tmp_path, method=method, teacher=str(teacher_path), epochs=1)
    student_path = train(cfg)
    (line,) = metrics(tmp_path / "run")
    assert set(line) == {"epoch", "train_loss", "clean_acc", "robust_acc", "lr", "images_per_s", "seconds",
                         "eval_split", "loss_terms", "train_robust_acc", "train_clean_acc"}
    assert math.isfinite(line["train_loss"]) and 0 <= line["robust_acc"] <= line["clean_acc"] <= 1
    total, term_names = TOTAL_FROM_TERMS[method]
    assert set(line["loss_terms"]) == term_names
    assert line["train_loss"] == pytest.approx(total(line["loss_terms"]), rel=1e-4)
    assert (line["train_robust_acc"] is not None) == (METHODS[method].attack_loss is not None)
    assert (line["train_clean_acc"] is not None) == ("student_clean" in METHODS[method].needs)
    model, info = load_checkpoint(student_path)
    assert info["arch"] == "smallcnn" and info["meta"]["method"] == method
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists() and (tmp_path / "run" / "config.yaml").exists()


def test_training_changes_the_student_and_lowers_the_loss(tmp_path):
    cfg = tiny(tmp_path, method="natural", epochs=3, train_subset=256, lr=0.05, milestones=[10])
    train(cfg)
    losses = [m["train_loss"] for m in metrics(tmp_path / "run")]
    assert losses[-1] < losses[0]


@pytest.mark.slow
def test_compiled_run_follows_the_eager_run(tmp_path, teacher_path):
    # --compile compiles the student and the BN-folded attack view; the folded weights are refreshed in place after
    # every step, which the compiled graph must see: its losses track the eager run's (same seeds, same batches).
    losses = {}
    for compiled in (False, True):
        cfg = tiny(tmp_path / str(compiled), method="rslad", teacher=str(teacher_path), epochs=2, compile=compiled)
        train(cfg)
        losses[compiled] = [m["train_loss"] for m in metrics(tmp_path / str(compiled) / "run")]
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)


def test_existing_run_directory_is_refused_without_resume_or_force(tmp_path):
    train(tiny(tmp_path, epochs=1))
    with pytest.raises(RunDirError, match="--resume.*--force"):
        train(tiny(tmp_path, epochs=1))
    train(tiny(tmp_path, epochs=1), force=True)
    assert len(metrics(tmp_path / "run")) == 1  # --force started over


def test_resume_without_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(RunDirError, match="nothing to resume"):
        train(tiny(tmp_path), resume=True)
    with pytest.raises(ConfigError, match="holds no run"):
        resume_config(tmp_path / "nothing")


def test_resume_refuses_to_change_the_experiment(tmp_path):
    train(tiny(tmp_path, epochs=1))
    with pytest.raises(ConfigError, match="--lr cannot change when resuming"):
        resume_config(tmp_path / "run", lr=0.5)


def test_resume_refuses_to_change_the_held_out_split_the_selection_or_the_loss_scale(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tiny(tmp_path).to_dict()))
    for flag, value in [("val_n", 64), ("select", "last"), ("loss_scale", "batchmean")]:
        with pytest.raises(ConfigError, match=f"--{flag.replace('_', '-')} cannot change when resuming"):
            resume_config(run_dir, **{flag: value})


class InterruptAt:
    """An observer that presses Ctrl-C after a given number of batches."""

    def __init__(self, after_batches):
        self.left = after_batches

    def epoch_started(self, *args):
        pass

    def batch_done(self, loss, images_per_s):
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt

    def evaluating(self, n):
        pass

    def epoch_done(self, metrics):
        pass


def test_interrupt_mid_epoch_saves_and_resume_gives_the_same_student_as_an_uninterrupted_run(tmp_path):
    straight = train(tiny(tmp_path / "a", epochs=2))
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(tiny(tmp_path / "b", epochs=2), observer=InterruptAt(after_batches=4))  # epoch 2, batch 2 of 3
    assert read_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.pt")["progress"]["batch"] == 1
    resumed = train(resume_config(tmp_path / "b" / "run"), resume=True)
    a, b = read_checkpoint(straight)["state_dict"], read_checkpoint(resumed)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["epoch"] for m in metrics(tmp_path / "b" / "run")] == [1, 2]
    # The interrupted epoch's sums were saved and restored: its record matches the uninterrupted run's.
    a_epoch2, b_epoch2 = metrics(tmp_path / "a" / "run")[1], metrics(tmp_path / "b" / "run")[1]
    assert b_epoch2["loss_terms"] == pytest.approx(a_epoch2["loss_terms"], rel=1e-6)
    assert b_epoch2["train_robust_acc"] == a_epoch2["train_robust_acc"]


def test_last_checkpoint_of_the_earlier_layout_resumes_where_it_stopped(tmp_path):
    # Earlier last.pt files keep the best robust accuracy beside "progress" rather than inside it.
    train(tiny(tmp_path / "a", epochs=2))
    with pytest.raises(TrainingInterrupted):
        train(tiny(tmp_path / "b", epochs=2), observer=InterruptAt(after_batches=4))
    last = tmp_path / "b" / "run" / "checkpoints" / "last.pt"
    state = read_checkpoint(last)
    del state["progress"]["best_robust_acc"]
    state["best_robust_acc"] = 1.0  # a best no epoch can beat: whether it was read shows in the end state
    torch.save(state, last)
    resumed = train(resume_config(tmp_path / "b" / "run"), resume=True)
    a = read_checkpoint(tmp_path / "a" / "run" / "checkpoints" / "last.pt")["state_dict"]
    b = read_checkpoint(last)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_checkpoint(last)["progress"] == {"epoch": 3, "batch": 0, "loss_sum": 0.0, "seen": 0, "sums": {},
                                                 "best_robust_acc": 1.0}
    assert read_checkpoint(resumed)["meta"]["epoch"] == 1  # epoch 2 did not beat the restored best


def test_resume_can_extend_a_finished_run(tmp_path):
    train(tiny(tmp_path, epochs=1))
    train(resume_config(tmp_path / "run", epochs=2), resume=True)
    assert [m["epoch"] for m in metrics(tmp_path / "run")] == [1, 2]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from rslad_edge.distill import trainer

    real_step = trainer.train_step

    def diverging_step(run, x, y, epoch, generator):
        step = real_step(run, x, y, epoch, generator)
        return dataclasses.replace(step, loss=float("nan")) if epoch == 2 else step

    monkeypatch.setattr(trainer, "train_step", diverging_step)
    with pytest.raises(TrainingDivergedError, match="last good state"):
        train(tiny(tmp_path, epochs=3))
    state = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert state["progress"]["epoch"] == 2 and state["progress"]["batch"] == 0  # epoch 1's checkpoint, intact
    assert len(metrics(tmp_path / "run")) == 1


def test_teacher_with_other_class_count_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "t100.pt", create_model("smallcnn", 100), "smallcnn", num_classes=100,
        input_size=(32, 32))
    with pytest.raises(ConfigError, match="100 classes"):
        train(tiny(tmp_path, method="rslad", teacher=str(path)))


def test_teacher_of_another_architecture_names_the_keys(tmp_path):
    torch.save(create_model("smallcnn").state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="--arch smallcnn"):
        train(tiny(tmp_path, method="rslad", teacher=str(tmp_path / "bare.pt"), teacher_arch="resnet18"))


def test_batch_size_larger_than_the_training_set_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="larger than the training set"):
        train(tiny(tmp_path, batch_size=512, val_n=512))


def test_teacher_methods_need_a_teacher_outside_the_smoke_preset(tmp_path):
    with pytest.raises(ConfigError, match="--teacher"):
        train(tiny(tmp_path, method="rslad", preset="paper"))


# ------------------------------------------------------------------------------------------------ model selection


def _write_train_only_folder(root, classes=3, per_class=24):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label in range(classes):
        folder = root / "train" / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(32, 32, 3, generator=generator) * 80 + 80 * label).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(folder / f"{i:03d}.png")
    return root


def test_distill_never_reads_the_test_split_a_train_only_folder_trains_and_selects_a_best_checkpoint(
    tmp_path, monkeypatch
):
    from rslad_edge.distill import trainer

    monkeypatch.setenv("RSLAD_EDGE_CACHE", str(tmp_path / "cache"))
    root = _write_train_only_folder(tmp_path / "data")  # no test/ folder at all
    splits = []
    real_load = trainer.load_dataset
    monkeypatch.setattr(trainer, "load_dataset", lambda *a, **k: splits.append(a[2]) or real_load(*a, **k))
    cfg = tiny(tmp_path, dataset="imagefolder", data_root=str(root), train_subset=None, val_n=16, batch_size=16)
    student_path = train(cfg)

    assert splits == ["train"]
    assert (tmp_path / "run" / "checkpoints" / "best.pt").exists()
    assert [m["eval_split"] for m in metrics(tmp_path / "run")] == ["val", "val"]
    selection = read_checkpoint(student_path)["meta"]["selection"]
    assert (selection["select"], selection["split"], selection["n"], selection["seed"]) == ("val", "val", 16, 0)


@pytest.mark.slow
def test_held_out_images_are_the_seeded_split_recorded_in_the_student_and_never_trained_on(tmp_path):
    from rslad_edge.data import hold_out, load_dataset

    student_path = train(tiny(tmp_path, epochs=1, train_subset=None, val_n=64, seed=3))
    full = load_dataset("shapes", split="train", seed=3)
    rest, held_out, indices = hold_out(full, 64, seed=3)
    selection = read_checkpoint(student_path)["meta"]["selection"]
    assert selection["indices_sha256"] == hashlib.sha256(indices.numpy().tobytes()).hexdigest()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["val_n"] == 64
    run = _build(tiny(tmp_path, train_subset=None, val_n=64, seed=3), DistInfo())
    assert len(run.train_set) == len(full) - 64 and torch.equal(run.train_set.images, rest.images)
    assert torch.equal(run.eval_y, held_out.labels) and run.eval_split == "val"


def test_selecting_on_the_test_split_is_explicit_trains_on_everything_and_says_so(tmp_path):
    cfg = resolve_config("smoke", cli_values={"select": "test"})
    assert cfg.val_n == 0  # the paper's protocol: the whole training set, selection on the test split
    student_path = train(tiny(tmp_path, epochs=1, select="test", val_n=0, eval_n=32))
    selection = read_checkpoint(student_path)["meta"]["selection"]
    assert selection["split"] == "test" and "not a held-out estimate" in selection["note"]
    assert metrics(tmp_path / "run")[0]["eval_split"] == "test"


def test_select_last_keeps_the_last_epoch_and_writes_no_best_checkpoint(tmp_path):
    student_path = train(tiny(tmp_path, epochs=2, select="last"))
    assert not (tmp_path / "run" / "checkpoints" / "best.pt").exists()
    assert read_checkpoint(student_path)["meta"]["epoch"] == 2


@pytest.mark.parametrize(
    "args,flag",
    [(["--val-n", "0"], "--val-n 0"), (["--val-n", "8"], "smaller than one batch"),
     (["--val-n", "6000"], "--val-n 6000"), (["--select", "best"], "--select"),
     (["--select", "test", "--val-n", "64"], "--val-n 64 with --select test")],
)
def test_bad_selection_options_exit_2_with_one_line_naming_the_flag_and_write_nothing(tmp_path, args, flag):
    result = runner.invoke(app, ["distill", *TINY_ARGS, *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert flag in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ processes

TINY_ARGS = ["--preset", "smoke", "--method", "sat", "--student", "smallcnn", "--train-subset", "128", "--batch-size",
             "32", "--val-n", "64", "--attack-steps", "2", "--precision", "fp32", "--device", "cpu"]


def _cli(*args):
    return [sys.executable, "-m", "rslad_edge.cli", "distill", *args]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _wait_for_epochs(run_dir, n, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no {n} epoch(s) within {timeout} s")


@pytest.mark.slow  # 16 s: subprocesses; Ctrl-C in-process stays in the default run
def test_sigterm_saves_and_exits_cleanly_and_kill_9_resumes_from_the_last_epoch(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY_ARGS, "--epochs", "40", "--out", str(run_dir)]
    process = subprocess.Popen(_cli(*args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_epochs(run_dir, 1, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "--resume" in stderr and "Traceback" not in stderr
    saved_epochs = len(metrics(run_dir))

    process = subprocess.Popen(_cli(*args, "--resume"), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_epochs(run_dir, saved_epochs + 1, process)
    process.kill()  # SIGKILL: no chance to save anything
    process.wait()
    done = metrics(run_dir)
    assert [m["epoch"] for m in done] == list(range(1, len(done) + 1))

    train(resume_config(run_dir, epochs=len(done) + 1), resume=True)
    epochs = [m["epoch"] for m in metrics(run_dir)]
    assert epochs == list(range(1, len(done) + 2))


@pytest.mark.slow  # a minute on 2 cores; `make test-all` runs it
def test_torchrun_with_two_cpu_processes_agrees_with_a_single_process(tmp_path):
    import socket

    torchrun = Path(sys.executable).with_name("torchrun")
    with socket.socket() as sock:  # a free port for the rendezvous (torchrun's --master-port 0 hangs)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [*TINY_ARGS, "--epochs", "2"]
    subprocess.run(_cli(*args, "--out", str(tmp_path / "single")), env=_env(), check=True, capture_output=True)
    result = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", "--master-port", str(port), "-m", "rslad_edge.cli", "distill", *args,
         "--out", str(tmp_path / "ddp")],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    single, ddp = metrics(tmp_path / "single"), metrics(tmp_path / "ddp")
    assert len(single) == len(ddp) == 2
    for a, b in zip(single, ddp, strict=True):
        # Same global batches and initialisation; BN statistics per half batch and attack starts differ.
        assert abs(a["train_loss"] - b["train_loss"]) < 0.05 * a["train_loss"]
        assert abs(a["clean_acc"] - b["clean_acc"]) <= 0.1


@pytest.mark.slow
def test_smoke_preset_student_is_clearly_more_robust_than_a_natural_one(tmp_path):
    """The smoke preset's promise: minutes on a CPU, no files. About 3 minutes on 2 cores."""
    result = runner.invoke(app, ["distill", "--preset", "smoke", "--out", str(tmp_path / "rslad")])
    assert result.exit_code == 0, result.output
    natural_args = ["distill", "--preset", "smoke", "--method", "natural", "--out", str(tmp_path / "nat")]
    natural = runner.invoke(app, natural_args)
    assert natural.exit_code == 0, natural.output
    rslad_robust = metrics(tmp_path / "rslad")[-1]["robust_acc"]
    natural_last = metrics(tmp_path / "nat")[-1]
    assert natural_last["clean_acc"] > 0.8  # the natural model did learn the task
    assert rslad_robust > natural_last["robust_acc"] + 0.2
