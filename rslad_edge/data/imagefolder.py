"""``imagefolder``: ``root/{train,test}/<class>/<image>``, decoded once into a uint8 ``.npy`` cache.

Decoding 60,000 small JPEGs costs seconds to tens of seconds, a million large ones far longer; every training, verify
and bench run needs the same pixels. So the first load decodes (in a thread pool: PIL releases the GIL while
decoding), brings every image to the input size on the way (``preprocess.py``), and writes the rows straight into a
memory-mapped ``.npy`` file, so decoding never holds the split in memory. Later loads read that file: whole into
memory when the split fits the memory budget, memory-mapped (a streamed :class:`ImageSet`) when it does not.

The cache key covers the folder's absolute path, every file's name, size and mtime, the input size and crop_pct, so
adding, removing or rewriting an image, or asking for another size, decodes again. Caches of other sizes of the same
folder are kept (a model at 96 px and one at 224 px each have theirs); a cache whose contents went stale is deleted
when its successor is written. Files that cannot be decoded are skipped with one warning, and the sidecar remembers
them, so a load from the cache warns the same way.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from rslad_edge.data.imageset import ImageSet, in_memory, subset, subset_index
from rslad_edge.data.preprocess import EvalResize, eval_resize, preprocess_pil
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

__all__ = ["CACHE_ENV", "IMAGE_EXTENSIONS", "default_cache_dir", "load_imagefolder", "load_imagefolder_sample"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_CACHE_FORMAT = "rslad-edge/imagefolder/2"  # bump when the cached content or key changes meaning
_NAMED_SKIPS = 5  # undecodable files named in the warning; the rest are counted
_CHUNK = 256  # files per job of the thread pool: small enough to spread a few thousand files over the workers


@dataclass(frozen=True)
class _Folder:
    """One split's files as scanned: classes sorted by folder name, files by name within a class."""

    root: Path
    split_dir: Path
    classes: list[str]
    files: list[Path]
    labels: np.ndarray  # int64 (N,)

    @property
    def name(self) -> str:
        return f"imagefolder:{self.root.name}/{self.split_dir.name}"

    def relative(self, index: int) -> str:
        return self.files[index].relative_to(self.split_dir).as_posix()


def load_imagefolder(
    root: Path,
    split: str,
    *,
    cache_dir: Path | None = None,
    input_size: tuple[int, int] | None = None,
    crop_pct: float | None = None,
    memory_budget: int | None = None,
) -> ImageSet:
    """Load ``root/split`` at ``input_size`` (``None``: the images' own, common size), from the cache when current.

    In memory when the decoded split fits ``memory_budget`` bytes (default :func:`default_memory_budget`), else
    streamed from the cache file. Raises DatasetError for a malformed folder, images of different sizes without
    ``input_size``, a class none of whose images decode, or a split too large for memory when the cache folder is not
    writable.
    """
    folder = _scan_split(root, split)
    resize = eval_resize(input_size, crop_pct)
    budget = _budget(memory_budget)
    cache, key = _cache_for(folder, resize, cache_dir)
    hit = cache.read(key)
    if hit is not None:
        meta, mapped = hit
        data = _image_set(folder, resize, mapped, _skipped_rows(meta), budget)
        log.info("loaded %d images of %s from cache %s", len(data), folder.split_dir, cache.npy)
        return data

    started = time.perf_counter()
    source, skipped = _decode_to_cache(folder, resize, cache, key, budget)
    log.info("decoded %d images in %.1f s", len(folder.files) - len(skipped), time.perf_counter() - started)
    return _image_set(folder, resize, source, skipped, budget)


