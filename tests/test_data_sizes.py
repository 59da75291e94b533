"""rslad_edge.data at any input size: the evaluation resize + center crop, for image folders and for CIFAR / shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rslad_edge.data import eval_crop_pct, load_dataset, load_sample, subset
from rslad_edge.data.preprocess import EvalResize, eval_resize, preprocess_pil, preprocess_tensor
from rslad_edge.errors import ConfigError, DatasetError

torch.set_num_threads(1)


def _save(path: Path, pixels: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def _random_image(path: Path, height: int, width: int, seed: int) -> np.ndarray:
    return _save(path, np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def mixed_tree(tmp_path, monkeypatch):
    """Two classes of PNGs of six different sizes, landscape and portrait."""
    monkeypatch.setenv("RSLAD_EDGE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "mixed"
    sizes = [(30, 40), (50, 20), (24, 24), (17, 63), (90, 70), (33, 31)]  # (H, W)
    for index, (height, width) in enumerate(sizes):
        for split in ("train", "test"):
            _random_image(root / split / ("cat" if index % 2 else "dog") / f"{index}.png", height, width, index)
    return root


def test_eval_crop_pct_keeps_the_whole_image_up_to_64_px_and_87_5_percent_above():
    assert eval_crop_pct((32, 32)) == eval_crop_pct((64, 40)) == eval_crop_pct(64) == 1.0
    assert eval_crop_pct((65, 65)) == eval_crop_pct((224, 224)) == eval_crop_pct((32, 96)) == 0.875
    assert EvalResize((224, 224), 0.875).shorter == 256 and EvalResize((96, 96), 0.875).shorter == 110
    assert eval_resize((96, 128)).describe() == {"resize_shorter": 146, "center_crop": [96, 128], "crop_pct": 0.875,
                                                 "interpolation": "bilinear"}


@pytest.mark.parametrize("size", [(0, 32), (32, -1), (32,), (32, 32, 3), "96", (1.5, 2), (True, 8), 0])
def test_a_bad_input_size_is_a_config_error_saying_what_to_give(size):
    with pytest.raises(ConfigError, match=r"input size must be two positive integers .*--input-size H\[xW\]"):
        load_dataset("shapes", None, "test", n_test=10, input_size=size)


def test_a_crop_pct_out_of_range_or_without_a_size_is_a_config_error():
    with pytest.raises(ConfigError, match=r"crop_pct must be in \(0, 1\], got 1.5"):
        load_dataset("shapes", None, "test", n_test=10, input_size=(48, 48), crop_pct=1.5)
    with pytest.raises(ConfigError, match=r"crop_pct 0.9 needs an input size"):
        load_dataset("shapes", None, "test", n_test=10, crop_pct=0.9)


def test_mixed_sizes_load_at_the_input_size_with_the_preprocessing_recorded(mixed_tree):
    data = load_dataset("imagefolder", mixed_tree, "train", input_size=(28, 36))

    assert data.images.shape == (6, 3, 28, 36) and data.images.dtype == torch.uint8 and data.input_size == (28, 36)
    assert data.preprocess == {"resize_shorter": 36, "center_crop": [28, 36], "crop_pct": 1.0,
                               "interpolation": "bilinear"}
    big = load_dataset("imagefolder", mixed_tree, "train", input_size=(80, 80))
    assert big.images.shape == (6, 3, 80, 80) and big.preprocess["crop_pct"] == 0.875
    assert big.preprocess["resize_shorter"] == 91


def test_mixed_sizes_without_an_input_size_name_two_files_and_the_flag(mixed_tree):
    message = r"cat/3\.png is 63x17 but .*cat/1\.png is 20x50; .*give --input-size H\[xW\]"
    with pytest.raises(DatasetError, match=message) as error:
        load_dataset("imagefolder", mixed_tree, "train")
    assert "\n" not in str(error.value)
    assert not list((mixed_tree.parent / "cache").glob("*.tmp"))  # the unfinished cache is gone


def test_the_resize_and_center_crop_match_torchvision_evaluation_transforms(mixed_tree):
    from torchvision import transforms

    data = load_dataset("imagefolder", mixed_tree, "train", input_size=(72, 72))  # crop_pct 0.875: shorter side 82
    reference = transforms.Compose([transforms.Resize(82, interpolation=transforms.InterpolationMode.BILINEAR),
                                    transforms.CenterCrop((72, 72)), transforms.PILToTensor()])
    files = sorted((mixed_tree / "train").glob("*/*.png"), key=lambda path: (path.parent.name, path.name))
    for index, path in enumerate(files):
        with Image.open(path) as image:
            assert torch.equal(data.images[index], reference(image.convert("RGB"))), path


def test_the_center_crop_takes_the_middle_of_a_known_pattern(tmp_path):
    # 100 x 200 (H x W): red left quarter, green middle half, blue right quarter, a white band along the top.
    pixels = np.zeros((100, 200, 3), dtype=np.uint8)
    pixels[:, :50] = (255, 0, 0)
    pixels[:, 50:150] = (0, 255, 0)
    pixels[:, 150:] = (0, 0, 255)
    pixels[:8] = 255
    image = Image.fromarray(pixels)

    # crop_pct 0.8: shorter side 50, so 50 x 100, and the 40 x 40 crop starts at row 5, column 30: original rows
    # 10..90 and columns 60..140, inside the green half and below the white band.
    crop = preprocess_pil(image, EvalResize((40, 40), 0.8))
    assert crop.shape == (40, 40, 3) and (crop == (0, 255, 0)).all()
    # The whole height at crop_pct 1 (shorter side 40, so 40 x 80): the crop keeps the top band and the green only.
    whole = preprocess_pil(image, EvalResize((40, 40), 1.0))
    assert whole[0].min() > 200 and (whole[10:, 5:35] == (0, 255, 0)).all()
    # A portrait image resizes its width to the shorter side: 20 x 10 -> 40 x 20 for (16, 16) at crop_pct 0.8.
    portrait = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 0, 2)))  # 200 x 100, the band on the left
    assert preprocess_pil(portrait, EvalResize((16, 16), 0.8)).shape == (16, 16, 3)
    assert (preprocess_pil(portrait, EvalResize((16, 16), 0.8)) == (0, 255, 0)).all()


def test_tensor_datasets_are_resized_by_the_same_rule_and_32_px_is_left_alone():
    native = load_dataset("shapes", None, "test", n_test=20)
    same = load_dataset("shapes", None, "test", n_test=20, input_size=(32, 32))
    assert torch.equal(same.images, native.images) and same.preprocess is None and native.preprocess is None

    larger = load_dataset("shapes", None, "test", n_test=20, input_size=(80, 80))  # 32 -> 91 -> center 80
    assert larger.images.shape == (20, 3, 80, 80) and larger.preprocess["resize_shorter"] == 91
    expected = F.interpolate(native.images.float(), size=(91, 91), mode="bilinear", align_corners=False,
                             antialias=True)[:, :, 6:86, 6:86].round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(larger.images, expected)
    assert torch.equal(larger.labels, native.labels)

    whole = load_dataset("shapes", None, "test", n_test=20, input_size=(48, 48))  # crop_pct 1: the whole image
    assert torch.equal(whole.images, preprocess_tensor(native.images, EvalResize((48, 48), 1.0)))
    assert preprocess_tensor(native.images, EvalResize((48, 48), 1.0), chunk=3).equal(whole.images)  # chunking


def test_load_sample_of_a_resized_tensor_set_equals_the_subset_of_the_resized_split():
    full = load_dataset("shapes", None, "test", input_size=(72, 72))
    sample = load_sample("shapes", None, "test", 37, seed=4, input_size=(72, 72))
    expected = subset(full, 37, seed=4)
    assert torch.equal(sample.images, expected.images) and torch.equal(sample.labels, expected.labels)
    assert sample.preprocess == full.preprocess
