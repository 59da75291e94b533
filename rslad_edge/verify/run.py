"""``verify_artifact(VerifyConfig)``: from file names and flags to a :class:`VerifyReport` (and its JSON).

Opens the artifact, the reference and the sources as Runners, loads the seeded test images they are measured on,
checks that the data fit the models (input size, class count), calls :func:`rslad_edge.verify.verify` and writes
the JSON atomically. The CLI is a thin shell over this; the pipeline calls it too.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rslad_edge.attacks.square import DEFAULT_SCHEDULE
from rslad_edge.data import (
    ImageSet,
    check_class_count,
    check_image_shape,
    dataset_for_model,
    load_sample,
    preprocess_for_model,
    to_float,
)
from rslad_edge.errors import ConfigError, DatasetError
from rslad_edge.io import write_json
from rslad_edge.options import comma_list, levels_text, option
from rslad_edge.runtime import CHECKPOINT_SUFFIXES, Runner, load_runner
from rslad_edge.verify.core import ProgressFn, check_verify_options, verify
from rslad_edge.verify.report import ModelResult, VerifyReport
from rslad_edge.verify.suite import CHECKPOINT_DEFAULT_ATTACKS, VERIFY_ATTACKS, parse_attacks

logger = logging.getLogger(__name__)


@dataclass
class VerifyConfig:
    """Everything ``rslad-edge verify`` takes, each field one of its options (rslad_edge.options); validated on
    creation, messages name the flag."""

    artifact: Path = option(
        positional=True, metavar="ARTIFACT",
        help="What to verify: a checkpoint (.pt), an ONNX model (.onnx, .ort), an ExecuTorch program (.pte) or a "
        "TensorRT engine (.engine).")
    reference: Path | None = option(
        None, help="The PyTorch checkpoint the artifact came from: measured on the same images and adversarial "
        "examples, the drop shown; also the default transfer source.")
    sources: list[Path] = option(
        [], flags=("--source",),
        help="Another checkpoint to craft transfer examples on (repeatable; the reference is one too).")
    arch: str | None = option(
        None, help="Architecture of bare-state-dict checkpoints among the artifact, reference and sources; "
        "self-describing files ignore it.")
    num_classes: int | None = option(None, help="Class count of bare-state-dict checkpoints.")
    dataset: str | None = option(None, default_text="what the artifact (or reference) was trained on, else cifar10",
                                 help="cifar10, cifar100, imagefolder or shapes.")
    data_root: str | None = option(None, help="Dataset folder.")
    n: int = option(1000, help="Seeded test images to verify on (clipped to the test set).")
    attacks: list[str] | None = option(
        None, parse=comma_list, help=f"Comma-separated, from: {', '.join(VERIFY_ATTACKS)}.",
        default_text=f"{','.join(CHECKPOINT_DEFAULT_ATTACKS)} for every artifact, plus transfer_pgd,transfer_cw with "
        "a --reference or --source and divergence with a --reference")
    eps: float | str = option(8 / 255, show=levels_text, help="L-inf budget in pixel units: 8/255 or 0.031.")
    square_queries: int = option(5000, help="Square's queries per image (5000 in the paper).")
    square_schedule: str = option(
        DEFAULT_SCHEDULE, help="Square's p schedule: budget (compressed to --square-queries: ties paper on robust "
        "models at 1,000-5,000 queries, far stronger on weak ones; measured) or paper (fixed for 10,000 queries, "
        "p_init 0.8: the paper's and AutoAttack's setting).")
    batch_size: int = option(
        256, help="Images per attack batch and per runtime call (Square sends all images of a query at once).")
    seed: int = option(0, help="Seed of the image sample, PGD starts, Square and AutoAttack.")
    json_path: Path | None = option(None, flags=("--json",), help="Write the results here (JSON).")
    max_drop: float | None = option(
        None, metavar="PP",
        help="Gate: exit 3 when any attack's robust accuracy drops by more than PP points against --reference.")
    device: str = option(
        "auto", help="auto, cpu, cuda[:N] (PyTorch, ONNX Runtime CUDA) or trt[:N] (ONNX Runtime TensorRT).")
    threads: int | None = option(None, default_text="the backend's", help="Intra-op CPU threads.")
    aa_version: str = option(
        "standard", help="AutoAttack version: standard, plus, rand, or apgd (standard's APGD-CE + APGD-T only: a "
        "third of the cost on a CPU; Square is its own column).")

    def __post_init__(self) -> None:
        self.artifact = Path(self.artifact)
        self.reference = Path(self.reference) if self.reference is not None else None
        self.sources = [Path(source) for source in self.sources]
        self.eps = check_verify_options(eps=self.eps, square_queries=self.square_queries,
                                        batch_size=self.batch_size, aa_version=self.aa_version,
                                        square_schedule=self.square_schedule)
        if self.n < 1:
            raise ConfigError(f"--n must be at least 1, got {self.n}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        if self.max_drop is not None:
            if self.max_drop < 0:
                raise ConfigError(f"--max-drop is a bound in points and must be >= 0, got {self.max_drop:g}")
            if self.reference is None:
                raise ConfigError("--max-drop needs --reference: the drop is measured against the reference")
        if self.attacks is not None:
            self.attacks = [attack.name for attack in parse_attacks(self.attacks)]  # unknown names fail here, early
        for flag, path in [("--reference", self.reference), *(("--source", source) for source in self.sources)]:
            if path is not None and path.suffix.lower() not in CHECKPOINT_SUFFIXES:
                raise ConfigError(f"{flag} {path} must be a PyTorch checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}): "
                                  "its gradients craft the transfer attacks")

    def check_files(self) -> None:
        """The artifact, reference and sources exist (checked when verify starts, not on creation, so a pipeline
        validates its verify section before the files are made)."""
        for flag, path in [("ARTIFACT", self.artifact), ("--reference", self.reference),
                           *(("--source", source) for source in self.sources)]:
            if path is not None and not path.is_file():
                raise ConfigError(f"{flag} {path} does not exist" + (" (it is a directory)" if path.is_dir() else ""))

    def to_json(self) -> dict[str, Any]:
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()} | {
            "sources": [str(source) for source in self.sources]}


def verify_artifact(
    cfg: VerifyConfig, progress: ProgressFn | None = None, reference_measured: ModelResult | None = None
) -> VerifyReport:
    """Open the models, load the data, run :func:`verify`, write ``cfg.json_path``; the gate is the caller's.

    ``reference_measured``: the reference's own report row from a verify with the same settings (see :func:`verify`).
    """
    cfg.check_files()
    runner = _open(cfg.artifact, cfg)
    reference = _open(cfg.reference, cfg) if cfg.reference is not None else None
    sources = [reference] if reference is not None else []
    for path in cfg.sources:
        if cfg.reference is not None and path.resolve() == cfg.reference.resolve():
            continue  # already a source
        sources.append(_open(path, cfg))

    dataset, data_root = dataset_for_model(cfg.dataset, cfg.data_root, getattr(runner, "metadata", None),
                                           getattr(reference, "metadata", None))
    images, notes = load_verify_images(dataset, data_root, cfg.n, cfg.seed, runner)
    report = verify(
        runner, to_float(images.read()), images.labels, attacks=cfg.attacks, eps=cfg.eps, reference=reference,
        sources=sources, square_queries=cfg.square_queries, square_schedule=cfg.square_schedule,
        batch_size=cfg.batch_size, seed=cfg.seed, aa_version=cfg.aa_version, progress=progress,
        notes=notes, config={**cfg.to_json(), "dataset": dataset, "data_root": data_root},
        reference_measured=reference_measured,
    )
    if cfg.json_path is not None:
        write_json(cfg.json_path, report.to_json())
    return report


def load_verify_images(
    dataset: str, data_root: str | None, n: int, seed: int, runner: Runner
) -> tuple[ImageSet, list[str]]:
    """``n`` seeded test images that fit ``runner`` (class count, image size), brought to the model's size as it was
    trained; only those images are read. Notes say what was adjusted."""
    metadata = getattr(runner, "metadata", None) or {}
    _, height, width = runner.input_shape
    input_size = (int(height), int(width)) if height and width else None
    crop_pct = (preprocess_for_model(metadata) or {}).get("crop_pct")
    try:
        test = load_sample(dataset, data_root, "test", n, seed, input_size=input_size, crop_pct=crop_pct)
    except DatasetError as exc:
        raise DatasetError(f"--dataset {dataset}: {exc}") from exc
    name = Path(runner.path).name
    check_class_count(runner.num_classes, test.num_classes, model=name, data=f"--dataset {dataset}",
                      fix="verify on the dataset the model was trained on")
    check_image_shape(runner.input_shape, (3, *test.input_size), model=name,
                      images=f"the images of --dataset {dataset}",
                      fix="verify on the data it was trained on, or export it for that size")
    notes: list[str] = []
    trained_classes = metadata.get("classes")
    if isinstance(trained_classes, list) and trained_classes != list(test.classes):
        notes.append(f"the class names of --dataset {dataset} differ from those {name} was exported with"
                     f" ({', '.join(map(str, trained_classes[:3]))}, ...): is it the right dataset?")
    if n > len(test):
        notes.append(f"--n {n} is more than the {len(test)} test images of {dataset}: using all {len(test)}")
        logger.warning(notes[-1])
    return test, notes


def _open(path: Path, cfg: VerifyConfig) -> Runner:
    """load_runner with ``--arch`` / ``--num-classes`` passed only to bare state dicts (a self-describing checkpoint
    names its own architecture), so one --arch serves a bare teacher next to an rslad-edge student."""
    is_checkpoint = path.suffix.lower() in CHECKPOINT_SUFFIXES
    # --arch reaches bare state dicts, and checkpoints of a package.module:factory (rebuilt only when named)
    bare = is_checkpoint and _takes_arch(path)
    device = cfg.device
    if is_checkpoint and device.startswith("trt"):
        device = "cuda" + device[3:]  # the reference and sources run in PyTorch on the GPU TensorRT uses
    # spinning=False: between two runtime calls verify does attack work on the same cores (Square's bookkeeping,
    # the twin's gradients); spinning runtime threads would only steal those cores.
    return load_runner(path, device, arch=cfg.arch if bare else None, num_classes=cfg.num_classes if bare else None,
                       threads=cfg.threads, batch_size=cfg.batch_size, spinning=False)


def _takes_arch(path: Path) -> bool:
    """A bare state dict, or a checkpoint of a package.module:factory (rebuilt only when --arch names it)."""
    from rslad_edge.models.checkpoint import FORMAT, read_checkpoint
    from rslad_edge.models.external import is_factory_spec

    checkpoint = read_checkpoint(path)
    return checkpoint.get("format") != FORMAT or is_factory_spec(str(checkpoint.get("arch") or ""))
