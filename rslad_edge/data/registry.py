"""``load_dataset``: one entry point from a dataset name (CLI flag, YAML key) to an in-memory :class:`ImageSet`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rslad_edge.data.cifar import CIFAR_LAYOUTS, load_cifar
from rslad_edge.data.imagefolder import default_cache_dir, load_imagefolder
from rslad_edge.data.imageset import ImageSet
from rslad_edge.data.shapes import load_shapes
from rslad_edge.errors import ConfigError

DATASET_NAMES = ("cifar10", "cifar100", "imagefolder", "shapes")
SPLITS = ("train", "test")


def load_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    *,
    download: bool = True,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
) -> ImageSet:
    """Load one split of a named dataset whole into memory as uint8 images and int64 labels.

    - ``cifar10`` / ``cifar100``: torchvision's python-format folders under ``root`` (default
      ``<cache>/datasets``), downloaded through torchvision if missing and ``download`` is on.
    - ``imagefolder``: ``root/{train,test}/<class>/<images>``, decoded once and cached (see ``imagefolder.py``).
    - ``shapes``: generated from ``seed``; ``root`` is ignored; ``n_train`` / ``n_test`` set the sizes.

    Raises ConfigError for an unknown name or split, DatasetError for missing or malformed data.
    """
    key = name.lower()
    if key not in DATASET_NAMES:
        raise ConfigError(f"unknown dataset '{name}'; known datasets: {', '.join(DATASET_NAMES)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}' for {key}; use one of: {', '.join(SPLITS)}")
    if key != "shapes" and (n_train is not None or n_test is not None):
        raise ConfigError(f"n_train / n_test apply to the shapes dataset only; to use part of {key}, take a subset()")

    if key == "shapes":
        return load_shapes(split, seed=seed, n_train=n_train, n_test=n_test)
    if key == "imagefolder":
        if root is None:
            raise ConfigError("imagefolder needs a root folder holding train/<class>/... and test/<class>/...")
        return load_imagefolder(Path(root), split)
    assert key in CIFAR_LAYOUTS
    data_root = default_cache_dir() / "datasets" if root is None else Path(root).expanduser()
    return load_cifar(key, data_root, split, download=download)


def dataset_for_model(
    dataset: str | None, data_root: str | None, *model_metadata: Mapping[str, Any] | None
) -> tuple[str, str | None]:
    """The dataset (and its folder) a model is measured on: ``--dataset`` / ``--data-root`` when given, else what
    the first of ``model_metadata`` that says so was trained on (a checkpoint's info or an exported artifact's
    metadata), else cifar10. The one rule export (parity, calibration), verify and the pipeline share."""
    trained_on, trained_root = None, None
    for metadata in model_metadata:
        meta = metadata or {}
        inner = meta.get("meta") or {}
        trained_on = meta.get("trained_on") or inner.get("dataset")
        if trained_on:
            trained_root = (inner.get("config") or {}).get("data_root")
            break
    name = str(dataset or trained_on or "cifar10")
    root = data_root if data_root is not None else (trained_root if name == trained_on else None)
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
