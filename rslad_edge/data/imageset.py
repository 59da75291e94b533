"""The one dataset type, and the few operations every stage needs on it.

Airbench style: a CIFAR-scale split is small (50,000 x 3 x 32 x 32 uint8 = 150 MB), so it is held whole as one
uint8 tensor, moved to the training device once, and sliced per batch. No Dataset / DataLoader / worker processes.

A split is in memory when it fits (the memory budget, see ``store.py``) and memory-mapped from the decoded cache
when it does not: then the set is *streamed*, a view of rows of a ``.npy`` file, and a batch reads only its own rows
from disk. Consumers that work through :meth:`ImageSet.read` and :meth:`ImageSet.take` need not care which; a
subset or a held-out split of a streamed set is again a streamed view, so nothing ever loads the whole split by
accident.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from rslad_edge.data.store import MappedImages, format_bytes
from rslad_edge.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)


class _InMemoryImages:
    """The ``images`` field: the uint8 tensor of an in-memory set; reading it on a streamed set is a clear error
    (rather than a ``None`` that fails somewhere downstream). A data descriptor, so the frozen dataclass's ``__init__``
    stores through it and ``images`` stays the first, required constructor argument."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, instance: ImageSet | None, owner: type | None = None) -> torch.Tensor:
        if instance is None:
            raise AttributeError("images has no default")  # tells dataclasses the field is required
        images = instance.__dict__[self.slot]
        if images is None:
            raise ValueError(
                f"{instance.name} is streamed from {instance.store.path} (it does not fit the memory budget), so it "
                "has no in-memory images; use read(index) or take(index, device)"
            )
        return images

    def __set__(self, instance: ImageSet, value: torch.Tensor | None) -> None:
        instance.__dict__[self.slot] = value


