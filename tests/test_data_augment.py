"""rslad_edge.data augmentation recipes: pad-crop-flip (unchanged) up to 64 px, RandomResizedCrop + flip above."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rslad_edge.data import AUGMENT_RECIPES, ImageSet, augment_batch, augment_recipe, batches, to_float
from rslad_edge.data import augment as augment_module
from rslad_edge.data.augment import rrc_boxes
from rslad_edge.errors import ConfigError

torch.set_num_threads(1)


def _pad_crop_flip_reference(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The pad-crop-flip that CIFAR training has always used, spelled out per image: the recipe must not drift."""
    batch, _, height, width = images.shape
    offset_y = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    offset_x = torch.randint(0, 2 * pad + 1, (batch,), generator=generator)
    flip = torch.rand(batch, generator=generator) < 0.5
    padded = F.pad(images, (pad, pad, pad, pad))
    out = torch.stack([padded[i, :, offset_y[i] : offset_y[i] + height, offset_x[i] : offset_x[i] + width]
                       for i in range(batch)])
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def test_recipes_by_input_size():
    assert AUGMENT_RECIPES == ("pad-crop-flip", "rrc-flip")
    assert augment_recipe((32, 32)) == augment_recipe((64, 48)) == "pad-crop-flip"
    assert augment_recipe((65, 65)) == augment_recipe((224, 224)) == augment_recipe((32, 96)) == "rrc-flip"
    with pytest.raises(ConfigError, match=r"unknown augmentation recipe 'rrc-flips'.*Did you mean 'rrc-flip'"):
        augment_batch(torch.zeros(1, 3, 8, 8), recipe="rrc-flips")


@pytest.mark.parametrize("seed", [0, 7])
def test_pad_crop_flip_is_unchanged_bit_for_bit(seed):
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    expected = _pad_crop_flip_reference(images, torch.Generator().manual_seed(seed))
    assert torch.equal(augment_batch(images, torch.Generator().manual_seed(seed)), expected)
    assert torch.equal(augment_batch(images, torch.Generator().manual_seed(seed), recipe="pad-crop-flip"), expected)


def test_batches_of_a_32_px_set_pick_pad_crop_flip_and_keep_their_old_order_and_crops():
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    data = ImageSet(images=images, labels=torch.arange(50) % 10, classes=[str(i) for i in range(10)], name="t")
    generator, reference = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    order = torch.randperm(50, generator=reference)
    for start, (x, y) in zip(range(0, 50, 16), batches(data, 16, shuffle=True, augment=True, device="cpu",
                                                       generator=generator), strict=True):
        index = order[start : start + 16]
        assert torch.equal(x, to_float(_pad_crop_flip_reference(images[index], reference)))
        assert torch.equal(y, data.labels[index])


def test_rrc_flip_keeps_shape_dtype_and_range_and_is_reproducible_from_the_generator():
    images = torch.randint(0, 256, (32, 3, 72, 88), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment_batch(images, torch.Generator().manual_seed(1), recipe="rrc-flip")
    again = augment_batch(images, torch.Generator().manual_seed(1), recipe="rrc-flip")
    other = augment_batch(images, torch.Generator().manual_seed(2), recipe="rrc-flip")

    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, again) and not torch.equal(out, other)
    floats = augment_batch(to_float(images), torch.Generator().manual_seed(1), recipe="rrc-flip")
    assert floats.dtype == torch.float32 and 0.0 <= floats.min() and floats.max() <= 1.0
    assert (floats * 255 - out.float()).abs().max() <= 0.5 + 1e-3  # the uint8 result is the float one, rounded


def test_rrc_flip_varies_the_crops_and_boxes_stay_inside_the_image():
    top, left, box_height, box_width, flip = rrc_boxes(4000, 96, 128, torch.Generator().manual_seed(0))
    assert (box_height >= 1).all() and (box_width >= 1).all()
    assert (top >= 0).all() and (left >= 0).all() and (top + box_height <= 96).all() and (left + box_width <= 128).all()
    scale = box_height * box_width / (96 * 128)
    assert 0.06 < scale.min() < 0.1 and scale.max() > 0.95 and 0.4 < scale.mean() < 0.6
    assert 0.45 < flip.double().mean() < 0.55
    assert len(set(zip(top.tolist(), left.tolist(), box_height.tolist(), strict=True))) > 2000

    one = torch.randint(0, 256, (1, 3, 80, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    out = augment_batch(one.expand(16, -1, -1, -1), torch.Generator().manual_seed(0), recipe="rrc-flip")
    assert len({tuple(image.flatten().tolist()) for image in out}) == 16  # one image, sixteen different crops


def test_rrc_flip_is_the_box_cropped_and_resized_then_flipped():
    images = torch.randint(0, 256, (12, 3, 70, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    out = augment_batch(images, torch.Generator().manual_seed(9), recipe="rrc-flip")
    top, left, box_height, box_width, flip = rrc_boxes(12, 70, 90, torch.Generator().manual_seed(9))
    for i in range(12):
        y0, x0, h, w = (int(v) for v in (top[i], left[i], box_height[i], box_width[i]))
        crop = images[i : i + 1, :, y0 : y0 + h, x0 : x0 + w].float()
        expected = F.interpolate(crop, size=(70, 90), mode="bilinear", align_corners=False)[0]
        expected = expected.flip(-1) if flip[i] else expected
        assert (out[i].float() - expected).abs().max() <= 1.0, i  # float32 grid vs interpolate rounding


def test_rrc_flip_with_the_whole_image_as_the_box_is_the_image_or_its_mirror(monkeypatch):
    monkeypatch.setattr(augment_module, "RRC_SCALE", (1.0, 1.0))
    monkeypatch.setattr(augment_module, "RRC_RATIO", (80 / 96, 80 / 96))
    images = torch.randint(0, 256, (16, 3, 96, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment_batch(images, torch.Generator().manual_seed(1), recipe="rrc-flip")
    flipped = [torch.equal(out[i], images[i].flip(-1)) for i in range(16)]
    assert all(flipped[i] or torch.equal(out[i], images[i]) for i in range(16)) and 0 < sum(flipped) < 16


def test_batches_pick_rrc_flip_above_64_px_unless_told_otherwise():
    images = torch.randint(0, 256, (8, 3, 72, 72), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = ImageSet(images=images, labels=torch.zeros(8, dtype=torch.int64), classes=["a"], name="t")

    def one_batch(recipe: str | None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return next(batches(data, 8, shuffle=False, augment=True, device="cpu", generator=generator, recipe=recipe))[0]

    expected = to_float(augment_batch(images, torch.Generator().manual_seed(0), recipe="rrc-flip"))
    assert torch.equal(one_batch(None), expected) and torch.equal(one_batch("rrc-flip"), expected)
    assert torch.equal(one_batch("pad-crop-flip"), to_float(augment_batch(images, torch.Generator().manual_seed(0))))
