"""The distillation loop: one function, ``train(cfg) -> Path``, that reads top to bottom.

Per batch: the teacher's logits on the clean augmented batch (once, no grad); the method's attack crafts x' with the
student in its authors' BN mode; the student, back in train mode, is updated on the method's outer loss. Per epoch:
clean and PGD-20 accuracy of the student on a seeded split held out of the training set (never the test split,
unless ``--select test`` asks for the paper's protocol), one JSON line in ``metrics.jsonl``, ``last.pt`` and
``best.pt``. All randomness comes from generators seeded by (seed, epoch, batch), so a resumed run replays the same
batches, including after an interruption in the middle of an epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from rslad_edge import __version__
from rslad_edge.attacks import get_attack, pgd, robust_correct
from rslad_edge.data import (
    ImageSet,
    augment_batch,
    augment_recipe,
    hold_out,
    load_dataset,
    load_sample,
    subset,
    to_float,
)
from rslad_edge.data.cifar import CIFAR_SIZE
from rslad_edge.device import Precision, resolve_device, resolve_precision
from rslad_edge.distill import ddp
from rslad_edge.distill.config import DistillConfig
from rslad_edge.distill.methods import Method, StepLogits, get_method, kl_scale_factor
from rslad_edge.distill.schedules import step_lr
from rslad_edge.errors import ConfigError, RsladEdgeError, RunDirError, TrainingDivergedError, UsageError
from rslad_edge.io import atomic_write, sha256_file
from rslad_edge.models import (
    check_model_fits,
    create_model,
    load_checkpoint,
    model_defaults,
    read_checkpoint,
    save_checkpoint,
)
from rslad_edge.models.folding import BatchNormFoldedView, fold_batchnorm
from rslad_edge.models.teacher import ClassMapped, Resized, read_class_map

logger = logging.getLogger(__name__)

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "student.pt")  # what one train() writes into --out


class TrainingInterrupted(RsladEdgeError):
    """Ctrl-C or SIGTERM: the state was saved; ``--resume`` continues from it."""

    exit_code = 130


class TrainObserver(Protocol):
    """What the CLI implements to show progress (library code only logs)."""

    def epoch_started(self, epoch: int, epochs: int, batches: int, done: int) -> None: ...
    def batch_done(self, loss: float, images_per_s: float) -> None: ...
    def evaluating(self, n: int) -> None: ...
    def epoch_done(self, metrics: dict[str, Any]) -> None: ...


@dataclass
class _Run:
    """What one call of ``train`` works with, built once."""

    cfg: DistillConfig  # resolved: input_size and augment as run (what config.yaml records)
    method: Method
    hyperparameters: dict[str, float]
    device: torch.device
    precision: Precision
    student: nn.Module  # plain module: the attack, eval and checkpoints use it
    student_fn: nn.Module  # what is called for train-mode forwards: the student, or its torch.compile'd wrapper
    folded: BatchNormFoldedView | None  # eval-mode attacks: the student with BN folded into its convolutions
    attack_fn: nn.Module  # what the attack calls: the folded view (compiled with --compile), or student_fn
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    train_set: ImageSet
    augment: str  # the training augmentation recipe (data/augment.py)
    eval_split: str | None  # what the per-epoch check runs on: "val" (held-out training images), "test", or None
    eval_x: torch.Tensor | None  # (N, 3, H, W) float in [0, 1]
    eval_y: torch.Tensor | None
    num_classes: int
    dist: ddp.DistInfo
    kl_scale: float  # the factor on the method's KL term(s) that --loss-scale chose (0.1 for RSLAD's authors')
    meta: dict[str, Any]
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # metrics of the finished epochs
    progress: dict[str, Any] = dataclasses.field(default_factory=dict)  # of the current epoch, for an interrupt


def train(
    cfg: DistillConfig, *, resume: bool = False, force: bool = False, observer: TrainObserver | None = None
) -> Path:
    """Train a student as ``cfg`` says; returns the path of ``student.pt`` (the best checkpoint by PGD robust
    accuracy, as the paper reports; ``checkpoints/last.pt`` holds the last epoch).

    ``resume=True`` continues the run in ``cfg.out`` from ``checkpoints/last.pt``; build its ``cfg`` with
    :func:`rslad_edge.distill.config.resume_config`, which keeps the run's own settings.
    """
    dist = ddp.init_from_env()
    out = Path(cfg.out)
    if resume:
        if not (out / "checkpoints" / "last.pt").exists():
            raise RunDirError(f"--resume: nothing to resume in '{out}' (no checkpoints/last.pt); drop --resume")
    elif dist.is_main:
        _prepare_run_dir(out, force)
    dist.barrier()

    if get_method(cfg.method).needs_teacher and cfg.teacher is None:  # the smoke teacher is distill_student's job
        raise ConfigError(f"--method {cfg.method} needs --teacher (a checkpoint path, or robustbench:NAME)")
    run = _build(cfg, dist)
    cfg = run.cfg
    if dist.is_main and not resume:
        atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))

    start_epoch, start_batch, partial, best_robust = 1, 0, None, -1.0
    if resume:
        start_epoch, start_batch, partial, best_robust = _restore(run, out / "checkpoints" / "last.pt")
        if dist.is_main:  # a run killed between its checkpoint and its metrics line: the checkpoint is the truth
            lines = "".join(json.dumps(m) + "\n" for m in run.history)
            atomic_write(out / "metrics.jsonl", lambda tmp: tmp.write_text(lines))
    logger.info(
        "distill %s: %s <- %s on %s (%d images), %s, precision %s, %d epoch(s)%s",
        cfg.method, cfg.student, cfg.teacher or "no teacher", cfg.dataset, len(run.train_set), run.device,
        run.precision.name, cfg.epochs, f", {dist.world_size} processes" if dist.world_size > 1 else "",
    )

    for epoch in range(start_epoch, cfg.epochs + 1):
        with _interrupts_as_keyboard_interrupt():
            try:
                best_robust = _run_epoch(run, out, epoch, start_batch, partial, best_robust, observer)
            except KeyboardInterrupt:
                raise _save_interrupted(run, out, epoch, best_robust) from None
        start_batch, partial = 0, None

    if dist.is_main:
        best = out / "checkpoints" / "best.pt"
        source = best if best.exists() else out / "checkpoints" / "last.pt"
        atomic_write(out / "student.pt", lambda tmp: shutil.copyfile(source, tmp))
    dist.barrier()
    ddp.shutdown(dist)
    return out / "student.pt"


def _run_epoch(
    run: _Run, out: Path, epoch: int, start_batch: int, partial: dict[str, Any] | None, best_robust: float,
    observer: TrainObserver | None,
) -> float:
    """Train, evaluate (rank 0) and checkpoint one epoch; returns the best robust accuracy so far."""
    cfg, dist = run.cfg, run.dist
    lr = step_lr(epoch, cfg.lr, cfg.milestones, cfg.lr_gamma)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    started = time.perf_counter()
    train_loss, images, loss_made_of = _train_epoch(run, epoch, start_batch, partial, observer)
    train_seconds = time.perf_counter() - started
    ddp.broadcast_buffers(run.student, dist)  # BN running stats: rank 0's, everywhere

    metrics: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "clean_acc": None, "robust_acc": None,
                               "lr": lr, "images_per_s": images / max(train_seconds, 1e-9), "seconds": None,
                               "eval_split": None, **loss_made_of}
    if dist.is_main and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs) and run.eval_split is not None:
        if observer:
            observer.evaluating(len(run.eval_y))
        metrics["clean_acc"], metrics["robust_acc"] = evaluate(run.student, run.eval_x, run.eval_y, cfg, run.device)
        metrics["eval_split"] = run.eval_split
    metrics["seconds"] = time.perf_counter() - started
    if dist.is_main:
        best_robust = _save_epoch(run, out, epoch, metrics, best_robust)
        if observer:
            observer.epoch_done(metrics)
    dist.barrier()
    return best_robust


def evaluate(
    student: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: DistillConfig, device: torch.device
) -> tuple[float, float]:
    """Clean and PGD-20 accuracy of the student in eval mode, in fp32 whatever the training precision, so that
    numbers of runs with different precisions compare. PGD as RSLAD's training script measures it every epoch:
    20 steps of 0.003, uniform start, CE (the ``pgd_trades`` preset)."""
    student.eval()
    spec = dataclasses.replace(get_attack("pgd_trades"), steps=cfg.eval_steps)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    robust = robust_correct(student, x, y, spec, eps=cfg.eps, batch_size=256, generator=generator, device=device)
    with torch.no_grad():
        clean = torch.cat([student(x[i:i + 256].to(device)).argmax(1).cpu() for i in range(0, len(x), 256)]) == y
    return clean.float().mean().item(), robust.float().mean().item()


# ---------------------------------------------------------------------------------------------------------- setup


def _build(cfg: DistillConfig, dist: ddp.DistInfo) -> _Run:
    method = get_method(cfg.method)
    device = resolve_device(cfg.device, dist.local_rank if dist.world_size > 1 else None)
    precision = resolve_precision(cfg.precision, device)
    torch.manual_seed(cfg.seed)

    # The image size: --input-size, else the student's own config (timm, torchvision weights), else the data's.
    defaults = model_defaults(cfg.student, cfg.student_kwargs)
    wanted_size = tuple(cfg.input_size) if cfg.input_size else defaults.input_size
    data_options = {"input_size": wanted_size, "crop_pct": defaults.crop_pct, "memory_budget": (
        None if cfg.memory_budget is None else int(cfg.memory_budget * 2**30))}
    train_set = load_dataset(cfg.dataset, cfg.data_root, "train", seed=cfg.seed, **data_options)
    input_size = train_set.input_size
    augment = cfg.augment or augment_recipe(input_size)
    cfg = dataclasses.replace(cfg, input_size=list(input_size), augment=augment)
    train_set, eval_set, selection = _evaluation_split(cfg, train_set, data_options)
    train_set = subset(train_set, cfg.train_subset, seed=cfg.seed)
    num_classes = cfg.num_classes or train_set.num_classes
    if num_classes != train_set.num_classes:
        raise ConfigError(f"--num-classes {num_classes} but dataset '{cfg.dataset}' has {train_set.num_classes}")
    if cfg.batch_size > len(train_set):
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is larger than the training set ({len(train_set)} images); "
            "lower it or raise --train-subset"
        )
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} must divide evenly over {dist.world_size} processes")

    teacher, meta = None, {"method": cfg.method, "dataset": cfg.dataset, "eps": cfg.eps, "teacher": cfg.teacher}
    if method.needs_teacher:
        teacher = _load_teacher(cfg, train_set.classes, input_size, device, precision)
        if not str(cfg.teacher).startswith("robustbench:"):
            meta["teacher_sha256"] = sha256_file(cfg.teacher)
    meta["augment"] = augment
    meta["preprocess"] = train_set.preprocess

    student = create_model(cfg.student, num_classes, cfg.student_kwargs)
    check_model_fits(student, cfg.student, num_classes, input_size)
    student = precision.prepare(student.to(device), device)
    if cfg.sync_bn and dist.world_size > 1:
        if device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm does not run on CPU); drop the flag")
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    ddp.broadcast_parameters(student, dist)  # every rank starts from rank 0's initialisation
    student_fn = torch.compile(student) if cfg.compile else student
    # Eval-mode attacks run on a BN-folded view of the student (exact, and the attack is most of a step).
    folded = fold_batchnorm(student) if method.attack_bn_mode == "eval" else None
    attack_fn = student_fn if folded is None else torch.compile(folded) if cfg.compile else folded

    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type) if precision.grad_scaler else None
    hyperparameters = dict(method.hyperparameters)
    for name in ("alpha", "temperature", "beta"):
        if getattr(cfg, name) is not None:
            if name not in hyperparameters:
                raise ConfigError(f"--{name} has no meaning for --method {cfg.method}")
            hyperparameters[name] = getattr(cfg, name)
    meta["hyperparameters"] = hyperparameters
    meta["selection"] = selection
    kl_scale = kl_scale_factor(method, cfg.loss_scale, num_classes)
    meta["loss_scale"] = {"choice": cfg.loss_scale, "kl_factor": kl_scale}
    meta["config"] = cfg.to_dict()
    meta["rslad_edge_version"] = __version__
    return _Run(
        cfg=cfg, method=method, hyperparameters=hyperparameters, device=device, precision=precision, student=student,
        student_fn=student_fn, folded=folded, attack_fn=attack_fn, teacher=teacher, optimizer=optimizer, scaler=scaler,
        train_set=train_set, augment=augment, eval_split=selection["split"],
        eval_x=None if eval_set is None else to_float(eval_set.read()),
        eval_y=None if eval_set is None else eval_set.labels, num_classes=num_classes, dist=dist,
        kl_scale=kl_scale, meta=meta,
    )


def _evaluation_split(
    cfg: DistillConfig, train_set: ImageSet, data_options: dict[str, Any]
) -> tuple[ImageSet, ImageSet | None, dict[str, Any]]:
    """(the images to train on, the images of the per-epoch check, how student.pt is chosen, for the record).

    The held-out images come out of the training set before --train-subset samples it, so runs with different
    subsets, methods or seeds of training select on the same images. The test split is read only for --select test.
    """
    selection: dict[str, Any] = {
        "select": cfg.select, "split": None, "n": 0,
        "rule": "last epoch" if cfg.select == "last" else "best PGD-20 robust accuracy",
    }
    if cfg.select == "test":
        test_set = load_sample(cfg.dataset, cfg.data_root, "test", cfg.eval_n, cfg.seed,
                               input_size=train_set.input_size, crop_pct=data_options["crop_pct"])
        selection.update(split="test", n=len(test_set), seed=cfg.seed,
                         note="selected on the test split, as the paper's 'best checkpoint' row: not a held-out "
                              "estimate of the student's accuracy")
        return train_set, test_set, selection
    if cfg.val_n == 0:
        return train_set, None, selection
    if cfg.val_n + cfg.batch_size > len(train_set):
        raise UsageError(
            f"--val-n {cfg.val_n}: the training set has {len(train_set)} images, so holding out {cfg.val_n} leaves "
            f"less than one batch (--batch-size {cfg.batch_size}) to train on; lower --val-n"
        )
    rest, held_out, indices = hold_out(train_set, cfg.val_n, seed=cfg.seed)
    selection.update(split="val", n=cfg.val_n, seed=cfg.seed, source="training set",
                     indices_sha256=hashlib.sha256(indices.numpy().tobytes()).hexdigest())
    return rest, held_out, selection


# What a RobustBench teacher of each dataset takes: (classes, input size). ImageNet models get RobustBench's
# 224x224 crop (their Res256Crop224 preprocessing), normalisation inside.
ROBUSTBENCH_DATASETS = {"cifar10": (10, CIFAR_SIZE), "cifar100": (100, CIFAR_SIZE), "imagenet": (1000, (224, 224))}


def _load_teacher(
    cfg: DistillConfig, classes: list[str], input_size: tuple[int, int], device: torch.device, precision: Precision
) -> nn.Module:
    """The teacher as the student sees it: its logits over the dataset's classes (through --class-map when it was
    trained on others), on the student's images (resized inside when it was trained at another size). Its class
    count is checked on load: one line when it does not fit."""
    if str(cfg.teacher).startswith("robustbench:"):
        name = str(cfg.teacher).split(":", 1)[1]
        teacher_dataset = cfg.teacher_dataset or cfg.dataset
        if teacher_dataset not in ROBUSTBENCH_DATASETS:
            raise UsageError(f"--teacher-dataset {teacher_dataset}: RobustBench teachers come from "
                             f"{', '.join(ROBUSTBENCH_DATASETS)}; give --teacher-dataset")
        teacher_classes, teacher_size = ROBUSTBENCH_DATASETS[teacher_dataset]
        teacher = _robustbench_teacher(name, teacher_dataset)
        check_model_fits(teacher, cfg.teacher, teacher_classes, teacher_size)
    else:
        teacher, info = load_checkpoint(cfg.teacher, arch=cfg.teacher_arch, arch_kwargs=cfg.teacher_kwargs)
        teacher_classes = info["num_classes"]
        teacher_size = tuple((info.get("input") or {}).get("size") or input_size)
    if cfg.class_map:
        teacher = ClassMapped(teacher, read_class_map(cfg.class_map, classes, teacher_classes), cfg.class_map_reduce)
    elif teacher_classes != len(classes):
        raise ConfigError(
            f"teacher '{cfg.teacher}' has {teacher_classes} classes but the student is trained on {cfg.dataset} with "
            f"{len(classes)}; use a teacher of the same classes, or map its classes to yours with --class-map"
        )
    if teacher_size != tuple(input_size):
        teacher = Resized(teacher, teacher_size)
    return precision.prepare(teacher.to(device).eval().requires_grad_(False), device)


def _robustbench_teacher(name: str, dataset: str) -> nn.Module:
    try:
        from robustbench.utils import load_model  # optional extra, imported only when asked for
    except ImportError as exc:
        raise ConfigError(
            f"--teacher robustbench:{name} needs the robustbench extra: pip install 'rslad-edge[robustbench]'"
        ) from exc
    return load_model(model_name=name, dataset=dataset, threat_model="Linf")


# ---------------------------------------------------------------------------------------------------------- epoch


def _epoch_order(run: _Run, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(run.cfg.seed * 100_003 + epoch)
    return torch.randperm(len(run.train_set), generator=generator)


def _batch_generator(run: _Run, epoch: int, batch: int) -> torch.Generator:
    # One stream per (epoch, batch, rank): augmentation and attack starts replay exactly after a resume.
    seed = ((run.cfg.seed * 100_003 + epoch) * 1_000_003 + batch) * 64 + run.dist.rank
    return torch.Generator(device=run.device).manual_seed(seed)


def _num_batches(run: _Run) -> int:
    n, batch_size = len(run.train_set), run.cfg.batch_size
    # Under DDP every rank must take part in every all-reduce: whole global batches only.
    return n // batch_size if run.dist.world_size > 1 else math.ceil(n / batch_size)


def _train_epoch(
    run: _Run, epoch: int, start_batch: int, partial: dict[str, Any] | None, observer: TrainObserver | None
) -> tuple[float, int, dict[str, Any]]:
    """Train one epoch from ``start_batch``; returns (mean train loss, images seen by all ranks, what the loss was
    made of: the method's terms and the train-mode accuracies on x' and x, averaged over the epoch's images)."""
    cfg, dist = run.cfg, run.dist
    order = _epoch_order(run, epoch)
    num_batches = _num_batches(run)
    loss_sum = partial["loss_sum"] if partial else 0.0
    seen = int(partial["seen"]) if partial else 0
    sums: dict[str, float] = dict(partial.get("sums", {})) if partial else {}  # image-weighted, all ranks
    run.progress = {"batch": start_batch, "loss_sum": loss_sum, "seen": seen, "sums": sums}
    if observer:
        observer.epoch_started(epoch, cfg.epochs, num_batches, start_batch)
    epoch_images = 0
    for batch in range(start_batch, num_batches):
        index = order[batch * cfg.batch_size:(batch + 1) * cfg.batch_size]
        index = index[dist.rank::dist.world_size]  # this rank's shard of the global batch
        generator = _batch_generator(run, epoch, batch)
        images, y = run.train_set.take(index, run.device)  # (B, 3, H, W) uint8, (B,)
        x = to_float(augment_batch(images, generator, recipe=run.augment))  # (B, 3, H, W) in [0, 1]
        if run.precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        step_started = time.perf_counter()
        step = train_step(run, x, y, epoch, generator)
        if not math.isfinite(step.loss):
            raise TrainingDivergedError(
                f"the training loss became {step.loss} at epoch {epoch}, batch {batch + 1}; training stopped. The "
                f"last good state is {Path(cfg.out) / 'checkpoints' / 'last.pt'}. Try a lower --lr or --precision "
                "fp32."
            )
        batch_images = len(index) * dist.world_size
        loss_sum += step.loss * batch_images
        seen += batch_images
        epoch_images += batch_images
        for name, value in step.terms.items():
            sums[name] = sums.get(name, 0.0) + value * batch_images
        for name, correct in [("adv_correct", step.adv_correct), ("clean_correct", step.clean_correct)]:
            if correct is not None:
                sums[name] = sums.get(name, 0.0) + correct
        run.progress = {"batch": batch + 1, "loss_sum": loss_sum, "seen": seen, "sums": sums}
        if observer:
            observer.batch_done(step.loss, batch_images / (time.perf_counter() - step_started))
    return loss_sum / max(seen, 1), epoch_images, _epoch_summary(sums, seen)


_CORRECT_COUNTS = {"adv_correct": "train_robust_acc", "clean_correct": "train_clean_acc"}  # sums -> metric keys


def _epoch_summary(sums: dict[str, float], seen: int) -> dict[str, Any]:
    """Per-image means of an epoch's sums: ``loss_terms`` {name: mean}, ``train_robust_acc`` (the train-mode student
    on x', the examples it was trained on), ``train_clean_acc`` (on x, for methods that forward it)."""
    seen = max(seen, 1)
    summary: dict[str, Any] = {
        "loss_terms": {name: value / seen for name, value in sums.items() if name not in _CORRECT_COUNTS},
        "train_robust_acc": None, "train_clean_acc": None,
    }
    for name, key in _CORRECT_COUNTS.items():
        if name in sums:
            summary[key] = sums[name] / seen
    return summary


@dataclass(frozen=True)
class StepResult:
    """What one optimisation step reports, over the global batch (all ranks)."""

    loss: float  # the loss the optimiser minimised (at the chosen --loss-scale), mean over ranks
    terms: dict[str, float]  # the method's loss terms, unweighted and unscaled, mean over ranks
    adv_correct: int | None  # images the train-mode student classifies right on x' (None: no x')
    clean_correct: int | None  # ... on x (None: the method does not forward x)


def craft_adversarial(
    run: _Run, x: torch.Tensor, y: torch.Tensor, teacher_clean: torch.Tensor | None, generator: torch.Generator
) -> torch.Tensor:
    """The method's inner maximisation: x' for the batch, with the student in its authors' BN mode during the attack
    (eval: the BN-folded view, running statistics untouched; train: batch statistics, running statistics updated
    by every attack forward, as in ARD's and Madry's code), the random start unclamped as in their training loops
    (``pgd(clamp_start=False)``). Leaves the student in that mode."""
    method, cfg = run.method, run.cfg
    autocast = run.precision.autocast(run.device)
    run.student.train(method.attack_bn_mode == "train")
    if run.folded is not None:
        run.folded.refresh()  # the folded weights follow the last optimizer step and running statistics
    target_probs = None
    if method.attack_loss == "kl":
        if method.attack_target == "teacher":
            target_probs = F.softmax(teacher_clean, dim=1)
        else:  # TRADES: the student's own clean prediction, in eval mode, as a constant
            with torch.no_grad(), autocast:
                target_probs = F.softmax(run.attack_fn(x).float(), dim=1)
    with autocast:
        return pgd(
            run.attack_fn, x, y, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.attack_steps,
            loss=method.attack_loss, random_start=method.random_start, target_probs=target_probs,
            generator=generator, clamp_start=False,
        )


def train_step(run: _Run, x: torch.Tensor, y: torch.Tensor, epoch: int, generator: torch.Generator) -> StepResult:
    """One optimisation step of the method on the batch ``(x, y)`` (this rank's shard)."""
    method, student = run.method, run.student
    autocast = run.precision.autocast(run.device)

    teacher_clean = None
    if run.teacher is not None:
        with torch.inference_mode(), autocast:
            teacher_clean = run.teacher(x).float().clone()  # (B, C); clone leaves inference mode for autograd

    x_adv = craft_adversarial(run, x, y, teacher_clean, generator) if method.attack_loss is not None else None

    student.train()
    with autocast:
        # Separate forwards: BN normalises the adversarial and the clean batch each with its own statistics.
        student_adv = run.student_fn(x_adv) if "student_adv" in method.needs else None
        student_clean = run.student_fn(x) if "student_clean" in method.needs else None
    teacher_adv = None
    if "teacher_adv" in method.needs:
        with torch.inference_mode(), autocast:
            teacher_adv = run.teacher(x_adv).float().clone()
    logits = StepLogits(labels=y, student_adv=student_adv, student_clean=student_clean, teacher_clean=teacher_clean,
                        teacher_adv=teacher_adv)
    objective = method.loss(logits, run.hyperparameters, epoch, run.kl_scale)
    loss = objective.total

    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        ddp.all_reduce_gradients(student, run.dist)
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        ddp.all_reduce_gradients(student, run.dist)
        run.optimizer.step()
    return _step_result(loss, objective.terms, student_adv, student_clean, y, run.dist)


def _step_result(
    loss: torch.Tensor, terms: dict[str, torch.Tensor], student_adv: torch.Tensor | None,
    student_clean: torch.Tensor | None, y: torch.Tensor, dist: ddp.DistInfo,
) -> StepResult:
    """Everything a step reports, in one all-reduce (and one device sync): means of the losses, sums of the counts."""
    names = list(terms)
    correct = {kind: (logits.detach().argmax(1) == y).sum()
               for kind, logits in (("adv", student_adv), ("clean", student_clean)) if logits is not None}
    values = torch.stack([loss.detach().float(), *(terms[n].detach().float() for n in names),
                          *(count.float() for count in correct.values())])
    totals = ddp.sum_over_ranks(values, dist).tolist()
    term_totals, correct_totals = totals[1:1 + len(names)], dict(zip(correct, totals[1 + len(names):], strict=True))
    return StepResult(
        loss=totals[0] / dist.world_size,
        terms={name: total / dist.world_size for name, total in zip(names, term_totals, strict=True)},
        adv_correct=round(correct_totals["adv"]) if "adv" in correct_totals else None,
        clean_correct=round(correct_totals["clean"]) if "clean" in correct_totals else None,
    )


# ---------------------------------------------------------------------------------------------------------- state


def _prepare_run_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out '{out}' is a file, not a directory")
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not force:
        raise RunDirError(
            f"--out '{out}' already holds a run ({', '.join(existing)}): pass --resume to continue it or --force to "
            "start over (which deletes it)"
        )
    for name in existing:  # --force: only what a run writes, never anything else in the folder
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    # Nothing is created here: a run refused by a later check (a bad --val-n) leaves no trace; the first checkpoint
    # creates the folders.


def _restore(run: _Run, path: Path) -> tuple[int, int, dict[str, Any] | None, float]:
    """Load student, optimizer and progress from ``last.pt``: (epoch to run, first batch, partial sums, best)."""
    state = read_checkpoint(path)
    run.student.load_state_dict(state["state_dict"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and "grad_scaler" in state:
        run.scaler.load_state_dict(state["grad_scaler"])
    torch.set_rng_state(state["torch_rng"])
    run.history = list(state["history"])
    progress = state["progress"]
    logger.info("resuming %s at epoch %d, batch %d", path, progress["epoch"], progress["batch"])
    partial = ({"loss_sum": progress["loss_sum"], "seen": progress["seen"], "sums": progress.get("sums", {})}
               if progress["batch"] else None)
    return progress["epoch"], progress["batch"], partial, state["best_robust_acc"]


def _training_state(
    run: _Run, epoch: int, batch: int, loss_sum: float, seen: int, best: float, sums: dict[str, float] | None = None
) -> dict[str, Any]:
    state = {
        "optimizer": run.optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        # The epoch (1-based) and batch to continue from; partial sums of an interrupted epoch.
        "progress": {"epoch": epoch, "batch": batch, "loss_sum": loss_sum, "seen": seen, "sums": dict(sums or {})},
        "best_robust_acc": best,
        "history": run.history,
    }
    if run.scaler is not None:
        state["grad_scaler"] = run.scaler.state_dict()
    return state


def _save(run: _Run, path: Path, meta: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    save_checkpoint(path, run.student, run.cfg.student, num_classes=run.num_classes,
                    input_size=run.train_set.input_size, arch_kwargs=run.cfg.student_kwargs,
                    preprocess=run.train_set.preprocess, meta={**run.meta, **meta}, extra=extra)


def _save_epoch(run: _Run, out: Path, epoch: int, metrics: dict[str, Any], best: float) -> float:
    """best.pt, then last.pt (which carries the metrics history), then the metrics line: a kill at any point
    leaves a consistent run that --resume repairs."""
    run.history.append(metrics)
    meta = {"epoch": epoch, "metrics": metrics}
    robust = metrics["robust_acc"]
    if run.cfg.select != "last" and robust is not None and robust > best:
        best = robust
        _save(run, out / "checkpoints" / "best.pt", meta)
    extra = _training_state(run, epoch + 1, 0, 0.0, 0, best)
    _save(run, out / "checkpoints" / "last.pt", meta, extra)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    return best


def _save_interrupted(run: _Run, out: Path, epoch: int, best: float) -> TrainingInterrupted:
    progress = run.progress or {"batch": 0, "loss_sum": 0.0, "seen": 0}
    if run.dist.is_main:
        extra = _training_state(run, epoch, progress["batch"], progress["loss_sum"], progress["seen"], best,
                                progress.get("sums"))
        _save(run, out / "checkpoints" / "last.pt", {"epoch": epoch - 1, "interrupted_at_batch": progress["batch"]},
              extra)
    return TrainingInterrupted(
        f"interrupted at epoch {epoch}, batch {progress['batch']}; state saved to {out / 'checkpoints' / 'last.pt'}. "
        f"Continue with: rslad-edge distill --out {out} --resume"
    )


@contextlib.contextmanager
def _interrupts_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the job) is handled like Ctrl-C: save, then exit cleanly."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
