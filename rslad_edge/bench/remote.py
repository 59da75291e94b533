"""Bench on a Jetson over SSH with the device's own trtexec: nothing but JetPack needed on the device.

For each ONNX artifact: make a private directory on the device (``mktemp -d``), copy the ONNX and a small POSIX
``sh`` script there with ``scp``, run the script with ``ssh``, copy its ``out/`` folder back, delete the remote
directory. The script records the L4T release, ``nvpmodel -q`` and ``jetson_clocks --show``, then per batch size
builds an engine for exactly that batch and times it with ``trtexec --exportTimes`` while ``tegrastats`` samples
power. The per-query times are summarised here with the same statistics as a local run.

SSH is the system ``ssh`` / ``scp`` (the user's keys, agent and ``~/.ssh/config`` work as usual), always with
``BatchMode=yes`` (never a password prompt in a pipeline), ``StrictHostKeyChecking=yes`` (an unknown or changed
host key is an error, never accepted) and a ``ConnectTimeout``.
"""

from __future__ import annotations

import logging
import math
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rslad_edge.bench.core import BenchReport, BenchResult, TimingConfig, artifact_facts
from rslad_edge.bench.jetson import (
    TEGRASTATS_INTERVAL_MS,
    jetson_state,
    parse_tegrastats,
    power_in_window,
    sample_times,
)
from rslad_edge.bench.stats import summarize
from rslad_edge.bench.trtexec import parse_export_times, parse_trtexec_log, time_args
from rslad_edge.errors import ConfigError, RuntimeUnavailableError
from rslad_edge.runtime.onnx_info import inspect_onnx
from rslad_edge.runtime.trt_build import plan_build, trtexec_build_args

logger = logging.getLogger(__name__)

REMOTE_PREFIX = "/tmp/rslad-bench."
DEFAULT_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"
_EXIT_REASONS = {
    20: "trtexec is neither on the PATH nor at /usr/src/tensorrt/bin/trtexec: install TensorRT (it ships with "
        "JetPack: `sudo apt install nvidia-jetpack` or `tensorrt`)",
    21: "the engine build failed",
    22: "trtexec failed while timing the engine",
}


class RemoteError(RuntimeUnavailableError):
    """The device could not be reached, authenticated, trusted, or it failed to build or run the model."""


@dataclass(frozen=True)
class SshTarget:
    """Where to bench: ``user@address`` or a Host alias of ``~/.ssh/config``."""

    host: str
    port: int | None = None
    identity: Path | None = None
    known_hosts: Path | None = None
    connect_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not self.host or self.host.startswith("-") or any(c.isspace() for c in self.host):
            raise ConfigError(f"--host must look like user@address (or an ssh config alias), got '{self.host}'")
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigError(f"--port must be 1-65535, got {self.port}")
        if self.connect_timeout <= 0:
            raise ConfigError("--connect-timeout must be > 0 seconds")
        if self.identity is not None and not Path(self.identity).is_file():
            raise ConfigError(f"--identity {self.identity} does not exist")

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}" if self.port else self.host

    def options(self) -> list[str]:
        """Options shared by ssh and scp. Host keys are always checked; a hung device ends the command."""
        opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"ConnectTimeout={max(1, math.ceil(self.connect_timeout))}",
                "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        if self.known_hosts is not None:
            opts += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        if self.identity is not None:
            opts += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        return opts

    def ssh_command(self, remote_command: str) -> list[str]:
        port = ["-p", str(self.port)] if self.port else []
        return ["ssh", *self.options(), *port, self.host, remote_command]

    def scp_command(self, sources: Sequence[str], destination: str, *, recursive: bool = False) -> list[str]:
        port = ["-P", str(self.port)] if self.port else []
        return ["scp", "-q", *(["-r"] if recursive else []), *self.options(), *port, *sources, destination]

    def remote(self, path: str) -> str:
        return f"{self.host}:{path}"


