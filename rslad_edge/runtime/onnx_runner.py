"""The ONNX Runtime backend: an ONNX model on the CPU, CUDA or TensorRT execution provider, or an ORT-format model
(``.ort``, ONNX Runtime Mobile's form of an ONNX export, optimised for the CPU when it was converted) on the CPU.

ONNX Runtime only warns when a requested execution provider is missing and then runs on the CPU, so a result
labelled "cuda" may have been computed on the CPU. This runner reads back what the session actually uses
(``session.get_providers()``), reports it as ``provider``, and refuses to start when the first provider is not the
one asked for: a wrong label on a robustness or latency figure is worse than an error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rslad_edge.errors import ConfigError, ExportError, RuntimeUnavailableError
from rslad_edge.runtime.inputs import batch_slices, check_input, pad_batch
from rslad_edge.runtime.onnx_info import inspect_onnx, inspect_ort_session

if TYPE_CHECKING:
    from rslad_edge.runtime.twin import OnnxTwin

logger = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
ORT_FORMAT_SUFFIXES = (".ort",)
DEFAULT_MAX_BATCH = 256  # images per session.run for a dynamic-batch model: bounds memory, costs nothing in speed


def qdq_semantics_on_cpu(target: str | None) -> bool:
    """Whether an int8 graph for ``target`` runs on this CPU with ONNX Runtime's graph optimizations off (dequantize,
    float operator, quantize, as the graph says): TensorRT's graph (``trt``) where this CPU's fused S8S8 kernels
    saturate and TensorRT's do not (x86 without VNNI, :func:`rslad_edge.device.cpu_saturates_u8s8`). ONNX Runtime's
    CPU stands in for TensorRT there: export's parity check, the int8 search, QAT, verify and bench all run it so."""
    from rslad_edge.device import cpu_saturates_u8s8

    return target == "trt" and cpu_saturates_u8s8()


def choose_provider(
    device: str = "cpu", provider: str | None = None, available: list[str] | None = None
) -> tuple[str, int]:
    """Map ``device`` ("auto", "cpu", "cuda[:N]", "trt[:N]") and an optional ``provider`` override ("cpu", "cuda",
    "trt" or a full ONNX Runtime name) to ``(execution provider name, GPU id)``.

    ``auto`` picks CUDA when this ONNX Runtime build has it, else the CPU; TensorRT is used only when asked for,
    because its first run builds an engine (minutes on a Jetson).
    """
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda", "trt"):
        raise ConfigError(f"--device must be auto, cpu, cuda[:N] or trt[:N] for an ONNX model, got '{device}'")
    try:
        device_id = int(index) if index else 0
    except ValueError:
        raise ConfigError(f"--device {device}: the GPU index must be a number, e.g. cuda:0") from None
    if provider is not None:
        name = PROVIDERS.get(provider.lower(), provider)
        if name not in PROVIDERS.values():
            known = ", ".join([*PROVIDERS, *PROVIDERS.values()])
            raise ConfigError(f"--provider '{provider}' is not one rslad-edge drives; use one of {known}")
    elif kind == "auto":
        name = PROVIDERS["cuda"] if PROVIDERS["cuda"] in available else PROVIDERS["cpu"]
    else:
        name = PROVIDERS[kind]
    if name not in available:
        package = "onnxruntime-gpu (built for your CUDA / TensorRT)" if name != PROVIDERS["cpu"] else "onnxruntime"
        raise RuntimeUnavailableError(
            f"this ONNX Runtime has no {name} (it has {', '.join(available)}): install {package}, "
            f"or use --device cpu"
        )
    return name, device_id


