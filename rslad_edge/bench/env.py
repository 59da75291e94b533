"""The machine a figure was measured on: CPU, cores, GPU, library versions, load.

A latency without its machine is not a result. The load average (start and end) and how many cores other processes
kept busy as the run started are recorded because on a shared machine they are the first thing to look at when two
runs disagree.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rslad_edge.device import cpu_saturates_u8s8
from rslad_edge.versions import package_versions

logger = logging.getLogger(__name__)

_LIBRARIES = ("numpy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tensorrt-cu12", "tensorrt-cu13",
              "executorch")


def cpu_model(cpuinfo: str | None = None) -> str:
    """``model name`` from /proc/cpuinfo (x86), else the ``Hardware`` / first ``CPU part`` line (ARM), else
    ``platform.processor()``."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    for key in ("model name", "Model name", "Hardware", "Processor"):
        if fields.get(key):
            return fields[key]
    if "CPU part" in fields:
        return f"{fields.get('CPU implementer', '?')}/{fields['CPU part']} ({platform.machine()})"
    return platform.processor() or platform.machine() or "unknown"


def physical_cores(cpuinfo: str | None = None) -> int | None:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo; None where cpuinfo does not say (most ARM)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return None
    cores = set()
    physical = core = None
    for line in cpuinfo.splitlines() + [""]:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip():
            if core is not None:
                cores.add((physical, core))
            physical = core = None
    return len(cores) or None


def library_versions() -> dict[str, str | None]:
    """Installed versions of what a figure may depend on; the absent ones are left out, since the list names
    alternatives (``onnxruntime`` / ``onnxruntime-gpu``, one ``tensorrt`` wheel per CUDA) of which one is there."""
    return package_versions(_LIBRARIES, skip_missing=True)


def gpu_info() -> dict[str, Any] | None:
    """Name, capability and driver-side CUDA of the first GPU torch sees; None without one (torch imported here)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gb": round(props.total_memory / 2**30, 1),
        "count": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
    }


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _cpu_jiffies(stat: str) -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from the first line of /proc/stat."""
    fields = stat.split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def busy_cores_of_others(seconds: float = 0.5, read_stat: Callable[[], str] | None = None) -> float | None:
    """How many cores other processes keep busy right now: /proc/stat sampled over ``seconds`` while this process
    sleeps, so (unlike the load average) this run's own earlier work does not count. None where /proc is absent."""
    read = read_stat or (lambda: Path("/proc/stat").read_text())
    try:
        before = _cpu_jiffies(read())
        time.sleep(seconds)
        after = _cpu_jiffies(read())
    except (OSError, ValueError):
        return None
    if before is None or after is None or after[1] <= before[1]:
        return None
    cores = os.cpu_count() or 1
    return round(cores * (after[0] - before[0]) / (after[1] - before[1]), 2)


def probe_env(*, with_gpu: bool = True) -> dict[str, Any]:
    """Everything :mod:`rslad_edge.bench` records about the local machine."""
    env: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_int8_saturates": cpu_saturates_u8s8(),
        "cpu_cores_logical": os.cpu_count(),
        "cpu_cores_physical": physical_cores(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "busy_cores_of_others": busy_cores_of_others(),
        "versions": library_versions(),
        "python_executable": sys.executable,
    }
    try:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        env["onnxruntime_providers"] = []
    env["gpu"] = gpu_info() if with_gpu else None
    return env
