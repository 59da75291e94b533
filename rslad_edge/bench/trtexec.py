"""trtexec: the command line that times a built engine, and parsers for what trtexec prints and exports.

The engine itself is built by the command :mod:`rslad_edge.runtime.trt_build` writes (the one export prints).

trtexec ships with every JetPack (``/usr/src/tensorrt/bin/trtexec``), so timing through it needs nothing installed
on the device. Per-iteration times come from ``--exportTimes`` (one record per query), so the statistics are
computed by :func:`rslad_edge.bench.stats.summarize`, exactly as for a local run; the console summary is parsed as
a cross-check and as the fallback when the JSON is missing.

Formats handled (see ``../shared/samples``): the TensorRT 8.4-11 ``=== Performance summary ===`` block (with
``percentile(99%)`` only, or 90/95/99, or whatever ``--percentile`` asked for), the TensorRT 7 block (``Host
Latency`` / ``min: ...`` / ``throughput: ...``), and logs with no summary at all (``--dumpProfile`` without
``--separateProfileRun``). Verbose ``[V]`` explanation lines, trace lines and ``[W]`` lines after ``&&&& PASSED``
are ignored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from rslad_edge.runtime.trt_build import shape_arg

PERCENTILES = (50, 90, 99)

_PREFIX = re.compile(r"^\[[^\]]*\]\s*\[([IWEVF])\]\s?(.*)$")  # "[09/26/2026-13:30:05] [I] text"
_NUMBER = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_SUMMARY_METRICS = {
    "Latency": "latency",
    "End-to-End Host Latency": "end_to_end",
    "Enqueue Time": "enqueue",
    "H2D Latency": "h2d",
    "GPU Compute Time": "gpu_compute",
    "D2H Latency": "d2h",
}
_LEGACY_SECTIONS = {"Host Latency": "latency", "Enqueue Time": "enqueue", "GPU Compute": "gpu_compute"}


@dataclass(frozen=True)
class TimeStats:
    """One metric of the summary, in ms. ``percentiles`` maps 90.0 -> ms for each percentile trtexec printed."""

    min_ms: float | None = None
    max_ms: float | None = None
    mean_ms: float | None = None
    median_ms: float | None = None
    percentiles: dict[float, float] = field(default_factory=dict)


@dataclass
class TrtexecLog:
    """What a trtexec console log says. ``latency`` is the host latency (H2D + GPU compute + D2H) of one query."""

    passed: bool | None = None  # None: neither "&&&& PASSED" nor "&&&& FAILED" (a cut log)
    command: str | None = None
    trt_version: str | None = None
    device: str | None = None
    precision: str | None = None
    throughput_qps: float | None = None
    walltime_s: float | None = None
    gpu_compute_total_s: float | None = None
    queries: int | None = None  # "Timing trace has N queries over D s"
    trace_s: float | None = None
    metrics: dict[str, TimeStats] = field(default_factory=dict)  # latency, enqueue, h2d, gpu_compute, d2h
    errors: list[str] = field(default_factory=list)  # "[E]" lines, for the error message when a run failed

    @property
    def has_summary(self) -> bool:
        return "latency" in self.metrics or "gpu_compute" in self.metrics

    @property
    def latency(self) -> TimeStats | None:
        return self.metrics.get("latency")

    @property
    def gpu_compute(self) -> TimeStats | None:
        return self.metrics.get("gpu_compute")


def parse_trt_version(code: str) -> str:
    """``101602`` -> ``10.16.2``; ``8502`` -> ``8.5.2`` (the ``[TensorRT vNNNN]`` tag: 4 digits before 10.0)."""
    if len(code) >= 6:
        major, minor, patch = code[:-4], code[-4:-2], code[-2:]
    else:
        major, minor, patch = code[:-3], code[-3:-2], code[-2:]
    return f"{int(major)}.{int(minor)}.{int(patch)}"


def parse_trtexec_log(text: str) -> TrtexecLog:
    """Parse a trtexec console log (stdout, possibly with stderr appended)."""
    log = TrtexecLog()
    in_summary = False
    legacy_section: str | None = None
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith("&&&& "):
            status = re.match(r"&&&& (RUNNING|PASSED|FAILED)[^#]*(?:# (.*))?$", line)
            if status:
                if status.group(1) != "RUNNING":
                    log.passed = status.group(1) == "PASSED"
                log.command = log.command or status.group(2)
            tag = re.search(r"\[TensorRT v(\d+)\]", line)
            if tag and log.trt_version is None:
                log.trt_version = parse_trt_version(tag.group(1))
            continue
        prefixed = _PREFIX.match(line)
        if not prefixed:
            continue
        level, body = prefixed.groups()
        if level == "E":
            log.errors.append(body.strip())
            continue
        if level != "I":  # [V] explanations reuse the metric names; [W] are warnings
            continue
        if (m := re.match(r"TensorRT version: ([\d.]+)", body)) is not None:
            log.trt_version = m.group(1)
        elif (m := re.match(r"Selected Device: (.+)", body)) is not None:
            log.device = m.group(1).strip()
        elif (m := re.match(r"Precision: (.+)", body)) is not None and log.precision is None:
            log.precision = m.group(1).strip()
        elif (m := re.match(rf"Timing trace has (\d+) queries over {_NUMBER} s", body)) is not None:
            log.queries, log.trace_s = int(m.group(1)), float(m.group(2))
        elif body.startswith("=== Performance summary ==="):
            in_summary = True
        elif body.startswith("==="):
            in_summary = False
        elif in_summary:
            _parse_summary_line(body, log)
        else:
            legacy_section = _parse_legacy_line(body, log, legacy_section)
    return log


def _parse_summary_line(body: str, log: TrtexecLog) -> None:
    if (m := re.match(rf"Throughput: {_NUMBER} qps", body)) is not None:
        log.throughput_qps = float(m.group(1))
    elif (m := re.match(rf"Total Host Walltime: {_NUMBER} s", body)) is not None:
        log.walltime_s = float(m.group(1))
    elif (m := re.match(rf"Total GPU Compute Time: {_NUMBER} s", body)) is not None:
        log.gpu_compute_total_s = float(m.group(1))
    elif (m := re.match(r"([A-Za-z0-9 -]+?): (min = .*)$", body)) is not None and m.group(1) in _SUMMARY_METRICS:
        values = dict(re.findall(rf"(min|max|mean|median|percentile\([\d.]+%\)) = {_NUMBER} ms", m.group(2)))
        log.metrics[_SUMMARY_METRICS[m.group(1)]] = TimeStats(
            min_ms=_float(values.get("min")),
            max_ms=_float(values.get("max")),
            mean_ms=_float(values.get("mean")),
            median_ms=_float(values.get("median")),
            percentiles={float(k[len("percentile("):-2]): float(v) for k, v in values.items()
                         if k.startswith("percentile")},
        )


def _parse_legacy_line(body: str, log: TrtexecLog, section: str | None) -> str | None:
    """TensorRT 7: a section title line, then ``min: X ms (end to end Y ms)`` ... lines. Returns the section."""
    title = body.strip()
    if title in _LEGACY_SECTIONS:
        log.metrics.setdefault(_LEGACY_SECTIONS[title], TimeStats())
        return _LEGACY_SECTIONS[title]
    if section is None:
        return None
    if (m := re.match(rf"throughput: {_NUMBER} qps", title)) is not None:
        log.throughput_qps = float(m.group(1))
    elif (m := re.match(rf"walltime: {_NUMBER} s", title)) is not None:
        log.walltime_s = float(m.group(1))
    elif (m := re.match(rf"total compute time: {_NUMBER} s", title)) is not None:
        log.gpu_compute_total_s = float(m.group(1))
    elif (m := re.match(rf"(min|max|mean|median): {_NUMBER} ms", title)) is not None:
        stats = log.metrics[section]
        log.metrics[section] = TimeStats(**{**stats.__dict__, f"{m.group(1)}_ms": float(m.group(2))})
    elif (m := re.match(rf"percentile: {_NUMBER} ms at {_NUMBER}%", title)) is not None:
        log.metrics[section].percentiles[float(m.group(2))] = float(m.group(1))
    else:
        return None  # any other line ends the block
    return section


def _float(value: str | None) -> float | None:
    return float(value) if value is not None else None


# ------------------------------------------------------------------------------------------------ --exportTimes


@dataclass(frozen=True)
class QueryTimes:
    """Per-query times from ``--exportTimes``, in ms. ``latency_ms`` = H2D + compute + D2H (host latency)."""

    latency_ms: list[float]
    compute_ms: list[float]


def parse_export_times(text: str) -> QueryTimes:
    """Parse a ``--exportTimes`` JSON: ``[{"latencyMs", "computeMs", ...}, ...]`` (TensorRT 7 to 11 key names).

    Raises ValueError for anything else, including several arrays joined in one file (one per run: which one
    belongs to which batch size cannot be told from the file).
    """
    decoder = json.JSONDecoder()
    text = text.strip()
    records, end = decoder.raw_decode(text)
    if text[end:].strip():
        raise ValueError("more than one JSON document in the file (several runs appended to one --exportTimes?)")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError("expected a JSON array of per-query records")
    try:
        latency = [float(r["latencyMs"]) for r in records]
        compute = [float(r["computeMs"]) for r in records]
    except KeyError as exc:
        raise ValueError(f"a record lacks {exc.args[0]!r}: not a trtexec --exportTimes file") from None
    return QueryTimes(latency, compute)


# --------------------------------------------------------------------------------------------------- commands


def time_args(engine: str, *, input_name: str, chw: tuple[int, int, int], batch: int, warmup_ms: int,
              seconds: float | None, iterations: int | None, times_json: str) -> list[str]:
    """Time a built engine: spin-wait sync (steadier than blocking), the percentiles rslad-edge reports, every
    query's times exported. ``--separateProfileRun`` keeps any layer profiling out of the timed run."""
    args = [f"--loadEngine={engine}", f"--shapes={shape_arg(input_name, (batch, *chw))}", f"--warmUp={warmup_ms}",
            "--useSpinWait", "--percentile=" + ",".join(str(p) for p in PERCENTILES), "--separateProfileRun",
            f"--exportTimes={times_json}"]
    if iterations is not None:
        args += [f"--iterations={iterations}", "--duration=0"]
    else:
        args += [f"--duration={seconds:g}"]
    return args
