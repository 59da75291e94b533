"""GPU truth: one prepared check that runs rslad-edge's CUDA paths on one GPU, end to end, in under ten minutes.

Every stage runs through the real CLI (``python -m rslad_edge.cli ...``, one subprocess per stage, as a user runs
it), and every figure is read back from the files the stages write. Phases, in order (each with a time budget, a
wall-clock guard and its elapsed time; a failed phase is recorded with a one-line error and the next one runs):

    env              GPU name, driver, torch, CUDA, cuDNN, onnxruntime; what ``--precision auto`` picks there
    data             unpack the CIFAR-10 JPEG archive, decode it once into the imagefolder cache
    teacher          ResNet-18, fast AT (SAT with one FGSM step of 10/255 from a uniform start), --precision auto
    student          RSLAD MobileNetV2 from that teacher, the ``fast`` preset's recipe for a few epochs, bf16 AMP
                     + channels_last; images/s per epoch, clean / PGD-20 on 1,000 held-out training images (the
                     test-image figures are verify's)
    export_fp32/16   ONNX fp32 and fp16 of the GPU-trained student, parity vs PyTorch on ONNX Runtime's CPU provider
    bench            the checkpoint on cuda: fp32, bf16 and fp16 autocast at batch 1, 64 and 256 (``bench
                     --precision``; bench times ``predict``, so the figure includes the host-device copies)
    verify           white-box on cuda: PGD_SAT and CW on 1,000 test images
    window_eager     short timed distill windows (2 epochs each, the first one warms up): bf16 eager, fp16 AMP with
    window_fp16      loss scaling, and (last, after AutoAttack) bf16 with --compile (its first epoch includes the
    autoattack       compilation); AutoAttack (standard) on 200 test images, when pyautoattack is importable (else
    window_compiled  skipped)

It prints one table and writes ``OUT/gpu_check.json`` (environment, settings, every phase: status, seconds, budget,
error, figures) after every phase, so a run cut short still leaves what it measured, and ``OUT/gpu_check.log`` (the
output of every stage). Exit status: 0 when every phase passed (a skipped AutoAttack included), 1 otherwise.

On a GPU machine with internet, from the repository root (the stages download CIFAR-10 when ``--data`` is a
folder that lacks it, and pip brings pyautoattack for the AutoAttack phase)::

    pip install -e ".[autoattack]"
    python benchmarks/gpu_check.py --data cifar10-jpeg.tar.gz --out runs/gpu-check

On an offline GPU machine (torch, onnx, onnxruntime, typer and rich installed; nothing can be downloaded there):

1. On a machine that has the data, once, from the repository root: ``--prepare`` copies the CIFAR-10 JPEG archive
   (``--data``; an image folder tree ``cifar10/{train,test}/<class>/*.jpg`` packed as ``.tar.gz``, 18.7 MiB) and
   pyautoattack's code (its wheel is 42 MiB because of an example model it does not need; the code is 0.13 MiB) into
   ``gpu_data/`` (git-ignored), small enough to copy along with the checkout::

       python benchmarks/gpu_check.py --prepare --data cifar10-jpeg.tar.gz

2. On the GPU machine, with the checkout and ``gpu_data/`` copied there::

       python3 -m pip install -q -e . --no-deps --no-build-isolation; PYTHONUNBUFFERED=1 python3
       benchmarks/gpu_check.py --data gpu_data/cifar10-jpeg.tar.gz --site gpu_data/site --out runs/gpu-check

   ``--no-deps``: pip must not try to fetch dependencies. The ``;`` lets the check run even if the install fails
   (the stages run from the checkout either way, and the env phase records whether the install worked).

On a CPU, with no data at all (the default test suite runs this; about a minute on two cores):

    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check             # synthetic shapes data, tiny runs
    python benchmarks/gpu_check.py --dry-run --data tiny.tar.gz --out DIR     # a tiny imagefolder archive

The dry run is the same script with tiny settings: smallcnn models, a few hundred images, CPU; fp16 training is
skipped there (it needs CUDA). ``--budget PHASE=SECONDS`` overrides a phase's budget, ``--time-limit`` the whole.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# The check itself imports nothing from rslad_edge (only its probes and the stages do, with the checkout on their
# PYTHONPATH), so it records a broken install instead of dying of it.
REPO = Path(__file__).resolve().parents[1]
# The sha256 of the CIFAR-10 JPEG archive the README's figures were made with (any image-folder archive works).
KNOWN_ARCHIVE_SHA256 = "d0fa18ce7a86ee512727ed96b37825d1a52484b879d883f3b6a449ff847c7d14"
PREPARED_DIR = REPO / "gpu_data"
RECORD_FORMAT = "rslad-edge/gpu-check/1"
STOP_GRACE_S = 30.0  # after SIGTERM at a budget's end: distill saves its state, then exits 130

# The compiled window goes last: its compilation is the one open-ended cost (on an H200 in 2026-12 it had not
# reached its first batch after 108 s), so it takes whatever time the other phases leave.
PHASES = ("env", "data", "teacher", "student", "export_fp32", "export_fp16", "bench", "verify", "window_eager",
          "window_fp16", "autoattack", "window_compiled")
# What each phase needs from an earlier one; a phase whose input is missing is skipped, naming the culprit.
NEEDS = {"teacher": "data", "student": "teacher", "export_fp32": "student", "export_fp16": "student",
         "bench": "student", "verify": "student", "window_eager": "teacher", "window_fp16": "teacher",
         "window_compiled": "teacher", "autoattack": "student"}


@dataclass(frozen=True)
class Settings:
    """How big each phase is. ``gpu()`` is the real check; ``dry_run()`` the same phases, tiny, on the CPU."""

    device: str  # cuda | cpu
    time_limit_s: float  # the whole check; a phase never runs past it
    budgets_s: dict[str, float]  # per phase
    teacher_arch: str
    teacher_precision: str
    teacher_epochs: int
    teacher_train_subset: int | None  # None: the whole training split
    student_arch: str
    student_epochs: int
    student_train_subset: int
    student_precision: str
    batch_size: int  # 128: the paper's
    attack_steps: int | None  # None: the fast preset's PGD-10
    val_n: int  # held-out training images: the per-epoch clean / PGD-20 check and selection (distill --val-n)
    window_images: int  # per epoch of each timed window; a multiple of batch_size (a short last batch recompiles)
    window_precision: str  # of the eager and the compiled window (the fp16 window is fp16)
    parity_n: int
    bench_precisions: str
    bench_batches: str
    bench_timing: tuple[str, ...]  # bench's timing options
    verify_n: int
    autoattack_n: int  # 0: the phase is skipped
    threads: int | None = None  # intra-op CPU threads for bench and verify; None: the backend's default
    # False in the dry run: --compile is passed but TORCHDYNAMO_DISABLE=1 makes it eager, because compiling costs
    # 20-60 s on two CPU cores (the CPU --compile path has its own slow test in tests/test_distill.py).
    compile_for_real: bool = True

    @classmethod
    def gpu(cls) -> Settings:
        # Budgets: the time each phase took on one H200 (2026-12-04) with margin; the sum is cut by time_limit_s
        # (9.5 minutes in all, less the install: every phase passed in 563 s there, the compiled window's
        # compilation 84 s of it). Subprocess start-up (Python, torch, CUDA context: several seconds)
        # is inside each. The student's subset keeps its three epochs well inside the budget (12,800 images took
        # 107 s of 110).
        budgets = {"env": 40, "data": 90, "teacher": 90, "student": 120, "export_fp32": 45, "export_fp16": 45,
                   "bench": 50, "verify": 40, "window_eager": 45, "window_fp16": 45, "autoattack": 100,
                   "window_compiled": 150}
        return cls(device="cuda", time_limit_s=570, budgets_s=budgets, teacher_arch="resnet18",
                   teacher_precision="auto", teacher_epochs=4, teacher_train_subset=None, student_arch="mobilenetv2",
                   student_epochs=3, student_train_subset=10_240, student_precision="bf16", batch_size=128,
                   attack_steps=None, val_n=1000, window_images=2560, window_precision="bf16", parity_n=256,
                   bench_precisions="fp32,bf16,fp16", bench_batches="1,64,256",
                   bench_timing=("--seconds", "1", "--warmup-seconds", "0.5"), verify_n=1000, autoattack_n=200)

    @classmethod
    def dry_run(cls, threads: int | None = None) -> Settings:
        budgets = dict.fromkeys(PHASES, 120.0)
        # fp32 training: bf16 on a CPU first spends seconds creating oneDNN kernels, which a dry run does not need.
        # AutoAttack is left out (autoattack_n=0): on a CPU it takes minutes on even a few images that survive.
        return cls(device="cpu", time_limit_s=600, budgets_s=budgets, teacher_arch="smallcnn", teacher_precision="fp32",
                   teacher_epochs=1, teacher_train_subset=64, student_arch="smallcnn", student_epochs=1,
                   student_train_subset=64, student_precision="fp32", batch_size=32, attack_steps=2, val_n=32,
                   window_images=32, window_precision="fp32", parity_n=16, bench_precisions="fp32,bf16",
                   bench_batches="1,8", bench_timing=("--iters", "5", "--warmup", "1", "--warmup-seconds", "0"),
                   verify_n=16, autoattack_n=0, threads=threads, compile_for_real=False)


@dataclass
class Phase:
    """One phase's record in the JSON."""

    name: str
    budget_s: float
    status: str = "pending"  # ok | failed | timeout | skipped
    seconds: float = 0.0
    error: str | None = None  # one line
    summary: str = ""  # the table's cell
    figures: dict[str, Any] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)


