"""Checkpoint I/O: the self-describing rslad-edge format, and the bare state dicts the community publishes.

The rslad-edge format is one file::

    {"format": "rslad-edge/1", "arch", "arch_kwargs", "num_classes",
     "input": {"size", "range", "layout", "dtype", "mean", "std", "preprocess"}, "state_dict", "meta": {...}}

``arch`` is a registry name, ``torchvision:NAME``, ``timm:NAME`` or ``package.module:factory``, built with
``arch_kwargs``; ``input.size`` is the (H, W) it was trained at, ``input.mean`` / ``std`` the normalisation inside the
model (torchvision / timm wrappers), ``input.preprocess`` how images were brought to that size. So export, verify and
bench rebuild the model and its data from the file alone.

Everything is loaded with ``torch.load(weights_only=True)``: a checkpoint is data, never code (a factory it names is
imported only when the caller names the same one). Bare state dicts (RSLAD, ARD, TRADES, AutoAttack, RobustBench, a
torchvision / timm model's own) load too when the architecture is given; their ``module.`` / ``model.`` /
``_orig_mod.`` prefixes are stripped and the class count is read off the classifier; their input size is the one
given, else the data's.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rslad_edge.errors import CheckpointError
from rslad_edge.io import atomic_write
from rslad_edge.models.external import Normalized, is_factory_spec, trust_factory
from rslad_edge.models.registry import MODELS, canonical_arch, create_model

logger = logging.getLogger(__name__)

FORMAT = "rslad-edge/1"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "student")
_PREFIXES = ("module.", "model.", "_orig_mod.")
_CLASSIFIER_KEYS = ("linear.weight", "fc.weight", "logits.weight")


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    arch: str,
    *,
    num_classes: int,
    input_size: tuple[int, int],
    arch_kwargs: Mapping[str, Any] | None = None,
    preprocess: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a self-describing checkpoint atomically. ``extra`` holds training state (optimizer, RNG) for resume."""
    plain = _unwrap(model)
    state_dict = {k: v.detach().cpu() for k, v in plain.state_dict().items()}
    model_input: dict[str, Any] = {"size": [int(s) for s in input_size], "range": [0.0, 1.0], "layout": "NCHW",
                                   "dtype": "float32"}
    if isinstance(plain, Normalized):
        model_input.update(mean=plain.mean.flatten().tolist(), std=plain.std.flatten().tolist())
    if preprocess:
        model_input["preprocess"] = dict(preprocess)
    payload = {
        "format": FORMAT,
        "arch": canonical_arch(arch),
        "arch_kwargs": dict(arch_kwargs or {}),
        "num_classes": int(num_classes),
        "input": model_input,
        "state_dict": state_dict,
        "meta": dict(meta or {}),
        **dict(extra or {}),
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file as plain data, with a clear error for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, AttributeError, KeyError,
            IndexError, TypeError, UnicodeDecodeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it contains Python objects other than tensors, which rslad-edge refuses to unpickle"
        else:
            reason = f"it is not a readable PyTorch checkpoint ({first_line[:160]})"
        raise CheckpointError(f"cannot load '{path}': {reason}") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, not a checkpoint or state dict")
    return dict(obj)


def load_checkpoint(
    path: str | Path,
    arch: str | None = None,
    num_classes: int | None = None,
    *,
    arch_kwargs: Mapping[str, Any] | None = None,
    input_size: tuple[int, int] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model from an rslad-edge checkpoint or a bare state dict; returns ``(model in eval mode, info)``.

    ``info`` has ``arch``, ``arch_kwargs``, ``num_classes``, ``input`` and ``meta`` (empty for bare state dicts).
    ``input_size`` is the (H, W) of a bare state dict (None: the data's); a checkpoint knows its own.
    """
    path = Path(path)
    obj = read_checkpoint(path)
    if obj.get("format") == FORMAT:
        file_arch = obj["arch"]
        if is_factory_spec(file_arch):
            trust_factory(arch or "", file_arch, path)
        elif arch is not None and canonical_arch(arch) != file_arch:
            raise CheckpointError(
                f"'{path}' is a {file_arch} checkpoint but --arch {arch} was given; drop --arch or pass {file_arch}"
            )
        if num_classes is not None and num_classes != obj["num_classes"]:
            raise CheckpointError(
                f"'{path}' has {obj['num_classes']} classes but --num-classes {num_classes} was given"
            )
        arch, state_dict = file_arch, obj["state_dict"]
        arch_kwargs = dict(obj.get("arch_kwargs") or {})
        info = {"arch": file_arch, "arch_kwargs": arch_kwargs, "num_classes": obj["num_classes"],
                "input": obj.get("input", {}), "meta": obj.get("meta", {}), "format": FORMAT}
    else:
        state_dict = _find_state_dict(obj, path)
        inferred_classes = _infer_num_classes(state_dict)
        if arch is None:
            guess = guess_arch(state_dict)
            hint = f" (its keys match '{guess}')" if guess else ""
            raise CheckpointError(f"'{path}' is a bare state dict: pass --arch{hint}. Known: {', '.join(MODELS)}.")
        num_classes = num_classes or inferred_classes
        arch = canonical_arch(arch)
        model_input: dict[str, Any] = {"range": [0.0, 1.0]}
        if input_size is not None:
            model_input["size"] = [int(s) for s in input_size]
        info = {"arch": arch, "arch_kwargs": dict(arch_kwargs or {}), "num_classes": num_classes,
                "input": model_input, "meta": {}, "format": "state_dict"}
    model = create_model(arch, info["num_classes"], info["arch_kwargs"])
    if isinstance(model, Normalized) and info["format"] == "state_dict" and "mean" not in state_dict:
        _load_state_dict(model.net, state_dict, arch, path)  # a torchvision / timm model's own state dict
    else:
        _load_state_dict(model, state_dict, arch, path)
    model.eval()
    return model, info


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers, so saved keys never carry their prefixes."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _find_state_dict(obj: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = dict(obj[key])
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"'{path}' contains no tensors: it is not a model checkpoint")
    return strip_prefixes(tensors)


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the wrappers' key prefixes (DataParallel ``module.``, RobustBench ``model.``, compile ``_orig_mod.``)."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def _infer_num_classes(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    for key in _CLASSIFIER_KEYS:
        if key in state_dict and state_dict[key].ndim == 2:
            return int(state_dict[key].shape[0])
    return None


def _expected_keys(arch: str) -> set[str]:
    with torch.device("meta"):
        model = create_model(arch)
    return set(model.state_dict())


def guess_arch(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """The registered architecture whose keys best match (Jaccard over key names), if any matches well."""
    keys = set(state_dict)
    best, best_score = None, 0.0
    for name in MODELS:
        expected = _expected_keys(name)
        score = len(keys & expected) / len(keys | expected)
        if score > best_score:
            best, best_score = name, score
    return best if best_score > 0.9 else None


def _load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], arch: str, path: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        k for k in set(expected) & set(state_dict) if tuple(expected[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_preview(unexpected)}")
        if mismatched:
            k = mismatched[0]
            parts.append(
                f"shape mismatch in {_preview(mismatched)} (e.g. {k}: file {tuple(state_dict[k].shape)}, "
                f"{arch} {tuple(expected[k].shape)})"
            )
        guess = guess_arch(state_dict)
        hint = f"; its keys match --arch {guess}" if guess and guess != arch else ""
        raise CheckpointError(f"'{path}' does not fit {arch}: {'; '.join(parts)}{hint}")
    model.load_state_dict(state_dict, strict=True)


def _preview(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return f"[{shown}{', ...' if len(keys) > n else ''}] ({len(keys)})"
