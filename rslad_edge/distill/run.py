"""``distill_student(cfg) -> DistillResult``: the distill stage as the CLI and the pipeline run it.

It owns what happens around one call of :func:`rslad_edge.distill.trainer.train`: the process group under
``torchrun`` (joined once here, so every training run inside shares it), the run directory check, and the run's own
teacher (``--train-teacher ARCH``, or the smoke preset's), which is a second, complete training run under
``OUT/teacher`` done *before* the student's (``train`` never calls itself: a nested run would shut down the process
group the outer one still needs).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from rslad_edge.distill import ddp
from rslad_edge.distill.config import SMOKE_TEACHER, DistillConfig, missing_teacher, resolve_config
from rslad_edge.distill.methods import get_method
from rslad_edge.distill.trainer import RUN_FILES, TrainObserver, check_run_dir, train
from rslad_edge.record import Artifact

logger = logging.getLogger(__name__)

TEACHER_DIR = "teacher"
TEACHER_SHARES = ("seed", "device", "precision", "dataset", "data_root", "epochs", "milestones", "batch_size",
                  "train_subset", "val_n", "select", "eval_n", "eval_every", "attack_steps", "step_size", "eps",
                  "input_size", "augment", "memory_budget", "loss_scale")


@dataclass(frozen=True)
class DistillResult:
    """What the distill stage made: the student (the selected checkpoint), its metrics, and the smoke teacher."""

    student: Artifact
    metrics_file: Path
    config: DistillConfig  # as run (with the teacher it used)
    teacher: Artifact | None = None  # the run's own teacher (--train-teacher, smoke), when this run trained one
    teacher_metrics_file: Path | None = None


def distill_student(
    cfg: DistillConfig, *, resume: bool = False, force: bool = False, observer: TrainObserver | None = None
) -> DistillResult:
    """Train the student ``cfg`` describes into ``cfg.out`` (first the smoke preset's teacher, when it needs one).

    ``resume``: continue the run in ``cfg.out`` (and its teacher's); ``force``: delete it first. Without either, an
    existing run is refused before anything is trained.
    """
    out = Path(cfg.out)
    with ddp.process_group() as dist:
        if not resume:
            if dist.is_main:
                check_run_dir(out, force, names=(*RUN_FILES, TEACHER_DIR))  # the teacher's too
            dist.barrier()
        teacher_dir = out / TEACHER_DIR
        trains_own_teacher = get_method(cfg.method).needs_teacher and cfg.teacher is None
        if trains_own_teacher:
            cfg = dataclasses.replace(cfg, teacher=str(_own_teacher(cfg, observer)))
        student = train(cfg, resume=resume, observer=observer)
    return DistillResult(
        student=Artifact.from_file(student, metadata={"method": cfg.method, "arch": cfg.student,
                                                      "arch_kwargs": cfg.student_kwargs}),
        metrics_file=out / "metrics.jsonl",
        config=cfg,
        teacher=Artifact.from_file(teacher_dir / "student.pt") if trains_own_teacher else None,
        teacher_metrics_file=teacher_dir / "metrics.jsonl" if trains_own_teacher else None,
    )


def _own_teacher(cfg: DistillConfig, observer: TrainObserver | None) -> Path:
    """No --teacher: train a robust teacher first (SAT) under ``OUT/teacher``: ``--train-teacher ARCH`` at the run's
    own lr, or the smoke preset's small one (SMOKE_TEACHER). Resumed when it was interrupted, reused when done."""
    if cfg.train_teacher is None and cfg.preset != "smoke":
        raise missing_teacher(cfg)
    teacher_dir = Path(cfg.out) / TEACHER_DIR
    if (teacher_dir / "student.pt").exists():
        return teacher_dir / "student.pt"
    logger.info("no --teacher: training a robust teacher first (%s)", teacher_dir)
    # The teacher gets the run's data, device and budget (a shortened run shortens its teacher too); its method is
    # SAT, its architecture --train-teacher's (with --teacher-kwargs) or SMOKE_TEACHER's (its training attack too).
    shared = {key: getattr(cfg, key) for key in TEACHER_SHARES}
    own = (SMOKE_TEACHER if cfg.train_teacher is None else
           {"method": "sat", "student": cfg.train_teacher, "student_kwargs": cfg.teacher_kwargs, "lr": cfg.lr})
    teacher_cfg = resolve_config(cfg.preset, cli_values={**shared, **own, "out": str(teacher_dir)})
    resume = (teacher_dir / "checkpoints" / "last.pt").exists()
    return train(teacher_cfg, resume=resume, force=not resume, observer=observer)
