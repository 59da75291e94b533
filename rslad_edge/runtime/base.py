"""The Runner protocol: one way to run any artifact (PyTorch checkpoint, ONNX or ORT-format model, ExecuTorch
program, TensorRT engine).

Verify and bench take a Runner, never a file path, so one attack and one timing loop serve every backend.
Contract: ``predict`` takes float32 NCHW in [0, 1] as a numpy array, of any batch size (batching is the runner's
job), and returns float32 logits ``(N, num_classes)``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Runner(Protocol):
    backend: str  # "torch" | "onnxruntime" | "executorch" | "tensorrt"
    provider: str  # what actually ran, read back from the runtime (e.g. "CPUExecutionProvider"), never assumed
    precision: str  # "fp32" | "fp16" | "int8" | "bf16"
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    path: str  # the artifact file

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, C, H, W) in [0, 1] -> float32 logits (N, num_classes)."""
        ...
