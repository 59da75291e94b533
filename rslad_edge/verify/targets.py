"""Every model verify touches (the artifact, the reference, the transfer sources) behind one small interface.

A :class:`Model` predicts logits for CPU tensors and times what the backend spends doing it (the benchmark reports
that share; the rest is verify's own overhead). It also offers ``model_fn``, the differentiable forward the white-box
attacks, the divergence attack and the transfer crafting use:

- a PyTorch checkpoint or ``nn.Module``: the model itself, under the same autocast the runner predicts with
  (``gradients == "own"``);
- an exported artifact (ONNX Runtime, TensorRT): its differentiable twin (``runtime/twin.py``), the artifact's own
  graph, weights and quantization as torch ops (``gradients == "twin"``). The twin only crafts; every adversarial
  image is judged by the artifact's own ``predict``. When the artifact has no twin, ``model_fn`` is None and
  ``twin_error`` says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rslad_edge.attacks import ModelFn
from rslad_edge.io import sha256_file
from rslad_edge.runtime import Runner
from rslad_edge.runtime.twin import TwinUnavailableError


@dataclass(frozen=True)
class ArtifactInfo:
    """What was measured, as the JSON names it: the file and its hash, and what actually ran it."""

    path: str | None
    sha256: str | None
    backend: str
    provider: str
    precision: str

    def to_json(self) -> dict[str, Any]:
        return {"artifact": self.path, "sha256": self.sha256, "backend": self.backend, "provider": self.provider,
                "precision": self.precision}


class Model:
    """One model, queried through CPU tensors; ``model_fn`` is its own forward (``gradients == "own"``), its twin's
    (``"twin"``), or None (``"none"``: ``twin_error`` says why)."""

    def __init__(
        self,
        label: str,
        predict_numpy: Callable[[np.ndarray], np.ndarray],
        *,
        info: ArtifactInfo,
        input_shape: tuple[int, int, int],
        num_classes: int,
        model_fn: ModelFn | None = None,
        device: torch.device | None = None,
        handle: object = None,
        gradients: str | None = None,
        twin_error: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.label = label  # how warnings and the per-source table name it: the file name
        self._predict_numpy = predict_numpy
        self.info = info
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.model_fn = model_fn
        self.device = device or torch.device("cpu")
        self.handle = handle  # the runner / module it wraps: the same handle means the same model
        self.gradients = gradients or ("own" if model_fn is not None else "none")  # own | twin | none
        self.twin_error = twin_error  # why an exported artifact has no twin (the op it cannot emulate, ...)
        self.metadata = dict(metadata or {})  # what the artifact says about itself (arch, num_classes, ...)
        self.runtime_seconds = 0.0  # wall time inside the backend's predict
        self.images_predicted = 0
        self.predict_calls = 0

    @property
    def differentiable(self) -> bool:
        return self.model_fn is not None

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits ``(N, classes)`` on the CPU for CPU inputs ``(N, C, H, W)`` in [0, 1]; timed.

        One call into the backend for the whole array: the runner splits it into its largest batch.
        """
        inputs = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        start = time.perf_counter()
        logits = self._predict_numpy(inputs)
        self.runtime_seconds += time.perf_counter() - start
        self.images_predicted += len(inputs)
        self.predict_calls += 1
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))

    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """Arg-max predictions ``(N,)`` int64 on the CPU."""
        if x.shape[0] == 0:
            return torch.empty(0, dtype=torch.long)
        return self.logits(x).argmax(dim=1)

    def same_as(self, other: Model) -> bool:
        """True when both wrap the same runner or module (a transfer source that is the model itself)."""
        return self.handle is other.handle

    def __repr__(self) -> str:
        return f"Model({self.label!r}, {self.info.backend}, differentiable={self.differentiable})"


def as_model(obj: Runner | nn.Module | Model, label: str | None = None, *, batch_size: int = 256) -> Model:
    """Wrap a Runner (any backend) or a plain ``nn.Module`` (used in eval mode, fp32, on its parameters' device)."""
    if isinstance(obj, Model):
        return obj
    if isinstance(obj, nn.Module):
        return _module_model(obj, label, batch_size)
    if not hasattr(obj, "predict"):
        raise TypeError(f"expected a Runner (rslad_edge.runtime.load_runner) or an nn.Module, got {type(obj).__name__}")
    path = str(obj.path) if getattr(obj, "path", None) else None
    info = ArtifactInfo(path=path, sha256=_sha256(path), backend=obj.backend, provider=obj.provider,
                        precision=obj.precision)
    label = label or (Path(path).name if path else type(obj).__name__)
    model_fn, device, gradients, twin_error = None, None, "none", None
    torch_model = getattr(obj, "model", None)
    if obj.backend == "torch" and isinstance(torch_model, nn.Module):
        device = torch.device(getattr(obj, "device", "cpu"))
        model_fn = _autocast_forward(torch_model, getattr(obj, "autocast", None), device)
        gradients = "own"
    elif callable(getattr(obj, "twin", None)):
        try:
            device = torch.device(getattr(obj, "device", None) or "cpu")
            model_fn = obj.twin().to(device).eval()
            gradients = "twin"
        except TwinUnavailableError as exc:
            twin_error, device = str(exc), None
    else:
        twin_error = f"{label} ({obj.backend}) offers no differentiable twin"
    return Model(label, obj.predict, info=info, input_shape=tuple(obj.input_shape), num_classes=int(obj.num_classes),
                 model_fn=model_fn, device=device, handle=obj, gradients=gradients, twin_error=twin_error,
                 metadata=getattr(obj, "metadata", None))


def _module_model(module: nn.Module, label: str | None, batch_size: int) -> Model:
    module.eval()
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")

    def predict(x: np.ndarray) -> np.ndarray:
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                batch = torch.from_numpy(x[start : start + batch_size]).to(device)
                outputs.append(module(batch).float().cpu())
        return torch.cat(outputs).numpy() if outputs else np.zeros((0, 0), np.float32)

    info = ArtifactInfo(path=None, sha256=None, backend="torch", provider=str(device), precision="fp32")
    num_classes = _probe_classes(module)
    return Model(label or type(module).__name__, predict, info=info, input_shape=(0, 0, 0), num_classes=num_classes,
                 model_fn=module, device=device, handle=module)


def _autocast_forward(module: nn.Module, precision: Any, device: torch.device) -> ModelFn:
    """``module`` under the runner's autocast (bf16 / fp16), so attacks see what the runner predicts with."""
    if precision is None or getattr(precision, "autocast_dtype", None) is None:
        return module

    def forward(x: torch.Tensor) -> torch.Tensor:
        with precision.autocast(device):
            return module(x)

    return forward


def _probe_classes(module: nn.Module) -> int:
    """The class count of a bare module: its last Linear layer's width (0 when it has none: not checked)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features) if linears else 0


def _sha256(path: str | None) -> str | None:
    return sha256_file(path) if path and Path(path).is_file() else None
