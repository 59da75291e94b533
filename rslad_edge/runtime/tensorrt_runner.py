"""The TensorRT backend: a serialized engine (``.engine`` / ``.plan``) run with the TensorRT 10 / 11 Python API.

NEVER RUN ON REAL HARDWARE in this project so far (no GPU or TensorRT where it was written): it follows the
TensorRT 10 / 11 API as documented (tensors addressed by name, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``; the bindings API is gone in 10). Device buffers are torch CUDA tensors, whose ``data_ptr()``
TensorRT accepts, so no pycuda / cuda-python dependency. Run ``pytest -m gpu`` on a GPU machine before trusting it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rslad_edge.errors import ConfigError, RuntimeUnavailableError
from rslad_edge.runtime.inputs import batch_slices, check_input, pad_batch
from rslad_edge.runtime.metadata import read_sidecar

if TYPE_CHECKING:
    from rslad_edge.runtime.twin import OnnxTwin

logger = logging.getLogger(__name__)


def import_tensorrt() -> Any:
    """``import tensorrt``, or a RuntimeUnavailableError that says where TensorRT comes from."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeUnavailableError(
            "TensorRT is not installed here: on a Jetson use JetPack's python3-libnvinfer, on a desktop "
            "`pip install tensorrt` from NVIDIA's index (engines must be built and run on the target GPU)"
        ) from exc
    return trt


class TensorRTRunner:
    """Runs a TensorRT engine on one GPU. Batches inside, within the engine's optimization profile."""

    backend = "tensorrt"

    def __init__(self, path: str | Path, *, device: str = "cuda", batch_size: int | None = None) -> None:
        import torch

        self.path = str(path)
        kind, _, index = device.partition(":")
        if kind not in ("auto", "cuda", "trt"):
            raise ConfigError(f"--device {device}: a TensorRT engine runs on a GPU; use --device cuda[:N]")
        if not torch.cuda.is_available():
            raise RuntimeUnavailableError(f"'{self.path}' is a TensorRT engine and needs a CUDA GPU; none is visible")
        self.device = torch.device("cuda", int(index) if index else 0)
        trt = import_tensorrt()
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            runtime = trt.Runtime(self._logger)
            engine = runtime.deserialize_cuda_engine(Path(self.path).read_bytes())
            if engine is None:
                raise RuntimeUnavailableError(
                    f"TensorRT {trt.__version__} cannot load '{self.path}': engines only load on the TensorRT "
                    f"version and GPU model that built them; rebuild it here (rslad-edge export --format trt)"
                )
            self.context = engine.create_execution_context()
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or len(outputs) != 1:
            raise RuntimeUnavailableError(f"'{self.path}' has inputs {inputs} and outputs {outputs}: expected one each")
        self.input_name, self.output_name = inputs[0], outputs[0]
        for name in (self.input_name, self.output_name):
            if engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise RuntimeUnavailableError(
                    f"'{self.path}': tensor {name} is {engine.get_tensor_dtype(name)}, expected float32 I/O"
                )
        shape = tuple(engine.get_tensor_shape(self.input_name))  # (-1, C, H, W) for a dynamic batch
        self.input_shape = tuple(int(d) for d in shape[1:])
        min_shape, _, max_shape = engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(min_shape[0]), int(max_shape[0])
        self.batch_size = min(batch_size or self.max_batch, self.max_batch)
        self.metadata = read_sidecar(self.path)
        self.num_classes = int(engine.get_tensor_shape(self.output_name)[-1])
        self.precision = self.metadata.get("precision", "unknown")
        self.provider = f"TensorRT {trt.__version__} on {torch.cuda.get_device_name(self.device)}"

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, C, H, W) in [0, 1] -> float32 logits (N, num_classes). Copies in and out, synchronises."""
        import torch

        x = check_input(x, self.input_shape, self.path)
        logits = np.empty((len(x), self.num_classes), dtype=np.float32)
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            for part in batch_slices(len(x), self.batch_size):
                enqueue, device_output = self._prepare(pad_batch(x[part], self.min_batch))
                enqueue()
                stream.synchronize()
                logits[part] = device_output[: part.stop - part.start].cpu().numpy()
        return logits

    def timed_fn(self, x: np.ndarray) -> Callable[[], object]:
        """A callable that enqueues one inference on device buffers prepared once from ``x`` (no copies, no sync)
        on torch's current CUDA stream: what bench times with CUDA events (device latency). One batch only."""
        x = check_input(x, self.input_shape, self.path)
        if not self.min_batch <= len(x) <= self.max_batch:
            raise ConfigError(f"'{self.path}' takes batches of {self.min_batch} to {self.max_batch}, got {len(x)}")
        enqueue, _ = self._prepare(x)
        return enqueue

    def _prepare(self, batch: np.ndarray) -> tuple[Callable[[], None], Any]:
        """Device input / output buffers for ``batch``, shapes and addresses bound; returns (enqueue, output)."""
        import torch

        device_input = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        self.context.set_input_shape(self.input_name, tuple(device_input.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        device_output = torch.empty(out_shape, dtype=torch.float32, device=self.device)
        self.context.set_tensor_address(self.input_name, device_input.data_ptr())
        self.context.set_tensor_address(self.output_name, device_output.data_ptr())

        def enqueue() -> None:
            stream = torch.cuda.current_stream(self.device)
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeUnavailableError(f"TensorRT failed to run '{self.path}' (see its log above)")
            _ = device_input  # keep the input buffer alive as long as the callable

        return enqueue, device_output

    def twin(self) -> OnnxTwin:
        """The twin of the ONNX this engine was built from (an engine's own weights are not readable; its sidecar
        names the ONNX and its hash)."""
        from rslad_edge.runtime.twin import built_from_onnx_twin

        return built_from_onnx_twin(self.path, self.metadata)

    def __repr__(self) -> str:
        return f"TensorRTRunner({self.path!r}, {self.precision}, {self.provider})"
