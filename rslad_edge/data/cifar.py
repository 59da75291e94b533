"""CIFAR-10 / CIFAR-100 from torchvision's on-disk format, read without executing anything.

The batches are Python pickles. A pickle can name any importable callable (``os.system``) and unpickling calls it,
so a dataset file from the internet or a shared drive is code unless we say otherwise. We say otherwise: the
unpickler below resolves only the handful of numpy globals that rebuild an array, and refuses the rest.

We read the files ourselves instead of through ``torchvision.datasets.CIFAR10`` so that loading does not depend on
its md5 check (a re-packed or test copy of the same format loads) and so the whole split lands directly in one
uint8 tensor. torchvision is used only to download, and imported only then.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rslad_edge.data.imageset import ImageSet
from rslad_edge.errors import DatasetError

log = logging.getLogger(__name__)

CIFAR_SIZE = (32, 32)  # (H, W) of every CIFAR-10 / CIFAR-100 image


@dataclass(frozen=True)
class _CifarLayout:
    folder: str  # torchvision's base_folder
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    labels_key: str
    names_key: str
    torchvision_class: str  # where torchvision keeps the download url and md5


CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        labels_key="labels",
        names_key="label_names",
        torchvision_class="CIFAR10",
    ),
    "cifar100": _CifarLayout(
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        labels_key="fine_labels",
        names_key="fine_label_names",
        torchvision_class="CIFAR100",
    ),
}

# Everything a pickled numpy array (any protocol, numpy 1 or 2, written by Python 2 or 3) needs, and nothing else.
# numpy 2 renamed numpy.core to numpy._core; old pickles name the former, new ones the latter.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2 (the array's raw buffer)
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild dicts, lists, strings, numbers and numpy arrays, and nothing that runs code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a dataset file")
        if module.startswith("numpy.core."):  # resolve without numpy 2's deprecation warning for numpy.core
            for candidate in (module.replace("numpy.core.", "numpy._core.", 1), module):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", DeprecationWarning)
                        return getattr(importlib.import_module(candidate), name)
                except (ImportError, AttributeError):
                    continue
        return super().find_class(module, name)


def read_pickle(path: Path) -> Any:
    """Unpickle a data file with :class:`_NumpyOnlyUnpickler`; any failure is a DatasetError naming the file."""
    try:
        with path.open("rb") as file:
            # latin1: the original batches were written by Python 2; latin1 maps its byte strings 1:1.
            return _NumpyOnlyUnpickler(file, encoding="latin1").load()
    except pickle.UnpicklingError as error:
        raise DatasetError(f"refusing to load {path}: {error}. A CIFAR batch holds only arrays and lists.") from error
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise DatasetError(f"cannot read {path}: {error}. Delete the folder and download it again.") from error


def load_cifar(name: str, root: Path, split: str, *, download: bool = True) -> ImageSet:
    """Load a CIFAR split as uint8 (N, 3, 32, 32), downloading it through torchvision if absent and allowed."""
    layout = CIFAR_LAYOUTS[name]
    folder = root / layout.folder
    files = layout.train_files if split == "train" else layout.test_files
    needed = [folder / file for file in (*files, layout.meta_file)]
    if not all(path.is_file() for path in needed):
        if not download:
            raise DatasetError(_missing_message(name, folder, needed, "download is off"))
        _download(name, root, folder, needed)

    classes = _class_names(folder / layout.meta_file, layout.names_key)
    images, labels = [], []
    for file in files:
        path = folder / file
        entries = _entries(read_pickle(path), path)
        batch_images, batch_labels = _check_batch(entries, layout.labels_key, path)
        images.append(batch_images)
        labels.append(batch_labels)
    images_nchw = torch.from_numpy(np.concatenate(images).reshape(-1, 3, *CIFAR_SIZE))  # rows are R, G, B planes
    return ImageSet(
        images=images_nchw, labels=torch.from_numpy(np.concatenate(labels)), classes=classes, name=f"{name}/{split}"
    )


def _entries(obj: Any, path: Path) -> dict[str, Any]:
    """The batch dict with str keys (Python 2 files give str under latin1, Python 3 files may give bytes)."""
    if not isinstance(obj, dict):
        raise DatasetError(f"{path} does not hold a CIFAR batch (a dict), but a {type(obj).__name__}")
    return {key.decode("latin1") if isinstance(key, bytes) else str(key): value for key, value in obj.items()}


def _class_names(path: Path, names_key: str) -> list[str]:
    names = _entries(read_pickle(path), path).get(names_key)
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path}: '{names_key}' must be a non-empty list of class names")
    return [name.decode("latin1") if isinstance(name, bytes) else str(name) for name in names]


def _check_batch(entries: dict[str, Any], labels_key: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The batch's (N, 3072) uint8 pixels and (N,) int64 labels, or a DatasetError saying what is off."""
    data, labels = entries.get("data"), entries.get(labels_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        found = f"{type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}"
        raise DatasetError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {found}")
    try:
        labels_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as error:
        raise DatasetError(f"{path}: '{labels_key}' is not a list of integer labels ({error})") from error
    if labels_array.shape != (data.shape[0],):
        raise DatasetError(f"{path}: '{labels_key}' must hold one label per image ({data.shape[0]})")
    return data, labels_array


def _download(name: str, root: Path, folder: Path, needed: list[Path]) -> None:
    from torchvision import datasets  # slow import, needed only here
    from torchvision.datasets.utils import download_and_extract_archive

    spec = getattr(datasets, CIFAR_LAYOUTS[name].torchvision_class)
    log.info("downloading %s to %s", name, root)
    try:
        download_and_extract_archive(spec.url, download_root=str(root), filename=spec.filename, md5=spec.tgz_md5)
    except Exception as error:  # offline, proxy, disk full, bad checksum: all the same to the user
        raise DatasetError(_missing_message(name, folder, needed, f"the download failed ({error})")) from error
    if not all(path.is_file() for path in needed):
        raise DatasetError(_missing_message(name, folder, needed, "the downloaded archive did not contain them"))


def _missing_message(name: str, folder: Path, needed: list[Path], reason: str) -> str:
    missing = ", ".join(path.name for path in needed if not path.is_file())
    return (
        f"{name} not found: {folder} lacks {missing} and {reason}. Put torchvision's python-format archive there "
        f"(e.g. run `torchvision.datasets.{CIFAR_LAYOUTS[name].torchvision_class}(root='{folder.parent}', "
        f"download=True)` on a machine with internet and copy the folder), or use imagefolder for image files."
    )