def ssh_error(target: SshTarget, stderr: str, action: str) -> RemoteError:
    """One line saying what went wrong with the connection and what to do; ``action`` names what was attempted."""
    known_hosts = str(target.known_hosts or "~/.ssh/known_hosts")
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not set(ln.strip()) <= {"@"}]
    last = lines[-1] if lines else "no message"
    text = stderr.lower()
    where = f"--host {target.label}"
    if "remote host identification has changed" in text or re.search(r"host key for .* has changed", text):
        return RemoteError(
            f"{where}: the host key does not match the one in {known_hosts} (device reinstalled, or someone in "
            f"between): check the new key's fingerprint on the device, then `ssh-keygen -R {target.host}` and "
            "connect once by hand")
    if "host key verification failed" in text:
        return RemoteError(
            f"{where}: no trusted host key for it in {known_hosts}: connect once with `ssh {target.host}` and check "
            "the fingerprint (or pass --known-hosts)")
    if "timed out" in text:
        return RemoteError(
            f"{where} is unreachable: the connection timed out after {target.connect_timeout:g} s (check the "
            "address, that the device is on and on this network)")
    if "connection refused" in text:
        return RemoteError(f"{where} refused the connection: is sshd running there (port {target.port or 22})?")
    if "could not resolve hostname" in text:
        return RemoteError(f"{where}: the name does not resolve (check the spelling or use the IP address)")
    if "no route to host" in text or "network is unreachable" in text:
        return RemoteError(f"{where} is unreachable ({last})")
    if "permission denied" in text:
        return RemoteError(
            f"{where} refused the login: only key authentication is used (BatchMode); install your key with "
            f"`ssh-copy-id {target.host}` or pass --identity")
    return RemoteError(f"{where}: {action} failed: {last}")


def _run(target: SshTarget, command: list[str], *, timeout: float, action: str) -> subprocess.CompletedProcess:
    logger.debug("running %s", shlex.join(command))
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise RuntimeUnavailableError(
            f"the `{command[0]}` client is not installed here: install OpenSSH (apt install openssh-client)") from None
    except subprocess.TimeoutExpired:
        raise RemoteError(f"--host {target.label}: {action} did not finish within {timeout:g} s "
                          "(raise --remote-timeout for big models)") from None


def run_ssh(target: SshTarget, remote_command: str, *, timeout: float, action: str) -> subprocess.CompletedProcess:
    """Run a command on the target; connection-level failures (ssh exits 255) become one-line RemoteErrors."""
    done = _run(target, target.ssh_command(remote_command), timeout=timeout, action=action)
    if done.returncode == 255:
        raise ssh_error(target, done.stderr, action)
    return done


def scp(target: SshTarget, sources: Sequence[str], destination: str, *, timeout: float, action: str,
        recursive: bool = False) -> None:
    done = _run(target, target.scp_command(sources, destination, recursive=recursive), timeout=timeout,
                action=action)
    if done.returncode != 0:
        raise ssh_error(target, done.stderr, action)


# ------------------------------------------------------------------------------------------------ artifacts


@dataclass(frozen=True)
class OnnxArtifact:
    path: Path
    sha256: str
    size_mb: float
    precision: str
    input_name: str
    chw: tuple[int, int, int]
    static_batch: int | None = None  # the batch a static-batch export was fixed to


def describe_onnx(path: Path) -> OnnxArtifact:
    """Input name, image shape and precision of an ONNX file, as the runtime reads it (the graph's shape, or the
    input size its export metadata records). trtexec needs every shape spelled out, so a size the file does not tell
    is an error, never a guess."""
    info = inspect_onnx(path)
    if not all(info.input_shape):
        shape = "x".join(str(d) if d else "?" for d in info.input_shape)
        raise ConfigError(f"'{path}' does not say its input size ({shape}: symbolic, and no rslad-edge export "
                          "metadata): export it with `rslad-edge export`, or with a fixed height and width")
    channels, height, width = info.input_shape
    sha256, size_mb = artifact_facts(path)
    return OnnxArtifact(Path(path), sha256, size_mb, info.precision, info.input_name, (channels, height, width),
                        info.static_batch)


# --------------------------------------------------------------------------------------------------- script


