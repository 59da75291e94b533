"""Bringing images to the model's input size: the standard *evaluation* preprocessing, done once at load time.

A model sees one input size (H, W) in training, export and verify alike, so the data layer hands every stage images
of exactly that size and records how they were made. The rule is the one torchvision / timm evaluation uses:

- resize (bilinear, antialiased) so the shorter side is ``round(max(H, W) / crop_pct)``, keeping the aspect ratio;
- center-crop (H, W).

``crop_pct`` is 1.0 for CIFAR-sized inputs (max side <= 64: the whole image, as CIFAR models are trained and
tested) and 0.875 above (ImageNet's 256 -> 224 convention). Training augmentation then works on these images (see
``augment.py``), so the pixels a deployed model sees are the pixels it was measured on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rslad_edge.errors import ConfigError

SMALL_IMAGE_MAX = 64  # px: inputs whose longer side is at most this are "CIFAR-sized" (whole image, pad-crop-flip)
LARGE_CROP_PCT = 0.875  # the central fraction kept above SMALL_IMAGE_MAX: torchvision's 224 / 256
INTERPOLATION = "bilinear"


def check_input_size(input_size: int | Sequence[int]) -> tuple[int, int]:
    """``input_size`` as an (H, W) pair of positive ints (one int means a square), or a ConfigError saying what to
    give instead."""
    sides = (input_size, input_size) if isinstance(input_size, int) else input_size
    try:
        if isinstance(sides, str | bytes):
            raise TypeError("a string, not a pair of sizes")
        height, width = (int(side) for side in sides)
        valid = all(not isinstance(side, bool) and float(side) == int(side) for side in sides)
    except (TypeError, ValueError):
        height, width, valid = 0, 0, False
    if not valid or height < 1 or width < 1:
        raise ConfigError(
            f"input size must be two positive integers (H, W), got {input_size!r}; give --input-size H[xW]"
        )
    return height, width


def eval_crop_pct(input_size: int | Sequence[int]) -> float:
    """The central fraction the evaluation crop keeps: 1.0 up to 64 px (CIFAR-sized), else 0.875 (ImageNet)."""
    height, width = check_input_size(input_size)
    return 1.0 if max(height, width) <= SMALL_IMAGE_MAX else LARGE_CROP_PCT


def check_crop_pct(crop_pct: float) -> float:
    """A crop_pct in (0, 1]: above 1 the crop would be larger than the resized image."""
    try:
        value = float(crop_pct)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ConfigError(f"crop_pct must be in (0, 1], got {crop_pct!r}; 1.0 keeps the whole image")
    return value


@dataclass(frozen=True)
class EvalResize:
    """The evaluation preprocessing to ``input_size`` (H, W): shorter side to :attr:`shorter`, then center crop."""

    input_size: tuple[int, int]
    crop_pct: float

    @property
    def shorter(self) -> int:
        """The shorter side images are resized to: ``round(max(H, W) / crop_pct)``, at least max(H, W)."""
        return round(max(self.input_size) / self.crop_pct)

    @property
    def tag(self) -> str:
        """A short file-name-safe label, e.g. ``96x96-crop0.875``."""
        return f"{self.input_size[0]}x{self.input_size[1]}-crop{self.crop_pct:g}"

    def describe(self) -> dict[str, Any]:
        """What the preprocessing does, as plain JSON for metadata and reports (``ImageSet.preprocess``)."""
        return {
            "resize_shorter": self.shorter,
            "center_crop": [self.input_size[0], self.input_size[1]],
            "crop_pct": self.crop_pct,
            "interpolation": INTERPOLATION,
        }

    def is_identity_for(self, height: int, width: int) -> bool:
        """True when images of (height, width) come out unchanged (same size, nothing resized or cropped)."""
        return (height, width) == self.input_size and resized_shape(height, width, self.shorter) == (height, width)


def eval_resize(input_size: int | Sequence[int] | None, crop_pct: float | None = None) -> EvalResize | None:
    """The preprocessing for ``input_size`` (``None``: the data's own size, no preprocessing) with ``crop_pct``
    (default :func:`eval_crop_pct`); ConfigError for a bad size, a crop_pct out of (0, 1], or a crop_pct alone."""
    if input_size is None:
        if crop_pct is not None:
            raise ConfigError(f"crop_pct {crop_pct} needs an input size to crop to; give --input-size H[xW] as well")
        return None
    size = check_input_size(input_size)
    return EvalResize(size, eval_crop_pct(size) if crop_pct is None else check_crop_pct(crop_pct))


def resized_shape(height: int, width: int, shorter: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``shorter``: torchvision's rule (the long side truncated)."""
    if width <= height:
        return int(shorter * height / width), shorter
    return shorter, int(shorter * width / height)


def center_offsets(height: int, width: int, crop: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of a centered ``crop`` in a (height, width) image, rounded as torchvision's center_crop does."""
    return int(round((height - crop[0]) / 2.0)), int(round((width - crop[1]) / 2.0))


def preprocess_pil(image: Image.Image, resize: EvalResize) -> np.ndarray:
    """An RGB PIL image resized and center-cropped by ``resize``: (H, W, 3) uint8.

    ``reducing_gap=None``: PIL's exact antialiased bilinear, not its faster approximate two-step reduction, so the
    pixels match torchvision's evaluation transform on a PIL image.
    """
    height, width = resized_shape(image.height, image.width, resize.shorter)
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), Image.BILINEAR, reducing_gap=None)
    top, left = center_offsets(height, width, resize.input_size)
    crop_height, crop_width = resize.input_size
    return np.asarray(image.crop((left, top, left + crop_width, top + crop_height)))


def preprocess_tensor(images: torch.Tensor, resize: EvalResize, out: torch.Tensor | np.ndarray | None = None,
                      *, chunk: int = 256) -> torch.Tensor | np.ndarray:
    """uint8 (N, 3, h, w) resized (bilinear, antialiased) and center-cropped by ``resize``: uint8 (N, 3, H, W), in a
    new tensor or written into ``out`` (a tensor or an array, e.g. a memmap), which is returned.

    ``chunk`` images at a time in float32, rounded back to uint8, so the extra memory is a few chunks whatever N is.
    """
    count, _, height, width = images.shape
    new_height, new_width = resized_shape(height, width, resize.shorter)
    top, left = center_offsets(new_height, new_width, resize.input_size)
    crop_height, crop_width = resize.input_size
    result = torch.empty((count, 3, crop_height, crop_width), dtype=torch.uint8) if out is None else out
    for start in range(0, count, chunk):
        batch = images[start : start + chunk].to(torch.float32)
        if (new_height, new_width) != (height, width):
            batch = F.interpolate(batch, size=(new_height, new_width), mode="bilinear", align_corners=False,
                                  antialias=True)
        crops = batch[:, :, top : top + crop_height, left : left + crop_width].round().clamp_(0, 255).to(torch.uint8)
        result[start : start + len(crops)] = crops.numpy() if isinstance(result, np.ndarray) else crops
    return result
