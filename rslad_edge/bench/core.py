"""``bench(runner)``: latency and throughput of one Runner at several batch sizes.

What is timed: ``runner.predict(x)`` on an input preallocated once per batch size, holding exactly ``batch``
images, so every iteration is one call into the backend (one ``session.run`` for ONNX Runtime, one forward for
PyTorch, one ``execute_async_v3`` for TensorRT). This is the simplest honest choice: it is the API a deployment
calls, nothing is reached behind the Runner's back, and ``predict``'s own work (an input check that reads the batch
once, a copy of the logits) costs microseconds against milliseconds of inference. For GPU backends ``predict``
includes the host-device copies and a synchronisation (it returns host memory), so it is timed with the host clock
and the figure is the application latency, like trtexec's "Latency".

A runner may offer a device-resident fast path, ``runner.timed_fn(x) -> Callable[[], object]``: a callable that
enqueues one inference on device buffers prepared from ``x`` (no copies) on torch's current CUDA stream. When a
runner on a CUDA device has it, bench times that callable with CUDA events instead (device latency, like trtexec's
"GPU Compute Time"). No runner has it yet; the rows say which was timed (``timed``, ``clock``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rslad_edge.bench.stats import LatencyStats, summarize
from rslad_edge.bench.timing import Clock, CudaEventClock, PerfCounterClock, measure
from rslad_edge.errors import ConfigError, RsladEdgeError
from rslad_edge.options import option
from rslad_edge.record import Artifact

logger = logging.getLogger(__name__)

DEFAULT_BATCHES = (1, 8, 64)


@dataclass
class BenchResult:
    """One row: one artifact at one batch size on one device. Times in ms per batch."""

    artifact: str
    sha256: str
    backend: str  # torch | onnxruntime | tensorrt
    provider: str  # what actually ran: "CPUExecutionProvider", "cpu", "trtexec (TensorRT 10.3.0) on Orin", ...
    precision: str
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    images_per_s: float  # batch / p50
    images_per_s_wall: float  # images / timed seconds, outliers included
    iterations: int
    outliers: int
    outlier_threshold_ms: float
    device: str
    timed: str  # "predict" | "timed_fn" | "trtexec"
    clock: str  # "perf_counter" | "cuda_events" | "trtexec"
    threads: int | None = None  # intra-op threads; None: the backend's default
    warmup_iterations: int | None = None
    size_mb: float | None = None
    host: str | None = None  # the SSH host for remote rows
    power_w: float | None = None  # mean module power during the timed run (Jetson)
    energy_per_image_mj: float | None = None
    power_rail: str | None = None
    power_samples: int | None = None
    gpu_load_pct: float | None = None
    gpu_compute_p50_ms: float | None = None  # trtexec: device time only
    gpu_compute_p99_ms: float | None = None
    trtexec_throughput_qps: float | None = None  # trtexec's own figure (queries / host walltime), a cross-check
    clean_acc: float | None = None  # from the artifact's verify JSON
    robust_acc: float | None = None  # worst case over the attacks run by verify
    notes: list[str] = field(default_factory=list)


@dataclass
class BenchReport:
    results: list[BenchResult]
    env: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"results": [asdict(r) for r in self.results], "env": self.env, "config": self.config,
                "warnings": list(self.warnings)}

    def extend(self, other: BenchReport) -> None:
        self.results.extend(other.results)
        self.warnings.extend(w for w in other.warnings if w not in self.warnings)


@dataclass(frozen=True)
class TimingConfig:
    """How long to time: each option declared once here (BenchConfig offers them, rslad_edge.options makes them
    the CLI's), validated here so every entry point (CLI, pipeline, tests) gets the same messages."""

    @staticmethod
    def batch_sizes(sizes: Sequence[int]) -> list[int]:
        """Batch sizes to time, each once, in order; a ConfigError naming --batch if none is given or one is < 1."""
        if not sizes:
            raise ConfigError("--batch needs at least one batch size, e.g. --batch 1,8,64")
        bad = [size for size in sizes if int(size) < 1]
        if bad:
            raise ConfigError(f"--batch sizes must be >= 1, got {bad[0]}")
        return list(dict.fromkeys(int(size) for size in sizes))

    @staticmethod
    def parse_batches(text: str) -> list[int]:
        """``--batch 1,8,64``."""
        try:
            sizes = [int(part) for part in text.replace(" ", "").split(",") if part]
        except ValueError:
            raise ConfigError(f"expected comma-separated batch sizes like 1,8,64, got '{text}'") from None
        return TimingConfig.batch_sizes(sizes)

    batches: tuple[int, ...] = option(DEFAULT_BATCHES, flags=("--batch",), parse=parse_batches,
                                      help="Batch sizes, comma-separated.")
    warmup: int = option(10, help="Warm-up calls per batch size (at least; see --warmup-seconds).")
    warmup_seconds: float = option(
        1.0, help="Warm-up time per batch size, seconds (at least; trtexec over --host warms up by time only).")
    iters: int | None = option(None, help="Time exactly N calls per batch size (instead of --seconds).")
    seconds: float | None = option(
        3.0, help="Time calls for S seconds per batch size (at least --min-iters calls).")
    min_iters: int = option(30, help="The fewest calls --seconds times per batch size.")
    seed: int = option(0, cli=False, help="Seed of the random input batch.")

    def __post_init__(self) -> None:
        self.batch_sizes(self.batches)
        if self.warmup < 0 or self.warmup_seconds < 0:
            raise ConfigError("--warmup and --warmup-seconds must be >= 0")
        if self.iters is not None and self.iters < 1:
            raise ConfigError(f"--iters must be >= 1, got {self.iters}")
        if self.iters is None and (self.seconds is None or self.seconds <= 0):
            raise ConfigError("--seconds must be > 0 (or give --iters)")
        if self.min_iters < 1:
            raise ConfigError(f"--min-iters must be >= 1, got {self.min_iters}")


def artifact_facts(path: str | Path) -> tuple[str, float]:
    """(sha256, size in MB) of an artifact file (and its ``.data`` external weights, when the ONNX has them)."""
    artifact = Artifact.from_file(path)
    return artifact.sha256, artifact.size_mb


def timed_callable(runner: Any, x: np.ndarray) -> tuple[Callable[[], object], str]:
    """The callable to time for ``runner`` on input ``x``, and what it is ("predict" or "timed_fn")."""
    fast_path = getattr(runner, "timed_fn", None)
    if callable(fast_path):
        return fast_path(x), "timed_fn"
    return (lambda: runner.predict(x)), "predict"


def _on_cuda(runner: Any) -> bool:
    device = getattr(runner, "device", None)
    return getattr(device, "type", str(device or "")).startswith("cuda")


def bench(
    runner: Any,
    *,
    batches: Sequence[int] = DEFAULT_BATCHES,
    warmup: int = 10,
    warmup_seconds: float = 1.0,
    iters: int | None = None,
    seconds: float | None = 3.0,
    min_iters: int = 30,
    threads: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    env: dict[str, Any] | None = None,
    power: Callable[[], Any] | None = None,
    clock: Clock | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> BenchReport:
    """Time ``runner.predict`` at each batch size; one :class:`BenchResult` per batch.

    ``threads``: intra-op threads the runner was created with (ONNX Runtime fixes them at session creation, so
    pass them to ``load_runner``); only recorded here, and checked against ``runner.threads`` when it has one.
    ``power``: a context-manager factory sampling the device's power while timing (a Jetson's tegrastats): it
    must return an object with ``power((t0, t1)) -> PowerReading | None`` after its block.
    ``clock``: override the clock (tests); by default the host clock, or CUDA events for a ``timed_fn`` on CUDA.
    ``device``: the bench device the rows are labelled with (the runner was already opened on it).
    """
    config = TimingConfig(tuple(int(b) for b in batches), warmup, warmup_seconds, iters, seconds, min_iters, seed)
    if env is None:
        from rslad_edge.bench.env import probe_env

        env = probe_env()
    threads = _threads_used(runner, threads)
    sha256, size_mb = artifact_facts(runner.path)
    rng = np.random.default_rng(config.seed)
    report = BenchReport([], env, config=asdict(config))

    for batch in config.batches:
        if on_batch is not None:
            on_batch(batch)
        # Preallocated once: uniform pixels in [0, 1] (the input contract); robust CIFAR nets have no
        # data-dependent control flow, so the values do not change the time.
        x = rng.random((batch, *runner.input_shape), dtype=np.float32)
        _check_runs(runner, x)
        fn, timed = timed_callable(runner, x)
        batch_clock = clock or (CudaEventClock() if timed == "timed_fn" and _on_cuda(runner) else PerfCounterClock())
        notes = _batch_notes(runner, batch)
        if threads is None and runner.backend == "onnxruntime":
            notes.append(f"ONNX Runtime's default intra-op threads: one per physical core "
                         f"({env.get('cpu_cores_physical') or '?'} here)")
        sampler = power() if power is not None else None
        with sampler if sampler is not None else contextlib.nullcontext():
            run = measure(fn, clock=batch_clock, warmup=config.warmup, warmup_seconds=config.warmup_seconds,
                          iters=config.iters, seconds=config.seconds, min_iters=config.min_iters)
        reading = sampler.power((run.started_at, run.ended_at)) if sampler is not None else None
        stats = summarize(run.latencies_ms, batch)
        result = _result_row(runner, stats, sha256=sha256, size_mb=size_mb, device=device, timed=timed,
                             clock=batch_clock.name, threads=threads, warmup_iterations=run.warmup_iterations,
                             notes=notes)
        if reading is not None:
            result.power_w, result.power_rail = reading.mean_w, reading.rail
            result.power_samples, result.gpu_load_pct = reading.samples, reading.gpu_load_pct
            result.energy_per_image_mj = reading.energy_per_image_mj(stats.images_per_s_wall)
        elif sampler is not None:
            result.notes.append("no tegrastats sample fell inside the timed run: time longer (--seconds)")
        if stats.outliers:
            logger.debug("%s batch %d: %d of %d iterations slower than %.3f ms (reported, not dropped)",
                        Path(runner.path).name, batch, stats.outliers, stats.iterations, stats.outlier_threshold_ms)
        report.results.append(result)
    return report


def _threads_used(runner: Any, requested: int | None) -> int | None:
    """The intra-op thread count the runner really uses; a request it was not created with is an error, since
    ONNX Runtime fixes threads when the session is made and a row must not claim threads it did not use."""
    runner_threads = getattr(runner, "threads", None)
    if requested is not None and runner_threads != requested:
        raise ConfigError(f"--threads {requested}, but the runner for '{runner.path}' was created with "
                          f"{runner_threads or 'the default'}: create it with load_runner(..., threads={requested})")
    if runner_threads is None and runner.backend == "torch":
        import torch  # already imported by the torch runner

        return torch.get_num_threads()
    return runner_threads


def _check_runs(runner: Any, x: np.ndarray) -> None:
    """One untimed call: a batch the artifact cannot take fails here with its name, not mid-measurement."""
    try:
        logits = runner.predict(x)
    except RsladEdgeError:
        raise
    except Exception as exc:  # backends raise their own types (ORT Fail, TensorRT RuntimeError, torch errors)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RsladEdgeError(f"'{runner.path}' fails at batch {len(x)}: {first_line}") from exc
    if getattr(logits, "shape", None) != (len(x), runner.num_classes):
        raise RsladEdgeError(f"'{runner.path}' returned logits of shape {getattr(logits, 'shape', None)} for a "
                             f"batch of {len(x)}; expected ({len(x)}, {runner.num_classes})")


def _batch_notes(runner: Any, batch: int) -> list[str]:
    """Things that make a row not what it looks like: a static batch padded or split, a capped batch split."""
    notes = []
    static = getattr(runner, "static_batch", None)
    cap = getattr(runner, "batch_size", None)
    if static and batch != static:
        notes.append(f"static-batch model ({static}): batch {batch} runs as {-(-batch // static)} call(s) of {static}")
    elif cap and batch > cap:
        notes.append(f"batch {batch} is split into calls of {cap} by the runner")
    return notes


def _result_row(runner: Any, stats: LatencyStats, **fields: Any) -> BenchResult:
    return BenchResult(artifact=str(runner.path), backend=runner.backend, provider=str(runner.provider),
                       precision=runner.precision, **{**asdict(stats), **fields})