def remote_script(artifact: OnnxArtifact, config: TimingConfig, model_name: str) -> str:
    """The POSIX sh script run on the device: probes, then per batch size build, time under tegrastats."""
    q = shlex.quote
    lines = [
        "#!/bin/sh",
        f"# Written by rslad-edge bench: builds and times {model_name} with this device's trtexec. Safe to delete.",
        "set -u",
        'cd "$(dirname "$0")" || exit 2',
        "mkdir -p out",
        "TRTEXEC=$(command -v trtexec 2>/dev/null || true)",
        f'if [ -z "$TRTEXEC" ] && [ -x {DEFAULT_TRTEXEC} ]; then TRTEXEC={DEFAULT_TRTEXEC}; fi',
        'if [ -z "$TRTEXEC" ]; then exit 20; fi',
        'echo "$TRTEXEC" > out/trtexec_path.txt',
        "TEGRASTATS=$(command -v tegrastats 2>/dev/null || true)",
        "cat /etc/nv_tegra_release > out/nv_tegra_release.txt 2>/dev/null",
        "nvpmodel -q > out/nvpmodel.txt 2>/dev/null",
        "jetson_clocks --show > out/jetson_clocks.txt 2>/dev/null || sudo -n jetson_clocks --show "
        "> out/jetson_clocks.txt 2>/dev/null",
        "uname -a > out/uname.txt",
        "now() { date +%s.%N; }",
    ]
    warmup_ms = max(1, round(config.warmup_seconds * 1000))
    for batch in config.batches:
        engine = f"b{batch}.engine"
        # The device's TensorRT version is known only there: build as export's TensorRT 10 plan (the weakly typed
        # flags work from 8.x to 10), and where that fails, as its TensorRT 11 plan (strongly typed, which refuses
        # --fp16 / --int8). An engine for exactly this batch (min = opt = max), kernels tuned for it, as a
        # deployment at that batch would; the timing cache makes the builds after the first fast.
        weakly_typed, strongly_typed = (
            trtexec_build_args(
                plan_build(trt_major, artifact.precision, artifact.chw, min_batch=batch, opt_batch=batch,
                           max_batch=batch, workspace_gib=None, input_name=artifact.input_name),
                model_name, engine, timing_cache="timing.cache", skip_inference=True)
            for trt_major in (10, 11)
        )
        build = f'"$TRTEXEC" {shlex.join(weakly_typed)} > out/build_b{batch}.log 2>&1'
        if strongly_typed != weakly_typed:
            build += (f' || "$TRTEXEC" {shlex.join(strongly_typed)} > out/build_b{batch}.strongly_typed.log'
                      " 2>&1")
        timing = time_args(engine, input_name=artifact.input_name, chw=artifact.chw, batch=batch, warmup_ms=warmup_ms,
                           seconds=config.seconds, iterations=config.iters, times_json=f"out/times_b{batch}.json")
        marks = q(f"out/marks_b{batch}.txt")
        lines += [
            f"echo 'rslad-edge: batch {batch}: building the engine' >&2",
            f"{build} || exit 21",
            f"now > {marks}",
            "TPID=",
            'if [ -n "$TEGRASTATS" ]; then '
            f'"$TEGRASTATS" --interval {TEGRASTATS_INTERVAL_MS} --logfile out/tegrastats_b{batch}.log & TPID=$!; fi',
            f"now >> {marks}",
            f"echo 'rslad-edge: batch {batch}: timing' >&2",
            f'"$TRTEXEC" {shlex.join(timing)} > out/trtexec_b{batch}.log 2>&1; RC=$?',
            f"now >> {marks}",
            'if [ -n "$TPID" ]; then kill "$TPID" 2>/dev/null; wait "$TPID" 2>/dev/null; fi',
            f"now >> {marks}",
            f"rm -f {q(engine)}",
            'if [ "$RC" -ne 0 ]; then exit 22; fi',
        ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------- bench


def bench_remote(
    artifacts: Sequence[Path],
    target: SshTarget,
    *,
    config: TimingConfig,
    workdir: Path,
    keep_remote: bool = False,
    timeout: float = 1800.0,
    on_step: Callable[[str], None] | None = None,
) -> BenchReport:
    """Build and time each ONNX on ``target`` with trtexec; raw outputs are kept under ``workdir/<artifact>/``."""
    described = []
    for path in artifacts:
        if Path(path).suffix.lower() != ".onnx":
            raise ConfigError(f"'{path}': over SSH only ONNX models are benched (built into an engine on the device; "
                              "engines and checkpoints do not move between machines)")
        artifact = describe_onnx(Path(path))
        if artifact.static_batch and config.batches != (artifact.static_batch,):
            raise ConfigError(f"'{path}' was exported with a static batch of {artifact.static_batch}: bench it with "
                              f"--batch {artifact.static_batch}, or export it with a dynamic batch")
        described.append(artifact)
    report = BenchReport([], {"remote": {"host": target.label}}, config=asdict(config))
    for artifact in described:
        out = Path(workdir) / artifact.path.name.replace(".", "_")
        if on_step is not None:
            on_step(f"{artifact.path.name} on {target.label}: copying, building and timing with trtexec")
        _run_on_device(artifact, target, config=config, out=out, keep_remote=keep_remote, timeout=timeout)
        rows, remote_env, warnings = parse_remote_results(out, artifact, config, host=target.label)
        report.results.extend(rows)
        report.env["remote"].update(remote_env)
        report.warnings.extend(w for w in warnings if w not in report.warnings)
    return report


def _run_on_device(artifact: OnnxArtifact, target: SshTarget, *, config: TimingConfig, out: Path,
                   keep_remote: bool, timeout: float) -> None:
    short = min(timeout, 60 + target.connect_timeout)
    made = run_ssh(target, f"mktemp -d {REMOTE_PREFIX}XXXXXX", timeout=short, action="creating a work directory")
    remote_dir = made.stdout.strip().splitlines()[-1] if made.stdout.strip() else ""
    if made.returncode != 0 or not remote_dir.startswith(REMOTE_PREFIX):
        raise RemoteError(f"--host {target.label}: could not create a work directory under /tmp "
                          f"({(made.stderr.strip() or remote_dir)[:160]})")
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "out", ignore_errors=True)  # results of an earlier run must not mix with this one's
    script = out / "run.sh"
    script.write_text(remote_script(artifact, config, artifact.path.name))
    sources = [str(artifact.path), str(script)]
    external = artifact.path.with_name(artifact.path.name + ".data")
    if external.is_file():
        sources.append(str(external))
    try:
        scp(target, sources, target.remote(remote_dir + "/"), timeout=timeout, action="copying the model")
        done = run_ssh(target, f"sh {shlex.quote(remote_dir + '/run.sh')}", timeout=timeout,
                       action="building and timing")
        try:
            scp(target, [target.remote(f"{remote_dir}/out")], str(out), timeout=short, action="copying results back",
                recursive=True)
        except RemoteError:
            if done.returncode == 0:
                raise
    finally:
        if keep_remote:
            logger.info("kept %s:%s (--keep-remote)", target.label, remote_dir)
        else:
            try:
                run_ssh(target, f"rm -rf {shlex.quote(remote_dir)}", timeout=short,
                        action="removing the work directory")
            except RemoteError as exc:  # keep the error that got us here, if any; just say what is left behind
                logger.warning("could not remove %s:%s (%s)", target.label, remote_dir, exc)
    if done.returncode != 0:
        reason = _EXIT_REASONS.get(done.returncode, f"the bench script exited {done.returncode}")
        detail = _failure_detail(out / "out", done.returncode)
        raise RemoteError(f"--host {target.label}: {artifact.path.name}: {reason}{detail}")


