"""rslad_edge.data beyond memory: the decoded .npy cache, streamed sets, samples that decode only themselves, and
files that do not decode."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rslad_edge.data import (
    batches,
    default_memory_budget,
    hold_out,
    imagefolder,
    load_dataset,
    load_sample,
    subset,
    to_float,
)
from rslad_edge.errors import ConfigError, DatasetError

torch.set_num_threads(1)

SIZE = (40, 40)  # the input size most tests load at: 40 * 40 * 3 = 4,800 bytes an image


def _write_tree(root: Path, per_class: int = 12, seed: int = 0) -> None:
    """Three classes of PNGs of random sizes, in train/ and test/."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for class_name in ("ant", "bee", "cow"):
            folder = root / split / class_name
            folder.mkdir(parents=True)
            for index in range(per_class):
                height, width = rng.integers(20, 70, 2)
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index:02d}.png")


@pytest.fixture
def tree(tmp_path, monkeypatch):
    monkeypatch.setenv("RSLAD_EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RSLAD_EDGE_MEMORY_BUDGET", raising=False)
    root = tmp_path / "tree"
    _write_tree(root)
    return root


@pytest.fixture
def decodes(monkeypatch):
    """The files decoded so far (every call of the one-file decoder)."""
    seen: list[Path] = []
    decode_one = imagefolder._decode_one

    def counting(path, resize):
        seen.append(path)
        return decode_one(path, resize)

    monkeypatch.setattr(imagefolder, "_decode_one", counting)
    return seen


def _cache(root: Path) -> Path:
    return root.parent / "cache"


def _load(root: Path, budget: int | None, split: str = "train", size=SIZE):
    return load_dataset("imagefolder", root, split, input_size=size, memory_budget=budget)


def _equal(a, b) -> bool:
    return torch.equal(a.read(), b.read()) and torch.equal(a.labels, b.labels)


# ---------------------------------------------------------------- the memory budget


def test_a_split_over_the_budget_streams_and_one_within_it_is_in_memory(tree):
    split_bytes = 36 * 3 * SIZE[0] * SIZE[1]
    within, exact, over = _load(tree, 10**9), _load(tree, split_bytes), _load(tree, split_bytes - 1)

    assert not within.streamed and not exact.streamed and over.streamed
    assert over.nbytes == split_bytes and len(over) == 36 and over.input_size == SIZE
    assert over.preprocess == within.preprocess == {"resize_shorter": 40, "center_crop": [40, 40], "crop_pct": 1.0,
                                                    "interpolation": "bilinear"}
    assert _equal(over, within) and torch.equal(within.images, within.read())
    index = torch.tensor([35, 0, 7, 7, 12])
    assert torch.equal(over.read(index), within.images[index])
    x, y = over.take(index, "cpu")
    assert torch.equal(x, within.images[index]) and torch.equal(y, within.labels[index])
    with pytest.raises(ValueError, match=r"streamed from .*\.npy .*use take\(index, device\)"):
        over.to_device("cpu")
    with pytest.raises(ValueError, match=r"streamed from .*\.npy .*use read\(index\) or take\(index, device\)"):
        _ = over.images


def test_the_default_budget_is_a_quarter_of_memory_unless_the_environment_says_otherwise(monkeypatch):
    monkeypatch.delenv("RSLAD_EDGE_MEMORY_BUDGET", raising=False)
    assert default_memory_budget() == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    for text, expected in [("8G", 8 * 2**30), ("8GiB", 8 * 2**30), ("512m", 512 * 2**20), ("1.5K", 1536),
                           ("123456", 123456), ("0", 0)]:
        monkeypatch.setenv("RSLAD_EDGE_MEMORY_BUDGET", text)
        assert default_memory_budget() == expected, text
    monkeypatch.setenv("RSLAD_EDGE_MEMORY_BUDGET", "lots")
    with pytest.raises(ConfigError, match=r"RSLAD_EDGE_MEMORY_BUDGET='lots' is not a size.*8G"):
        default_memory_budget()


def test_the_environment_budget_applies_when_none_is_given(tree, monkeypatch):
    monkeypatch.setenv("RSLAD_EDGE_MEMORY_BUDGET", "0")
    assert _load(tree, None).streamed
    monkeypatch.setenv("RSLAD_EDGE_MEMORY_BUDGET", "1G")
    assert not _load(tree, None).streamed


def test_a_tensor_dataset_resized_over_the_budget_streams_from_a_resized_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RSLAD_EDGE_CACHE", str(tmp_path / "cache"))
    in_memory = load_dataset("shapes", None, "test", n_test=30, input_size=(72, 72))
    streamed = load_dataset("shapes", None, "test", n_test=30, input_size=(72, 72), memory_budget=1000)
    assert streamed.streamed and not in_memory.streamed and _equal(streamed, in_memory)
    assert streamed.preprocess == in_memory.preprocess
    again = load_dataset("shapes", None, "test", n_test=30, input_size=(72, 72), memory_budget=1000)
    assert again.store.path == streamed.store.path and _equal(again, in_memory)
    assert len(list((tmp_path / "cache").glob("resized-*.npy"))) == 1


