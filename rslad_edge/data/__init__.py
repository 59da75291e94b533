"""Datasets held whole in memory as uint8 NCHW tensors, with crop + flip done per batch on the training device.

data = load_dataset("cifar10", "~/data", "train")          # ImageSet: uint8 (N, 3, 32, 32), int64 labels
for x, y in batches(data, 512, shuffle=True, augment=True, device="cuda", generator=g):
    ...                                                     # x float32 in [0, 1], the models' input contract
test = subset(load_dataset("cifar10", "~/data", "test"), 1000, seed=0)   # same 1,000 images every time
train, val, _ = hold_out(data, 1000, seed=0)            # a seeded validation split out of the training set
"""

from rslad_edge.data.augment import augment_batch, batches
from rslad_edge.data.imagefolder import default_cache_dir
from rslad_edge.data.imageset import HeldOut, ImageSet, hold_out, subset, to_float
from rslad_edge.data.registry import DATASET_NAMES, dataset_for_model, load_dataset

__all__ = [
    "DATASET_NAMES",
    "HeldOut",
    "ImageSet",
    "augment_batch",
    "batches",
    "dataset_for_model",
    "default_cache_dir",
    "hold_out",
    "load_dataset",
    "subset",
    "to_float",
]