def _failure_detail(results: Path, returncode: int) -> str:
    """The first TensorRT error line of the log that failed, and where the full log is kept.

    For a failed build the TensorRT 8-10 attempt's log is the one to read; the strongly typed retry (for TensorRT
    11) only when the first attempt printed no error (an older trtexec rejects --stronglyTyped, which says nothing
    about the model).
    """
    if returncode == 21:
        primary = [p for p in results.glob("build_b*.log") if not p.name.endswith(".strongly_typed.log")]
        retries = list(results.glob("build_b*.strongly_typed.log"))
        logs = [max(primary, key=lambda p: p.stat().st_mtime)] if primary else []
        logs += retries
    elif returncode == 22:
        logs = sorted(results.glob("trtexec_b*.log"), key=lambda p: p.stat().st_mtime)[-1:]
    else:
        return ""
    for log_path in logs:
        parsed = parse_trtexec_log(log_path.read_text(errors="replace"))
        if parsed.errors:
            return f" ({parsed.errors[0][:200]}; full log: {log_path})"
    return f" (no [E] line; full log: {logs[0]})" if logs else ""


def _read(path: Path) -> str | None:
    return path.read_text(errors="replace") if path.is_file() else None


def parse_remote_results(
    out: Path, artifact: OnnxArtifact, config: TimingConfig, *, host: str
) -> tuple[list[BenchResult], dict[str, Any], list[str]]:
    """Rows, environment and warnings from the ``out/`` folder a remote run brought back."""
    results = out / "out"
    state = jetson_state(_read(results / "nv_tegra_release.txt"), _read(results / "nvpmodel.txt"),
                         _read(results / "jetson_clocks.txt"))
    warnings = [f"{host}: {w}" for w in state.warnings]
    if state.release is None:
        warnings.append(f"{host}: no /etc/nv_tegra_release: not a Jetson (timed with its trtexec anyway)")
    env: dict[str, Any] = {"jetson": state.to_dict(), "uname": (_read(results / "uname.txt") or "").strip() or None,
                           "trtexec": (_read(results / "trtexec_path.txt") or "").strip() or None}
    rows = []
    for batch in config.batches:
        log_text = _read(results / f"trtexec_b{batch}.log")
        times_text = _read(results / f"times_b{batch}.json")
        if log_text is None or times_text is None:
            raise RemoteError(f"--host {host}: {artifact.path.name}: trtexec left no log or --exportTimes file for "
                              f"batch {batch} (see {results})")
        log = parse_trtexec_log(log_text)
        try:
            times = parse_export_times(times_text)
        except ValueError as exc:
            raise RemoteError(f"--host {host}: {results / f'times_b{batch}.json'}: {exc}") from None
        if not times.latency_ms:
            raise RemoteError(f"--host {host}: trtexec timed no queries at batch {batch} (see {results})")
        env.setdefault("trt_version", log.trt_version)
        env.setdefault("gpu", log.device)
        rows.append(_trtexec_row(artifact, batch, log, times, results, host=host))
    return rows, env, warnings


