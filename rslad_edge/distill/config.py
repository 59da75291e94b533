"""The distill stage's configuration: one typed dataclass, three presets, validated with messages naming flags.

Precedence: preset < the method's own recipe (preset ``paper`` only) < ``--config FILE.yaml`` < command-line flags.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rslad_edge.attacks.eps import parse_eps
from rslad_edge.distill.methods import METHODS
from rslad_edge.errors import ConfigError, UsageError, unknown_name_error
from rslad_edge.io import read_yaml_mapping
from rslad_edge.options import comma_ints, key_table, key_values, levels_text, option, read_mapping, specs

# How the KL terms of RSLAD and ARD are reduced (RSLAD.md, "Loss scale = learning rate"):
# - authors:   as their code reduces them: the elementwise mean over batch x classes, i.e. batchmean KL / 10 for
#              RSLAD (CIFAR-10 and, with their x10, CIFAR-100) and batchmean / C for ARD; lr and weight decay of the
#              paper were tuned at this scale.
# - batchmean: KL summed over classes and averaged over the batch, the scale of a cross-entropy and of every other
#              method here.
# With SGD, momentum and coupled weight decay, a step on s*L at lr η and weight decay λ is exactly a step on L at
# lr η*s and weight decay λ/s: the scale is a learning-rate choice, recorded as one.
LOSS_SCALES = ("authors", "batchmean")

# Which epoch becomes student.pt (checkpoints/best.pt):
# - val:  the best PGD-20 robust accuracy on --val-n held-out training images (never trained on). The default.
# - last: the last epoch (the held-out images, if any, are still evaluated each epoch, for the record).
# - test: the best PGD-20 on --eval-n test images, trained on the whole training set: the paper's "best checkpoint"
#         row, selected on the test split. Only when asked for; the run's record says so.
SELECTIONS = ("val", "last", "test")

PRESETS: dict[str, dict[str, Any]] = {
    # The authors' recipe (RSLAD.md) as their code runs it: SGD 0.1, momentum 0.9, wd 2e-4, batch 128, 300 epochs,
    # x0.1 after epochs 215/260/285, PGD-10 of 2/255 at eps 8/255 for training, the authors' loss scale; the best
    # epoch by PGD-20, on held-out training images (the paper's was chosen on the test split: --select test).
    # Under this preset ARD, IAD and TRADES get their own authors' schedules (methods.py, paper_overrides).
    "paper": {},
    # A short real run on a GPU: the same recipe with the schedule shrunk to 50 epochs (the decays after epochs
    # 36, 43, 48 = 215, 260, 285 scaled 300 -> 50), at the batchmean scale: 20 k steps do not absorb a 10x cut.
    "fast": {"epochs": 50, "milestones": [37, 44, 49], "loss_scale": "batchmean", "val_n": 500, "eval_n": 500},
    # A robust MobileNetV2 from a robust teacher on real CIFAR-10 within 30 minutes of RSLAD training on a 2-core CPU
    # with AVX-512 BF16 (precision auto = bf16). Faithful to the paper but for the schedule and the scale: batch 128,
    # SGD 0.1 / momentum 0.9 / wd 2e-4 on the batchmean loss (= the authors' scale at lr 1.0 / wd 2e-5), PGD-10 of
    # 2/255 at eps 8/255, selection by PGD-20 on 500 held-out training images; 3 epochs of 10,000 training images,
    # the last at lr 0.01 (215/300 of the run at 0.1, as the paper's first decay). Measured on a quiet 2-core AMD
    # EPYC (2026-11, bf16): RSLAD 13.7 min wall in all (41-44 img/s with the per-epoch check), SAT 20.7 min,
    # ARD 17.5 min (their attacks run the student in train mode). It was sized from a measurement on a busy machine
    # (~20 img/s), so it uses under half of its 30 minutes here; a larger preset has not been run (README, distill).
    "cpu-30min": {
        "student": "mobilenetv2", "epochs": 3, "milestones": [3], "train_subset": 10_000, "val_n": 500,
        "eval_n": 500, "loss_scale": "batchmean",
    },
    # Minutes on a CPU, no files needed: the synthetic `shapes` data (5,000 training images, 200 held out), the
    # 60 k-parameter smallcnn student, PGD-3 of 4/255 for training. lr 0.2 because RSLAD's loss is at the authors'
    # scale (1/10 of a cross-entropy), which 300 epochs absorb but 4 do not; the preset keeps that scale, at which
    # its lr was tuned and measured (= batchmean at lr 0.02 / wd 2e-3 for RSLAD; its other methods are batchmean
    # anyway). Without --teacher a small robust teacher is first trained there (SMOKE_TEACHER). 4 epochs and a
    # PGD-10 per-epoch check keep `make demo` under 5 minutes. Measured (2026-12-03, AMD EPYC, 2 cores, `make demo`):
    # teacher 99.0% clean / 91.0% PGD-10, RSLAD student 83.5% / 64.5% on the 200 held-out images.
    "smoke": {
        "dataset": "shapes", "student": "smallcnn", "epochs": 4, "milestones": [4], "batch_size": 64,
        "lr": 0.2, "val_n": 200, "eval_n": 200, "eval_steps": 10, "attack_steps": 3, "step_size": 4 / 255,
    },
}

# The teacher the smoke preset trains when none is given: a wider model, adversarially trained with SAT on one FGSM
# step of 10/255 from a uniform random start ("fast AT", Wong et al. 2020).
# Measured (2026-12-03, AMD EPYC, 2 cores, 4 epochs): 99.0% clean / 85.5% PGD-20 on the 200 held-out images in 64 s,
# against 94.5% / 77.0% in 105 s with the student's PGD-3.
SMOKE_TEACHER: dict[str, Any] = {"method": "sat", "student": "smallcnn-wide", "lr": 0.05, "attack_steps": 1,
                                 "step_size": 10 / 255}


def parse_input_size(value: Any, flag: str = "--input-size") -> list[int]:
    """``96``, ``"96"``, ``"96x128"``, ``[96, 128]`` -> ``[H, W]`` (one number: a square)."""
    try:
        if isinstance(value, str):
            parts = [int(part) for part in value.lower().replace(" ", "").split("x")]
        elif isinstance(value, int):
            parts = [value]
        else:
            parts = [int(part) for part in value]
    except (TypeError, ValueError):
        raise UsageError(f"{flag} takes H or HxW in pixels, e.g. 96 or 96x128; got '{value}'") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise UsageError(f"{flag} takes H or HxW in pixels, e.g. 96 or 96x128; got '{value}'")
    return parts


@dataclass
class DistillConfig:
    """Every knob of ``rslad-edge distill``: each field is its option (flag, help, default, parsing of its text);
    the command line, the ``--config`` / pipeline keys and the resume rule are derived from them."""

    out: str = option("runs/distill", help="Run directory.")
    # Architectures: a registry name, torchvision:NAME, timm:NAME or package.module:factory (models/external.py),
    # with the keyword arguments of its constructor (e.g. {width_mult: 0.75}).
    student: str = option(
        "mobilenetv2", help="Student architecture: a registry name (`rslad-edge models`), torchvision:NAME (e.g. "
        "torchvision:mobilenet_v3_small), timm:NAME (timm extra) or package.module:factory.")
    student_kwargs: dict[str, Any] = option(
        {}, parse=key_values, help="Options of the student's constructor, KEY=VALUE[,KEY=VALUE], e.g. width_mult=0.75.")
    teacher: str | None = option(
        None, help="Robust teacher: a checkpoint, or robustbench:NAME (robustbench extra). Omitted: --train-teacher "
        "trains one first (the smoke preset always does).")
    teacher_arch: str | None = option(
        None, flags=("--teacher-arch", "--arch"),
        help="Architecture of a bare-state-dict teacher, e.g. wrn-34-10 or torchvision:resnet50.")
    teacher_kwargs: dict[str, Any] = option(
        {}, parse=key_values, help="Options of a bare-state-dict teacher's constructor, KEY=VALUE[,KEY=VALUE].")
    teacher_input_size: list[int] | None = option(
        None, parse=lambda value: parse_input_size(value, "--teacher-input-size"),
        default_text="a checkpoint's own; a bare state dict: the data's own size (32 for CIFAR)",
        help="Image size a bare-state-dict teacher was trained at, H or HxW; the student's batch is resized to it "
        "inside the teacher's forward (differentiable), whatever --input-size is.")
    train_teacher: str | None = option(
        None, help="No teacher at hand: first train one of this architecture with SAT (this run's data and "
        "schedule) under OUT/teacher, then distil from it.")
    teacher_dataset: str | None = option(
        None, help="The dataset a robustbench: teacher was trained on, when not --dataset: imagenet (1,000 classes; "
        "needs --class-map).")
    class_map: str | None = option(
        None, help="YAML/JSON mapping each of your class names to the teacher's class indices (e.g. cat: [281, 282]),"
        " for a teacher of other classes (an ImageNet model).")
    class_map_reduce: str = option(
        "sum", help="How a class map joins a group's logits: sum (of probabilities: logsumexp of the logits) or max.")
    method: str = option("rslad", help=f"Training method: {', '.join(METHODS)}.")
    dataset: str = option(
        "cifar10", help="cifar10, cifar100, imagefolder (ROOT/{train,test}/<class>/) or shapes (synthetic).")
    data_root: str | None = option(None, help="Dataset folder.")
    num_classes: int | None = option(None, default_text="the dataset's", help="Class count.")
    input_size: list[int] | None = option(
        None, parse=parse_input_size, default_text="the student's own config (timm), else the data's",
        help="Image size the student takes, H or HxW in pixels (e.g. 96, 224x160). Images are resized (shorter side) "
        "and center-cropped to it; written resolved into config.yaml.")
    augment: str | None = option(
        None, default_text="pad-crop-flip up to 64 px, rrc-flip above",
        help="Training augmentation: pad-crop-flip (CIFAR's) or rrc-flip (random-resized crop + flip); written "
        "resolved into config.yaml.")
    memory_budget: float | None = option(
        None, default_text="a quarter of this machine's memory",
        help="GiB a data split may take in memory; a larger one is streamed from its decoded cache on disk.")
    epochs: int = option(300, resumable=True, help="Epochs.")
    batch_size: int = option(128, help="Global batch size (split across DDP ranks).")
    lr: float = option(0.1, help="SGD learning rate.")
    momentum: float = option(0.9, help="SGD momentum.")
    weight_decay: float = option(2e-4, help="SGD weight decay.")
    # RSLAD's code multiplies the lr by 0.1 *after* epochs 215, 260 and 285 (`if epoch in [215, 260, 285]` at the end
    # of the epoch), so 216 is the first epoch at 0.01.
    milestones: list[int] = option(
        [216, 261, 286], parse=comma_ints("216,261,286"),
        help="First epochs (1-based) at a --lr-gamma lower lr; RSLAD's code lowers it after epochs 215, 260, 285.")
    lr_gamma: float = option(0.1, help="Factor on the lr at each milestone.")
    loss_scale: str = option(
        "authors", help="authors: RSLAD's and ARD's KL as their code reduces it (batchmean / 10, batchmean / "
        "classes), at which the paper's lr was tuned; batchmean: the scale of a cross-entropy. A loss scaled by s at "
        "lr η, weight decay λ steps exactly as the unscaled loss at lr η·s, weight decay λ/s (SGD, momentum).")
    eps: float = option(8 / 255, parse=parse_eps, show=levels_text,
                        help="L-inf radius of the training attack in [0, 1] pixel units: 8/255, not 8.")
    step_size: float = option(2 / 255, parse=functools.partial(parse_eps, name="--step-size"), show=levels_text,
                              help="Attack step size, pixel units.")
    attack_steps: int = option(10, help="PGD steps of the training attack.")
    alpha: float | None = option(None, default_text="the method's", help="Method weight.")
    temperature: float | None = option(None, default_text="the method's", help="Distillation temperature.")
    beta: float | None = option(None, default_text="the method's", help="TRADES / IAD beta.")
    train_subset: int | None = option(
        None, default_text="the whole training set",
        help="Train on a fixed seeded sample of N images (after the held-out split).")
    val_n: int = option(
        1000, help="Training images held out (seeded, never trained on) for the per-epoch clean / PGD-20 check "
        "that chooses student.pt.")
    select: str = option(
        "val", help="Which epoch becomes student.pt: val (best PGD-20 on the --val-n held-out images), last, or test "
        "(best on --eval-n test images, trained on the whole training set: the paper's 'best checkpoint' row, "
        "selected on the test split and recorded as such).")
    eval_n: int = option(
        1000, resumable=True, help="Test images (fixed seeded sample) for the per-epoch check under --select test.")
    eval_every: int = option(1, resumable=True, help="Evaluate every K epochs (and the last).")
    eval_steps: int = option(20, help="PGD steps of the per-epoch robust check.")
    precision: str = option(
        "auto", help="auto (bf16 + channels_last on CPUs with AVX-512 BF16 / AMX, AMP on CUDA, else fp32), fp32, "
        "bf16, fp16.")
    device: str = option("auto", resumable=True, help="auto, cpu, cuda or cuda:N.")
    compile: bool = option(
        False, flags=("--compile/--no-compile",),
        help="torch.compile the student (CPU too; ~1 min of compile first; slower on the CPU we measured).")
    sync_bn: bool = option(False, flags=("--sync-bn/--no-sync-bn",), help="SyncBatchNorm under torchrun (CUDA).")
    bn_momentum: float | None = option(
        None, default_text="the student's own",
        help="Momentum of the student's BatchNorm running statistics. 0.1 is PyTorch's default and that of the "
        "registry's models; torchvision's MobileNetV3 / EfficientNet use 0.01, which a run of a few hundred steps "
        "cannot move off its initial statistics (distill warns when that happens).")
    seed: int = option(0, help="Seed of the weights, the data order and samples, the held-out split.")
    preset: str = option("paper", help=f"Starting values: {', '.join(PRESETS)}.")

    def __post_init__(self) -> None:
        from rslad_edge.data import AUGMENT_RECIPES
        from rslad_edge.distill.methods import get_method
        from rslad_edge.models import canonical_arch
        from rslad_edge.models.teacher import CLASS_MAP_REDUCTIONS

        get_method(self.method)
        for arch in (self.student, self.teacher_arch, self.train_teacher):
            if arch:
                canonical_arch(arch)  # an unknown name: one line with close matches
        if self.bn_momentum is not None and not 0 < self.bn_momentum <= 1:
            raise ConfigError(f"--bn-momentum is a fraction in (0, 1] (PyTorch's default 0.1), got {self.bn_momentum}")
        if self.input_size is not None:
            self.input_size = parse_input_size(self.input_size)
        if self.teacher_input_size is not None:
            self.teacher_input_size = parse_input_size(self.teacher_input_size, "--teacher-input-size")
        if self.class_map_reduce not in CLASS_MAP_REDUCTIONS:
            raise unknown_name_error("--class-map-reduce", self.class_map_reduce, CLASS_MAP_REDUCTIONS,
                                     error=UsageError)
        if self.augment is not None and self.augment not in AUGMENT_RECIPES:
            raise unknown_name_error("--augment", self.augment, AUGMENT_RECIPES, error=UsageError)
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise UsageError(f"--memory-budget must be positive (GiB), got {self.memory_budget}")
        for flag, values in [("--student-kwargs", self.student_kwargs), ("--teacher-kwargs", self.teacher_kwargs)]:
            if not isinstance(values, dict):
                raise UsageError(f"{flag} must be a mapping of option: value, got {values!r}")
        for flag, value in [("--eps", self.eps), ("--step-size", self.step_size)]:
            if not 0 <= value <= 1:
                raise ConfigError(f"{flag} {value:g} is outside [0, 1]: eps is in pixel units, write 8/255, not 8")
        positive = [("--epochs", self.epochs), ("--batch-size", self.batch_size), ("--eval-every", self.eval_every),
                    ("--lr", self.lr)]
        for flag, value in positive:
            if value <= 0:
                raise ConfigError(f"{flag} must be positive, got {value}")
        for flag, value in [("--attack-steps", self.attack_steps), ("--eval-n", self.eval_n),
                            ("--eval-steps", self.eval_steps), ("--weight-decay", self.weight_decay)]:
            if value < 0:
                raise ConfigError(f"{flag} must not be negative, got {value}")
        if self.train_subset is not None and self.train_subset <= 0:
            raise ConfigError(f"--train-subset must be positive, got {self.train_subset}")
        self._check_selection()
        if self.loss_scale not in LOSS_SCALES:
            raise unknown_name_error("--loss-scale", self.loss_scale, LOSS_SCALES, error=UsageError)
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"--precision must be auto, fp32, bf16 or fp16, got '{self.precision}'")
        if sorted(self.milestones) != list(self.milestones):
            raise ConfigError(f"--milestones must be increasing, got {self.milestones}")

    def _check_selection(self) -> None:
        if self.select not in SELECTIONS:
            raise unknown_name_error("--select", self.select, SELECTIONS, error=UsageError)
        if self.val_n < 0:
            raise UsageError(f"--val-n must not be negative, got {self.val_n}")
        if self.select == "val" and self.val_n == 0:
            raise UsageError("--val-n 0 leaves no held-out images to select the best epoch on: give --val-n N "
                             "(at least one batch), or --select last to keep the last epoch")
        if 0 < self.val_n < self.batch_size:
            raise UsageError(f"--val-n {self.val_n} is smaller than one batch (--batch-size {self.batch_size}): "
                             "too few held-out images to select on; raise --val-n")
        if self.select == "test" and self.val_n > 0:
            raise UsageError(f"--val-n {self.val_n} with --select test: the paper's protocol trains on the whole "
                             "training set and selects on the test split; drop --val-n (or give --val-n 0)")
        if self.select == "test" and self.eval_n == 0:
            raise UsageError("--eval-n 0 with --select test leaves no test images to select on; give --eval-n N")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# What each option's help shows beside its default (preset paper's): the other presets' values and each method's
# own recipe (its hyperparameters; its schedule under preset paper), where they differ.
DEFAULT_NOTES: dict[str, dict[str, Any]] = {
    **{name: values for name, values in PRESETS.items() if values},
    **{name: {**method.paper_overrides, **method.hyperparameters} for name, method in METHODS.items()},
}
# Options a resumed run may change: how long it runs, where, and how often it is evaluated.
RESUME_OVERRIDES = tuple(name for name, spec in specs(DistillConfig).items() if spec.option.resumable)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A distill config file: the keys are the CLI options; a pipeline file's ``distill:`` section works too."""
    data = read_yaml_mapping(path)
    if isinstance(data.get("distill"), dict):
        data = data["distill"]
    return read_mapping(data, key_table(DistillConfig), where=f"--config {path}")