class OnnxRunner:
    """Runs an ONNX model with ONNX Runtime; batches inside (exactly the static batch of a static-batch model)."""

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "cpu",
        provider: str | None = None,
        threads: int | None = None,
        batch_size: int | None = None,
        spinning: bool = True,
        reference: bool | None = None,
    ) -> None:
        """``spinning=False``: ONNX Runtime's threads sleep as soon as a run ends instead of spinning for the next
        one; right where other work runs between calls (verify's attacks), wrong for a latency loop (bench).
        ``reference=True``: graph optimizations off, so a Q/DQ graph runs as its operators say (dequantize, float
        operator, quantize) instead of through fused int8 kernels; ``False``: the fused kernels; ``None`` (default):
        on for an int8 graph exported for TensorRT (metadata ``target: trt``) run on a CPU whose fused kernels
        saturate (:func:`qdq_semantics_on_cpu`), so that what runs is what TensorRT computes."""
        import onnxruntime as ort

        self.path = str(path)
        ort_format = Path(self.path).suffix.lower() in ORT_FORMAT_SUFFIXES
        if ort_format:  # optimised for the CPU when it was converted: auto means the CPU
            if device.partition(":")[0] not in ("auto", "cpu") or provider not in (None, "cpu", PROVIDERS["cpu"]):
                raise ConfigError(f"'{self.path}' is an ORT-format model, optimised for the CPU when it was converted; "
                                  "run it with --device cpu, or run the .onnx it came from on the GPU")
            device, provider = "cpu", None
        requested, device_id = choose_provider(device, provider)
        if ort_format and not Path(self.path).is_file():
            raise ExportError(f"ORT-format model '{self.path}' does not exist")
        # An ONNX file is read before the session (TensorRT's options depend on it); a .ort only through one.
        info = None if ort_format else inspect_onnx(self.path)
        self.metadata = info.metadata if info is not None else {}
        self.precision = info.precision if info is not None else "unknown"
        if reference is None:
            reference = (requested == PROVIDERS["cpu"] and self.precision == "int8"
                         and qdq_semantics_on_cpu(self.metadata.get("target")))
            if reference:
                logger.info("%s is an int8 graph for TensorRT and this CPU's fused int8 kernels saturate (x86 without "
                            "VNNI): it runs as its Q/DQ operators say (ONNX Runtime's graph optimizations off), what "
                            "TensorRT computes", Path(self.path).name)
        self.reference = reference
        options = ort.SessionOptions()
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if reference
                                            else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: ORT's own warnings go to stderr outside our logging
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(
                self.path, sess_options=options, providers=self._provider_list(requested, device_id, batch_size)
            )
        except Exception as exc:  # ORT raises its own Fail / InvalidGraph / NoSuchFile types
            first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"ONNX Runtime cannot load '{self.path}': {first_line}") from exc
        if info is None:
            info = inspect_ort_session(session, self.path)
            self.metadata, self.precision = info.metadata, info.precision
        self.input_name, self.output_name = info.input_name, info.output_name
        self.static_batch = info.static_batch
        self.input_shape = info.input_shape  # 0: symbolic
        self.session = session
        self.providers = list(session.get_providers())
        self.provider = self.providers[0]
        if self.provider != requested:
            raise RuntimeUnavailableError(
                f"asked ONNX Runtime for {requested} but the session runs on {self.provider} (it fell back: check "
                f"the CUDA / TensorRT libraries ONNX Runtime needs); use --device cpu to run on the CPU on purpose"
            )
        self.threads = threads
        # Where this model's twin runs (verify's white-box attacks): the GPU the session uses, else the CPU.
        self.device = "cpu" if self.provider == PROVIDERS["cpu"] else f"cuda:{device_id}"

        self.batch_size = self.static_batch or batch_size or DEFAULT_MAX_BATCH
        if info.num_classes is not None:
            self.num_classes = info.num_classes
        else:  # a symbolic class count: ask the model once
            probe = np.zeros((self.static_batch or 1, *(d or 32 for d in self.input_shape)), dtype=np.float32)
            self.num_classes = int(session.run([self.output_name], {self.input_name: probe})[0].shape[-1])
        logger.debug("loaded %s on %s (%s, batch %s)", self.path, self.providers, self.precision,
                     self.static_batch or "dynamic")

    def _provider_list(self, name: str, device_id: int, batch_size: int | None) -> list[Any]:
        """The provider chain: the one asked for, then the CPU for nodes it cannot run (ORT's usual layout)."""
        if name == PROVIDERS["cpu"]:
            return [name]
        if name == PROVIDERS["cuda"]:
            return [(name, {"device_id": device_id}), PROVIDERS["cpu"]]
        # TensorRT EP (never run here: no GPU). Reduced precision must be enabled explicitly on TensorRT 10, the
        # engine is cached next to the model (building takes minutes on a Jetson), and a dynamic batch gets one
        # profile 1..max instead of a rebuild per new batch size.
        trt_options: dict[str, Any] = {
            "device_id": device_id,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(Path(self.path).resolve().parent / ".trt-cache"),
            "trt_fp16_enable": self.precision in ("fp16", "int8"),
            "trt_int8_enable": self.precision == "int8",
        }
        size = self.metadata.get("input_size")
        if self.metadata.get("batch") in (None, "dynamic") and size:
            shape = f"3x{size[0]}x{size[1]}"
            max_batch = batch_size or DEFAULT_MAX_BATCH
            trt_options.update(
                trt_profile_min_shapes=f"{self.input_name}:1x{shape}",
                trt_profile_opt_shapes=f"{self.input_name}:{min(64, max_batch)}x{shape}",
                trt_profile_max_shapes=f"{self.input_name}:{max_batch}x{shape}",
            )
        return [(name, trt_options), (PROVIDERS["cuda"], {"device_id": device_id}), PROVIDERS["cpu"]]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, C, H, W) in [0, 1] -> float32 logits (N, num_classes)."""
        x = check_input(x, self.input_shape, self.path)
        logits = np.empty((len(x), self.num_classes), dtype=np.float32)
        for part in batch_slices(len(x), self.batch_size):
            batch = x[part]
            if self.static_batch:
                batch = pad_batch(batch, self.static_batch)
            out = self.session.run([self.output_name], {self.input_name: batch})[0]
            logits[part] = out[: part.stop - part.start]
        return logits

    def twin(self) -> OnnxTwin:
        """The differentiable twin of this model (:mod:`rslad_edge.runtime.twin`): its own graph, weights, scales
        and zero points as torch ops; TwinUnavailableError naming an op it cannot emulate. A ``.ort`` holds a graph
        ONNX Runtime already fused into its own operators, so its twin is that of the ONNX it was converted from
        (named, with its sha256, in its metadata); verify's agreement check then compares the twin with the .ort."""
        from rslad_edge.runtime.twin import built_from_onnx_twin, onnx_twin

        if Path(self.path).suffix.lower() in ORT_FORMAT_SUFFIXES:
            return built_from_onnx_twin(self.path, self.metadata)
        return onnx_twin(self.path)

    def __repr__(self) -> str:
        semantics = ", Q/DQ semantics" if self.reference else ""
        return f"OnnxRunner({self.path!r}, {self.precision}, {self.provider}{semantics})"
