"""`rslad-edge distill`: parses options, calls ``train``, shows progress. No training logic here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from rslad_edge.attacks import parse_eps
from rslad_edge.console import console
from rslad_edge.distill.config import PRESETS, DistillConfig, load_yaml, resolve_config, resume_config
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


def _milestones(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated epochs like 215,260,285, got '{value}'") from None


@app.callback(invoke_without_command=True)
def distill(
    student: Annotated[str | None, typer.Option(help="Student architecture (see `rslad-edge models`).")] = None,
    teacher: Annotated[str | None, typer.Option(
        help="Robust teacher: a checkpoint, or robustbench:NAME (robustbench extra). The smoke preset trains one "
        "when omitted.")] = None,
    teacher_arch: Annotated[str | None, typer.Option(
        "--teacher-arch", "--arch", help="Architecture of a bare-state-dict teacher, e.g. wrn-34-10.")] = None,
    num_classes: Annotated[int | None, typer.Option(help="Class count (default: the dataset's).")] = None,
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
    if resume:
        if out is None:
            raise typer.BadParameter("--resume needs --out, the run directory to continue")
        cfg = resume_config(out, epochs=epochs, device=device, eval_every=eval_every, eval_n=eval_n, **{
            name: value for name, value in dict(
                student=student, teacher=teacher, method=method, dataset=dataset, lr=lr, batch_size=batch_size,
                preset=preset, precision=precision, eps=_eps(eps), seed=seed, train_subset=train_subset,
                attack_steps=attack_steps, loss_scale=loss_scale, val_n=val_n, select=select,
            ).items() if value is not None})
        _run(cfg, resume=True, force=False)
        return
    cli_values = dict(
        student=student, teacher=teacher, teacher_arch=teacher_arch, num_classes=num_classes, method=method,
        dataset=dataset, data_root=data_root, out=out, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, loss_scale=loss_scale, milestones=_milestones(milestones), eps=_eps(eps),
        step_size=_eps(step_size), attack_steps=attack_steps, alpha=alpha, temperature=temperature, beta=beta,
        train_subset=train_subset, val_n=val_n, select=select, eval_n=eval_n, eval_every=eval_every,
        precision=precision, device=device, compile=compile, sync_bn=sync_bn, seed=seed, preset=preset,
    )
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
