"""rslad_edge.data: loaders (cifar pickles, imagefolder + cache, shapes), augmentation, batching, subsets."""

from __future__ import annotations

import logging
import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from rslad_edge.data import (
    DATASET_NAMES,
    ImageSet,
    augment_batch,
    batches,
    hold_out,
    imagefolder,
    load_dataset,
    subset,
    to_float,
)
from rslad_edge.errors import ConfigError, DatasetError

torch.set_num_threads(1)


# ---------------------------------------------------------------- cifar (torchvision's python pickle format)


def _write_pickle(path: Path, obj: object, protocol: int) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _fake_cifar10(root: Path, per_batch: int = 20) -> dict[str, np.ndarray]:
    """Five train batches and a test batch in torchvision's layout; returns what was written, for comparison."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for index, file in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch)
        written[file] = (data, labels)
        if index % 2:  # Python 3 style: str keys, newest protocol (arrays via _frombuffer)
            _write_pickle(folder / file, {"data": data, "labels": labels.tolist(), "batch_label": file}, 5)
        else:  # bytes keys at protocol 2, as in files read with encoding="bytes" (bytes via _codecs.encode)
            _write_pickle(folder / file, {b"data": data, b"labels": labels.tolist(), b"batch_label": b"x"}, 2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _write_pickle(folder / "batches.meta", {"label_names": names, "num_vis": 3072}, 2)
    return written


def test_cifar10_loads_from_a_fake_copy_in_torchvision_pickle_format(tmp_path):
    written = _fake_cifar10(tmp_path)
    train = load_dataset("cifar10", tmp_path, "train", download=False)
    test = load_dataset("cifar10", tmp_path, "test", download=False)

    assert train.images.shape == (100, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (20, 3, 32, 32)
    assert train.classes[0] == "airplane" and train.num_classes == 10 and train.input_size == (32, 32)
    expected_train_labels = np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert train.labels.dtype == torch.int64
    assert np.array_equal(train.labels.numpy(), expected_train_labels)
    # Each 3072-byte row is the red plane, then green, then blue, row-major: (3, 32, 32).
    data, labels = written["test_batch"]
    assert np.array_equal(test.images[7].numpy(), data[7].reshape(3, 32, 32))
    assert np.array_equal(test.labels.numpy(), labels)


def test_cifar100_uses_fine_labels_and_fine_label_names(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(4 * 3072, dtype=np.int64).astype(np.uint8).reshape(4, 3072)
    _write_pickle(folder / "test", {"data": data, "fine_labels": [99, 0, 5, 7], "coarse_labels": [1, 2, 3, 4]}, 4)
    names = [f"class_{i:02d}" for i in range(100)]
    _write_pickle(folder / "meta", {"fine_label_names": names, "coarse_label_names": names[:20]}, 4)

    test = load_dataset("cifar100", tmp_path, "test", download=False)

    assert test.num_classes == 100 and test.classes[99] == "class_99"
    assert test.labels.tolist() == [99, 0, 5, 7]


def test_cifar_pickle_naming_a_forbidden_global_is_refused_without_running_it(tmp_path):
    _fake_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    _write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {"data": Exploit(), "labels": []}, 2)

    with pytest.raises(DatasetError, match=r"refusing to load .*test_batch.*system' is not allowed"):
        load_dataset("cifar10", tmp_path, "test", download=False)
    assert not marker.exists()


def test_cifar10_missing_without_download_names_the_expected_folder(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar-10-batches-py lacks data_batch_1.*download is off"):
        load_dataset("cifar10", tmp_path / "nowhere", "train", download=False)


def test_cifar10_failed_download_is_a_dataset_error_saying_how_to_get_it(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(DatasetError, match=r"download failed .*no route to host.*torchvision.datasets.CIFAR10"):
        load_dataset("cifar10", tmp_path, "test", download=True)


# ---------------------------------------------------------------- imagefolder and its cache


def _write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> np.ndarray:
    """A solid-colour image with one distinct pixel; returns the (H, W, 3) pixels written."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8) + np.array(color, dtype=np.uint8)
    pixels[0, 0] = (255, 255, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture
def image_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("RSLAD_EDGE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "tree"
    # Written out of order: classes and files must still come back sorted by name.
    written = {
        "zebra/b.png": _write_image(root / "train/zebra/b.png", (10, 20, 30)),
        "zebra/a.jpg": _write_image(root / "train/zebra/a.jpg", (200, 100, 50)),
        "apple/c.png": _write_image(root / "train/apple/c.png", (0, 128, 255)),
        "apple/notes.txt": None,
    }
    (root / "train/apple/notes.txt").write_text("not an image")
    for class_name in ("apple", "zebra"):
        (root / "test" / class_name).mkdir(parents=True)
        _write_image(root / "test" / class_name / "x.png", (1, 2, 3))
    return root, written


def test_imagefolder_sorts_classes_and_files_and_labels_them(image_tree):
    root, written = image_tree
    train = load_dataset("imagefolder", root, "train")

    assert train.classes == ["apple", "zebra"]
    assert train.labels.tolist() == [0, 1, 1]  # apple/c.png, zebra/a.jpg, zebra/b.png
    assert train.images.shape == (3, 3, 6, 8) and train.input_size == (6, 8)
    assert np.array_equal(train.images[0].permute(1, 2, 0).numpy(), written["apple/c.png"])  # PNG is lossless
    assert np.array_equal(train.images[2].permute(1, 2, 0).numpy(), written["zebra/b.png"])
    jpeg_error = np.abs(train.images[1].permute(1, 2, 0).numpy().astype(int) - written["zebra/a.jpg"].astype(int))
    assert np.median(jpeg_error) <= 3


def test_imagefolder_second_load_comes_from_the_cache_and_a_new_file_invalidates_it(image_tree, monkeypatch):
    root, _ = image_tree
    first = load_dataset("imagefolder", root, "train")
    decode = imagefolder._decode_images

    def must_not_decode(*args):
        raise AssertionError("decoded although the cache is current")

    monkeypatch.setattr(imagefolder, "_decode_images", must_not_decode)
    second = load_dataset("imagefolder", root, "train")
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)

    _write_image(root / "train/apple/d.png", (9, 9, 9))
    calls = []
    monkeypatch.setattr(imagefolder, "_decode_images", lambda files, *rest: calls.append(files) or decode(files, *rest))
    third = load_dataset("imagefolder", root, "train")
    assert len(calls) == 1 and len(third) == 4 and third.labels.tolist() == [0, 0, 1, 1]
    cache = root.parent / "cache"
    assert len(list(cache.glob("imagefolder-*.npy"))) == len(list(cache.glob("imagefolder-*.json"))) == 1  # replaced


def test_imagefolder_rejects_an_image_of_a_different_size_naming_it(image_tree):
    root, _ = image_tree
    _write_image(root / "train/zebra/odd.png", (5, 5, 5), size=(9, 6))
    with pytest.raises(DatasetError, match=r"odd\.png is 9x6 but .* is 8x6"):
        load_dataset("imagefolder", root, "train")


def test_imagefolder_missing_split_folder_is_a_dataset_error_naming_it(tmp_path):
    with pytest.raises(DatasetError, match=r"nothing/test is not a folder"):
        load_dataset("imagefolder", tmp_path / "nothing", "test")


def test_unknown_dataset_name_is_a_config_error_listing_the_known_names():
    with pytest.raises(ConfigError, match=r"unknown dataset 'mnist'; known datasets: cifar10, cifar100, imagefolder"):
        load_dataset("mnist", None)
    assert set(DATASET_NAMES) == {"cifar10", "cifar100", "imagefolder", "shapes"}


# ---------------------------------------------------------------- shapes


def test_shapes_is_deterministic_per_seed_balanced_and_differs_across_seeds_and_splits():
    first = load_dataset("shapes", None, "train", seed=3, n_train=600)
    again = load_dataset("shapes", "ignored/root", "train", seed=3, n_train=600)
    other_seed = load_dataset("shapes", None, "train", seed=4, n_train=600)
    test = load_dataset("shapes", None, "test", seed=3, n_test=600)

    assert first.images.shape == (600, 3, 32, 32) and first.num_classes == 10
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.images, other_seed.images)
    assert not torch.equal(first.images, test.images)
    assert first.labels.bincount(minlength=10).tolist() == [60] * 10
    assert len(load_dataset("shapes", None, "test")) == 1000 and len(load_dataset("shapes", None, "train")) == 5000