class PhaseFailed(Exception):
    """A phase's one-line failure."""


class PhaseTimeout(Exception):
    """A phase ran into its budget (or the check's time limit)."""


class PhaseSkipped(Exception):
    """A phase that cannot run here, for a reason that is no failure (no pyautoattack, fp16 on a CPU)."""


# ------------------------------------------------------------------------------------------------------------------
# The one place that knows what the stages write. Everything else asks these functions.


def stage_epochs(run_dir: Path) -> list[dict[str, Any]]:
    """distill's ``metrics.jsonl``: one dict per finished epoch (epoch, train_loss, clean_acc, robust_acc, lr,
    images_per_s, seconds)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trained_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a distill run left: ``student.pt`` when it finished, else the best or last epoch's (a run
    stopped at its budget saves ``checkpoints/last.pt`` on SIGTERM)."""
    for relative in ("student.pt", "checkpoints/best.pt", "checkpoints/last.pt"):
        if (run_dir / relative).is_file():
            return run_dir / relative
    return None


def exported_onnx(export_dir: Path, precision: str) -> Path:
    """``export --name student``: student.onnx (fp32), student.fp16.onnx."""
    return export_dir / ("student.onnx" if precision == "fp32" else f"student.{precision}.onnx")


def export_parity(onnx_path: Path) -> dict[str, Any]:
    """The parity figures export wrote into the artifact's sidecar ``<file>.json``."""
    return json.loads(onnx_path.with_name(onnx_path.name + ".json").read_text())["parity"]


