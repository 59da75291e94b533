"""Architectures from outside the registry: ``torchvision:NAME``, ``timm:NAME`` and ``package.module:factory``.

Every model here keeps the input contract of the rest of rslad-edge (float32 NCHW in [0, 1]): torchvision and timm
networks expect mean / std normalised inputs, so they are wrapped in :class:`Normalized`, which holds their own mean and
std as buffers (saved with the weights, exported into the ONNX graph). A ``module:factory`` model is the user's own and
is taken as it is: it must accept [0, 1] inputs itself.

- ``torchvision:NAME``: any classification model of ``torchvision.models.list_models``; ``num_classes`` builds the head
  at that size. With ``weights=...`` (e.g. ``DEFAULT``; downloaded by torchvision on first use), the 1,000-class head
  is replaced by a fresh one when another class count is asked. Mean / std: ImageNet's (torchvision's
  ``weights.transforms()``); input size: the weights' crop size when weights are given, else none of its own.
- ``timm:NAME`` (the ``timm`` extra): ``timm.create_model(NAME, num_classes=..., **kwargs)``; mean, std, input size and
  crop_pct from the model's ``pretrained_cfg``.
- ``package.module:factory``: ``factory(num_classes=N, **kwargs)`` (``num_classes`` only if the factory takes it).
  Building one imports the module, i.e. runs code from your Python path: a checkpoint that names one is rebuilt only
  when you name the same factory yourself (``--arch``), never from the file alone.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rslad_edge.errors import CheckpointError, ConfigError, UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCES = ("torchvision", "timm")


@dataclass(frozen=True)
class ModelDefaults:
    """What an architecture says about its own inputs (None: nothing of its own; the data decides)."""

    input_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None  # normalisation inside the model (the wrapper's buffers)
    std: tuple[float, ...] | None = None
    crop_pct: float | None = None  # evaluation crop: resize the shorter side to size / crop_pct, then center-crop


class Normalized(nn.Module):
    """``net((x - mean) / std)``: a torchvision / timm network behind the [0, 1] input contract."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, H, W) in [0, 1]
        return self.net((x - self.mean) / self.std)


def split_spec(arch: str) -> tuple[str, str]:
    """``"torchvision:resnet18"`` -> ``("torchvision", "resnet18")``; ``"pkg.mod:fn"`` -> ``("module", "pkg.mod:fn")``;
    a registry name -> ``("registry", name)``."""
    source, sep, name = arch.partition(":")
    if not sep:
        return "registry", arch
    if source in SOURCES:
        if not name:
            raise UsageError(f"--arch '{arch}' names no model: write {source}:NAME")
        return source, name
    if not name or not all(part.isidentifier() for part in [*source.split("."), name]):
        raise UsageError(f"--arch '{arch}' is neither a registry name, torchvision:NAME, timm:NAME nor "
                         "package.module:factory")
    return "module", arch


def is_factory_spec(arch: str) -> bool:
    return ":" in arch and split_spec(arch)[0] == "module"


# ---------------------------------------------------------------------------------------------------- torchvision


def torchvision_names() -> list[str]:
    import torchvision.models

    return list(torchvision.models.list_models(module=torchvision.models))  # classification models only


def check_torchvision(name: str) -> None:
    names = torchvision_names()
    if name not in names:
        raise _unknown("torchvision", name, names)


def torchvision_defaults(name: str, kwargs: Mapping[str, Any]) -> ModelDefaults:
    import torchvision.models

    size = None
    if kwargs.get("weights"):
        transforms = torchvision.models.get_weight(_weights_name(name, kwargs["weights"])).transforms()
        crop = int(transforms.crop_size[0])
        size = (crop, crop)
        return ModelDefaults(size, IMAGENET_MEAN, IMAGENET_STD, crop / int(transforms.resize_size[0]))
    return ModelDefaults(size, IMAGENET_MEAN, IMAGENET_STD)


