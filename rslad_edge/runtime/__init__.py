"""One way to run any artifact: ``load_runner(path)`` picks the backend from the file and returns a Runner.

An exported Runner (ONNX Runtime, TensorRT) also offers ``twin()``: a differentiable torch module that computes what
the artifact computes (:mod:`rslad_edge.runtime.twin`), so white-box attacks can be crafted for it.

Verify and bench take a Runner, never a path, so one attack and one timing loop serve a PyTorch checkpoint, an ONNX
model (ONNX Runtime on CPU / CUDA / TensorRT), its ORT-format form (``.ort``, ONNX Runtime Mobile), an ExecuTorch
program (``.pte``) and a TensorRT engine alike. TensorRT, CUDA and ExecuTorch are imported only by the backend that
needs them.
"""

from __future__ import annotations

from pathlib import Path

from rslad_edge.errors import ConfigError
from rslad_edge.runtime.base import Runner
from rslad_edge.runtime.inputs import check_input
from rslad_edge.runtime.metadata import decode_props, encode_props, read_sidecar, sidecar_path
from rslad_edge.runtime.onnx_runner import ORT_FORMAT_SUFFIXES, OnnxRunner, choose_provider
from rslad_edge.runtime.torch_runner import TorchRunner
from rslad_edge.runtime.twin import (
    MIN_TWIN_AGREEMENT,
    TWIN_OPS,
    OnnxTwin,
    TwinAgreement,
    TwinUnavailableError,
    onnx_twin,
    twin_agreement,
)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
ONNX_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
EXECUTORCH_SUFFIXES = (".pte",)
KNOWN_SUFFIXES = CHECKPOINT_SUFFIXES + ONNX_SUFFIXES + ORT_FORMAT_SUFFIXES + EXECUTORCH_SUFFIXES + ENGINE_SUFFIXES


def load_runner(
    path: str | Path,
    device: str = "cpu",
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    provider: str | None = None,
    threads: int | None = None,
    precision: str = "fp32",
    batch_size: int | None = None,
    spinning: bool = True,
) -> Runner:
    """Open ``path`` with the backend its suffix names.

    - checkpoint (``.pt``, ``.pth``, ``.ckpt``, ``.bin``): :class:`TorchRunner` on ``device`` (auto / cpu / cuda[:N]);
      ``arch`` / ``num_classes`` for bare state dicts; ``precision`` fp32 (default), bf16 or fp16 autocast;
      ``threads`` sets torch's intra-op threads while predicting.
    - ONNX (``.onnx``): :class:`OnnxRunner`; ``device`` auto / cpu / cuda[:N] / trt[:N] chooses the execution
      provider, ``provider`` (cpu, cuda, trt or a full ONNX Runtime name) overrides it; ``threads`` sets intra-op
      threads. The precision is the file's.
    - ORT format (``.ort``): :class:`OnnxRunner` on the CPU (auto / cpu), as ONNX Runtime Mobile runs it.
    - ExecuTorch program (``.pte``): :class:`ExecuTorchRunner` on the CPU (auto / cpu) with the backend it was
      lowered to (XNNPACK); ``threads`` sizes ExecuTorch's thread pool. Needs the ``mobile`` extra.
    - TensorRT engine (``.engine``, ``.plan``, ``.trt``): :class:`TensorRTRunner` on a CUDA GPU (``device`` auto or
      cuda[:N]; cpu is an error).

    ``batch_size`` caps the images per call into the backend (a static-batch model always gets its own batch).
    """
    from rslad_edge.models import load_checkpoint

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in KNOWN_SUFFIXES:
        raise ConfigError(f"cannot tell what '{path}' is from its suffix '{suffix}': expected one of "
                          f"{', '.join(KNOWN_SUFFIXES)}")
    if suffix not in CHECKPOINT_SUFFIXES and precision != "fp32":
        raise ConfigError(f"--precision {precision} applies to checkpoints; '{path}' runs at the precision it was "
                          "exported with")
    if suffix in ONNX_SUFFIXES + ORT_FORMAT_SUFFIXES:
        return OnnxRunner(path, device=device, provider=provider, threads=threads, batch_size=batch_size,
                          spinning=spinning)
    if suffix in EXECUTORCH_SUFFIXES:
        from rslad_edge.runtime.executorch_runner import ExecuTorchRunner

        if device not in ("auto", "cpu") or provider is not None:
            raise ConfigError(f"'{path}' is an ExecuTorch program: it runs on the CPU with the backend it was "
                              "lowered to (XNNPACK); use --device cpu and no --provider")
        return ExecuTorchRunner(path, threads=threads, batch_size=batch_size)
    if suffix in ENGINE_SUFFIXES:
        from rslad_edge.runtime.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(path, device=device, batch_size=batch_size)
    if provider is not None:
        raise ConfigError(f"--provider is for ONNX models; '{path}' is a checkpoint, run with --device")
    model, info = load_checkpoint(path, arch=arch, num_classes=num_classes)
    return TorchRunner(model, info, path, device=device, precision=precision, threads=threads,
                       batch_size=batch_size or 256)


__all__ = [
    "CHECKPOINT_SUFFIXES",
    "ENGINE_SUFFIXES",
    "EXECUTORCH_SUFFIXES",
    "KNOWN_SUFFIXES",
    "MIN_TWIN_AGREEMENT",
    "ONNX_SUFFIXES",
    "ORT_FORMAT_SUFFIXES",
    "TWIN_OPS",
    "OnnxRunner",
    "OnnxTwin",
    "Runner",
    "TorchRunner",
    "TwinAgreement",
    "TwinUnavailableError",
    "check_input",
    "choose_provider",
    "decode_props",
    "encode_props",
    "load_runner",
    "onnx_twin",
    "read_sidecar",
    "sidecar_path",
    "twin_agreement",
]