def resolve_config(
    preset: str | None = None, file_values: dict[str, Any] | None = None, cli_values: dict[str, Any] | None = None,
    *, source: str = "the command line",
) -> DistillConfig:
    """Merge preset, method recipe, config file and flags (None values in ``cli_values`` mean 'not given');
    ``source`` names where ``cli_values`` came from in error messages."""
    from rslad_edge.distill.methods import get_method

    file_values = dict(file_values or {})
    given = {key: value for key, value in (cli_values or {}).items() if value is not None}
    cli_values = read_mapping(given, key_table(DistillConfig), where=source)
    preset = preset or cli_values.get("preset") or file_values.get("preset") or "paper"
    if preset not in PRESETS:
        raise unknown_name_error("--preset", preset, PRESETS)
    values: dict[str, Any] = dict(PRESETS[preset])
    method = get_method(cli_values.get("method") or file_values.get("method") or values.get("method") or "rslad")
    if preset == "paper":
        values.update(method.paper_overrides)
    values.update(file_values)
    values.update(cli_values)
    values["preset"] = preset
    if values.get("teacher") is not None and values.get("train_teacher") is not None:
        raise UsageError("--teacher and --train-teacher exclude each other: give the teacher, or train one")
    if values.get("select") == "test" and "val_n" not in {**file_values, **cli_values}:
        values["val_n"] = 0  # the paper's protocol: no held-out split, selection on the test split
    return DistillConfig(**values)