# ---------------------------------------------------------------- streamed and in-memory sets agree


@pytest.mark.parametrize("size", [(32, 32), (72, 72)])  # pad-crop-flip and rrc-flip
def test_streamed_and_in_memory_copies_give_identical_batches(tree, size):
    in_memory, streamed = _load(tree, 10**9, size=size), _load(tree, 0, size=size)
    assert streamed.streamed and not in_memory.streamed

    def epoch(data):
        generator = torch.Generator().manual_seed(11)
        return list(batches(data, 8, shuffle=True, augment=True, device="cpu", generator=generator))

    expected, got = epoch(in_memory), epoch(streamed)
    assert len(expected) == len(got) == 5
    for (x1, y1), (x2, y2) in zip(expected, got, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(expected[0][0], to_float(in_memory.images[:8]))  # shuffled and augmented


def test_subset_and_hold_out_of_a_streamed_set_are_streamed_views_equal_to_the_in_memory_ones(tree):
    in_memory, streamed = _load(tree, 10**9), _load(tree, 0)

    part, expected = subset(streamed, 10, seed=3), subset(in_memory, 10, seed=3)
    assert part.streamed and part.store is streamed.store and _equal(part, expected)
    rest, held, indices = hold_out(part, 4, seed=1)
    rest_expected, held_expected, indices_expected = hold_out(expected, 4, seed=1)
    assert rest.streamed and held.streamed and torch.equal(indices, indices_expected)
    assert _equal(rest, rest_expected) and _equal(held, held_expected)
    assert held.name.endswith("(held out)") and len(rest) == 6
    inner = subset(rest, 3, seed=0)  # views of views compose
    assert inner.streamed and _equal(inner, subset(rest_expected, 3, seed=0))


def test_a_streamed_set_pickles_as_its_file_not_its_pixels(tree):
    streamed = _load(tree, 0)
    payload = pickle.dumps(subset(streamed, 30, seed=0))
    assert len(payload) < streamed.nbytes // 4
    assert _equal(pickle.loads(payload), subset(streamed, 30, seed=0))


# ---------------------------------------------------------------- the cache


def test_the_cache_is_reused_and_redone_when_a_file_or_the_input_size_changes(tree, decodes):
    first = _load(tree, 10**9)
    assert len(decodes) == 36
    sidecar = json.loads(next(_cache(tree).glob("imagefolder-*.json")).read_text())
    assert sidecar["input_size"] == [40, 40] and sidecar["crop_pct"] == 1.0 and sidecar["skipped"] == []
    assert sidecar["shape"] == [36, 3, 40, 40] and sidecar["folder"] == str((tree / "train").resolve())

    assert _equal(_load(tree, 10**9), first) and _equal(_load(tree, 0), first) and len(decodes) == 36  # cached

    other_size = _load(tree, 10**9, size=(48, 40))
    assert other_size.input_size == (48, 40) and len(decodes) == 72
    assert len(list(_cache(tree).glob("*.npy"))) == 2  # each size keeps its cache
    _load(tree, 10**9)
    assert len(decodes) == 72

    path = tree / "train" / "bee" / "03.png"
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(path)  # rewritten: new size and mtime
    changed = _load(tree, 10**9)
    assert len(decodes) == 108 and not _equal(changed, first)
    assert len(list(_cache(tree).glob("*.npy"))) == 2 and len(list(_cache(tree).glob("*.json"))) == 2  # replaced
    assert not list(_cache(tree).glob("*.tmp"))


def test_decoding_writes_rows_straight_into_the_memory_mapped_cache_and_logs_where(tree, monkeypatch, caplog):
    targets = []
    decode = imagefolder._decode_images

    def recording(files, resize, allocate):
        pixels, skipped = decode(files, resize, allocate)
        targets.append(pixels)
        return pixels, skipped

    monkeypatch.setattr(imagefolder, "_decode_images", recording)
    with caplog.at_level(logging.INFO, logger="rslad_edge.data"):
        _load(tree, 10**9)
    assert isinstance(targets[0], np.memmap) and targets[0].filename.endswith(".tmp")  # renamed when complete
    npy = next(_cache(tree).glob("*.npy"))
    assert f"into the cache {npy}" in caplog.text and f"cached 36 decoded images in {npy} (168.9 KiB)" in caplog.text


def test_an_unwritable_cache_decodes_into_memory_when_it_fits_and_names_the_variable_when_not(
    tree, monkeypatch, caplog
):
    blocker = tree.parent / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("RSLAD_EDGE_CACHE", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING):
        data = _load(tree, 10**9)
    assert not data.streamed and len(data) == 36 and "set RSLAD_EDGE_CACHE to a writable folder" in caplog.text
    with pytest.raises(DatasetError, match=r"cannot write the decoded cache .* set RSLAD_EDGE_CACHE to a writable"):
        _load(tree, 1000)


def test_an_old_format_cache_of_the_folder_is_removed(tree):
    _cache(tree).mkdir()
    legacy = _cache(tree) / f"imagefolder-{imagefolder._short_hash(str((tree / 'train').resolve()))}-0123abcd.pt"
    legacy.write_bytes(b"old")
    _load(tree, 10**9)
    assert not legacy.exists()


# ---------------------------------------------------------------- samples


def test_load_sample_equals_the_subset_of_the_full_load_and_decodes_only_the_sample(tree, decodes):
    sample = load_sample("imagefolder", tree, "test", 7, seed=5, input_size=SIZE)
    assert len(decodes) == 7 and not sample.streamed  # no cache yet: only the sampled files
    assert not list(_cache(tree).glob("*.npy"))  # and none is written

    expected = subset(_load(tree, 10**9, split="test"), 7, seed=5)
    assert len(decodes) == 7 + 36
    assert torch.equal(sample.images, expected.images) and torch.equal(sample.labels, expected.labels)
    assert sample.classes == expected.classes and sample.name == expected.name
    assert sample.preprocess == expected.preprocess

    cached = load_sample("imagefolder", tree, "test", 7, seed=5, input_size=SIZE)  # reads 7 rows of the cache
    assert len(decodes) == 43 and not cached.streamed
    assert torch.equal(cached.images, expected.images) and torch.equal(cached.labels, expected.labels)

    whole = load_sample("imagefolder", tree, "test", None, seed=5, input_size=SIZE)
    assert len(whole) == 36 and _equal(whole, _load(tree, 10**9, split="test"))


def test_load_sample_does_not_touch_broken_files_outside_the_sample(tree, decodes, caplog):
    index = np.random.default_rng(2).permutation(36)[:5]
    files = sorted((tree / "train").glob("*/*.png"), key=lambda path: (path.parent.name, path.name))
    for position in set(range(36)) - set(index.tolist()):
        files[position].write_bytes(b"broken")  # every file outside the sample
    with caplog.at_level(logging.WARNING):
        sample = load_sample("imagefolder", tree, "train", 5, seed=2, input_size=SIZE)
    assert len(sample) == 5 and sorted(decodes) == sorted(files[i] for i in index)
    assert "skipped" not in caplog.text


# ---------------------------------------------------------------- files that do not decode


def test_an_undecodable_file_is_skipped_with_one_warning_and_its_label_and_the_cache_remembers(
    tree, decodes, caplog
):
    (tree / "train" / "bee" / "05.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (tree / "train" / "cow" / "zz.jpg").write_bytes(b"")

    with caplog.at_level(logging.WARNING):
        data = _load(tree, 10**9)
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "skipped 2 of the 37 files" in warnings[0].getMessage()
    assert "bee/05.png" in warnings[0].getMessage() and "cow/zz.jpg" in warnings[0].getMessage()
    assert len(data) == 35 and data.labels.bincount().tolist() == [12, 11, 12]
    sidecar = json.loads(next(_cache(tree).glob("*.json")).read_text())
    assert [entry["file"] for entry in sidecar["skipped"]] == ["bee/05.png", "cow/zz.jpg"]

    caplog.clear()
    decoded = len(decodes)
    with caplog.at_level(logging.WARNING):
        streamed = _load(tree, 0)  # from the cache: the same warning, the same images, no decoding
    assert len(decodes) == decoded and "skipped 2 of the 37 files" in caplog.text
    assert streamed.streamed and _equal(streamed, data)
    assert _equal(subset(streamed, 9, seed=1), subset(data, 9, seed=1))


def test_a_class_whose_images_all_fail_to_decode_is_named(tree, decodes):
    for path in (tree / "train" / "bee").iterdir():
        path.write_bytes(b"not an image")
    message = r"none of the 12 images in .*train/bee could be decoded \(e\.g\. bee/00\.png: .*remove the folder"
    with pytest.raises(DatasetError, match=message):
        _load(tree, 10**9)
    with pytest.raises(DatasetError, match=message):
        _load(tree, 10**9)  # the cache remembers, and says the same without decoding again
    assert len(decodes) == 36


def test_every_image_failing_names_the_first_class_and_an_empty_class_folder_is_named(tree):
    for path in (tree / "test").glob("*/*.png"):
        path.write_bytes(b"")
    with pytest.raises(DatasetError, match=r"none of the 12 images in .*test/ant could be decoded"):
        _load(tree, 10**9, split="test")
    for path in (tree / "train" / "cow").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match=r"train/cow holds no images .*remove the folder or add images"):
        _load(tree, 10**9)
