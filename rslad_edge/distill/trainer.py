"""The distillation loop: ``train(cfg) -> Path``, whose body is the loop, top to bottom.

Per batch: the teacher's logits on the clean augmented batch (once, no grad); the method's attack crafts x' with the
student in its authors' BN mode; the student, back in train mode, is updated on the method's outer loss. Per epoch:
clean and PGD-20 accuracy of the student on a seeded split held out of the training set (never the test split,
unless ``--select test`` asks for the paper's protocol), one JSON line in ``metrics.jsonl``, ``last.pt`` and
``best.pt``. All randomness comes from generators seeded by (seed, epoch, batch, rank), and ``last.pt`` stores the
loop's position (:class:`Progress`) as the loop holds it, so a resumed run replays the same batches, including after
an interruption in the middle of an epoch.
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
from dataclasses import dataclass, field
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
    check_class_count,
    hold_out,
    load_dataset,
    load_sample,
    subset,
    to_float,
)
from rslad_edge.data.cifar import CIFAR_SIZE
from rslad_edge.device import Precision, resolve_device, resolve_precision
from rslad_edge.distill import ddp
from rslad_edge.distill.config import DistillConfig, missing_teacher
from rslad_edge.distill.methods import Method, StepLogits, get_method, kl_scale_factor
from rslad_edge.distill.schedules import step_lr
from rslad_edge.errors import ConfigError, RunDirError, TrainingDivergedError, TrainingInterrupted, UsageError
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


class TrainObserver(Protocol):
    """What the CLI implements to show progress (library code only logs)."""

    def epoch_started(self, epoch: int, epochs: int, batches: int, done: int) -> None: ...
    def batch_done(self, loss: float, images_per_s: float) -> None: ...
    def evaluating(self, n: int) -> None: ...
    def epoch_done(self, metrics: dict[str, Any]) -> None: ...


@dataclass
class _Run:
    """What one call of ``train`` works with, built once. Where the loop stands is not here: see Progress."""

    cfg: DistillConfig  # resolved: input_size and augment as run (what config.yaml records)
    method: Method
    hyperparameters: dict[str, float]
    kl_scale: float  # the factor on the method's KL term(s) that --loss-scale chose (0.1 for RSLAD's authors')
    device: torch.device
    precision: Precision
    dist: ddp.DistInfo
    student: nn.Module  # the module trained and saved; with --compile its forward is compiled in place
    # What eval-mode attacks call: the student with BN folded into its convolutions (a BatchNormFoldedView sharing
    # its modules), or the student itself where it cannot be folded; None for methods that attack in train mode.
    student_eval_view: nn.Module | None
    teacher: nn.Module | None  # eval mode, frozen; as the student sees it (class map, resize inside)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    train_set: ImageSet
    eval_split: str | None  # what the per-epoch check runs on: "val" (held-out training images), "test", or None
    eval_x: torch.Tensor | None  # (N, 3, H, W) float in [0, 1]
    eval_y: torch.Tensor | None
    meta: dict[str, Any]  # what every checkpoint's meta carries


@dataclass(frozen=True)
class StepResult:
    """What one optimisation step reports, over the global batch (all ranks)."""

    loss: float  # the loss the optimiser minimised (at the chosen --loss-scale), mean over ranks
    terms: dict[str, float]  # the method's loss terms, unweighted and unscaled, mean over ranks
    adv_correct: int | None  # images the train-mode student classifies right on x' (None: no x')
    clean_correct: int | None  # ... on x (None: the method does not forward x)


_COUNTS = {"adv_correct": "train_robust_acc", "clean_correct": "train_clean_acc"}  # sums -> metrics.jsonl keys


@dataclass
class Progress:
    """Where the run stands: what the loop updates after each batch and each epoch, and what ``last.pt`` stores,
    field for field, under ``progress``. The sums are over the epoch's batches done so far, all ranks."""

    epoch: int = 1  # the epoch in progress (1-based)
    batch: int = 0  # its batches done, so the next one to train
    loss_sum: float = 0.0  # the loss, image-weighted
    seen: int = 0  # images
    sums: dict[str, float] = field(default_factory=dict)  # the method's loss terms, image-weighted; _COUNTS
    best_robust_acc: float = -1.0  # the per-epoch check's best so far (best.pt's)

    def add(self, step: StepResult, images: int) -> None:
        """Count in one more finished batch of ``images`` (all ranks)."""
        self.batch += 1
        self.seen += images
        self.loss_sum += step.loss * images
        for name, value in step.terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value * images
        for name, count in (("adv_correct", step.adv_correct), ("clean_correct", step.clean_correct)):
            if count is not None:
                self.sums[name] = self.sums.get(name, 0.0) + count

    def next_epoch(self) -> None:
        """The epoch is done: the position moves to the start of the next one."""
        self.epoch, self.batch, self.loss_sum, self.seen, self.sums = self.epoch + 1, 0, 0.0, 0, {}

    def means(self) -> dict[str, Any]:
        """What the epoch's loss was made of, per image: ``loss_terms`` {name: mean}, ``train_robust_acc`` (the
        train-mode student on x', the examples it was trained on), ``train_clean_acc`` (on x, for methods that
        forward it); None where the method has no such forward."""
        seen = max(self.seen, 1)
        return {
            "loss_terms": {name: value / seen for name, value in self.sums.items() if name not in _COUNTS},
            **{key: self.sums[name] / seen if name in self.sums else None for name, key in _COUNTS.items()},
        }


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
    last, best = out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt"
    if resume and not last.exists():
        raise RunDirError(f"--resume: nothing to resume in '{out}' (no checkpoints/last.pt); drop --resume")
    if not resume and dist.is_main:
        check_run_dir(out, force)
    dist.barrier()
    if get_method(cfg.method).needs_teacher and cfg.teacher is None:  # training one is distill_student's job
        raise missing_teacher(cfg)

    run = _build(cfg, dist)
    cfg = run.cfg
    if dist.is_main and not resume:
        atomic_write(out / "config.yaml", lambda tmp: tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False)))
    progress, history = Progress(), []  # history: the metrics of the finished epochs
    if resume:
        progress, history = _restore(run, last)
        if dist.is_main:  # a run killed between its checkpoint and its metrics line: the checkpoint is the truth
            lines = "".join(json.dumps(m) + "\n" for m in history)
            atomic_write(out / "metrics.jsonl", lambda tmp: tmp.write_text(lines))
    logger.info(
        "distill %s: %s <- %s on %s (%d images), %s, precision %s, %d epoch(s)%s",
        cfg.method, cfg.student, cfg.teacher or "no teacher", cfg.dataset, len(run.train_set), run.device,
        run.precision.name, cfg.epochs, f", {dist.world_size} processes" if dist.world_size > 1 else "",
    )
    # Under DDP every rank must take part in every all-reduce: whole global batches only.
    num_batches = (len(run.train_set) // cfg.batch_size if dist.world_size > 1
                   else math.ceil(len(run.train_set) / cfg.batch_size))

    with _saved_on_interrupt(run, last, progress, history):
        for epoch in range(progress.epoch, cfg.epochs + 1):
            lr = step_lr(epoch, cfg.lr, cfg.milestones, cfg.lr_gamma)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            order = _epoch_order(cfg.seed, epoch, len(run.train_set))
            if observer:
                observer.epoch_started(epoch, cfg.epochs, num_batches, progress.batch)
            started, seen_before = time.perf_counter(), progress.seen
            for batch in range(progress.batch, num_batches):
                index = order[batch * cfg.batch_size:(batch + 1) * cfg.batch_size]
                index = index[dist.rank::dist.world_size]  # this rank's shard of the global batch
                generator = _batch_generator(cfg.seed, epoch, batch, dist.rank, run.device)
                images, y = run.train_set.take(index, run.device)  # (B, 3, H, W) uint8, (B,)
                x = to_float(augment_batch(images, generator, recipe=cfg.augment))  # (B, 3, H, W) in [0, 1]
                if run.precision.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                step_started = time.perf_counter()
                step = train_step(run, x, y, epoch, generator)
                if not math.isfinite(step.loss):
                    raise TrainingDivergedError(
                        f"the training loss became {step.loss} at epoch {epoch}, batch {batch + 1}; training stopped. "
                        f"The last good state is {last}. Try a lower --lr or --precision fp32."
                    )
                batch_images = len(index) * dist.world_size
                progress.add(step, batch_images)  # the position moves past this batch
                if observer:
                    observer.batch_done(step.loss, batch_images / (time.perf_counter() - step_started))
            train_seconds = time.perf_counter() - started
            ddp.broadcast_buffers(run.student, dist)  # BN running stats: rank 0's, everywhere

            # The per-epoch check, on rank 0: clean and PGD-20 accuracy on the held-out images.
            evaluated = (dist.is_main and run.eval_split is not None
                         and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs))
            clean_acc = robust_acc = None
            if evaluated:
                if observer:
                    observer.evaluating(len(run.eval_y))
                clean_acc, robust_acc = evaluate(run.student, run.eval_x, run.eval_y, cfg, run.device)
            metrics = {"epoch": epoch, "train_loss": progress.loss_sum / max(progress.seen, 1), "clean_acc": clean_acc,
                       "robust_acc": robust_acc, "lr": lr,
                       "images_per_s": (progress.seen - seen_before) / max(train_seconds, 1e-9),
                       "seconds": time.perf_counter() - started, "eval_split": run.eval_split if evaluated else None,
                       **progress.means()}

            # The checkpoint, on rank 0: best.pt, then last.pt (at the start of the next epoch, with the history),
            # then the metrics line: a kill at any point leaves a consistent run that --resume repairs.
            meta = {"epoch": epoch, "metrics": metrics}
            if cfg.select != "last" and robust_acc is not None and robust_acc > progress.best_robust_acc:  # rank 0
                _save(run, best, meta)
                progress.best_robust_acc = robust_acc
            history.append(metrics)
            progress.next_epoch()
            if dist.is_main:
                _save(run, last, meta, _training_state(run, progress, history))
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if observer:
                    observer.epoch_done(metrics)
            dist.barrier()

    if dist.is_main:
        source = best if best.exists() else last
        atomic_write(out / "student.pt", lambda tmp: shutil.copyfile(source, tmp))
    dist.barrier()
    ddp.shutdown(dist)
    return out / "student.pt"


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


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The epoch's shuffle of the training set: the same on every rank and after a resume."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def _batch_generator(seed: int, epoch: int, batch: int, rank: int, device: torch.device) -> torch.Generator:
    """One stream per (epoch, batch, rank): augmentation and attack starts replay exactly after a resume."""
    return torch.Generator(device=device).manual_seed(((seed * 100_003 + epoch) * 1_000_003 + batch) * 64 + rank)


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
    check_class_count(num_classes, train_set.num_classes, model=f"the student (--num-classes {num_classes})",
                      data=f"--dataset {cfg.dataset}", fix="leave --num-classes out to take the dataset's",
                      error=ConfigError)
    if cfg.batch_size > len(train_set):
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is larger than the training set ({len(train_set)} images); "
            "lower it or raise --train-subset"
        )
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} must divide evenly over {dist.world_size} processes")

    hyperparameters = dict(method.hyperparameters)
    for name in ("alpha", "temperature", "beta"):
        if getattr(cfg, name) is not None:
            if name not in hyperparameters:
                raise ConfigError(f"--{name} has no meaning for --method {cfg.method}")
            hyperparameters[name] = getattr(cfg, name)
    kl_scale = kl_scale_factor(method, cfg.loss_scale, num_classes)
    meta = {"method": cfg.method, "dataset": cfg.dataset, "eps": cfg.eps, "teacher": cfg.teacher, "augment": augment,
            "preprocess": train_set.preprocess, "hyperparameters": hyperparameters, "selection": selection,
            "loss_scale": {"choice": cfg.loss_scale, "kl_factor": kl_scale}, "config": cfg.to_dict(),
            "rslad_edge_version": __version__}

    teacher = None
    if method.needs_teacher:
        teacher, meta["teacher_input_size"] = _load_teacher(cfg, train_set.classes, input_size, device, precision)
        if not str(cfg.teacher).startswith("robustbench:"):
            meta["teacher_sha256"] = sha256_file(cfg.teacher)

    student = create_model(cfg.student, num_classes, cfg.student_kwargs)
    check_model_fits(student, cfg.student, num_classes, input_size)
    _set_bn_momentum(student, cfg, steps=cfg.epochs * (len(train_set) // cfg.batch_size))
    student = precision.prepare(student.to(device), device)
    if cfg.sync_bn and dist.world_size > 1:
        if device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm does not run on CPU); drop the flag")
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
    ddp.broadcast_parameters(student, dist)  # every rank starts from rank 0's initialisation
    # Eval-mode attacks run on a BN-folded view of the student (exact, and the attack is most of a step).
    student_eval_view = (fold_batchnorm(student) or student) if method.attack_bn_mode == "eval" else None
    if cfg.compile:  # in place: the same modules and state dicts, compiled forwards
        student.compile()
        if isinstance(student_eval_view, BatchNormFoldedView):
            student_eval_view.compile()

    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return _Run(
        cfg=cfg, method=method, hyperparameters=hyperparameters, kl_scale=kl_scale, device=device,
        precision=precision, dist=dist, student=student, student_eval_view=student_eval_view, teacher=teacher,
        optimizer=optimizer, scaler=torch.amp.GradScaler(device.type) if precision.grad_scaler else None,
        train_set=train_set, eval_split=selection["split"],
        eval_x=None if eval_set is None else to_float(eval_set.read()),
        eval_y=None if eval_set is None else eval_set.labels, meta=meta,
    )


# A BatchNorm layer's running statistics keep (1 - momentum) ** steps of their initial values; above this share at the
# end of a run, the eval-mode student (the attack's, the checkpoint's, every export's) is not the one trained.
STALE_BN_SHARE = 0.01


def _set_bn_momentum(student: nn.Module, cfg: DistillConfig, *, steps: int) -> None:
    """Apply --bn-momentum; without it, warn when the student's own momentum leaves its running statistics near their
    initial values after this run's ``steps``."""
    layers = [m for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if cfg.bn_momentum is not None:
        for layer in layers:
            layer.momentum = cfg.bn_momentum
        return
    slowest = min((layer.momentum for layer in layers if layer.momentum is not None), default=None)
    if slowest is not None and (1 - slowest) ** steps > STALE_BN_SHARE:
        # The advice: PyTorch's default 0.1, or the smallest momentum (rounded up to 0.01) that clears the share.
        enough = math.ceil(100 * (1 - STALE_BN_SHARE ** (1 / max(steps, 1)))) / 100
        logger.warning("%s's BatchNorm momentum is %g: after this run's %d steps its running statistics keep %.1f%% "
                       "of their initial values, so the eval-mode student (attacked, checked, exported) is not the "
                       "one trained; pass --bn-momentum %g", cfg.student, slowest, steps,
                       100 * (1 - slowest) ** steps, max(0.1, enough))


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
) -> tuple[nn.Module, list[int]]:
    """The teacher as the student sees it: its logits over the dataset's classes (through --class-map when it was
    trained on others), on the student's images (resized inside when it was trained at another size), and the size
    it takes. Its class count is checked on load: one line when it does not fit."""
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
        teacher_size = _teacher_size(cfg, info, input_size)
    if cfg.class_map:
        teacher = ClassMapped(teacher, read_class_map(cfg.class_map, classes, teacher_classes), cfg.class_map_reduce)
    elif teacher_classes != len(classes):
        raise ConfigError(
            f"teacher '{cfg.teacher}' has {teacher_classes} classes but the student is trained on {cfg.dataset} with "
            f"{len(classes)}; use a teacher of the same classes, or map its classes to yours with --class-map"
        )
    if teacher_size != tuple(input_size):
        teacher = Resized(teacher, teacher_size)
    return precision.prepare(teacher.to(device).eval().requires_grad_(False), device), list(teacher_size)


def _teacher_size(cfg: DistillConfig, info: dict[str, Any], input_size: tuple[int, int]) -> tuple[int, int]:
    """The size the teacher takes: its checkpoint's; for a bare state dict --teacher-input-size, else the data's own
    size (what a teacher of this data was most likely trained at), else the student's."""
    from rslad_edge.data.registry import own_size

    recorded = (info.get("input") or {}).get("size")
    if recorded:
        if cfg.teacher_input_size and list(cfg.teacher_input_size) != list(recorded):
            raise ConfigError(f"teacher '{cfg.teacher}' records its input size, {recorded[0]}x{recorded[1]}; "
                              "--teacher-input-size is for a bare state dict: drop it")
        return int(recorded[0]), int(recorded[1])
    if cfg.teacher_input_size:
        return int(cfg.teacher_input_size[0]), int(cfg.teacher_input_size[1])
    size = own_size(cfg.dataset, cfg.data_root) or tuple(input_size)
    if tuple(size) != tuple(input_size):
        logger.warning("teacher '%s' is a bare state dict, which records no input size: it sees the student's "
                       "%dx%d images resized to %dx%d, the data's own size (--teacher-input-size to change)",
                       cfg.teacher, input_size[0], input_size[1], size[0], size[1])
    return int(size[0]), int(size[1])


def _robustbench_teacher(name: str, dataset: str) -> nn.Module:
    try:
        from robustbench.utils import load_model  # optional extra, imported only when asked for
    except ImportError as exc:
        raise ConfigError(
            f"--teacher robustbench:{name} needs the robustbench extra: pip install 'rslad-edge[robustbench]'"
        ) from exc
    return load_model(model_name=name, dataset=dataset, threat_model="Linf")


# ---------------------------------------------------------------------------------------------------------- step


def craft_adversarial(
    run: _Run, x: torch.Tensor, y: torch.Tensor, teacher_clean: torch.Tensor | None, generator: torch.Generator
) -> torch.Tensor:
    """The method's inner maximisation: x' for the batch, with the student in its authors' BN mode during the attack
    (eval: the BN-folded view, running statistics untouched; train: batch statistics, running statistics updated
    by every attack forward, as in ARD's and Madry's code), the random start unclamped as in their training loops
    (``pgd(clamp_start=False)``). Leaves the student in that mode."""
    method, cfg = run.method, run.cfg
    autocast = run.precision.autocast(run.device)
    eval_mode = method.attack_bn_mode == "eval"
    run.student.train(not eval_mode)
    attacked = run.student_eval_view if eval_mode else run.student
    if isinstance(attacked, BatchNormFoldedView):
        attacked.refresh()  # the folded weights follow the last optimizer step and running statistics
    target_probs = None
    if method.attack_loss == "kl":
        if method.attack_target == "teacher":
            target_probs = F.softmax(teacher_clean, dim=1)
        else:  # TRADES: the student's own clean prediction, in eval mode, as a constant
            with torch.no_grad(), autocast:
                target_probs = F.softmax(attacked(x).float(), dim=1)
    with autocast:
        return pgd(
            attacked, x, y, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.attack_steps,
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
        student_adv = student(x_adv) if "student_adv" in method.needs else None
        student_clean = student(x) if "student_clean" in method.needs else None
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


def check_run_dir(out: Path, force: bool, names: tuple[str, ...] = RUN_FILES) -> None:
    """Refuse an existing run in ``out`` without ``force``; with it, delete ``names`` (only what a run writes)."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out '{out}' is a file, not a directory")
    existing = [name for name in names if (out / name).exists()]
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


def _training_state(run: _Run, progress: Progress, history: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``last.pt`` holds besides the student: enough to continue exactly where the loop stands."""
    state = {"progress": dataclasses.asdict(progress), "history": history, "optimizer": run.optimizer.state_dict(),
             "torch_rng": torch.get_rng_state()}
    if run.scaler is not None:
        state["grad_scaler"] = run.scaler.state_dict()
    return state


def _restore(run: _Run, path: Path) -> tuple[Progress, list[dict[str, Any]]]:
    """Load the student, the optimizer and the loop's position from ``last.pt``: (progress, history)."""
    state = read_checkpoint(path)
    run.student.load_state_dict(state["state_dict"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and "grad_scaler" in state:
        run.scaler.load_state_dict(state["grad_scaler"])
    torch.set_rng_state(state["torch_rng"])
    progress = Progress(**state["progress"])
    if "best_robust_acc" in state:  # last.pt of earlier versions: the best beside the progress (and maybe no sums)
        progress.best_robust_acc = state["best_robust_acc"]
    logger.info("resuming %s at epoch %d, batch %d", path, progress.epoch, progress.batch)
    return progress, list(state["history"])


def _save(run: _Run, path: Path, meta: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    save_checkpoint(path, run.student, run.cfg.student, num_classes=run.train_set.num_classes,
                    input_size=run.train_set.input_size, arch_kwargs=run.cfg.student_kwargs,
                    preprocess=run.train_set.preprocess, meta={**run.meta, **meta}, extra=extra)


@contextlib.contextmanager
def _saved_on_interrupt(run: _Run, path: Path, progress: Progress, history: list[dict[str, Any]]) -> Iterator[None]:
    """Ctrl-C, or SIGTERM (a scheduler stopping the job) handled like it, inside the block: ``last.pt`` at the loop's
    position (rank 0), then :class:`TrainingInterrupted` (exit 130)."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except KeyboardInterrupt:
        if run.dist.is_main:
            _save(run, path, {"epoch": progress.epoch - 1, "interrupted_at_batch": progress.batch},
                  _training_state(run, progress, history))
        raise TrainingInterrupted(
            f"interrupted at epoch {progress.epoch}, batch {progress.batch}; state saved to {path}. "
            f"Continue with: rslad-edge distill --out {run.cfg.out} --resume"
        ) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
