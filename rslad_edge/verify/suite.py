"""The attack names verify accepts, what each one runs, on which model's gradients, and what judges it.

Every adversarial image is judged by the model being measured, through its own runtime (ONNX Runtime, TensorRT,
PyTorch): gradients only decide where an attack searches. Four families:

- **white-box**: ``fgsm``, ``pgd_sat``, ``pgd_trades``, ``cw``, ``autoattack``, the RSLAD.md presets, crafted on the
  model's own gradients: a checkpoint's, or for an exported artifact its differentiable twin's (its own graph,
  weights and int8 scales as torch ops, ``runtime/twin.py``).
- **transfer**: ``transfer_pgd`` (the PGD-20 of ``pgd_sat``) and ``transfer_cw`` (``cw``), crafted on each source model
  (the reference by default) and judged by the artifact: what an adversary holding the float model can do.
- **divergence**: ``divergence`` (DIVA), crafted on the float reference and the artifact's twin together, to fool the
  artifact while the float model stays right; judged by both.
- **query**: ``square`` against the model's own predictions; it needs nothing but logits.

By default every artifact, checkpoint or export, gets the same columns: the white-box suite, transfer and divergence
when there is a float model to craft on (``--reference`` / ``--source``), and Square.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rslad_edge.attacks import AttackSpec, get_attack
from rslad_edge.errors import ConfigError, unknown_name_error

Family = Literal["white-box", "transfer", "divergence", "query"]

WHITE_BOX_ATTACKS: tuple[str, ...] = ("fgsm", "pgd_sat", "pgd_trades", "cw", "autoattack")
TRANSFER_PRESETS: dict[str, str] = {"transfer_pgd": "pgd_sat", "transfer_cw": "cw"}  # verify name -> attack preset
DIVERGENCE_ATTACKS: tuple[str, ...] = ("divergence",)
QUERY_ATTACKS: tuple[str, ...] = ("square",)
VERIFY_ATTACKS: tuple[str, ...] = (*WHITE_BOX_ATTACKS, *TRANSFER_PRESETS, *DIVERGENCE_ATTACKS, *QUERY_ATTACKS)

DEFAULT_ATTACKS: tuple[str, ...] = VERIFY_ATTACKS  # each one where it applies (see default_attack_names)
CHECKPOINT_DEFAULT_ATTACKS: tuple[str, ...] = (*WHITE_BOX_ATTACKS, *QUERY_ATTACKS)  # a checkpoint on its own
EXPORTED_DEFAULT_ATTACKS: tuple[str, ...] = VERIFY_ATTACKS  # an export with its --reference


@dataclass(frozen=True)
class VerifyAttack:
    """One verify attack: its name in the table and JSON, its family, and the preset it runs.

    For a transfer attack ``spec`` is what runs on each source model; the artifact only sees its output.
    """

    name: str
    family: Family
    spec: AttackSpec

    @property
    def description(self) -> str:
        if self.family == "transfer":
            return f"transfer: {self.spec.description}, crafted on each source model"
        return self.spec.description


def get_verify_attack(name: str) -> VerifyAttack:
    """The verify attack called ``name`` (case and ``-``/``_`` insensitive); ConfigError listing the known names."""
    key = name.strip().lower().replace("-", "_")
    if key in TRANSFER_PRESETS:
        return VerifyAttack(key, "transfer", get_attack(TRANSFER_PRESETS[key]))
    if key in WHITE_BOX_ATTACKS:
        return VerifyAttack(key, "white-box", get_attack(key))
    if key in DIVERGENCE_ATTACKS:
        return VerifyAttack(key, "divergence", get_attack(key))
    if key in QUERY_ATTACKS:
        return VerifyAttack(key, "query", get_attack(key))
    raise unknown_name_error("attack in --attacks", name, VERIFY_ATTACKS)


def parse_attacks(names: str | Sequence[str]) -> list[VerifyAttack]:
    """``"fgsm,pgd_sat"`` or a list of names -> attacks in the given order, duplicates dropped."""
    if isinstance(names, str):
        names = names.split(",")
    attacks = [get_verify_attack(name) for name in names if name.strip()]
    if not attacks:
        raise ConfigError(f"--attacks: give at least one attack; known attacks: {', '.join(VERIFY_ATTACKS)}.")
    return list({attack.name: attack for attack in attacks}.values())


def checkpoint_attacks(names: str | Sequence[str]) -> list[str]:
    """The attacks of ``names`` that a checkpoint on its own faces: white-box and query. Transfer and divergence
    need a float model beside it; on a reference they would only repeat its own white-box attacks."""
    return [attack.name for attack in parse_attacks(names) if attack.family in ("white-box", "query")]


def default_attack_names(*, exported: bool, has_reference: bool, has_source: bool) -> tuple[list[str], str | None]:
    """The default attacks for an artifact, and a note when some had to be left out.

    Every artifact gets the white-box suite and Square; transfer when there is a model to craft on, divergence when
    there is a float reference. An exported artifact without a reference gets a note saying how to add them,
    rather than an error for an option the user never gave.
    """
    names = list(WHITE_BOX_ATTACKS)
    if has_source:
        names += list(TRANSFER_PRESETS)
    if has_reference:
        names += list(DIVERGENCE_ATTACKS)
    names += list(QUERY_ATTACKS)
    left_out = [name for name in VERIFY_ATTACKS if name not in names]
    if not exported or not left_out:
        return names, None
    return names, (f"{', '.join(left_out)} were skipped: they need the float model the artifact came from; pass "
                   "--reference CKPT (the checkpoint it was exported from) or --source CKPT")
