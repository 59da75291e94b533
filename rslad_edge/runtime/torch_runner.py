"""The PyTorch backend: a checkpoint run eagerly, the reference every exported artifact is compared against."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rslad_edge.device import resolve_device, resolve_precision
from rslad_edge.runtime.inputs import batch_slices, check_input

logger = logging.getLogger(__name__)


class TorchRunner:
    """Runs a model from a checkpoint in eval mode; fp32 by default, bf16 (CPU / CUDA) or fp16 (CUDA) autocast.

    ``model`` is exposed because white-box attacks need gradients, which only this backend has.
    """

    backend = "torch"

    def __init__(
        self,
        model: nn.Module,
        info: dict[str, Any],
        path: str | Path,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        threads: int | None = None,
        batch_size: int = 256,
    ) -> None:
        self.device = resolve_device(device)
        self.autocast = resolve_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        self.path = str(path)
        self.precision = self.autocast.name
        self.provider = str(self.device)  # what runs is exactly what was asked: torch does not fall back
        self.num_classes = int(info["num_classes"])
        # (C, H, W) as the checkpoint was trained; a bare state dict knows no size: 0 = any (the data's)
        height, width = (info.get("input") or {}).get("size") or (0, 0)
        self.input_shape = (3, int(height), int(width))
        self.metadata = {
            "arch": info["arch"], "arch_kwargs": info.get("arch_kwargs", {}), "num_classes": self.num_classes,
            "input": info.get("input", {}),
            "meta": info.get("meta", {}), "format": info.get("format"), "precision": self.precision,
        }
        self.threads = threads
        self.batch_size = batch_size

    def predict(self, x: np.ndarray) -> np.ndarray:
        """float32 (N, C, H, W) in [0, 1] -> float32 logits (N, num_classes), in batches of ``batch_size``."""
        x = check_input(x, self.input_shape, self.path)
        logits = np.empty((len(x), self.num_classes), dtype=np.float32)
        previous_threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)  # process-wide in torch, so restored below
        try:
            with torch.inference_mode(), self.autocast.autocast(self.device):
                for part in batch_slices(len(x), self.batch_size):
                    batch = torch.from_numpy(x[part]).to(self.device)
                    logits[part] = self.model(batch).float().cpu().numpy()
        finally:
            if self.threads:
                torch.set_num_threads(previous_threads)
        return logits

    def __repr__(self) -> str:
        return f"TorchRunner({self.path!r}, {self.metadata['arch']}, {self.precision}, {self.provider})"