def load_imagefolder_sample(
    root: Path,
    split: str,
    n: int | None,
    seed: int,
    *,
    cache_dir: Path | None = None,
    input_size: tuple[int, int] | None = None,
    crop_pct: float | None = None,
) -> ImageSet:
    """``subset(load_imagefolder(root, split, ...), n, seed)`` in memory, decoding only the ``n`` sampled files.

    From the cache when there is one (only the sampled rows are read). Without one, the sample is drawn over the
    scanned files and only those are decoded (no cache is written): that equals the subset of the full load as long
    as every file decodes. A file that does not is dropped from the sample with a warning, and since the full load
    would have dropped it before sampling, that sample then differs from the one a cached load gives. ``n=None`` or
    ``n`` at least the number of files: the full load itself (streamed when over the memory budget).
    """
    if n is not None and n < 1:
        raise ConfigError(f"subset size must be at least 1, got {n}")
    folder = _scan_split(root, split)
    resize = eval_resize(input_size, crop_pct)
    if n is None or n >= len(folder.files):  # the whole split: a full load, which also writes the cache
        return subset(load_imagefolder(root, split, cache_dir=cache_dir, input_size=input_size, crop_pct=crop_pct),
                      n, seed)
    cache, key = _cache_for(folder, resize, cache_dir)
    hit = cache.read(key)
    if hit is not None:
        meta, mapped = hit
        everything = _image_set(folder, resize, mapped, _skipped_rows(meta), budget=0)  # a view: reads nothing
        sample = in_memory(subset(everything, n, seed))
        log.info("read %d sampled images of %s from cache %s", len(sample), folder.split_dir, cache.npy)
        return sample

    index = subset_index(len(folder.files), n, seed)
    files = [folder.files[i] for i in index]
    log.info("decoding a sample of %d of the %d images in %s", n, len(folder.files), folder.split_dir)
    pixels, skipped = _decode_images(files, resize, lambda shape: np.empty(shape, dtype=np.uint8))
    if pixels is None:
        raise DatasetError(
            f"imagefolder: none of the {n} sampled images of {folder.split_dir} could be decoded "
            f"(e.g. {files[0]}: {skipped[0]}); replace or remove the broken files"
        )
    if skipped:
        _warn_skipped(folder.split_dir, [(files[row].relative_to(folder.split_dir).as_posix(), error)
                                         for row, error in sorted(skipped.items())], n)
    kept = np.setdiff1d(np.arange(n), np.fromiter(skipped, dtype=np.int64, count=len(skipped)))
    return ImageSet(
        images=torch.from_numpy(pixels if not skipped else pixels[kept]),
        labels=torch.from_numpy(folder.labels[index][kept]),
        classes=list(folder.classes),
        name=folder.name,
        preprocess=None if resize is None else resize.describe(),
    )


# ---------------------------------------------------------------- scanning


def imagefolder_own_size(root: str | Path, split: str = "train", probes: int = 64) -> tuple[int, int] | None:
    """The (H, W) every image of ``root/split`` has, judged from the headers of ``probes`` files spread over the
    split (nothing is decoded); None when they differ or none can be read."""
    folder = _scan_split(Path(root), split)
    picks = np.unique(np.linspace(0, len(folder.files) - 1, num=min(probes, len(folder.files))).astype(int))
    sizes = set()
    for index in picks:
        try:
            with Image.open(folder.files[index]) as image:
                sizes.add((image.height, image.width))
        except OSError:
            continue
    return sizes.pop() if len(sizes) == 1 else None


def _scan_split(root: Path, split: str) -> _Folder:
    root = Path(root).expanduser().resolve()
    split_dir = root / split
    if not split_dir.is_dir():
        raise DatasetError(
            f"imagefolder: {split_dir} is not a folder. Expected {root}/{{train,test}}/<class>/<image files>."
        )
    classes, files, labels = _scan(split_dir)
    _check_sibling_split(root, split, classes)
    return _Folder(root=root, split_dir=split_dir, classes=classes, files=files, labels=labels)


