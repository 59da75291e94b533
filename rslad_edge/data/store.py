"""Decoded images on disk: the cache folder, the memory budget, and uint8 ``.npy`` files read row by row.

A split that fits in memory is read whole (training then slices a device copy). One that does not stays where it
is: a ``.npy`` file of uint8 (N, 3, H, W) rows, memory-mapped, so a batch reads only its own rows and the page cache
keeps what is hot. The same file format serves both, written once by the first load (row by row, so writing it never
needs the whole split in memory either) and described by a small JSON sidecar that says what it holds.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from rslad_edge.errors import ConfigError

log = logging.getLogger(__name__)

CACHE_ENV = "RSLAD_EDGE_CACHE"
MEMORY_BUDGET_ENV = "RSLAD_EDGE_MEMORY_BUDGET"
MEMORY_FRACTION = 0.25  # of physical memory: room for the model, the optimizer, a device copy and the OS
_FALLBACK_PHYSICAL = 8 * 2**30  # bytes, where the platform cannot say (no sysconf)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def default_cache_dir() -> Path:
    """``$RSLAD_EDGE_CACHE`` if set, else ``~/.cache/rslad-edge``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "rslad-edge"


def default_memory_budget() -> int:
    """Bytes of decoded images a split may take in memory before it is streamed from disk instead.

    ``$RSLAD_EDGE_MEMORY_BUDGET`` when set: a byte count with an optional binary unit, ``8G``, ``8GiB``, ``512M``,
    ``1073741824`` (``0`` streams every split). Else 25% of physical memory, which leaves room for the model, the
    optimizer state, a device copy of the set and the OS.
    """
    configured = os.environ.get(MEMORY_BUDGET_ENV)
    if configured is not None and configured.strip():
        return parse_bytes(configured, MEMORY_BUDGET_ENV)
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name on this platform
        physical = -1
    if physical <= 0:
        physical = _FALLBACK_PHYSICAL
    return int(physical * MEMORY_FRACTION)


def parse_bytes(text: str, what: str) -> int:
    """``"8G"`` / ``"8GiB"`` / ``"1.5g"`` / ``"1000000"`` -> bytes; a ConfigError naming ``what`` otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if match is None:
        raise ConfigError(f"{what}={text!r} is not a size; give bytes or a number with K, M, G or T (e.g. 8G)")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def format_bytes(count: int) -> str:
    """1536 -> '1.5 KiB': for log lines."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class MappedImages:
    """uint8 (M, 3, H, W) rows of a ``.npy`` file, memory-mapped read-only. Pickles as its path, so a set sent to
    another process re-opens the file instead of copying the split."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.array = np.load(self.path, mmap_mode="r")
        if self.array.dtype != np.uint8 or self.array.ndim != 4 or self.array.shape[1] != 3:
            raise ValueError(f"{self.path} holds {self.array.dtype} {self.array.shape}, not uint8 (M, 3, H, W)")

    def __reduce__(self) -> tuple[type[MappedImages], tuple[Path]]:
        return MappedImages, (self.path,)

    def __repr__(self) -> str:
        return f"MappedImages({str(self.path)!r}, shape={self.shape})"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(int(side) for side in self.array.shape)  # type: ignore[return-value]

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """The rows at ``positions`` (any order, repeats allowed) as a new writable array in memory.

        Rows are read in increasing file order (disk and page-cache read-ahead like that), then put in the asked
        order. The copy is writable, so ``torch.from_numpy`` takes it without the read-only warning.
        """
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if positions.size == 0 or np.all(positions[1:] > positions[:-1]):
            return np.ascontiguousarray(self.array[positions])  # fancy indexing: only these rows, into memory
        unique, inverse = np.unique(positions, return_inverse=True)
        return self.array[unique][inverse.reshape(-1)]


class CacheFiles:
    """``<stem>.npy`` (the decoded rows) and ``<stem>.json`` (what they hold) in ``folder``.

    The ``.npy`` is written under a temporary name, then renamed; the sidecar is renamed last, so a reader that finds
    a sidecar with the right key finds the finished rows beside it. Other files that share ``stale_prefix`` (the same
    source at the same size, with older contents) are deleted once a new pair is in place.
    """

    def __init__(self, folder: Path, stem: str, stale_prefix: str) -> None:
        self.folder = folder
        self.npy = folder / f"{stem}.npy"
        self.sidecar = folder / f"{stem}.json"
        self.stale_prefix = stale_prefix
        self._temp: Path | None = None

    def read(self, key: str) -> tuple[dict[str, Any], MappedImages] | None:
        """The sidecar and the mapped rows if both exist and match ``key``; anything else is a miss, never an error
        (a stale, foreign or truncated cache is decoded again)."""
        if not self.sidecar.is_file() or not self.npy.is_file():
            return None
        try:
            meta = json.loads(self.sidecar.read_text())
            if meta.get("key") != key:
                raise ValueError("key mismatch")
            images = MappedImages(self.npy)
            if list(images.shape) != list(meta.get("shape", [])):
                raise ValueError(f"rows {images.shape} but the sidecar says {meta.get('shape')}")
        except Exception as error:  # truncated file, old format, foreign file: decode again rather than fail
            log.warning("ignoring cache file %s (%s); decoding again", self.npy, error)
            return None
        return meta, images

    def create(self, shape: tuple[int, int, int, int]) -> np.ndarray:
        """A writable uint8 memmap of ``shape`` under a temporary name; OSError when the folder is not writable or
        the disk is too small (space is reserved up front where the OS allows, so a full disk is an error here
        rather than a crash while writing the map)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        descriptor, temp_name = tempfile.mkstemp(dir=self.folder, prefix=self.npy.name, suffix=".tmp")
        os.close(descriptor)
        self._temp = Path(temp_name)
        try:
            array = np.lib.format.open_memmap(temp_name, mode="w+", dtype=np.uint8, shape=shape)
            if hasattr(os, "posix_fallocate") and array.size:
                with open(temp_name, "r+b") as file:
                    try:
                        os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
                    except OSError as error:
                        if error.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                            raise  # ENOSPC: no room for the split
        except BaseException:
            self.abort()
            raise
        return array

    def commit(self, array: np.ndarray, meta: dict[str, Any]) -> None:
        """Flush ``array`` (from :meth:`create`), rename it into place, write the sidecar, drop stale caches."""
        assert self._temp is not None, "commit() without create()"
        try:
            if isinstance(array, np.memmap):
                array.flush()
            os.replace(self._temp, self.npy)
            self._temp = None
            write_text_atomically(self.sidecar, json.dumps(meta, indent=1) + "\n")
        except BaseException:
            self.abort()
            raise
        for stale in self.folder.glob(f"{self.stale_prefix}*"):
            if stale not in (self.npy, self.sidecar) and stale.suffix in (".npy", ".json"):
                stale.unlink(missing_ok=True)

    def abort(self) -> None:
        """Delete the temporary rows of an unfinished :meth:`create`."""
        if self._temp is not None:
            self._temp.unlink(missing_ok=True)
            self._temp = None


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``path`` under a temporary name in the same folder, then rename: readers see the old or the new file."""
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