def test_shapes_is_learnable_by_a_tiny_cnn_in_seconds():
    train = load_dataset("shapes", None, "train", seed=0, n_train=2000)
    test = load_dataset("shapes", None, "test", seed=0, n_test=500)
    torch.manual_seed(0)

    def block(channels_in: int, channels_out: int) -> list[nn.Module]:
        return [
            nn.Conv2d(channels_in, channels_out, 3, padding=1),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    model = nn.Sequential(
        *block(3, 8), *block(8, 16), *block(16, 32), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(32, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        for x, y in batches(train, 32, shuffle=True, augment=False, device="cpu", generator=generator):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        test_acc = (model(to_float(test.images)).argmax(1) == test.labels).float().mean().item()
    assert test_acc > 0.6  # chance is 0.1


# ---------------------------------------------------------------- augmentation, batching, subsets


def test_augment_batch_is_a_padded_crop_plus_optional_flip_of_each_image():
    images = torch.randint(1, 256, (16, 3, 32, 32), dtype=torch.uint8)  # no zeros: padding is recognisable
    out = augment_batch(images, torch.Generator().manual_seed(0), pad=4)

    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)
    padded = F.pad(images, (4, 4, 4, 4))
    for index in range(len(images)):
        candidates = [
            view[:, top : top + 32, left : left + 32]
            for view in (padded[index], padded[index].flip(-1))
            for top in range(9)
            for left in range(9)
        ]
        assert any(torch.equal(out[index], candidate) for candidate in candidates)


def test_augment_batch_keeps_float_range_and_flip_only_without_padding():
    images = torch.rand(64, 3, 8, 8)
    out = augment_batch(images, torch.Generator().manual_seed(1), pad=0)

    assert out.dtype == torch.float32 and 0.0 <= out.min() and out.max() <= 1.0
    flipped = [torch.equal(out[i], images[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], images[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54  # about half


def _indexed_set(count: int) -> ImageSet:
    """Image i carries its own index in pixel (0, 0, 0), so a batch tells which images it holds."""
    images = torch.zeros(count, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(count, dtype=torch.uint8)
    images[:, 1] = 255
    return ImageSet(images=images, labels=torch.arange(count) % 3, classes=["a", "b", "c"], name="indexed")


def test_batches_yield_float_unit_range_and_cover_every_image_once_per_epoch():
    data = _indexed_set(103)
    generator = torch.Generator().manual_seed(0)
    seen = []
    for x, y in batches(data, 10, shuffle=True, augment=False, device="cpu", generator=generator):
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 4, 4)
        assert x.min() >= 0.0 and x.max() == 1.0
        index = (x[:, 0, 0, 0] * 255).round().long()
        assert torch.equal(y, index % 3)  # labels travel with their images
        seen.append(index)
    order = torch.cat(seen)
    assert sorted(order.tolist()) == list(range(103))
    assert order.tolist() != list(range(103))  # shuffled

    dropped = list(batches(data, 10, shuffle=False, augment=True, device="cpu", generator=generator, drop_last=True))
    assert len(dropped) == 10 and all(len(y) == 10 for _, y in dropped)


def test_device_copy_is_made_once_and_reused():
    data = _indexed_set(8)
    images, labels = data.to_device("meta")
    assert images.device.type == "meta"
    assert data.to_device("meta")[0] is images and data.to_device("cpu")[0] is data.images


def test_subset_is_a_fixed_seeded_sample_not_a_prefix(caplog):
    data = _indexed_set(200)
    first, again, other = subset(data, 50, seed=0), subset(data, 50, seed=0), subset(data, 50, seed=1)

    assert len(first) == 50 and torch.equal(first.images, again.images)
    assert not torch.equal(first.images, other.images)
    expected = np.random.default_rng(0).permutation(200)[:50]
    assert first.images[:, 0, 0, 0].tolist() == expected.tolist()
    assert torch.equal(first.labels, torch.from_numpy(expected) % 3)
    with caplog.at_level(logging.WARNING):
        assert subset(data, 500, seed=0) is data
    assert "only 200" in caplog.text


def test_hold_out_splits_into_disjoint_parts_that_cover_the_set_the_same_way_for_the_same_seed():
    data = _indexed_set(200)
    rest, held_out, indices = hold_out(data, 30, seed=0)

    rest_ids, held_ids = set(rest.images[:, 0, 0, 0].tolist()), set(held_out.images[:, 0, 0, 0].tolist())
    assert len(held_out) == 30 and len(rest) == 170
    assert not rest_ids & held_ids and rest_ids | held_ids == set(range(200))
    assert held_out.images[:, 0, 0, 0].tolist() == indices.tolist() == np.random.default_rng(0).permutation(200)[
        :30].tolist()
    assert rest.images[:, 0, 0, 0].tolist() == sorted(rest_ids)  # the rest keep their order
    assert torch.equal(hold_out(data, 30, seed=0).indices, indices)
    assert not torch.equal(hold_out(data, 30, seed=1).indices, indices)
    with pytest.raises(ConfigError, match="cannot hold out 200"):
        hold_out(data, 200, seed=0)