def _scan(split_dir: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """Class names, image paths and int64 labels; hidden entries and non-image files are skipped."""
    classes = _class_folders(split_dir)
    if not classes:
        raise DatasetError(f"imagefolder: {split_dir} has no class folders; expected {split_dir}/<class>/<images>")
    files: list[Path] = []
    labels: list[int] = []
    for label, class_name in enumerate(classes):
        class_files = sorted(
            entry.name
            for entry in os.scandir(split_dir / class_name)
            if entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not class_files:
            raise DatasetError(
                f"imagefolder: {split_dir / class_name} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "remove the folder or add images"
            )
        files.extend(split_dir / class_name / file for file in class_files)
        labels.extend([label] * len(class_files))
    return classes, files, np.asarray(labels, dtype=np.int64)


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))


def _check_sibling_split(root: Path, split: str, classes: list[str]) -> None:
    """Train and test must have the same class folders, or label k would mean different classes in each."""
    sibling = root / ("test" if split == "train" else "train")
    if not sibling.is_dir():
        return
    sibling_classes = _class_folders(sibling)
    if sibling_classes != classes:
        only_here = sorted(set(classes) - set(sibling_classes))
        only_there = sorted(set(sibling_classes) - set(classes))
        raise DatasetError(
            f"imagefolder: {root / split} and {sibling} have different class folders "
            f"(only in {split}: {only_here or 'none'}; only in {sibling.name}: {only_there or 'none'}), so their "
            "labels would not match; give both splits the same class folders"
        )


# ---------------------------------------------------------------- the cache


def _budget(memory_budget: int | None) -> int:
    if memory_budget is None:
        return default_memory_budget()
    if memory_budget < 0:
        raise ConfigError(f"memory budget must be >= 0 bytes, got {memory_budget}")
    return int(memory_budget)


