"""Batched augmentation and the batch iterator, both on the training device.

Per-sample PIL transforms in DataLoader workers were the bottleneck of CIFAR training long before the GPU was;
airbench showed that crop + flip of a whole uint8 batch on the device is practically free. So augmentation here is
a few tensor ops on a (B, C, H, W) batch, and iteration is slicing a tensor that already lives on the device (or, for
a streamed set, reading the batch's rows from disk).

Two recipes, chosen by the input size (:func:`augment_recipe`): CIFAR-sized inputs get the pad-4 random crop + flip
they are always trained with; larger ones get ImageNet's RandomResizedCrop + flip, since a few pixels of shift mean
nothing at 224 px and the scale jitter of RandomResizedCrop is what those models are trained with.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from rslad_edge.data.imageset import ImageSet, to_float
from rslad_edge.data.preprocess import SMALL_IMAGE_MAX, check_input_size
from rslad_edge.errors import unknown_name_error

AUGMENT_RECIPES = ("pad-crop-flip", "rrc-flip")
RRC_SCALE = (0.08, 1.0)  # fraction of the image's area a RandomResizedCrop box covers (torchvision's default)
RRC_RATIO = (3 / 4, 4 / 3)  # its aspect ratio (width / height), drawn log-uniformly


def augment_recipe(input_size: int | Sequence[int]) -> str:
    """The augmentation for an input size: ``pad-crop-flip`` up to 64 px (CIFAR-sized), ``rrc-flip`` above."""
    height, width = check_input_size(input_size)
    return "pad-crop-flip" if max(height, width) <= SMALL_IMAGE_MAX else "rrc-flip"


def _check_recipe(recipe: str) -> str:
    if recipe not in AUGMENT_RECIPES:
        raise unknown_name_error("augmentation recipe", str(recipe), AUGMENT_RECIPES)
    return recipe


def augment_batch(
    images: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4, *, recipe: str = "pad-crop-flip"
) -> torch.Tensor:
    """A random crop, then a random horizontal flip, independently per image, for the whole batch at once.

    ``recipe="pad-crop-flip"`` (CIFAR): crop with ``pad`` pixels of zero padding; the same distribution as
    torchvision's ``RandomCrop(size, padding=pad)`` + ``RandomHorizontalFlip()``. ``recipe="rrc-flip"`` (larger
    inputs): see :func:`random_resized_crop_flip`; ``pad`` is not used. Either runs on whatever device ``images``
    live on. Any dtype; shape, dtype and value range are kept (padding is 0, the darkest pixel, as in torchvision).
    ``generator`` makes it reproducible; it may live on the CPU while ``images`` are on the GPU.
    """
    if images.ndim != 4:
        raise ValueError(f"augment_batch expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    if _check_recipe(recipe) == "rrc-flip":
        return random_resized_crop_flip(images, generator)
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    batch, _, height, width = images.shape
    random_device = generator.device if generator is not None else images.device
    offset_y = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=random_device).to(images.device)
    offset_x = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=random_device).to(images.device)
    flip = (torch.rand(batch, generator=generator, device=random_device) < 0.5).to(images.device)

    padded = F.pad(images, (pad, pad, pad, pad)) if pad else images  # (B, C, H + 2 pad, W + 2 pad)
    rows = offset_y[:, None] + torch.arange(height, device=images.device)  # (B, H)
    columns = torch.arange(width, device=images.device).expand(batch, width)  # (B, W)
    columns = torch.where(flip[:, None], columns.flip(1), columns) + offset_x[:, None]  # a flip reads columns backwards
    batch_index = torch.arange(batch, device=images.device)[:, None, None]
    # Advanced indexing on dims 0, 2, 3 around the channel slice puts the indexed dims first: (B, H, W, C).
    crops = padded[batch_index, :, rows[:, :, None], columns[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()


def random_resized_crop_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3/4, 4/3))`` + ``RandomHorizontalFlip()``
    for a whole (B, C, H, W) batch, output size = input size.

    Per image: an area fraction uniform in ``RRC_SCALE`` and an aspect ratio log-uniform in ``RRC_RATIO`` give a box
    (rounded to whole pixels, as torchvision does). A box wider or taller than the image is clamped to it, where
    torchvision would draw again (up to 10 times, then fall back to a center crop): one draw keeps the batch
    vectorised. It shifts the distribution a little towards large, image-shaped boxes: about 14% of the draws are
    clamped for a square image (area above ~75% with a ratio away from 1), 25% for a 3:4 one, and each clamped box
    still covers most of the image. The box's offset is uniform over the positions where it fits.

    The crops are resized back to (H, W) by one ``affine_grid`` + ``grid_sample`` (bilinear, align_corners=False,
    the box's edge pixels replicated as ``F.interpolate`` of the cropped box does) with the flip folded into the
    affine map, so the whole batch is a single resampling pass. A box is never larger than the image, so resampling
    only magnifies and needs no antialiasing.

    uint8 in gives uint8 out (rounded); float in gives the same float dtype. ``generator`` makes it reproducible
    and may live on the CPU while ``images`` are on the GPU.
    """
    if images.ndim != 4:
        raise ValueError(f"random_resized_crop_flip expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    batch, _, height, width = images.shape
    if batch == 0:
        return images.clone()
    top, left, box_height, box_width, flip = rrc_boxes(batch, height, width, generator, images.device)

    # affine_grid maps output coordinates in [-1, 1] to input coordinates in [-1, 1] (pixel edges, align_corners
    # False): the box [left, left + box_width) becomes scale box_width / width about its centre; a flip negates x.
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = torch.where(flip, -1.0, 1.0) * box_width / width
    theta[:, 0, 2] = (2 * left + box_width) / width - 1
    theta[:, 1, 1] = box_height / height
    theta[:, 1, 2] = (2 * top + box_height) / height - 1
    work_dtype = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    grid = F.affine_grid(theta.to(images.device, work_dtype), list(images.shape), align_corners=False)
    # Clamp the sampling points to the box's outer pixel centres: the crop is resized on its own, edges replicated as
    # F.interpolate does, rather than blending in the pixels just outside the box.
    for axis, start, size, extent in ((0, left, box_width, width), (1, top, box_height, height)):
        low = ((2 * start + 1) / extent - 1).to(images.device, work_dtype)[:, None, None]
        high = ((2 * (start + size - 1) + 1) / extent - 1).to(images.device, work_dtype)[:, None, None]
        grid[..., axis] = torch.minimum(torch.maximum(grid[..., axis], low), high)
    crops = F.grid_sample(images.to(work_dtype), grid, mode="bilinear", padding_mode="border", align_corners=False)
    if images.dtype.is_floating_point:
        return crops.to(images.dtype)
    info = torch.iinfo(images.dtype)
    return crops.round_().clamp_(info.min, info.max).to(images.dtype)


def rrc_boxes(
    batch: int, height: int, width: int, generator: torch.Generator | None = None, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The boxes :func:`random_resized_crop_flip` crops: (top, left, box_height, box_width) float64 whole pixels and
    the flip (bool), each (batch,) on the CPU.

    Five uniforms per image, drawn where ``generator`` lives (else on ``device``); the box arithmetic is a few numbers
    per image, done in float64 on the CPU so the same draws give the same boxes whatever device the images are on.
    """
    random_device = generator.device if generator is not None else (device or torch.device("cpu"))
    draws = torch.rand(5, batch, generator=generator, device=random_device).to("cpu", torch.float64)
    area = height * width * (RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * draws[0])
    log_ratio = math.log(RRC_RATIO[0]) + (math.log(RRC_RATIO[1]) - math.log(RRC_RATIO[0])) * draws[1]
    ratio = torch.exp(log_ratio)  # width / height of the box
    box_width = torch.sqrt(area * ratio).round().clamp(1, width)
    box_height = torch.sqrt(area / ratio).round().clamp(1, height)
    top = torch.floor(draws[2] * (height - box_height + 1)).clamp(max=height - box_height)
    left = torch.floor(draws[3] * (width - box_width + 1)).clamp(max=width - box_width)
    return top, left, box_height, box_width, draws[4] < 0.5


def batches(
    data: ImageSet,
    batch_size: int,
    *,
    shuffle: bool,
    augment: bool,
    device: torch.device | str,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    recipe: str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(x, y)``: x float32 in [0, 1] (B, 3, H, W), y int64 (B,), both on ``device``.

    Each batch is :meth:`ImageSet.take` of its positions: for an in-memory set, an index into the uint8 split copied
    to ``device`` once (cached on ``data``, so later epochs do not copy again); for a streamed set, the batch's rows
    read from disk. Either way the same data, order and ``generator`` give the same batches. Augmentation (``recipe``,
    default :func:`augment_recipe` of the input size) runs while the batch is still uint8 (4x less memory traffic),
    then it is converted to float. Without ``drop_last`` every image appears exactly once per epoch; the last batch
    may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    recipe = augment_recipe(data.input_size) if recipe is None else _check_recipe(recipe)
    device = torch.device(device)
    count = len(data)
    if shuffle:
        random_device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(count, generator=generator, device=random_device)
    else:
        order = torch.arange(count)
    # An in-memory set is indexed on the device (move the order once); a streamed one reads rows on the CPU.
    order = order.cpu() if data.streamed else order.to(data.to_device(device)[0].device)
    stop = count - count % batch_size if drop_last else count
    for start in range(0, stop, batch_size):
        x, y = data.take(order[start : start + batch_size], device)  # (B, 3, H, W) uint8, (B,) int64
        if augment:
            x = augment_batch(x, generator, recipe=recipe)
        yield to_float(x), y
