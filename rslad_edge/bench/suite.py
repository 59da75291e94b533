"""``bench_artifacts``: several artifacts on one device (local or over SSH) into one report, JSON and plot.

This is what ``rslad-edge bench`` and the pipeline call. It checks that each artifact can run on the device before
loading anything (an engine on a CPU is an error that says why), opens each through ``load_runner``, times it with
:func:`rslad_edge.bench.core.bench`, adds the accuracy verify measured for that exact file (by sha256), and writes
the JSON atomically.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from rslad_edge.bench.accuracy import Accuracies
from rslad_edge.bench.core import BenchReport, TimingConfig, bench
from rslad_edge.bench.env import probe_env
from rslad_edge.bench.jetson import TegrastatsSampler, is_jetson, probe_local_jetson
from rslad_edge.bench.remote import SshTarget, bench_remote
from rslad_edge.errors import ConfigError, RuntimeUnavailableError
from rslad_edge.io import write_json
from rslad_edge.options import comma_list, option, same_option
from rslad_edge.runtime import (
    CHECKPOINT_SUFFIXES,
    ENGINE_SUFFIXES,
    EXECUTORCH_SUFFIXES,
    ONNX_SUFFIXES,
    ORT_FORMAT_SUFFIXES,
    load_runner,
)

logger = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda", "trt", "jetson")
PRECISIONS = ("fp32", "bf16", "fp16")
RELIABLE_P99_ITERATIONS = 100  # below this, p99 is (nearly) the slowest single iteration


def _device(text: str) -> str:
    if text not in (*DEVICES, "auto"):
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)} or auto, got '{text}'")
    return text


_timing_option = functools.partial(same_option, TimingConfig)
# bench_artifacts' keyword form names two options in the plural.
_KEYWORDS = {"batch": "batches", "precision": "precisions"}


@dataclass(frozen=True)
class BenchConfig:
    """The options of one bench run: ``rslad-edge bench``'s, and the keys of a pipeline's ``bench:`` section
    (rslad_edge.options derives both). The timing options are TimingConfig's (their defaults, help and parsing),
    under their command-line names. Validated on creation, so a typo or an impossible value fails before any stage
    of a pipeline runs."""

    device: str = option(
        "cpu", parse=_device, help="cpu, cuda (PyTorch / ONNX Runtime CUDA EP), trt (ONNX Runtime TensorRT EP, "
        "engines), jetson, or auto (cuda where a GPU is present).")
    batch: list[int] = _timing_option("batches", convert=list)
    warmup: int = _timing_option("warmup")
    warmup_seconds: float = _timing_option("warmup_seconds")
    iters: int | None = _timing_option("iters")
    seconds: float | None = _timing_option("seconds")
    min_iters: int = _timing_option("min_iters")
    threads: int | None = option(
        None, default_text="the backend's", help="Intra-op CPU threads (ONNX Runtime, PyTorch).")
    precision: list[str] = option(
        ["fp32"], parse=comma_list,
        help="For checkpoints: fp32, bf16 and/or fp16 autocast, comma-separated (one set of rows each).")
    provider: str | None = option(None, help="ONNX Runtime execution provider override: cpu, cuda or trt.")
    plot: bool = option(True, cli=False, help="A PNG next to the JSON when matplotlib is installed.")

    def __post_init__(self) -> None:
        _device(self.device)
        _ = self.timing  # validates batch sizes and durations, with TimingConfig's messages
        bad = [p for p in self.precision if p not in PRECISIONS]
        if bad:
            raise ConfigError(f"--precision must be among {', '.join(PRECISIONS)}, got '{bad[0]}'")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {self.threads}")
        if self.provider is not None and self.provider not in ("cpu", "cuda", "trt"):
            raise ConfigError(f"--provider must be cpu, cuda or trt, got '{self.provider}'")

    @property
    def timing(self) -> TimingConfig:
        return TimingConfig(tuple(self.batch), self.warmup, self.warmup_seconds, self.iters, self.seconds,
                            self.min_iters)

    def options(self) -> dict[str, Any]:
        """The keyword form of these settings (``bench_artifacts(paths, **cfg.options())``), device resolved."""
        values = {_KEYWORDS.get(f.name, f.name): getattr(self, f.name) for f in fields(self) if f.name != "plot"}
        return {**values, "device": self.resolved_device()}

    @classmethod
    def from_options(cls, **options: Any) -> BenchConfig:
        """The inverse of :meth:`options`."""
        names = {keyword: name for name, keyword in _KEYWORDS.items()}
        values = {names.get(keyword, keyword): value for keyword, value in options.items()}
        for name in ("batch", "precision"):
            if name in values:
                values[name] = list(values[name])
        return cls(**values)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def runner_device(path: Path, device: str) -> str:
    """The ``load_runner`` device for an artifact on a bench ``--device``, or a ConfigError saying why it cannot
    run there."""
    suffix = path.suffix.lower()
    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got '{device}'")
    if suffix in ENGINE_SUFFIXES:
        if device == "cpu":
            raise ConfigError(
                f"'{path}' is a TensorRT engine: it runs only on the NVIDIA GPU and TensorRT version that built it, "
                "not on --device cpu; bench the .onnx on the CPU, or this engine with --device trt on that machine")
        return "cuda"
    if suffix in CHECKPOINT_SUFFIXES:
        if device == "trt":
            raise ConfigError(f"'{path}' is a PyTorch checkpoint: --device trt runs ONNX models and engines; use "
                              "--device cuda for the checkpoint, or export it to ONNX")
        return "cuda" if device == "jetson" else device
    if suffix in ONNX_SUFFIXES:
        return "trt" if device == "jetson" else device
    if suffix in EXECUTORCH_SUFFIXES + ORT_FORMAT_SUFFIXES:
        if device != "cpu":
            what = "an ExecuTorch program (XNNPACK)" if suffix in EXECUTORCH_SUFFIXES else "an ORT-format model"
            raise ConfigError(f"'{path}' is {what}, made for phone CPUs: bench it with --device cpu (here, or on "
                              "the phone's CPU); the .onnx runs on GPUs")
        return device
    return device  # load_runner names the suffixes it knows


def bench_artifacts(
    artifacts: Sequence[str | Path],
    config: BenchConfig | None = None,
    *,
    target: SshTarget | None = None,
    arch: str | None = None,
    num_classes: int | None = None,
    accuracies: Accuracies | None = None,
    json_path: str | Path | None = None,
    plot: bool = False,
    keep_remote: bool = False,
    remote_timeout: float = 1800.0,
    loader: Callable[..., Any] | None = None,
    on_step: Callable[[str], None] | None = None,
    **options: Any,
) -> BenchReport:
    """Bench every artifact as ``config`` says, on its device (or on ``target`` over SSH), into one report.

    ``options``: instead of ``config``, its keyword form (:meth:`BenchConfig.options`: ``batches=(1, 8)``,
    ``precisions=("fp32",)``, ``device=``, ``iters=``, ...). ``config.precision`` applies to checkpoints (PyTorch
    eager fp32, bf16 / fp16 autocast): one set of rows each.
    ``json_path``: write the report there (and ``<same name>.png`` with ``plot``).
    ``accuracies``: what verify measured for each file, by sha256 (``rslad_edge.bench.accuracy``), shown beside
    its latency; its warnings join the report's.
    ``loader``: opens an artifact (default ``rslad_edge.runtime.load_runner``); tests pass their own.
    """
    if config is not None and options:
        raise TypeError(f"bench_artifacts takes a BenchConfig or its options, not both ({', '.join(options)})")
    config = config if config is not None else BenchConfig.from_options(**options)
    device, timing, threads, precisions = config.resolved_device(), config.timing, config.threads, config.precision
    paths = [Path(a) for a in artifacts]
    if not paths:
        raise ConfigError("give at least one ARTIFACT (.pt, .onnx, .ort, .pte or .engine) to bench")
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"ARTIFACT '{path}' does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    if plot and json_path is None:
        raise ConfigError("--plot writes the PNG next to the JSON: give --json PATH too")
    step = on_step or (lambda message: None)

    if target is not None:
        if device not in ("jetson", "trt"):
            raise ConfigError(f"--host times with the device's trtexec: use --device jetson (or trt), not {device}")
        report = _bench_over_ssh(paths, target, timing, json_path, keep_remote, remote_timeout, step)
    else:
        for path in paths:
            runner_device(path, device)  # every artifact's incompatibility is reported before any timing starts
        report = _bench_here(paths, device, timing, threads=threads, precisions=precisions, arch=arch,
                             num_classes=num_classes, provider=config.provider, loader=loader, step=step)

    _add_accuracy(report, accuracies or Accuracies())
    busy = busy_machine_warning(report.env.get("busy_cores_of_others"), report.env.get("cpu_cores_usable"))
    if busy and target is None:
        report.warnings.append(busy)
    report.config.update(device=device, host=target.label if target else None, threads=threads,
                         precisions=list(precisions), artifacts=[str(p) for p in paths])
    report.env["load_avg_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for row in report.results:
        if row.iterations < RELIABLE_P99_ITERATIONS:
            row.notes.append(f"p99 of {row.iterations} iterations is close to the slowest one: time longer "
                             "(--seconds) for a stable tail")
    if json_path is not None:
        write_json(json_path, report.to_dict())
        if plot:
            from rslad_edge.bench.plot import plot_report

            plot_report(report, Path(json_path).with_suffix(".png"))
    return report


def busy_machine_warning(busy_cores: float | None, cores: int | None) -> str | None:
    """A warning when other processes kept more than half a core (or a quarter of the usable cores) busy as the run
    started: every figure then depends on what they did meanwhile."""
    if busy_cores is None or not cores or busy_cores <= max(0.5, 0.25 * cores):
        return None
    return (f"the machine was busy when the run started (other processes kept {busy_cores:.1f} of {cores} usable "
            "cores busy): they compete for the CPU, so these figures are not reliable; rerun on a quiet machine")


def _bench_here(paths: list[Path], device: str, config: TimingConfig, *, threads: int | None,
                precisions: Sequence[str], arch: str | None, num_classes: int | None, provider: str | None,
                loader: Callable[..., Any] | None, step: Callable[[str], None]) -> BenchReport:
    loader = loader or load_runner
    env = probe_env(with_gpu=device != "cpu")
    report = BenchReport([], env, config=asdict(config))
    if list(precisions) != ["fp32"] and not any(p.suffix.lower() in CHECKPOINT_SUFFIXES for p in paths):
        report.warnings.append("--precision applies to checkpoints; ONNX models and engines run at the "
                               "precision they were exported with")
    with ExitStack() as stack:
        power = None
        if device == "jetson":
            if not is_jetson():
                raise RuntimeUnavailableError("--device jetson: this machine is not a Jetson (no "
                                              "/etc/nv_tegra_release); bench one over SSH with --host user@jetson")
            state = probe_local_jetson()
            env["jetson"] = state.to_dict()
            report.warnings.extend(state.warnings)
            if shutil.which("tegrastats"):
                workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rslad-tegrastats-")))
                power = functools.partial(TegrastatsSampler, workdir)
            else:
                report.warnings.append("tegrastats not found: no power or energy figures")
        for index, path in enumerate(paths, 1):
            is_checkpoint = path.suffix.lower() in CHECKPOINT_SUFFIXES
            for precision in precisions if is_checkpoint else ("fp32",):
                options: dict[str, Any] = {"threads": threads}
                if is_checkpoint:
                    options.update(arch=arch, num_classes=num_classes, precision=precision)
                elif provider is not None:
                    options["provider"] = provider
                step(f"[{index}/{len(paths)}] loading {path.name}")
                runner = loader(path, runner_device(path, device), **options)
                label = f"[{index}/{len(paths)}] {path.name} ({runner.precision}, {runner.provider})"
                part = bench(runner, batches=config.batches, warmup=config.warmup,
                             warmup_seconds=config.warmup_seconds, iters=config.iters, seconds=config.seconds,
                             min_iters=config.min_iters, threads=threads, device=device, seed=config.seed, env=env,
                             power=power, on_batch=lambda batch, label=label: step(f"{label}: batch {batch}"))
                report.extend(part)
                del runner  # free the session / model before the next one is timed
    return report


def _bench_over_ssh(paths: list[Path], target: SshTarget, config: TimingConfig, json_path: str | Path | None,
                    keep_remote: bool, timeout: float, step: Callable[[str], None]) -> BenchReport:
    with ExitStack() as stack:
        if json_path is not None:
            workdir = Path(json_path).with_name(Path(json_path).stem + ".remote")
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rslad-remote-")))
        report = bench_remote(paths, target, config=config, workdir=workdir, keep_remote=keep_remote,
                              timeout=timeout, on_step=step)
        if json_path is not None:
            report.env["remote"]["raw_outputs"] = str(workdir)
    report.env["local"] = probe_env(with_gpu=False)
    return report


def _add_accuracy(report: BenchReport, accuracies: Accuracies) -> None:
    report.warnings.extend(w for w in accuracies.warnings if w not in report.warnings)
    for row in report.results:
        accuracy = accuracies.by_sha256.get(row.sha256)
        if accuracy is not None:
            row.clean_acc, row.robust_acc = accuracy.clean_acc, accuracy.robust_acc
