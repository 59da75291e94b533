"""A teacher for another label set or another image size than the student's.

- :class:`ClassMapped`: a teacher trained on more classes (an ImageNet model's 1,000) distils into a student of the
  user's classes through a class map: each of our classes is a group of the teacher's class indices, whose logits are
  reduced to one. ``sum`` (the default) adds the group's probabilities: the logit of our class is the logsumexp of its
  members' logits, so the softmax over our classes is the teacher's probability of each group, renormalised over the
  mapped classes (RobustBench / ImageNet subsets are usually evaluated this way). ``max`` takes the group's largest
  logit (the teacher's most confident member speaks for the group).
- :class:`Resized`: a teacher trained at another resolution sees the student's batch resized (bilinear, antialiased
  when shrinking) to its own size inside the forward, so it stays differentiable for the attacks that use it.

The class map file (YAML or JSON) maps each of our class names to a list of teacher class indices::

    cat: [281, 282, 283, 284, 285]
    dog: [151, 152, 153]

Every class of the dataset must be mapped, to at least one index below the teacher's class count, and no teacher
class may belong to two of ours (their logits would be indistinguishable).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rslad_edge.errors import ConfigError
from rslad_edge.io import read_yaml_mapping

CLASS_MAP_REDUCTIONS = ("sum", "max")


class ClassMapped(nn.Module):
    """``teacher``'s logits reduced to one logit per group of its classes: (B, teacher classes) -> (B, len(groups))."""

    def __init__(self, teacher: nn.Module, groups: list[list[int]], reduce: str = "sum"):
        super().__init__()
        if reduce not in CLASS_MAP_REDUCTIONS:
            raise ConfigError(f"--class-map-reduce must be one of {', '.join(CLASS_MAP_REDUCTIONS)}, got '{reduce}'")
        self.teacher = teacher
        self.reduce = reduce
        width = max(len(group) for group in groups)
        # Padded (classes, width) index table; padding repeats a group's first member, which changes neither the
        # max nor, after the mask below, the logsumexp.
        index = torch.tensor([group + [group[0]] * (width - len(group)) for group in groups], dtype=torch.long)
        mask = torch.tensor([[True] * len(group) + [False] * (width - len(group)) for group in groups])
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.teacher(x)  # (B, teacher classes)
        grouped = logits[:, self.index]  # (B, classes, width)
        if self.reduce == "max":
            return grouped.amax(dim=2)
        return grouped.masked_fill(~self.mask, float("-inf")).logsumexp(dim=2)


class Resized(nn.Module):
    """``teacher`` run at ``size`` (H, W) on inputs of any size."""

    def __init__(self, teacher: nn.Module, size: tuple[int, int]):
        super().__init__()
        self.teacher = teacher
        self.size = (int(size[0]), int(size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.size:
            shrinking = x.shape[-2] > self.size[0] or x.shape[-1] > self.size[1]
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=shrinking)
        return self.teacher(x)


def read_class_map(path: str | Path, classes: list[str], teacher_classes: int) -> list[list[int]]:
    """The groups of teacher class indices, in the order of ``classes`` (the dataset's), checked as described above."""
    mapping = read_yaml_mapping(path, flag="--class-map")
    source = f"--class-map {path}"
    unknown = sorted(str(name) for name in mapping if str(name) not in classes)
    if unknown:
        raise ConfigError(f"{source} names classes the dataset does not have: {', '.join(unknown[:5])} (the dataset's: "
                          f"{', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})")
    missing = [name for name in classes if name not in {str(key) for key in mapping}]
    if missing:
        raise ConfigError(f"{source} does not map {', '.join(missing[:5])}: every class of the dataset needs teacher "
                          "class indices")
    by_name = {str(key): value for key, value in mapping.items()}
    groups: list[list[int]] = []
    owner: dict[int, str] = {}
    for name in classes:
        members = by_name[name]
        members = [members] if isinstance(members, int) else members
        if not isinstance(members, list) or not members or not all(isinstance(m, int) for m in members):
            raise ConfigError(f"{source}: '{name}' must map to a list of teacher class indices, got {members!r}")
        for member in members:
            if not 0 <= member < teacher_classes:
                raise ConfigError(f"{source}: '{name}' maps to class {member}, but the teacher has {teacher_classes} "
                                  f"classes (0-{teacher_classes - 1})")
            if member in owner and owner[member] != name:
                raise ConfigError(f"{source}: teacher class {member} is mapped to both '{owner[member]}' and '{name}'")
            owner[member] = name
        groups.append(sorted(set(members)))
    return groups