@dataclass(frozen=True, eq=False)
class ImageSet:
    """A split: uint8 (N, 3, H, W) images, int64 (N,) labels, class names, a display name.

    In memory (``images`` given, the usual ``ImageSet(images=..., labels=..., classes=..., name=...)``) or
    streamed (``images=None``, ``store`` the memory-mapped rows and ``rows`` the positions of this set's images in it,
    ``None`` for all of them in order). :meth:`read` and :meth:`take` work on both; ``images`` and :meth:`to_device`
    only on an in-memory set. ``preprocess`` says how the images were brought to their size (see ``preprocess.py``),
    ``None`` when they are the data's own pixels.

    Treat it as immutable: the device copies made by :meth:`to_device` are cached on the instance and would not see
    in-place edits. Build a new ImageSet (e.g. with :func:`subset`, or ``dataclasses.replace`` on an in-memory set)
    instead.
    """

    images: torch.Tensor | None = _InMemoryImages()  # type: ignore[assignment]
    labels: torch.Tensor
    classes: list[str]
    name: str
    preprocess: dict[str, Any] | None = None
    store: MappedImages | None = None
    rows: torch.Tensor | None = None
    _device_copies: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        # Cheap checks that catch a malformed dataset at load time rather than as a shape error mid-training.
        images, labels = self.__dict__["_images"], self.labels
        if (images is None) == (self.store is None):
            raise DatasetError(f"{self.name}: give either in-memory images or a store of rows, not both or neither")
        if images is not None:
            if self.rows is not None:
                raise DatasetError(f"{self.name}: rows index a store; an in-memory set has none")
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
                raise DatasetError(
                    f"{self.name}: images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}"
                )
            count = int(images.shape[0])
        else:
            stored = self.store.shape[0]
            if self.rows is not None:
                if self.rows.dtype != torch.int64 or self.rows.ndim != 1 or self.rows.device.type != "cpu":
                    raise DatasetError(f"{self.name}: rows must be int64 (N,) on the CPU, got {self.rows.dtype}")
                if len(self.rows) and (int(self.rows.min()) < 0 or int(self.rows.max()) >= stored):
                    raise DatasetError(f"{self.name}: rows fall outside the {stored} rows of {self.store.path}")
            count = stored if self.rows is None else len(self.rows)
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != (count,):
            found = f"{labels.dtype} {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else repr(labels)
            raise DatasetError(f"{self.name}: labels must be int64 ({count},), got {found}")
        if not self.classes:
            raise DatasetError(f"{self.name}: no class names")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(self.classes)):
            raise DatasetError(
                f"{self.name}: labels span [{int(labels.min())}, {int(labels.max())}] "
                f"but there are {len(self.classes)} classes"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        height, width = self.input_size
        where = f"streamed from {self.store.path}" if self.streamed else "in memory"
        return f"ImageSet({self.name!r}, {len(self)} images 3x{height}x{width}, {self.num_classes} classes, {where})"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        shape = self.store.shape if self.streamed else self.images.shape
        return int(shape[2]), int(shape[3])

    @property
    def streamed(self) -> bool:
        """True when the images stay on disk (memory-mapped) and each read fetches only the rows it needs."""
        return self.store is not None

    @property
    def nbytes(self) -> int:
        """Bytes of uint8 pixels in the set: what holding it in memory costs."""
        height, width = self.input_size
        return len(self) * 3 * height * width

    def read(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (k, 3, H, W) on the CPU: the images at positions ``index`` (all of them when ``None``).

        For a streamed set only those rows are read from disk, into a new tensor. For an in-memory set it is an
        index into ``images`` (with ``index=None``, ``images`` itself when it is on the CPU: do not modify it).
        """
        if not self.streamed:
            if index is None:
                return self.images.cpu()
            return self.images[_as_index(index).to(self.images.device)].cpu()
        return torch.from_numpy(self.store.gather(self._store_positions(index)))

    def take(self, index: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (k, 3, H, W) and int64 labels (k,) at positions ``index``, both on ``device``: a batch.

        In memory: indexed out of the cached device copy (see :meth:`to_device`), as training always did. Streamed:
        the rows are read from disk, then copied to ``device``. Either way the same positions give the same pixels.
        """
        device = torch.device(device)
        index = _as_index(index)
        if not self.streamed:
            images, labels = self.to_device(device)
            index = index.to(images.device)
            return images[index], labels[index]
        cpu_index = index.cpu()
        return self.read(cpu_index).to(device), self.labels[cpu_index].to(device)

    def to_device(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 images and labels on ``device``, copied once and cached: epochs re-use the copy.

        In-memory sets only: a streamed set does not fit in memory by definition, so it has no whole copy to make.
        """
        if self.streamed:
            raise ValueError(
                f"{self.name} is streamed from {self.store.path} ({format_bytes(self.nbytes)}, over the memory "
                "budget), so it has no whole device copy; use take(index, device) per batch"
            )
        device = torch.device(device)
        if self.images.device == device:
            return self.images, self.labels
        key = str(device)
        if key not in self._device_copies:
            log.debug("copying %s (%d images) to %s", self.name, len(self), device)
            self._device_copies[key] = (self.images.to(device), self.labels.to(device))
        return self._device_copies[key]

    def _store_positions(self, index: torch.Tensor | None) -> np.ndarray:
        """Positions in ``store`` of this set's images at ``index`` (all when None): int64 numpy."""
        rows = self.rows if self.rows is not None else torch.arange(self.store.shape[0])
        if index is not None:
            rows = rows[_as_index(index).cpu()]
        return rows.numpy()


def _as_index(index: torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
    """A tensor index (int64 positions or a bool mask) from a tensor, an array or a list."""
    return index if isinstance(index, torch.Tensor) else torch.as_tensor(np.asarray(index))


def _select(data: ImageSet, index: torch.Tensor, name: str) -> ImageSet:
    """The images of ``data`` at ``index`` (positions or a bool mask): a copy in memory, a view when streamed."""
    if not data.streamed:
        index = index.to(data.images.device)
        return ImageSet(images=data.images[index], labels=data.labels[index], classes=list(data.classes), name=name,
                        preprocess=data.preprocess)
    index = index.cpu()
    if index.dtype == torch.bool:
        index = index.nonzero().squeeze(1)
    rows = torch.from_numpy(data._store_positions(index))
    return ImageSet(images=None, labels=data.labels[index], classes=list(data.classes), name=name,
                    preprocess=data.preprocess, store=data.store, rows=rows)


def in_memory(data: ImageSet) -> ImageSet:
    """``data`` with its images read into memory (``data`` itself when it already is): for a small streamed view,
    e.g. a subset that export or verify uses whole."""
    if not data.streamed:
        return data
    return ImageSet(images=data.read(), labels=data.labels, classes=list(data.classes), name=data.name,
                    preprocess=data.preprocess)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]: the input contract of every model, ONNX graph and engine here."""
    if images.dtype != torch.uint8:
        raise ValueError(f"to_float expects uint8 images, got {images.dtype}")
    return images.to(torch.float32).div_(255.0)


def subset_index(count: int, n: int, seed: int) -> np.ndarray:
    """The positions :func:`subset` takes out of ``count`` images: the first ``n`` of a seeded permutation."""
    return np.random.default_rng(seed).permutation(count)[:n]


def subset(data: ImageSet, n: int | None, seed: int) -> ImageSet:
    """A fixed random sample of ``n`` images: the same one for the same ``seed``, whatever the caller.

    Random, not the first ``n``: test splits are often sorted by class, so a prefix would hold only a few classes.
    ``n=None`` returns ``data`` itself; ``n`` larger than the set returns all of it, with a warning. A subset of a
    streamed set is a streamed view of the same rows (nothing is read until it is used).
    """
    if n is None:
        return data
    if n < 1:
        raise ConfigError(f"subset size must be at least 1, got {n}")
    if n >= len(data):
        if n > len(data):
            log.warning("asked for %d images of %s but it has only %d: using all of them", n, data.name, len(data))
        return data
    return _select(data, torch.from_numpy(subset_index(len(data), n, seed)), data.name)


class HeldOut(NamedTuple):
    """``data`` split in two by :func:`hold_out`."""

    rest: ImageSet  # everything else, in the original order
    held_out: ImageSet
    indices: torch.Tensor  # (n,) int64: the held-out images' positions in the original set


def hold_out(data: ImageSet, n: int, seed: int) -> HeldOut:
    """Take ``n`` images out of ``data`` by a seeded permutation (a validation split of a training set).

    The held-out images are the first ``n`` of ``numpy.random.default_rng(seed).permutation(len(data))``; the rest keep
    their order. The same data, ``n`` and ``seed`` give the same split on every machine and in every process. Both
    parts of a streamed set are streamed views.
    """
    if not 1 <= n < len(data):
        raise ConfigError(f"cannot hold out {n} of the {len(data)} images of {data.name}: need 1 <= n < {len(data)}")
    permutation = torch.from_numpy(np.random.default_rng(seed).permutation(len(data)))
    device = data.labels.device if data.streamed else data.images.device
    held = permutation[:n].to(device)
    keep = torch.ones(len(data), dtype=torch.bool, device=device)
    keep[held] = False
    return HeldOut(_select(data, keep, data.name), _select(data, held, f"{data.name} (held out)"), held.cpu())
