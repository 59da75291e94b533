"""The one in-memory dataset type, and the few operations every stage needs on it.

Airbench style: a CIFAR-scale split is small (50,000 x 3 x 32 x 32 uint8 = 150 MB), so it is held whole as one
uint8 tensor, moved to the training device once, and sliced per batch. No Dataset / DataLoader / worker processes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from rslad_edge.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ImageSet:
    """A whole split in memory: ``images`` uint8 (N, 3, H, W), ``labels`` int64 (N,), class names, a display name.

    Treat it as immutable: the device copies made by :meth:`to_device` are cached on the instance and would not see
    in-place edits. Build a new ImageSet (e.g. with :func:`subset` or ``dataclasses.replace``) instead.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str
    _device_copies: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        # Cheap checks that catch a malformed dataset at load time rather than as a shape error mid-training.
        images, labels = self.images, self.labels
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise DatasetError(
                f"{self.name}: images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            raise DatasetError(
                f"{self.name}: labels must be int64 ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}"
            )
        if not self.classes:
            raise DatasetError(f"{self.name}: no class names")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self.classes)):
            raise DatasetError(
                f"{self.name}: labels span [{int(labels.min())}, {int(labels.max())}] "
                f"but there are {len(self.classes)} classes"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def to_device(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 images and labels on ``device``, copied once and cached: epochs re-use the copy."""
        device = torch.device(device)
        if self.images.device == device:
            return self.images, self.labels
        key = str(device)
        if key not in self._device_copies:
            log.debug("copying %s (%d images) to %s", self.name, len(self), device)
            self._device_copies[key] = (self.images.to(device), self.labels.to(device))
        return self._device_copies[key]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]: the input contract of every model, ONNX graph and engine here."""
    if images.dtype != torch.uint8:
        raise ValueError(f"to_float expects uint8 images, got {images.dtype}")
    return images.to(torch.float32).div_(255.0)


def subset(data: ImageSet, n: int | None, seed: int) -> ImageSet:
    """A fixed random sample of ``n`` images: the same one for the same ``seed``, whatever the caller.

    Random, not the first ``n``: test splits are often sorted by class, so a prefix would hold only a few classes.
    ``n=None`` returns ``data`` itself; ``n`` larger than the set returns all of it, with a warning.
    """
    if n is None:
        return data
    if n < 1:
        raise ConfigError(f"subset size must be at least 1, got {n}")
    if n >= len(data):
        if n > len(data):
            log.warning("asked for %d images of %s but it has only %d: using all of them", n, data.name, len(data))
        return data
    index = torch.from_numpy(np.random.default_rng(seed).permutation(len(data))[:n])
    index = index.to(data.images.device)
    return ImageSet(images=data.images[index], labels=data.labels[index], classes=list(data.classes), name=data.name)


class HeldOut(NamedTuple):
    """``data`` split in two by :func:`hold_out`."""

    rest: ImageSet  # everything else, in the original order
    held_out: ImageSet
    indices: torch.Tensor  # (n,) int64: the held-out images' positions in the original set


def hold_out(data: ImageSet, n: int, seed: int) -> HeldOut:
    """Take ``n`` images out of ``data`` by a seeded permutation (a validation split of a training set).

    The held-out images are the first ``n`` of ``numpy.random.default_rng(seed).permutation(len(data))``; the rest keep
    their order. The same data, ``n`` and ``seed`` give the same split on every machine and in every process.
    """
    if not 1 <= n < len(data):
        raise ConfigError(f"cannot hold out {n} of the {len(data)} images of {data.name}: need 1 <= n < {len(data)}")
    permutation = torch.from_numpy(np.random.default_rng(seed).permutation(len(data)))
    held = permutation[:n].to(data.images.device)
    keep = torch.ones(len(data), dtype=torch.bool, device=data.images.device)
    keep[held] = False

    def take(index: torch.Tensor, name: str) -> ImageSet:
        return ImageSet(images=data.images[index], labels=data.labels[index], classes=list(data.classes), name=name)

    return HeldOut(take(keep, data.name), take(held, f"{data.name} (held out)"), held.cpu())
