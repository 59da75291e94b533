"""``load_dataset``: one entry point from a dataset name (CLI flag, YAML key) to an :class:`ImageSet` at the model's
input size, in memory when it fits the memory budget and streamed from a decoded cache when it does not."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rslad_edge.data.cifar import CIFAR_LAYOUTS, load_cifar
from rslad_edge.data.imagefolder import imagefolder_own_size, load_imagefolder, load_imagefolder_sample
from rslad_edge.data.imageset import ImageSet, subset
from rslad_edge.data.preprocess import EvalResize, eval_resize, preprocess_tensor
from rslad_edge.data.shapes import load_shapes
from rslad_edge.data.store import (
    CACHE_ENV,
    CacheFiles,
    MappedImages,
    default_cache_dir,
    default_memory_budget,
    format_bytes,
)
from rslad_edge.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

DATASET_NAMES = ("cifar10", "cifar100", "imagefolder", "shapes")
SPLITS = ("train", "test")
_RESIZED_FORMAT = "rslad-edge/resized/1"  # bump when the resized cache's content or key changes meaning


def load_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    *,
    download: bool = True,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
    input_size: tuple[int, int] | None = None,
    crop_pct: float | None = None,
    memory_budget: int | None = None,
) -> ImageSet:
    """Load one split of a named dataset as uint8 (N, 3, H, W) images and int64 labels.

    - ``cifar10`` / ``cifar100``: torchvision's python-format folders under ``root`` (default
      ``<cache>/datasets``), downloaded through torchvision if missing and ``download`` is on.
    - ``imagefolder``: ``root/{train,test}/<class>/<images>``, decoded once and cached (see ``imagefolder.py``).
    - ``shapes``: generated from ``seed``; ``root`` is ignored; ``n_train`` / ``n_test`` set the sizes.

    ``input_size`` (H, W): every image is brought to it by the evaluation preprocessing (see ``preprocess.py``;
    ``crop_pct`` overrides :func:`eval_crop_pct`) and the result's ``preprocess`` says how. ``None``: the data's own
    size (32x32 for CIFAR and shapes; an image folder's images must then all share one size).

    ``memory_budget``: bytes of decoded images the split may take in memory (default :func:`default_memory_budget`);
    a larger split is streamed from its decoded cache file (``ImageSet.streamed``) instead.

    Raises ConfigError for an unknown name or split or a bad size, DatasetError for missing or malformed data.
    """
    key = _check_request(name, split, n_train, n_test)
    resize = eval_resize(input_size, crop_pct)
    if memory_budget is not None and memory_budget < 0:
        raise ConfigError(f"memory budget must be >= 0 bytes, got {memory_budget}")
    if key == "imagefolder":
        return load_imagefolder(_folder_root(root), split, input_size=input_size, crop_pct=crop_pct,
                                memory_budget=memory_budget)
    data = _load_tensor_set(key, root, split, download=download, seed=seed, n_train=n_train, n_test=n_test)
    return _resize_tensor_set(data, resize, memory_budget)


def own_size(name: str, root: str | Path | None = None) -> tuple[int, int] | None:
    """The size the data's images have before any resizing: 32x32 for CIFAR and shapes; an image folder's when all
    its training images share one (judged from file headers), else None."""
    key = _check_request(name, "train", None, None)
    if key == "imagefolder":
        return imagefolder_own_size(_folder_root(root))
    return (32, 32)


def load_sample(
    name: str,
    root: str | Path | None,
    split: str,
    n: int | None,
    seed: int,
    *,
    input_size: tuple[int, int] | None = None,
    crop_pct: float | None = None,
) -> ImageSet:
    """``subset(load_dataset(name, root, split, input_size=..., crop_pct=...), n, seed)`` at the cost of the ``n``
    images only, in memory: what export (parity, calibration) and verify need.

    The same images in the same order with the same labels as that expression. For ``imagefolder`` only the sampled
    files are decoded when there is no cache yet (and only their rows read when there is one; see
    :func:`~rslad_edge.data.imagefolder.load_imagefolder_sample` for the one case where the two can differ: files that
    do not decode); for CIFAR and shapes the sample is taken first and only it is resized. ``n=None`` or ``n`` at
    least the split's size: the whole split, as ``load_dataset`` gives it.
    """
    key = _check_request(name, split, None, None)
    resize = eval_resize(input_size, crop_pct)
    if n is not None and n < 1:
        raise ConfigError(f"subset size must be at least 1, got {n}")
    if key == "imagefolder":
        return load_imagefolder_sample(_folder_root(root), split, n, seed, input_size=input_size, crop_pct=crop_pct)
    sample = subset(_load_tensor_set(key, root, split), n, seed)
    return _resize_tensor_set(sample, resize, None)


def _check_request(name: str, split: str, n_train: int | None, n_test: int | None) -> str:
    key = name.lower()
    if key not in DATASET_NAMES:
        raise ConfigError(f"unknown dataset '{name}'; known datasets: {', '.join(DATASET_NAMES)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}' for {key}; use one of: {', '.join(SPLITS)}")
    if key != "shapes" and (n_train is not None or n_test is not None):
        raise ConfigError(f"n_train / n_test apply to the shapes dataset only; to use part of {key}, take a subset()")
    return key


def _folder_root(root: str | Path | None) -> Path:
    if root is None:
        raise ConfigError("imagefolder needs a root folder holding train/<class>/... and test/<class>/...")
    return Path(root)


def _load_tensor_set(
    key: str, root: str | Path | None, split: str, *, download: bool = True, seed: int = 0,
    n_train: int | None = None, n_test: int | None = None,
) -> ImageSet:
    """CIFAR or shapes at their own 32x32, in memory (150 MB at most)."""
    if key == "shapes":
        return load_shapes(split, seed=seed, n_train=n_train, n_test=n_test)
    assert key in CIFAR_LAYOUTS
    data_root = default_cache_dir() / "datasets" if root is None else Path(root).expanduser()
    return load_cifar(key, data_root, split, download=download)


def _resize_tensor_set(data: ImageSet, resize: EvalResize | None, budget: int | None) -> ImageSet:
    """An in-memory set brought to ``resize``'s input size: in memory when the result fits ``budget`` bytes (default
    :func:`default_memory_budget`), else resized chunk by chunk into a cache file (keyed by the pixels themselves)
    and streamed from it."""
    if resize is None or resize.is_identity_for(*data.input_size):
        return data
    budget = default_memory_budget() if budget is None else budget
    height, width = resize.input_size
    shape = (len(data), 3, height, width)
    nbytes = int(np.prod(shape))
    if nbytes <= budget:
        log.info("resizing %d images of %s to %dx%d", len(data), data.name, height, width)
        return ImageSet(images=preprocess_tensor(data.images, resize), labels=data.labels, classes=list(data.classes),
                        name=data.name, preprocess=resize.describe())

    digest = hashlib.sha256(f"{_RESIZED_FORMAT}\n{data.name}\n{resize.tag}\n{data.input_size}\n".encode())
    digest.update(data.images.contiguous().numpy().data)
    key = digest.hexdigest()
    prefix = f"resized-{data.name.replace('/', '-')}-{resize.tag}-"
    cache = CacheFiles(default_cache_dir(), prefix + key[:16], prefix)
    hit = cache.read(key)
    if hit is not None:
        log.info("streaming %d images of %s at %dx%d from cache %s", len(data), data.name, height, width, cache.npy)
        store = hit[1]
    else:
        log.info("resizing %d images of %s to %dx%d into the cache %s (%s: over the memory budget, so streamed)",
                 len(data), data.name, height, width, cache.npy, format_bytes(nbytes))
        try:
            rows = cache.create(shape)
            preprocess_tensor(data.images, resize, out=rows)
            cache.commit(rows, {"format": _RESIZED_FORMAT, "key": key, "dataset": data.name, "shape": list(shape),
                                "preprocess": resize.describe()})
        except OSError as error:
            raise DatasetError(
                f"{data.name} at {height}x{width} takes {format_bytes(nbytes)}, over the memory budget "
                f"({format_bytes(budget)}), and its cache {cache.npy} cannot be written ({error}); set {CACHE_ENV} "
                "to a writable folder with room for it"
            ) from error
        finally:
            cache.abort()  # a no-op once committed
        del rows
        store = MappedImages(cache.npy)
    return ImageSet(images=None, labels=data.labels, classes=list(data.classes), name=data.name,
                    preprocess=resize.describe(), store=store)


def dataset_for_model(
    dataset: str | None, data_root: str | None, *model_metadata: Mapping[str, Any] | None
) -> tuple[str, str | None]:
    """The dataset (and its folder) a model is measured on: ``--dataset`` / ``--data-root`` when given, else what
    the first of ``model_metadata`` that says so was trained on (a checkpoint's info or an exported artifact's
    metadata), else cifar10; the folder is the first one any of them records for that dataset (an export records
    the dataset, its checkpoint the folder too). The one rule export (parity, calibration), verify and the pipeline
    share."""
    trained: list[tuple[str, str | None]] = []
    for metadata in model_metadata:
        meta = metadata or {}
        inner = meta.get("meta") or {}
        name = meta.get("trained_on") or inner.get("dataset")
        if name:
            trained.append((str(name), meta.get("data_root") or (inner.get("config") or {}).get("data_root")))
    trained_on = trained[0][0] if trained else None
    name = str(dataset or trained_on or "cifar10")
    root = data_root if data_root is not None else next((r for n, r in trained if n == name and r), None)
    return name, root


def preprocess_for_model(*model_metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """How the images of the first of ``model_metadata`` that says so were brought to its input size (a checkpoint's
    ``input.preprocess``, an artifact's ``preprocess``), so export and verify read its data as it was trained."""
    for metadata in model_metadata:
        meta = metadata or {}
        preprocess = meta.get("preprocess") or (meta.get("input") or {}).get("preprocess")
        if preprocess:
            return dict(preprocess)
    return None
