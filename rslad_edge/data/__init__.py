"""Datasets as uint8 NCHW images at the model's input size, with crop + flip done per batch on the training device.

A split is held in memory when it fits the memory budget and memory-mapped from its decoded cache when it does not
(``data.streamed``); ``read`` / ``take`` / ``batches`` work the same on both.

data = load_dataset("cifar10", "~/data", "train")          # ImageSet: uint8 (N, 3, 32, 32), int64 labels
for x, y in batches(data, 512, shuffle=True, augment=True, device="cuda", generator=g):
    ...                                                     # x float32 in [0, 1], the models' input contract
test = subset(load_dataset("cifar10", "~/data", "test"), 1000, seed=0)   # same 1,000 images every time
train, val, _ = hold_out(data, 1000, seed=0)            # a seeded validation split out of the training set

pets = load_dataset("imagefolder", "~/pets", "train", input_size=(160, 160))  # any sizes -> resize + center crop
pets.preprocess                     # {"resize_shorter": 183, "center_crop": [160, 160], "crop_pct": 0.875, ...}
x, y = pets.take(index, "cuda")     # a batch by position, in memory or streamed from disk alike
augment_recipe(pets.input_size)     # "rrc-flip" above 64 px (batches() picks it), "pad-crop-flip" up to 64
calib = load_sample("imagefolder", "~/pets", "test", 256, seed=0, input_size=(160, 160))  # decodes 256 files only
check_class_count(37, pets.num_classes, model="m.onnx", data="--dataset imagefolder", fix="...")  # raises unless 37
"""

from rslad_edge.data.augment import AUGMENT_RECIPES, augment_batch, augment_recipe, batches
from rslad_edge.data.fit import check_class_count, check_image_shape
from rslad_edge.data.imagefolder import default_cache_dir
from rslad_edge.data.imageset import HeldOut, ImageSet, hold_out, subset, to_float
from rslad_edge.data.preprocess import eval_crop_pct
from rslad_edge.data.registry import (
    DATASET_NAMES,
    dataset_for_model,
    load_dataset,
    load_sample,
    preprocess_for_model,
)
from rslad_edge.data.store import default_memory_budget

__all__ = [
    "AUGMENT_RECIPES",
    "DATASET_NAMES",
    "HeldOut",
    "ImageSet",
    "augment_batch",
    "augment_recipe",
    "batches",
    "check_class_count",
    "check_image_shape",
    "dataset_for_model",
    "default_cache_dir",
    "default_memory_budget",
    "eval_crop_pct",
    "hold_out",
    "load_dataset",
    "load_sample",
    "preprocess_for_model",
    "subset",
    "to_float",
]