def _weights_name(name: str, weights: str) -> str:
    import torchvision.models

    enum = torchvision.models.get_model_weights(name)
    return f"{enum.__name__}.{weights}" if "." not in weights else weights


def build_torchvision(name: str, num_classes: int, kwargs: Mapping[str, Any]) -> nn.Module:
    import torchvision.models

    check_torchvision(name)
    kwargs = dict(kwargs)
    defaults = torchvision_defaults(name, kwargs)
    if kwargs.get("weights"):  # pretrained: torchvision insists on its 1,000 classes, so swap the head after
        kwargs["weights"] = _weights_name(name, kwargs["weights"])
        net = torchvision.models.get_model(name, **kwargs)
        replace_head(net, num_classes, f"torchvision:{name}")
    else:
        net = torchvision.models.get_model(name, num_classes=num_classes, **kwargs)
    return Normalized(net, defaults.mean, defaults.std)


def replace_head(net: nn.Module, num_classes: int, arch: str) -> None:
    """Swap the last ``nn.Linear`` for a fresh one with ``num_classes`` outputs (a no-op when it already fits)."""
    linears = [(name, module) for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ConfigError(f"{arch} has no nn.Linear classifier to resize to {num_classes} classes")
    name, head = linears[-1]
    if head.out_features == num_classes:
        return
    parent_name, _, child = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, child, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))


# ----------------------------------------------------------------------------------------------------------- timm


def _timm():
    try:
        import timm
    except ImportError as exc:
        raise ConfigError("timm: models need the timm extra: pip install 'rslad-edge[timm]'") from exc
    return timm


def timm_names() -> list[str]:
    return list(_timm().list_models())


def check_timm(name: str) -> None:
    timm = _timm()
    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models())


def timm_defaults(name: str, kwargs: Mapping[str, Any]) -> ModelDefaults:
    timm = _timm()
    check_timm(name)
    cfg = timm.models.get_pretrained_cfg(name)  # the default tag's config: sizes and mean / std, no download
    cfg = cfg.to_dict() if cfg is not None else {}
    size = cfg.get("input_size")
    return ModelDefaults(
        input_size=(int(size[1]), int(size[2])) if size else None,
        mean=tuple(cfg.get("mean") or IMAGENET_MEAN),
        std=tuple(cfg.get("std") or IMAGENET_STD),
        crop_pct=cfg.get("crop_pct"),
    )


def build_timm(name: str, num_classes: int, kwargs: Mapping[str, Any]) -> nn.Module:
    timm = _timm()
    defaults = timm_defaults(name, kwargs)
    kwargs = {"pretrained": False, **kwargs}
    net = timm.create_model(name, num_classes=num_classes, **kwargs)
    return Normalized(net, defaults.mean, defaults.std)


# --------------------------------------------------------------------------------------------------------- module


def _factory(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"--arch {spec}: cannot import '{module_name}' ({exc}); is it on your PYTHONPATH?") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"--arch {spec}: '{module_name}' has no callable '{attr}'")
    return factory


def build_factory(spec: str, num_classes: int, kwargs: Mapping[str, Any]) -> nn.Module:
    factory = _factory(spec)
    try:
        takes_classes = "num_classes" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        takes_classes = False
    net = factory(num_classes=num_classes, **kwargs) if takes_classes else factory(**kwargs)
    if not isinstance(net, nn.Module):
        raise UsageError(f"--arch {spec} returned a {type(net).__name__}, not a torch.nn.Module")
    return net


def trust_factory(arch: str, recorded: str, path: object) -> None:
    """A checkpoint that names a factory is rebuilt only when the caller named the same one (it runs code)."""
    if arch != recorded:
        raise CheckpointError(
            f"'{path}' was built by {recorded}, which imports and runs code from your Python path; pass "
            f"--arch {recorded} to allow it"
        )


def _unknown(source: str, name: str, known: list[str]) -> UsageError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Close: {', '.join(f'{source}:{c}' for c in close)}." if close else ""
    return UsageError(f"unknown {source} model '{name}'.{hint} `rslad-edge models --source {source}` lists them.")
