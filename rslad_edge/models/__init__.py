"""Architectures (CIFAR variants in the community key layouts; torchvision, timm, your own factory) and checkpoints."""

from rslad_edge.models.checkpoint import guess_arch, load_checkpoint, read_checkpoint, save_checkpoint
from rslad_edge.models.external import ModelDefaults, Normalized
from rslad_edge.models.registry import (
    MODELS,
    canonical_arch,
    check_model_fits,
    count_parameters,
    create_model,
    get_spec,
    model_defaults,
    model_names,
)

__all__ = [
    "MODELS",
    "ModelDefaults",
    "Normalized",
    "canonical_arch",
    "check_model_fits",
    "count_parameters",
    "create_model",
    "get_spec",
    "guess_arch",
    "load_checkpoint",
    "model_defaults",
    "model_names",
    "read_checkpoint",
    "save_checkpoint",
]
