"""`rslad-edge distill`: parses options, calls ``train``, shows progress. No training logic here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from rslad_edge.attacks import parse_eps
from rslad_edge.console import console
from rslad_edge.distill.config import (
    PRESETS,
    DistillConfig,
    load_yaml,
    parse_input_size,
    resolve_config,
    resume_config,
)
from rslad_edge.distill.methods import METHODS
from rslad_edge.distill.progress import RichObserver
from rslad_edge.errors import ConfigError

app = typer.Typer(rich_markup_mode="rich")

_METHODS_HELP = ", ".join(METHODS)
_PRESETS_HELP = ", ".join(PRESETS)


def _eps(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_eps(value)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


def _kwargs(value: str | None, flag: str) -> dict[str, Any] | None:
    """``"width_mult=0.75,dropout=0.2"`` -> ``{"width_mult": 0.75, "dropout": 0.2}`` (values read as YAML scalars)."""
    if value is None:
        return None
    out: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise typer.BadParameter(f"{flag} takes KEY=VALUE[,KEY=VALUE], got '{item}'")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def _size(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return parse_input_size(value)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


def _milestones(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated epochs like 215,260,285, got '{value}'") from None


@app.callback(invoke_without_command=True)
def distill(
    student: Annotated[str | None, typer.Option(
        help="Student architecture: a registry name (`rslad-edge models`), torchvision:NAME (e.g. "
        "torchvision:mobilenet_v3_small), timm:NAME (timm extra) or package.module:factory. [default: mobilenetv2]"
    )] = None,
    student_kwargs: Annotated[str | None, typer.Option(
        help="Options of the student's constructor, KEY=VALUE[,KEY=VALUE], e.g. width_mult=0.75.")] = None,
    teacher: Annotated[str | None, typer.Option(
        help="Robust teacher: a checkpoint, or robustbench:NAME (robustbench extra). Omitted: --train-teacher "
        "trains one first (the smoke preset always does).")] = None,
    teacher_arch: Annotated[str | None, typer.Option(
        "--teacher-arch", "--arch", help="Architecture of a bare-state-dict teacher, e.g. wrn-34-10 or "
        "torchvision:resnet50.")] = None,
    teacher_kwargs: Annotated[str | None, typer.Option(
        help="Options of a bare-state-dict teacher's constructor, KEY=VALUE[,KEY=VALUE].")] = None,
    train_teacher: Annotated[str | None, typer.Option(
        help="No teacher at hand: first train one of this architecture with SAT (this run's data and schedule) "
        "under OUT/teacher, then distil from it.")] = None,
    teacher_dataset: Annotated[str | None, typer.Option(
        help="The dataset a robustbench: teacher was trained on, when not --dataset: imagenet (1,000 classes; "
        "needs --class-map).")] = None,
    class_map: Annotated[Path | None, typer.Option(
        help="YAML/JSON mapping each of your class names to the teacher's class indices (e.g. cat: [281, 282]), "
        "for a teacher of other classes (an ImageNet model).")] = None,
    class_map_reduce: Annotated[str | None, typer.Option(
        help="How a class map joins a group's logits: sum (of probabilities: logsumexp of the logits) or max. "
        "[default: sum]")] = None,
    num_classes: Annotated[int | None, typer.Option(help="Class count (default: the dataset's).")] = None,
    input_size: Annotated[str | None, typer.Option(
        help="Image size the student takes, H or HxW (e.g. 96, 224x160). Images are resized (shorter side) and "
        "center-cropped to it. [default: the student's own config (timm), else the data's]")] = None,
    augment: Annotated[str | None, typer.Option(
        help="Training augmentation: pad-crop-flip (CIFAR's) or rrc-flip (random-resized crop + flip). [default: "
        "pad-crop-flip up to 64 px, rrc-flip above]")] = None,
    memory_budget: Annotated[float | None, typer.Option(
        help="GiB a data split may take in memory; a larger one is streamed from its decoded cache on disk. "
        "[default: a quarter of this machine's memory]")] = None,
    method: Annotated[str | None, typer.Option(help=f"Training method: {_METHODS_HELP}. [default: rslad]")] = None,
    dataset: Annotated[str | None, typer.Option(
        help="cifar10, cifar100, imagefolder (ROOT/{train,test}/<class>/) or shapes (synthetic). [default: cifar10]")
    ] = None,
    data_root: Annotated[str | None, typer.Option(help="Dataset folder.")] = None,
    out: Annotated[str | None, typer.Option(help="Run directory. [default: runs/distill]")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs. [default: 300, the paper's]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Global batch size. [default: 128]")] = None,
    lr: Annotated[float | None, typer.Option(help="SGD learning rate. [default: 0.1]")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="[default: 2e-4]")] = None,
    loss_scale: Annotated[str | None, typer.Option(
        help="authors: RSLAD's and ARD's KL as their code reduces it (batchmean / 10, batchmean / classes), at which "
        "the paper's lr was tuned; batchmean: the scale of a cross-entropy. A loss scaled by s at lr η, weight "
        "decay λ steps exactly as the unscaled loss at lr η·s, weight decay λ/s (SGD, momentum). "
        "[default: authors; batchmean in the short presets]")] = None,
    milestones: Annotated[str | None, typer.Option(
        help="First epochs at a 10x lower lr. [default: 216,261,286: RSLAD's code lowers it after epochs 215, 260, "
        "285; ARD/IAD 101 (of 200), TRADES 75 (of 76), as their code runs]")] = None,
    eps: Annotated[str | None, typer.Option(help="L-inf radius in pixel units: 8/255, not 8. [default: 8/255]")] = None,
    step_size: Annotated[str | None, typer.Option(help="Attack step size. [default: 2/255]")] = None,
    attack_steps: Annotated[int | None, typer.Option(help="PGD steps of the training attack. [default: 10]")] = None,
    alpha: Annotated[float | None, typer.Option(help="Method weight (RSLAD 5/6, ARD 1, KD 0.9).")] = None,
    temperature: Annotated[float | None, typer.Option(help="Distillation temperature (ARD 30, IAD 1, KD 4).")] = None,
    beta: Annotated[float | None, typer.Option(help="TRADES beta (6) / IAD beta (0.1).")] = None,
    train_subset: Annotated[int | None, typer.Option(help="Train on a fixed seeded sample of N images.")] = None,
    val_n: Annotated[int | None, typer.Option(
        help="Training images held out (seeded, never trained on) for the per-epoch clean / PGD-20 check that "
        "chooses student.pt. [default: 1000]")] = None,
    select: Annotated[str | None, typer.Option(
        help="Which epoch becomes student.pt: val (best PGD-20 on the --val-n held-out images), last, or test (best "
        "on --eval-n test images, trained on the whole training set: the paper's 'best checkpoint' row, selected on "
        "the test split and recorded as such). [default: val]")] = None,
    eval_n: Annotated[int | None, typer.Option(
        help="Test images for the per-epoch check under --select test. [default: 1000]")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate every K epochs (and the last). [default: 1]")] = None,
    precision: Annotated[str | None, typer.Option(
        help="auto (bf16 + channels_last on CPUs with AVX-512 BF16 / AMX, AMP on CUDA, else fp32), fp32, bf16, fp16."
    )] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N. [default: auto]")] = None,
    compile: Annotated[bool | None, typer.Option(
        "--compile/--no-compile",
        help="torch.compile the student (CPU too; ~1 min of compile first; slower on the CPU we measured).")] = None,
    sync_bn: Annotated[bool | None, typer.Option(
        "--sync-bn/--no-sync-bn", help="SyncBatchNorm under torchrun (CUDA).")] = None,
    seed: Annotated[int | None, typer.Option(help="[default: 0]")] = None,
    preset: Annotated[str | None, typer.Option(help=f"{_PRESETS_HELP}. [default: paper]")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML whose keys are these options.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from checkpoints/last.pt.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Delete the run already in --out and start over.")] = False,
) -> None:
    """Train a small robust student from a robust teacher (RSLAD and the paper's baselines).

    The defaults are the authors' recipe (--preset paper). Quick starts:

      rslad-edge distill --preset smoke --out runs/smoke        (CPU, minutes, no files needed)

      rslad-edge distill --student mobilenetv2 --teacher wrn34.pt --teacher-arch wrn-34-10
      --data-root data/ --out runs/mnv2

    Multi-GPU: torchrun --nproc-per-node 4 -m rslad_edge.cli distill ...
    """
    if resume and force:
        raise typer.BadParameter("--resume and --force exclude each other")
    if resume and out is None:
        raise typer.BadParameter("--resume needs --out, the run directory to continue")
    cli_values = dict(
        student=student, student_kwargs=_kwargs(student_kwargs, "--student-kwargs"), teacher=teacher,
        teacher_arch=teacher_arch, teacher_kwargs=_kwargs(teacher_kwargs, "--teacher-kwargs"),
        train_teacher=train_teacher, teacher_dataset=teacher_dataset,
        class_map=str(class_map) if class_map else None, class_map_reduce=class_map_reduce,
        num_classes=num_classes, input_size=_size(input_size), augment=augment, memory_budget=memory_budget,
        method=method, dataset=dataset, data_root=data_root, out=out, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, loss_scale=loss_scale, milestones=_milestones(milestones), eps=_eps(eps),
        step_size=_eps(step_size), attack_steps=attack_steps, alpha=alpha, temperature=temperature, beta=beta,
        train_subset=train_subset, val_n=val_n, select=select, eval_n=eval_n, eval_every=eval_every,
        precision=precision, device=device, compile=compile, sync_bn=sync_bn, seed=seed, preset=preset,
    )
    if resume:  # every value given must equal the run's own, except the few a resumed run may change
        file_values = load_yaml(config) if config else {}
        given = {**file_values, **{k: v for k, v in cli_values.items() if v is not None}}
        given.pop("out", None)
        _run(resume_config(out, **given), resume=True, force=False)
        return
    cfg = resolve_config(preset, load_yaml(config) if config else None, cli_values)
    _run(cfg, resume=False, force=force)


def _run(cfg: DistillConfig, *, resume: bool, force: bool) -> None:
    from rslad_edge.distill.run import distill_student

    observer = RichObserver()
    try:
        result = distill_student(cfg, resume=resume, force=force, observer=observer)
    finally:
        observer.close()
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        console.print(f"[bold green]done[/]: {result.student.path}  (metrics: {result.metrics_file})")