# What a run's config.yaml from before --loss-scale / --val-n / --select did, so that resuming it continues it.
def resume_config(out: str | Path, **overrides: Any) -> DistillConfig:
    """The config of the run in ``out``, as saved; a resumed run may only change how long it runs, where, and how
    often it is evaluated (anything else would silently make a different experiment). Repeating the run's own
    values is fine, so the command that started a run works again with ``--resume``."""
    path = Path(out) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume: '{out}' holds no run (no config.yaml); drop --resume to start one")
    values = yaml.safe_load(path.read_text())
    given = {key: value for key, value in overrides.items() if value is not None}
    options = specs(DistillConfig)
    for key, value in read_mapping(given, key_table(DistillConfig), where="--resume").items():
        if values.get(key, options[key].default) == value:
            continue
        if key not in RESUME_OVERRIDES:
            allowed = ", ".join(options[name].flag for name in RESUME_OVERRIDES)
            raise UsageError(f"{options[key].flag} cannot change when resuming; only {allowed} can")
        values[key] = value
    return DistillConfig(**values)


def missing_teacher(cfg: DistillConfig) -> ConfigError:
    """The one message for a method that needs a teacher and has none it can get."""
    return ConfigError(f"--method {cfg.method} needs --teacher (a checkpoint path, or robustbench:NAME), or "
                       "--train-teacher ARCH to train one first")
