"""Device and numeric-precision choices shared by every stage: `--device auto` and `--precision auto`."""

from __future__ import annotations

import functools
import logging
import platform
import types
from dataclasses import dataclass

import torch
from torch import nn

from rslad_edge.errors import ConfigError

logger = logging.getLogger(__name__)


def resolve_device(spec: str = "auto", local_rank: int | None = None) -> torch.device:
    """``auto``: CUDA when present (the local rank's GPU under torchrun), else CPU. ``cuda:N`` and ``cpu`` as given."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: no CUDA GPU is visible here; use --device cpu (or auto)")
        if spec == "cuda" and local_rank is not None:
            spec = f"cuda:{local_rank}"
    elif spec != "cpu":
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got '{spec}'")
    return torch.device(spec)


def cpu_has_fast_bf16() -> bool:
    """AVX-512 BF16 or AMX: the CPUs on which bf16 autocast is a measured speed-up rather than a slow-down."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


X86_MACHINES = ("x86_64", "amd64", "i386", "i686")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # /proc/cpuinfo flags of an int8 dot product without overflow


def cpu_saturates_u8s8(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """True on an x86 CPU without VNNI (AVX2 only): ONNX Runtime's uint8 x int8 kernels there add pairs of products
    in 16 bits with saturation (``vpmaddubsw``), which 8-bit weights overflow (255 x 127 x 2 > 32767), so an int8
    graph's fused kernels compute something else than its Q/DQ semantics. 7-bit weights (``reduce_range``) fit.
    False on ARM and every other machine, and where the flags cannot be read and torch does not know either."""
    machine = (machine or platform.machine()).lower()
    if machine not in X86_MACHINES:
        return False
    if cpuinfo is None:
        cpuinfo = _cpuinfo()
    flags = next((line.partition(":")[2].split() for line in cpuinfo.splitlines()
                  if line.partition(":")[0].strip() == "flags"), None)
    if flags is None:  # not Linux: what torch's CPU probe says (AVX-512 VNNI only)
        return bool(torch.cpu._is_avx2_supported() and not torch.cpu._is_vnni_supported())
    return not any(flag in flags for flag in VNNI_FLAGS)


@functools.cache
def _cpuinfo() -> str:
    """/proc/cpuinfo, read once (the search asks for every runner it makes); empty where there is none."""
    try:
        with open("/proc/cpuinfo", errors="replace") as handle:
            return handle.read()
    except OSError:
        return ""


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    autocast_dtype: torch.dtype | None
    channels_last: bool  # NHWC memory layout: faster convolutions under bf16 on CPU and AMP on CUDA
    grad_scaler: bool  # fp16 needs loss scaling; bf16 does not

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def prepare(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Put ``model`` (already on ``device``) in this precision's memory layout, with the per-layer exceptions
        that keep it fast: under bf16 on a CPU, strided depthwise convolutions run in fp32 (see
        ``_depthwise_in_fp32``). Weights, state-dict keys and the model's class are unchanged."""
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.autocast_dtype == torch.bfloat16 and device.type == "cpu":
            for module in model.modules():
                if _is_strided_depthwise(module):
                    module.forward = types.MethodType(_depthwise_in_fp32, module)
        return model


def _is_strided_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.groups == module.in_channels > 1
            and max(module.stride) > 1)


def _depthwise_in_fp32(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """oneDNN's bf16 backward of a strided depthwise convolution is 20-50x slower than fp32 on CPU (measured here,
    torch 2.14, batch 128: 78-141 ms vs 2-35 ms per layer); MobileNetV2 has three of them, which took over half of
    an attack step. In fp32 channels_last they cost little and are more exact."""
    with torch.autocast(x.device.type, enabled=False):
        return conv._conv_forward(x.float(), conv.weight, conv.bias)


def resolve_precision(spec: str, device: torch.device) -> Precision:
    """``auto``: bf16 autocast + channels_last on CPUs with fast bf16 and on CUDA GPUs with bf16, fp16 + loss scaling
    on older GPUs, fp32 otherwise. Measured here (AVX-512 BF16): channels_last helps only together with bf16."""
    if spec == "auto":
        if device.type == "cuda":
            spec = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            spec = "bf16" if cpu_has_fast_bf16() else "fp32"
    if spec == "fp32":
        return Precision("fp32", None, channels_last=False, grad_scaler=False)
    if spec == "bf16":
        return Precision("bf16", torch.bfloat16, channels_last=True, grad_scaler=False)
    if spec == "fp16":
        if device.type != "cuda":
            raise ConfigError("--precision fp16 needs a CUDA GPU; on a CPU use bf16 or fp32 (or auto)")
        return Precision("fp16", torch.float16, channels_last=True, grad_scaler=True)
    raise ConfigError(f"--precision must be auto, fp32, bf16 or fp16, got '{spec}'")