def _cache_for(folder: _Folder, resize: EvalResize | None, cache_dir: Path | None) -> tuple[CacheFiles, str]:
    """The cache files of this folder at this size, and the key their sidecar must hold to be current."""
    tag = "native" if resize is None else resize.tag
    digest = hashlib.sha256(f"{_CACHE_FORMAT}\n{folder.split_dir}\n{tag}\n".encode())
    for path in folder.files:
        stat = path.stat()
        digest.update(f"{path.relative_to(folder.split_dir).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    key = digest.hexdigest()
    prefix = f"imagefolder-{_short_hash(str(folder.split_dir))}-{tag}-"
    return CacheFiles(default_cache_dir() if cache_dir is None else cache_dir, prefix + key[:16], prefix), key


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _skipped_rows(meta: dict[str, Any]) -> dict[int, str]:
    return {int(entry["row"]): str(entry["error"]) for entry in meta.get("skipped", [])}


def _decode_to_cache(
    folder: _Folder, resize: EvalResize | None, cache: CacheFiles, key: str, budget: int
) -> tuple[MappedImages | np.ndarray, dict[int, str]]:
    """Decode the split into a new cache file (or into memory when the cache folder is not writable and the split
    fits the budget); returns the rows, mapped from the cache or in memory, and the skipped rows with their errors."""
    count = len(folder.files)
    on_disk = True

    def allocate(shape: tuple[int, int, int, int]) -> np.ndarray:
        nonlocal on_disk
        nbytes = int(np.prod(shape))
        try:
            array = cache.create(shape)
        except OSError as error:
            if nbytes > budget:
                raise DatasetError(
                    f"imagefolder: cannot write the decoded cache of {folder.split_dir} to {cache.folder} ({error}) "
                    f"and its {format_bytes(nbytes)} do not fit the memory budget ({format_bytes(budget)}); set "
                    f"{CACHE_ENV} to a writable folder with room for it"
                ) from error
            log.warning("could not write the image cache %s (%s); decoding into memory instead, so the next load "
                        "decodes again; set %s to a writable folder", cache.npy, error, CACHE_ENV)
            on_disk = False
            return np.empty(shape, dtype=np.uint8)
        log.info("decoding %d images from %s into the cache %s (%s; once, later loads read it)",
                 count, folder.split_dir, cache.npy, format_bytes(nbytes))
        return array

    try:
        pixels, skipped = _decode_images(folder.files, resize, allocate)
    except BaseException:
        cache.abort()
        raise
    if pixels is None:  # nothing decoded: the class check names the first class, whose images all failed
        _check_classes(folder, skipped)
    assert pixels is not None
    if not on_disk:
        return pixels, skipped
    meta = {
        "format": _CACHE_FORMAT,
        "key": key,
        "folder": str(folder.split_dir),
        "files": count,
        "input_size": None if resize is None else list(resize.input_size),
        "crop_pct": None if resize is None else resize.crop_pct,
        "preprocess": None if resize is None else resize.describe(),
        "shape": list(pixels.shape),
        "skipped": [
            {"row": row, "file": folder.relative(row), "error": error} for row, error in sorted(skipped.items())
        ],
    }
    try:
        cache.commit(pixels, meta)
    except OSError as error:  # e.g. the disk filled up at the very end: keep what was decoded if it fits in memory
        if pixels.nbytes > budget:
            raise DatasetError(
                f"imagefolder: cannot finish the decoded cache {cache.npy} ({error}); set {CACHE_ENV} to a writable "
                "folder with room for it"
            ) from error
        log.warning("could not write the image cache %s (%s); set %s to a writable folder", cache.npy, error, CACHE_ENV)
        return np.array(pixels), skipped
    del pixels  # close the writable map; the result reads the renamed file
    log.info("cached %d decoded images in %s (%s)", count, cache.npy, format_bytes(cache.npy.stat().st_size))
    for legacy in cache.folder.glob(f"imagefolder-{_short_hash(str(folder.split_dir))}-*.pt"):  # format 1 caches
        legacy.unlink(missing_ok=True)
    return MappedImages(cache.npy), skipped


def _image_set(
    folder: _Folder, resize: EvalResize | None, source: MappedImages | np.ndarray, skipped: dict[int, str], budget: int
) -> ImageSet:
    """The split's ImageSet from its decoded rows, without the skipped ones: streamed from ``source`` when it is the
    mapped cache and the kept rows exceed ``budget`` bytes, else in memory."""
    _check_classes(folder, skipped)
    if skipped:
        _warn_skipped(folder.split_dir, [(folder.relative(row), error) for row, error in sorted(skipped.items())],
                      len(folder.files))
    kept = None
    if skipped:
        kept = np.setdiff1d(np.arange(len(folder.files)), np.fromiter(skipped, dtype=np.int64, count=len(skipped)))
    labels = torch.from_numpy(folder.labels if kept is None else folder.labels[kept])
    preprocess = None if resize is None else resize.describe()
    _, _, height, width = source.shape
    nbytes = len(labels) * 3 * height * width
    if isinstance(source, MappedImages) and nbytes > budget:
        if budget:  # budget 0 is a deliberate view (a sample's source), not news
            log.info("%s: %s of decoded images is over the memory budget (%s); streaming them from %s",
                     folder.name, format_bytes(nbytes), format_bytes(budget), source.path)
        rows = None if kept is None else torch.from_numpy(kept)
        return ImageSet(images=None, labels=labels, classes=list(folder.classes), name=folder.name,
                        preprocess=preprocess, store=source, rows=rows)
    array = source.array if isinstance(source, MappedImages) else source
    if kept is not None:
        pixels = array[kept]  # fancy indexing: a new in-memory array of the kept rows
    else:
        pixels = np.array(array) if isinstance(source, MappedImages) else array  # read the whole file once
    return ImageSet(images=torch.from_numpy(pixels), labels=labels, classes=list(folder.classes), name=folder.name,
                    preprocess=preprocess)


def _check_classes(folder: _Folder, skipped: dict[int, str]) -> None:
    """A class none of whose images decode would silently vanish from training: name it."""
    if not skipped:
        return
    counts = np.bincount(folder.labels, minlength=len(folder.classes))
    failed = np.bincount(folder.labels[np.fromiter(skipped, dtype=np.int64, count=len(skipped))],
                         minlength=len(folder.classes))
    for label in np.flatnonzero(failed == counts):
        first = int(np.flatnonzero(folder.labels == label)[0])
        raise DatasetError(
            f"imagefolder: none of the {counts[label]} images in {folder.split_dir / folder.classes[label]} could be "
            f"decoded (e.g. {folder.relative(first)}: {skipped[first]}); replace them or remove the folder"
        )


def _warn_skipped(split_dir: Path, skipped: list[tuple[str, str]], total: int) -> None:
    """One warning for all the undecodable files: how many, the first few by name, and the first error."""
    named = ", ".join(file for file, _ in skipped[:_NAMED_SKIPS])
    more = f" and {len(skipped) - _NAMED_SKIPS} more" if len(skipped) > _NAMED_SKIPS else ""
    log.warning("imagefolder: skipped %d of the %d files in %s that cannot be decoded (%s%s; %s), and their labels; "
                "replace or remove them", len(skipped), total, split_dir, named, more, skipped[0][1])


# ---------------------------------------------------------------- decoding


def _decode_images(
    files: list[Path],
    resize: EvalResize | None,
    allocate: Callable[[tuple[int, int, int, int]], np.ndarray],
) -> tuple[np.ndarray | None, dict[int, str]]:
    """Decode ``files`` into row i of ``allocate((N, 3, H, W))``; returns the rows and ``{i: error}`` for the files
    that could not be decoded (their rows are left as allocated). (None, all) when no file decodes.

    (H, W) is ``resize``'s input size, or without ``resize`` the size of the first file that decodes, which every
    other file must share. The rows are written as they are decoded, so with a memory-mapped ``allocate`` the split
    is never whole in memory.
    """
    skipped: dict[int, str] = {}
    first = None
    for first_index, path in enumerate(files):  # the first decodable file fixes (H, W) when there is no resize
        try:
            first = _decode_one(path, resize)
            break
        except _Undecodable as error:
            skipped[first_index] = str(error)
    if first is None:
        return None, skipped
    height, width = first.shape[:2]
    pixels = allocate((len(files), 3, height, width))
    pixels[first_index] = first.transpose(2, 0, 1)
    reference = files[first_index]

    done = first_index + 1
    lock = threading.Lock()
    report_every = max(1000, len(files) // 10)

    def decode_chunk(start: int, stop: int) -> None:
        nonlocal done
        failed: dict[int, str] = {}
        for index in range(start, stop):
            try:
                image = _decode_one(files[index], resize)
            except _Undecodable as error:
                failed[index] = str(error)
                continue
            if image.shape[:2] != (height, width):
                raise DatasetError(
                    f"imagefolder: {files[index]} is {image.shape[1]}x{image.shape[0]} but {reference} is "
                    f"{width}x{height}; the images differ in size, so give --input-size H[xW] to bring them all to one"
                )
            pixels[index] = image.transpose(2, 0, 1)  # (H, W, 3) -> the row's (3, H, W)
        with lock:
            skipped.update(failed)
            before, done = done, done + (stop - start)
            if done // report_every != before // report_every:
                log.info("decoded %d / %d images", done, len(files))

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        starts = range(first_index + 1, len(files), _CHUNK)
        futures = [pool.submit(decode_chunk, start, min(start + _CHUNK, len(files))) for start in starts]
        try:
            for future in futures:
                future.result()  # re-raises the first error (an odd size)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # do not decode the rest of a folder we reject
            raise
    return pixels, skipped


class _Undecodable(Exception):
    """A file PIL cannot read as an image; its message is the reason."""


def _decode_one(path: Path, resize: EvalResize | None) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of ``path``, brought to ``resize``'s input size when given."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for broken files
        reason = " ".join(f"{type(error).__name__}: {error}".split())  # one line, whatever the decoder said
        raise _Undecodable(reason) from error
    return np.asarray(rgb) if resize is None else preprocess_pil(rgb, resize)