def _trtexec_row(artifact: OnnxArtifact, batch: int, log: Any, times: Any, results: Path, *, host: str) -> BenchResult:
    stats = summarize(times.latency_ms, batch)
    compute_p50, compute_p99 = (float(v) for v in np.percentile(times.compute_ms, [50, 99]))
    notes = []
    # What trtexec delivered: its queries over its timed wall time (queries overlap a little in its pipeline).
    wall = (log.queries * batch / log.trace_s) if log.queries and log.trace_s else stats.images_per_s_wall
    if log.latency and log.latency.median_ms and abs(log.latency.median_ms - stats.p50_ms) > 0.05 * stats.p50_ms:
        notes.append(f"trtexec's summary median {log.latency.median_ms:.4g} ms differs from its exported times")
    version = f"TensorRT {log.trt_version}" if log.trt_version else "TensorRT"
    row = BenchResult(
        artifact=str(artifact.path), sha256=artifact.sha256, backend="tensorrt",
        provider=f"trtexec ({version})" + (f" on {log.device}" if log.device else ""),
        precision=artifact.precision, **{**asdict(stats), "images_per_s_wall": wall}, device="jetson", timed="trtexec",
        clock="trtexec", size_mb=artifact.size_mb, host=host, gpu_compute_p50_ms=compute_p50,
        gpu_compute_p99_ms=compute_p99, trtexec_throughput_qps=log.throughput_qps, notes=notes,
    )
    reading = _remote_power(results, batch, log)
    if reading is None:
        row.notes.append("no power reading (tegrastats missing, or no sample inside the timed run)")
    else:
        row.power_w, row.power_rail, row.power_samples = reading.mean_w, reading.rail, reading.samples
        row.gpu_load_pct = reading.gpu_load_pct
        row.energy_per_image_mj = reading.energy_per_image_mj(wall)
    return row


def _remote_power(results: Path, batch: int, log: Any) -> Any:
    """Mean power over trtexec's timed window: its last ``trace_s`` seconds before it exited.

    Marks (device clock): tegrastats started, trtexec started, trtexec ended, tegrastats stopped.
    """
    marks_text, tegra_text = _read(results / f"marks_b{batch}.txt"), _read(results / f"tegrastats_b{batch}.log")
    if not marks_text or not tegra_text:
        return None
    try:
        tegra_start, trtexec_start, trtexec_end, tegra_stop = (float(v) for v in marks_text.split()[:4])
    except ValueError:
        logger.info("unreadable marks in %s (no GNU date on the device?)", results)
        return None
    samples = parse_tegrastats(tegra_text)
    times = sample_times(len(samples), tegra_start, tegra_stop)
    start = trtexec_end - log.trace_s if log.trace_s else trtexec_start
    return power_in_window(samples, times, (max(start, trtexec_start), trtexec_end))
