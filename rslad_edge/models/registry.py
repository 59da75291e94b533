"""The model zoo: one name per architecture, with the facts a user needs to pick one.

Besides the registry's CIFAR variants, an architecture may be ``torchvision:NAME``, ``timm:NAME`` or
``package.module:factory`` (``models/external.py``); :func:`create_model` builds any of them and
:func:`check_model_fits` runs it once at its input size, so a wrong class count or a too small image is one line
before any work starts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rslad_edge.errors import ConfigError, UsageError, unknown_name_error
from rslad_edge.models import external
from rslad_edge.models.external import ModelDefaults
from rslad_edge.models.mobilenetv2 import mobilenetv2
from rslad_edge.models.resnet import resnet18, resnet50
from rslad_edge.models.smallcnn import smallcnn, smallcnn_wide
from rslad_edge.models.wideresnet import wrn_34_10, wrn_70_16


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[int], nn.Module]
    description: str
    default_num_classes: int = 10
    # Parameters never used in forward (kept so community checkpoints load): not counted as the model's size.
    unused_prefixes: tuple[str, ...] = ()


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("resnet18", resnet18, "CIFAR ResNet-18, the paper's student (RSLAD/ARD key layout)"),
        ModelSpec("mobilenetv2", mobilenetv2, "CIFAR MobileNetV2, the paper's mobile student"),
        ModelSpec(
            "wrn-34-10",
            wrn_34_10,
            "WideResNet-34-10, TRADES layout: the paper's CIFAR-10 teacher (RobustBench Zhang2019Theoretically)",
            unused_prefixes=("sub_block1.",),
        ),
        ModelSpec(
            "wrn-70-16",
            wrn_70_16,
            "WideResNet-70-16, DeepMind layout, Swish, normalisation inside: the paper's CIFAR-100 teacher "
            "(RobustBench Gowal2020Uncovering)",
            default_num_classes=100,
        ),
        ModelSpec("resnet50", resnet50, "CIFAR ResNet-50: the paper's independent source for transfer attacks"),
        ModelSpec("smallcnn", smallcnn, "4-layer CNN: the smoke preset's student, and tests"),
        ModelSpec("smallcnn-wide", smallcnn_wide, "smallcnn at twice the width: quick robust teachers on a CPU"),
    ]
}


def model_names() -> list[str]:
    return list(MODELS)


def get_spec(name: str) -> ModelSpec:
    """The registry entry of a registry name (not of a torchvision / timm / factory spec)."""
    key = name.lower().replace("_", "-")
    if key not in MODELS:
        raise unknown_name_error("architecture", name, MODELS, error=UsageError)
    return MODELS[key]


def canonical_arch(arch: str) -> str:
    """The one spelling of an architecture that checkpoints record; checks that it exists (without building it)."""
    source, name = external.split_spec(arch)
    if source == "registry":
        return get_spec(name).name
    if source == "torchvision":
        external.check_torchvision(name)
    elif source == "timm":
        external.check_timm(name)
    return arch if source == "module" else f"{source}:{name}"


def model_defaults(arch: str, kwargs: Mapping[str, Any] | None = None) -> ModelDefaults:
    """The input size, mean / std and crop of the architecture's own config (timm's ``pretrained_cfg``, torchvision's
    weights), or None where it has none (the registry's CIFAR models and factories take the data's size)."""
    source, name = external.split_spec(arch)
    if source == "torchvision":
        return external.torchvision_defaults(name, kwargs or {})
    if source == "timm":
        return external.timm_defaults(name, kwargs or {})
    return ModelDefaults()


def default_num_classes(arch: str) -> int:
    source, name = external.split_spec(arch)
    return get_spec(name).default_num_classes if source == "registry" else 1000


def create_model(name: str, num_classes: int | None = None, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Build an architecture by name or spec, randomly initialised (float32, CPU, train mode); ``kwargs`` go to the
    torchvision / timm constructor or the factory."""
    source, spec_name = external.split_spec(name)
    num_classes = num_classes or default_num_classes(name)
    kwargs = dict(kwargs or {})
    if source == "registry":
        if kwargs:
            raise ConfigError(f"{name} takes no model options (got {', '.join(kwargs)})")
        return get_spec(spec_name).build(num_classes)
    try:
        if source == "torchvision":
            return external.build_torchvision(spec_name, num_classes, kwargs)
        if source == "timm":
            return external.build_timm(spec_name, num_classes, kwargs)
        return external.build_factory(spec_name, num_classes, kwargs)
    except TypeError as exc:  # an option the constructor does not take
        raise ConfigError(f"cannot build {name} with options {kwargs}: {exc}") from exc


def check_model_fits(model: nn.Module, arch: str, num_classes: int, input_size: tuple[int, int]) -> None:
    """Run ``model`` once on a (1, 3, H, W) input: it must end in ``num_classes`` logits, and no strided layer may be
    handed a feature map smaller than its stride (the image is then too small for the network: its later stages see
    a 1x1 map they cannot downsample, and their features mean nothing). One line when either fails."""
    height, width = input_size
    try:
        logits, too_small = _probe(model, height, width)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{arch} cannot run on {height}x{width} images ({first}); pick another --input-size") from exc
    if too_small:
        minimum = next((side for side in (2 ** k for k in range(3, 11)) if side > max(height, width)
                        and not _probe(model, side, side)[1]), None)
        hint = f"; it needs at least {minimum}x{minimum}" if minimum else ""
        raise UsageError(f"--input-size {height}x{width} is too small for {arch}: {too_small}{hint}")
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (1, num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(f"{arch} outputs {shape} for one image, not (1, {num_classes}) logits: it must end in "
                          f"{num_classes} classes (a factory takes num_classes=, or set --num-classes)")


def _probe(model: nn.Module, height: int, width: int) -> tuple[Any, str | None]:
    """(the logits of one zero image, the first strided layer handed a map smaller than its stride, if any)."""
    too_small: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        def check(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            stride = module.stride if isinstance(module.stride, tuple) else (module.stride, module.stride)
            shape = tuple(inputs[0].shape[-2:])
            if not too_small and max(stride) > 1 and (shape[0] < stride[0] or shape[1] < stride[1]):
                too_small.append(f"{name} (stride {max(stride)}) gets a {shape[0]}x{shape[1]} feature map")
        return check

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in model.named_modules()
               if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))]
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        with torch.no_grad():
            logits = model(torch.zeros(1, 3, height, width, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return logits, (too_small[0] if too_small else None)


def count_parameters(name: str, num_classes: int | None = None, kwargs: Mapping[str, Any] | None = None) -> int:
    """Parameters used in forward, counted on the meta device so even WRN-70-16 costs no memory."""
    source, spec_name = external.split_spec(name)
    unused = get_spec(spec_name).unused_prefixes if source == "registry" else ()
    with torch.device("meta"):
        model = create_model(name, num_classes, kwargs)
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(unused))