def bench_rows(json_path: Path) -> list[dict[str, Any]]:
    """``bench --json``: one row per artifact, precision and batch size."""
    keys = ("precision", "batch", "p50_ms", "p99_ms", "images_per_s", "provider", "timed", "clock", "iterations")
    return [{key: row.get(key) for key in keys} for row in json.loads(json_path.read_text())["results"]]


def verify_figures(json_path: Path) -> dict[str, Any]:
    """``verify --json``: accuracies as fractions, seconds per attack, where it ran."""
    data = json.loads(json_path.read_text())
    keys = ("backend", "provider", "precision", "n", "eps", "clean_acc", "robust_acc", "worst_case_acc",
            "attack_seconds", "seconds", "warnings")
    return {key: data.get(key) for key in keys}


# ------------------------------------------------------------------------------------------------------------------
# Probes run as subprocesses of this script (``--probe env`` / ``--probe data``): the parent never imports torch,
# so a hung driver or a crash in CUDA costs one phase, not the check.


def probe_environment(device: str) -> dict[str, Any]:
    import torch

    from rslad_edge.bench.env import cpu_model, gpu_info, library_versions
    from rslad_edge.device import resolve_precision

    env: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "libraries": library_versions(), "gpu": gpu_info(), "driver": _nvidia_driver(),
        "rslad_edge_installed": _version_of("rslad-edge"), "pyautoattack": _version_of("pyautoattack"),
    }
    if device == "cuda" and not torch.cuda.is_available():
        env["error"] = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU"
        return env
    resolved = torch.device(device)
    env["auto_precision"] = resolve_precision("auto", resolved).name
    if device == "cuda":
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
    return env


def _version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0].strip() if result.returncode == 0 and lines else None


def probe_dataset(dataset: str, root: str | None) -> dict[str, Any]:
    """Decode both splits once (imagefolder caches them), so no training phase pays for it."""
    from rslad_edge.data import load_dataset

    counts = {}
    for split in ("train", "test"):
        started = time.perf_counter()
        images = load_dataset(dataset, root, split)
        counts[split] = {"images": len(images), "classes": images.num_classes,
                         "seconds": round(time.perf_counter() - started, 2)}
    return counts


# ------------------------------------------------------------------------------------------------------------------
# The check


class GpuCheck:
    """Runs the phases in order, each under its budget, and keeps the record (``gpu_check.json``) current."""

    def __init__(self, settings: Settings, *, data: Path | None, site: Path | None, out: Path, work: Path) -> None:
        self.settings = settings
        self.data = data
        self.out = out
        self.work = work
        self.json_path = out / "gpu_check.json"
        self.log_path = out / "gpu_check.log"
        self.phases = {name: Phase(name, float(settings.budgets_s[name])) for name in PHASES}
        self.started = time.monotonic()
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.env_record: dict[str, Any] = {}
        self.dataset_args: list[str] = []
        self.child: subprocess.Popen[bytes] | None = None
        self.phase_deadline = 0.0  # monotonic time at which the running phase's stage is stopped
        self.phase_cut_by_time_limit = False  # that time is the check's limit, not the phase's budget
        python_path = [str(REPO)] + ([str(site.resolve())] if site else [])
        python_path += [str(Path(p).resolve()) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.child_env = {
            **os.environ, "PYTHONPATH": os.pathsep.join(python_path), "PYTHONUNBUFFERED": "1", "COLUMNS": "160",
            "RSLAD_EDGE_CACHE": str(work / "cache"),  # decoded images live with the check, not in ~/.cache
        }

    # -------------------------------------------------------------------------------------------------- driver

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text(f"rslad-edge GPU check, {self.started_at}\n")
        steps: dict[str, Callable[[Phase], None]] = {
            "env": self.env, "data": self.prepare_data, "teacher": self.teacher, "student": self.student,
            "export_fp32": lambda p: self.export(p, "fp32"), "export_fp16": lambda p: self.export(p, "fp16"),
            "bench": self.bench, "verify": self.verify,
            "window_eager": lambda p: self.window(p, self.settings.window_precision, False),
            "window_fp16": lambda p: self.window(p, "fp16", False),
            "window_compiled": lambda p: self.window(p, self.settings.window_precision, True),
            "autoattack": self.autoattack,
        }
        for name in PHASES:
            self.run_phase(self.phases[name], steps[name])
        self.write_record()
        self.print_table()
        return 0 if self.passed else 1

    @property
    def passed(self) -> bool:
        # A phase is skipped either for a reason that is no failure (no pyautoattack, fp16 on a CPU) or because an
        # earlier phase failed, which fails the check already.
        return all(p.status in ("ok", "skipped") for p in self.phases.values())

    def time_left(self) -> float:
        return self.settings.time_limit_s - (time.monotonic() - self.started)

    def run_phase(self, phase: Phase, step: Callable[[Phase], None]) -> None:
        needed = NEEDS.get(phase.name)
        started = time.monotonic()
        self.phase_deadline = started + min(phase.budget_s, max(self.time_left(), 0.0))
        self.phase_cut_by_time_limit = self.time_left() < phase.budget_s
        print(f"── {phase.name} (budget {phase.budget_s:.0f} s, {max(self.time_left(), 0):.0f} s left)", flush=True)
        try:
            if needed and self.phases[needed].status not in ("ok", "timeout"):
                raise PhaseSkipped(f"needs {needed}, which {self.phases[needed].status}")
            if self.time_left() < 5:
                raise PhaseTimeout(f"not started: the check's {self.settings.time_limit_s:.0f} s limit was reached")
            step(phase)
            phase.status = "ok"
        except PhaseSkipped as reason:
            phase.status, phase.error = "skipped", str(reason)
        except PhaseTimeout as reason:
            phase.status, phase.error = "timeout", str(reason)
        except PhaseFailed as reason:
            phase.status, phase.error = "failed", str(reason)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM of the check itself: record, then stop
            phase.status, phase.error = "failed", "interrupted"
            phase.seconds = round(time.monotonic() - started, 1)
            self.write_record()
            raise
        except Exception as exc:  # a bug in this script must not cost the other phases
            phase.status, phase.error = "failed", f"{type(exc).__name__}: {_one_line(str(exc))}"
        phase.seconds = round(time.monotonic() - started, 1)
        print(f"   {phase.status} in {phase.seconds:.1f} s" + (f": {phase.error}" if phase.error else "")
              + (f"\n   {phase.summary}" if phase.summary else ""), flush=True)
        self.write_record()

    def stage(self, phase: Phase, argv: list[str], label: str, extra_env: dict[str, str] | None = None) -> str:
        """Run one subprocess under the phase's deadline; its output goes to the log and is returned.

        At the deadline the stage gets SIGTERM (distill saves its state and exits 130), then SIGKILL for its whole
        process group (torch.compile's workers included) after a grace period."""
        phase.commands.append(" ".join(argv))
        timeout = self.phase_deadline - time.monotonic()
        if timeout <= 0:
            raise PhaseTimeout(f"{label}: no time left in the phase's budget")
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {phase.name}: {label}\n$ {' '.join(argv)}\n".encode())
            log.flush()
            offset = log.tell()
            self.child = subprocess.Popen(argv, cwd=self.work, env={**self.child_env, **(extra_env or {})},
                                          stdout=log, stderr=subprocess.STDOUT, preexec_fn=os.setpgrp)
            try:
                returncode = self.child.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                self.child.send_signal(signal.SIGTERM)
                try:
                    self.child.wait(timeout=STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    pass
                returncode = self.child.returncode
            finally:
                self.stop_child()
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            output = log.read().decode(errors="replace")
        if timed_out:
            limit = (f"the check's {self.settings.time_limit_s:.0f} s limit" if self.phase_cut_by_time_limit
                     else f"the phase's {phase.budget_s:.0f} s budget")
            raise PhaseTimeout(f"{label} ran into {limit} and was stopped")
        if returncode != 0:
            raise PhaseFailed(f"{label} exited {returncode}: {_last_error_line(output)}")
        return output

    def stop_child(self) -> None:
        """SIGKILL whatever is left of the current stage's process group."""
        if self.child is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.child.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.child.wait(timeout=10)
        self.child = None

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "rslad_edge.cli", *args]

    def probe(self, *args: str) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--probe", *args]

    # -------------------------------------------------------------------------------------------------- phases

    def env(self, phase: Phase) -> None:
        output = self.stage(phase, self.probe("env", self.settings.device), "environment probe")
        env = _last_json_line(output)
        self.env_record = env  # the record's top-level "env"
        if env.get("error"):
            raise PhaseFailed(env["error"])
        gpu = env.get("gpu") or {}
        where = (f"{gpu.get('name')} ({gpu.get('memory_gb')} GiB, sm {gpu.get('capability')}), driver "
                 f"{env.get('driver')}" if gpu else f"CPU: {env.get('cpu')}")
        phase.summary = (f"{where}; torch {env['torch']} (CUDA {env.get('torch_cuda')}, cuDNN {env.get('cudnn')}); "
                         f"--precision auto = {env.get('auto_precision')}; pyautoattack {env.get('pyautoattack')}")

    def prepare_data(self, phase: Phase) -> None:
        if self.data is None:
            dataset, root = "shapes", None
        elif self.data.is_dir():
            dataset, root = "imagefolder", _imagefolder_root(self.data)
        elif self.data.is_file():
            dataset, root = "imagefolder", self.unpack(phase, self.data)
        else:
            raise PhaseFailed(f"--data {self.data}: no such file or folder (run --prepare here first)")
        self.dataset_args = ["--dataset", dataset] + (["--data-root", str(root)] if root else [])
        counts = _last_json_line(self.stage(phase, self.probe("data", dataset, str(root or "")), "decode"))
        phase.figures.update(dataset=dataset, root=str(root) if root else None, **counts)
        phase.summary = (f"{dataset}: {counts['train']['images']:,} train / {counts['test']['images']:,} test images, "
                         f"decoded in {counts['train']['seconds'] + counts['test']['seconds']:.1f} s")

    def unpack(self, phase: Phase, archive: Path) -> Path:
        started = time.monotonic()
        target = self.work / "data"
        shutil.rmtree(target, ignore_errors=True)
        try:
            with tarfile.open(archive) as tar:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse links out, absolute paths
                    tar.extractall(target, filter="data")
                else:
                    tar.extractall(target)
        except (OSError, tarfile.TarError) as exc:
            raise PhaseFailed(f"--data {archive}: cannot unpack ({_one_line(str(exc))})") from None
        phase.figures.update(archive=str(archive), archive_mib=round(archive.stat().st_size / 2**20, 1),
                             unpack_seconds=round(time.monotonic() - started, 1))
        phase.figures["archive_is_the_readmes"] = _sha256(archive) == KNOWN_ARCHIVE_SHA256
        return _imagefolder_root(target)

    def teacher(self, phase: Phase) -> None:
        s = self.settings
        out = self.work / "teacher"
        args = ["distill", "--method", "sat", "--student", s.teacher_arch, "--attack-steps", "1",
                "--step-size", "10/255", "--lr", "0.1", "--epochs", str(s.teacher_epochs),
                "--batch-size", str(s.batch_size), "--val-n", str(s.val_n), "--precision", s.teacher_precision,
                "--device", s.device, *self.dataset_args, "--out", str(out), "--force"]
        if s.teacher_epochs > 1:
            args += ["--milestones", str(s.teacher_epochs)]  # the last epoch at lr x0.1
        if s.teacher_train_subset:
            args += ["--train-subset", str(s.teacher_train_subset)]
        self.run_training(phase, args, out, f"{s.teacher_arch} fast AT (FGSM-RS 10/255) {s.teacher_precision}")

    def student(self, phase: Phase) -> None:
        s = self.settings
        out = self.work / "student"
        args = ["distill", "--preset", "fast", "--method", "rslad", "--student", s.student_arch,
                "--teacher", str(self.teacher_checkpoint()), "--epochs", str(s.student_epochs),
                "--train-subset", str(s.student_train_subset), "--batch-size", str(s.batch_size),
                "--val-n", str(s.val_n), "--precision", s.student_precision, "--device", s.device,
                *self.dataset_args, "--out", str(out), "--force"]
        if s.attack_steps:
            args += ["--attack-steps", str(s.attack_steps)]
        self.run_training(phase, args, out, f"{s.student_arch} RSLAD {s.student_precision}")

    def run_training(self, phase: Phase, args: list[str], out: Path, what: str) -> None:
        """A distill run; its epochs go into the figures even when it was stopped at its budget."""
        try:
            self.stage(phase, self.cli(*args), "distill")
        finally:
            epochs = stage_epochs(out)
            checkpoint = trained_checkpoint(out)
            phase.figures.update(epochs=epochs, checkpoint=str(checkpoint) if checkpoint else None)
            evaluated = [e for e in epochs if e.get("robust_acc") is not None]
            if evaluated:  # the checkpoint distill keeps: the best by PGD-20 (the first of equals)
                best = max(evaluated, key=lambda e: e["robust_acc"])
                phase.figures.update(selected_epoch=best["epoch"], clean_acc=best["clean_acc"],
                                     pgd20_acc=best["robust_acc"], val_n=self.settings.val_n)
            rates = ", ".join(f"{e['images_per_s']:,.0f}" for e in epochs)
            phase.summary = (f"{what}, {len(epochs)} epoch(s), img/s per epoch: {rates or '-'}"
                             + (f"; clean {phase.figures['clean_acc']:.1%} / PGD-20 {phase.figures['pgd20_acc']:.1%}"
                                f" on {self.settings.val_n:,} held-out training images"
                                f" (epoch {phase.figures['selected_epoch']})"
                                if evaluated else ""))
        if checkpoint is None:
            raise PhaseFailed(f"distill finished without a checkpoint in {out}")

    def teacher_checkpoint(self) -> Path:
        checkpoint = trained_checkpoint(self.work / "teacher")
        if checkpoint is None:
            raise PhaseSkipped("the teacher phase left no checkpoint")
        return checkpoint

    def student_checkpoint(self) -> Path:
        checkpoint = trained_checkpoint(self.work / "student")
        if checkpoint is None:
            raise PhaseSkipped("the student phase left no checkpoint")
        return checkpoint

    def export(self, phase: Phase, precision: str) -> None:
        export_dir = self.work / "export"
        self.stage(phase, self.cli(
            "export", str(self.student_checkpoint()), "--precision", precision, "--out", str(export_dir),
            "--name", "student", "--parity-n", str(self.settings.parity_n), *self.dataset_args), "export")
        onnx_path = exported_onnx(export_dir, precision)
        parity = export_parity(onnx_path)
        phase.figures.update(onnx=str(onnx_path), mib=round(onnx_path.stat().st_size / 2**20, 2), parity=parity)
        phase.summary = (f"{onnx_path.name} {phase.figures['mib']} MiB: max |diff| {parity['max_abs_diff']:.2e}, "
                         f"agreement {parity['agreement']:.2%} vs PyTorch on {parity['n']} test images "
                         "(ONNX Runtime CPU)")

    def bench(self, phase: Phase) -> None:
        s = self.settings
        json_path = self.work / "bench.json"
        args = ["bench", str(self.student_checkpoint()), "--device", s.device, "--precision", s.bench_precisions,
                "--batch", s.bench_batches, *s.bench_timing, "--json", str(json_path)]
        if s.threads:
            args += ["--threads", str(s.threads)]
        self.stage(phase, self.cli(*args), "bench")
        rows = bench_rows(json_path)
        phase.figures["rows"] = rows
        by_precision: dict[str, list[str]] = {}
        for row in rows:
            by_precision.setdefault(row["precision"], []).append(f"{row['p50_ms']:.3g}")
        phase.summary = (f"p50 ms at batch {s.bench_batches.replace(',', '/')} on {rows[0]['provider']}: "
                         + "; ".join(f"{p} {'/'.join(v)}" for p, v in by_precision.items())
                         + f"; best {max(r['images_per_s'] for r in rows):,.0f} img/s")

    def verify(self, phase: Phase) -> None:
        figures = self.run_verify(phase, "pgd_sat,cw", self.settings.verify_n, self.work / "verify.json")
        robust = figures["robust_acc"]
        phase.summary = (f"{figures['n']:,} test images on {figures['provider']}: clean {figures['clean_acc']:.1%}, "
                         f"PGD_SAT {robust['pgd_sat']:.1%}, CW {robust['cw']:.1%}, worst "
                         f"{figures['worst_case_acc']:.1%} ({figures['seconds']:.1f} s)")

    def autoattack(self, phase: Phase) -> None:
        if self.settings.autoattack_n == 0:
            raise PhaseSkipped("not in the dry run (AutoAttack takes minutes on a CPU)")
        if not self.env_record.get("pyautoattack"):
            raise PhaseSkipped("pyautoattack is not importable here (run --prepare and pass --site)")
        figures = self.run_verify(phase, "autoattack", self.settings.autoattack_n,
                                  self.work / "verify-autoattack.json")
        phase.summary = (f"{figures['n']:,} test images on {figures['provider']}: clean {figures['clean_acc']:.1%}, "
                         f"AutoAttack {figures['robust_acc']['autoattack']:.1%} ({figures['seconds']:.1f} s)")

    def run_verify(self, phase: Phase, attacks: str, n: int, json_path: Path) -> dict[str, Any]:
        args = ["verify", str(self.student_checkpoint()), "--device", self.settings.device, "--attacks", attacks,
                "--n", str(n), *self.dataset_args, "--json", str(json_path)]
        if self.settings.threads:
            args += ["--threads", str(self.settings.threads)]
        self.stage(phase, self.cli(*args), "verify")
        phase.figures = verify_figures(json_path)
        return phase.figures

    def window(self, phase: Phase, precision: str, compiled: bool) -> None:
        """Two short epochs of the student's RSLAD run: the first warms up (and compiles), the second is timed."""
        s = self.settings
        if precision == "fp16" and s.device != "cuda":
            raise PhaseSkipped("fp16 AMP training needs CUDA (distill refuses it on a CPU)")
        out = self.work / phase.name
        args = ["distill", "--preset", "fast", "--method", "rslad", "--student", s.student_arch,
                "--teacher", str(self.teacher_checkpoint()), "--epochs", "2", "--train-subset", str(s.window_images),
                "--batch-size", str(s.batch_size), "--val-n", "0", "--select", "last", "--precision", precision,
                "--device", s.device, *self.dataset_args, "--out", str(out), "--force",
                *(["--compile"] if compiled else [])]
        if s.attack_steps:
            args += ["--attack-steps", str(s.attack_steps)]
        dynamo_disabled = compiled and not s.compile_for_real
        try:
            self.stage(phase, self.cli(*args), "distill" + (" --compile" if compiled else ""),
                       {"TORCHDYNAMO_DISABLE": "1"} if dynamo_disabled else None)
        finally:
            epochs = stage_epochs(out)
            phase.figures.update(precision=precision, compile=compiled, dynamo_disabled=dynamo_disabled,
                                 images_per_epoch=s.window_images, epochs=epochs)
        if len(epochs) < 2:
            raise PhaseFailed(f"the window finished {len(epochs)} of 2 epochs")
        first, timed = epochs[0], epochs[1]
        phase.figures.update(images_per_s=timed["images_per_s"], first_epoch_seconds=first["seconds"],
                             timed_epoch_seconds=timed["seconds"])
        compile_note = " (TORCHDYNAMO_DISABLE=1: dry run)" if dynamo_disabled else ""
        phase.summary = (f"{s.student_arch} RSLAD {precision}{' --compile' if compiled else ''}{compile_note}: "
                         f"{timed['images_per_s']:,.0f} img/s (epoch 2); epoch 1 {first['seconds']:.1f} s")
        eager = self.phases["window_eager"].figures.get("images_per_s")
        if compiled and eager:
            phase.figures["speedup_vs_eager"] = timed["images_per_s"] / eager
            phase.figures["compile_seconds_estimate"] = first["seconds"] - timed["seconds"]
            phase.summary += (f" incl. compilation (~{first['seconds'] - timed['seconds']:.0f} s); "
                              f"x{timed['images_per_s'] / eager:.2f} vs eager")

    # -------------------------------------------------------------------------------------------------- output

    def record(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT, "started_at": self.started_at, "command": " ".join(sys.argv),
            "passed": self.passed, "seconds": round(time.monotonic() - self.started, 1),
            "env": self.env_record, "settings": dataclasses.asdict(self.settings),
            "phases": {name: dataclasses.asdict(phase) for name, phase in self.phases.items()},
        }

    def write_record(self) -> None:
        """Atomically (a temporary file, then a rename): a check killed while writing keeps the previous record."""
        temporary = self.json_path.with_name(self.json_path.name + ".tmp")
        temporary.write_text(json.dumps(self.record(), indent=2, default=str) + "\n")
        os.replace(temporary, self.json_path)

    def print_table(self) -> None:
        from rich import box
        from rich.console import Console
        from rich.table import Table

        styles = {"ok": "green", "skipped": "yellow", "failed": "bold red", "timeout": "bold red"}
        table = Table(title=f"rslad-edge GPU check on {self.settings.device}: "
                      f"{'passed' if self.passed else 'FAILED'} in {time.monotonic() - self.started:.0f} s",
                      box=box.SIMPLE_HEAD, caption=f"record: {self.json_path}; stage output: {self.log_path}",
                      caption_justify="left")
        table.add_column("phase", style="bold", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("s / budget", justify="right", no_wrap=True)
        table.add_column("result", overflow="fold")
        for phase in self.phases.values():
            result = phase.summary if phase.status == "ok" else phase.error or ""
            if phase.status != "ok" and phase.summary:
                result += f"\n{phase.summary}"
            table.add_row(phase.name, f"[{styles.get(phase.status, '')}]{phase.status}[/]",
                          f"{phase.seconds:.0f} / {phase.budget_s:.0f}", result)
        Console(width=max(shutil.get_terminal_size((160, 40)).columns, 140)).print(table)


# ------------------------------------------------------------------------------------------------------------------
# Helpers


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _imagefolder_root(folder: Path) -> Path:
    """The folder holding train/ and test/: ``folder`` itself or its one subfolder (the archive's ``cifar10/``)."""
    for candidate in [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]:
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    raise PhaseFailed(f"{folder}: no train/ and test/ folders in it or in a subfolder")


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _last_error_line(output: str) -> str:
    """The CLI's ``error: ...`` line, else the last line (a traceback's exception)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return _one_line((errors or lines or ["no output"])[-1])


def _last_json_line(output: str) -> dict[str, Any]:
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise PhaseFailed(f"the probe printed no JSON: {_last_error_line(output)}")


def prepare(archive: Path, target: Path) -> None:
    """Before a run on an offline GPU machine: copy the CIFAR-10 archive and pyautoattack's code (without its 42 MiB
    example model) into ``target``, a git-ignored folder to copy there with the checkout."""
    target.mkdir(parents=True, exist_ok=True)
    if not archive.is_file():
        sys.exit(f"error: {archive} does not exist; pass --data with the CIFAR-10 JPEG archive")
    if _sha256(archive) != KNOWN_ARCHIVE_SHA256:
        print(f"note: {archive} is not the archive the README's figures were made with (sha256 differs)")
    shutil.copyfile(archive, target / archive.name)
    site = target / "site"
    shutil.rmtree(site, ignore_errors=True)
    spec = importlib.util.find_spec("pyautoattack")
    if spec is None or not spec.submodule_search_locations:
        print("warning: pyautoattack is not installed here; the GPU run will skip AutoAttack")
    else:
        package = Path(next(iter(spec.submodule_search_locations)))
        shutil.copytree(package, site / "pyautoattack", ignore=shutil.ignore_patterns("examples", "__pycache__"))
        distribution = importlib.metadata.distribution("pyautoattack")
        info = site / f"pyautoattack-{distribution.version}.dist-info"  # so importlib.metadata knows the version
        info.mkdir()
        (info / "METADATA").write_text(distribution.read_text("METADATA") or "")
    total = 0
    for entry in sorted(target.iterdir()):
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        total += size
        print(f"{size / 2**20:8.2f} MiB  {entry} ({len(files)} file(s))")
    print(f"{total / 2**20:8.2f} MiB  in all: copy \"{target.name}\" to the GPU machine with the checkout")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="CIFAR-10 JPEG archive (.tar.gz) or an imagefolder with "
                        "train/ and test/; required on the GPU; the dry run uses synthetic shapes without it")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-check"),
                        help="where gpu_check.json and gpu_check.log go")
    parser.add_argument("--work", type=Path, help="run directories and the unpacked data [default: a temporary "
                        "folder, removed at the end]")
    parser.add_argument("--site", type=Path, help="a folder of extra packages for the stages (pyautoattack)")
    parser.add_argument("--dry-run", action="store_true", help="tiny settings on the CPU: checks the script itself")
    parser.add_argument("--threads", type=int, help="intra-op CPU threads for bench and verify (dry run)")
    parser.add_argument("--time-limit", type=float, help="seconds for the whole check [default: 570 on the GPU]")
    parser.add_argument("--budget", action="append", default=[], metavar="PHASE=SECONDS",
                        help=f"override a phase's budget; phases: {', '.join(PHASES)}")
    parser.add_argument("--prepare", action="store_true",
                        help=f"for an offline GPU machine: copy the archive (--data) and pyautoattack's code into "
                        f"{PREPARED_DIR.relative_to(REPO)}/, then exit")
    parser.add_argument("--probe", nargs="+", help=argparse.SUPPRESS)  # internal: run by the check itself
    args = parser.parse_args()

    if args.probe:
        kind, *rest = args.probe
        result = probe_environment(*rest) if kind == "env" else probe_dataset(rest[0], rest[1] or None)
        print(json.dumps(result, default=str))
        return 0
    if args.prepare:
        if args.data is None:
            parser.error("--prepare needs --data, the CIFAR-10 JPEG archive to copy")
        prepare(args.data, PREPARED_DIR)
        return 0

    settings = Settings.dry_run(args.threads) if args.dry_run else Settings.gpu()
    if not args.dry_run and args.data is None:
        parser.error("--data is required on the GPU (the CIFAR-10 archive; see --prepare)")
    budgets = dict(settings.budgets_s)
    for item in args.budget:
        name, _, seconds = item.partition("=")
        try:
            budgets[name] = float(seconds) if name in budgets else float("nan")
        except ValueError:
            budgets[name] = float("nan")
        if not budgets[name] > 0:
            parser.error(f"--budget {item}: expected PHASE=SECONDS (> 0) with PHASE one of {', '.join(PHASES)}")
    settings = dataclasses.replace(settings, budgets_s=budgets,
                                   time_limit_s=args.time_limit or settings.time_limit_s)

    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    check = GpuCheck(settings, data=args.data.resolve() if args.data else None, site=args.site,
                     out=args.out.resolve(), work=work.resolve())
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return check.run()
    except KeyboardInterrupt:
        check.stop_child()
        print("interrupted; the record so far is in", check.json_path, file=sys.stderr)
        return 130
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
