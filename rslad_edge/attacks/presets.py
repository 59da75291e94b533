"""The evaluation protocol of RSLAD.md (eps 8/255, L-inf) as named, frozen attack specs.

| name | attack | where the setting comes from |
|---|---|---|
| ``fgsm`` | one CE step of eps, no start | Goodfellow et al. 2015 (2) |
| ``pgd_sat`` | PGD-20, 2/255, uniform start, CE | Madry; RSLAD Table 1 "PGD_SAT" |
| ``pgd_trades`` | PGD-20, 0.003, uniform start, CE | TRADES ``pgd_attack_cifar10.py``; RSLAD's per-epoch check (1) |
| ``cw`` | PGD-20, 2/255, uniform start, CW margin κ=50 | CAT/FAT/IAD ``cwloss`` + "Madry" (uniform) start |
| ``autoattack`` | AutoAttack standard | official ``pyautoattack`` |
| ``square`` | Square L-inf, 5000 queries, p_init 0.8 | RSLAD black-box row (schedule: see ``square.py``) |
| ``divergence`` | PGD-20, 2/255, uniform start, on DIVA's float-vs-edge objective | DIVA (Hao et al. 2022) |

(1) RSLAD's training scripts select checkpoints with ``attack_pgd(attack_iters=20, step_size=0.003)``.
(2) RSLAD.md names FGSM without its settings, and the authors' repository (zibojia/RSLAD) has no evaluation
script, so there is no authors' FGSM to copy. The baselines' scripts disagree: FAT's ``attack_test.py`` runs
``eval_robust(perturb_steps=1, step_size=eps, rand_init=False)`` for TRADES-style models ("fgsm_wori") but
``rand_init=True`` for its DAT-style ones, and IAD's ``basic_eval.py`` passes ``random=True`` (a uniform start in the
eps-ball before the step, although it prints "FGSM without Random Start"). ``fgsm`` here is Goodfellow's FGSM,
with no random start; a randomly started one-step attack is a different attack, and its numbers do not compare
with this row.

The budget itself is not part of a spec: it is given per run (``--eps``), since 8/255 vs 0.031 must be a visible
choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from rslad_edge.attacks.eps import check_eps
from rslad_edge.attacks.fgsm import fgsm
from rslad_edge.attacks.losses import CW_CONFIDENCE, LOSS_NAMES
from rslad_edge.attacks.pgd import RANDOM_STARTS, ModelFn, pgd
from rslad_edge.errors import ConfigError, unknown_name_error

AttackKind = Literal["fgsm", "pgd", "square", "autoattack", "divergence"]
ATTACK_KINDS: tuple[str, ...] = ("fgsm", "pgd", "square", "autoattack", "divergence")
WHITE_BOX_KINDS: tuple[str, ...] = ("fgsm", "pgd")


@dataclass(frozen=True)
class AttackSpec:
    """One attack of the protocol: everything but the budget eps.

    ``step_size`` is in pixel units (None for FGSM, whose step is eps, and the non-PGD kinds); ``loss`` and
    ``random_start`` as in :func:`rslad_edge.attacks.pgd.pgd`; ``n_queries`` / ``p_init`` for Square; ``version``
    for AutoAttack; ``seed`` for the attacks that seed themselves (Square, AutoAttack).
    """

    name: str
    kind: AttackKind
    steps: int = 0
    step_size: float | None = None
    loss: str = "ce"
    random_start: str = "none"
    cw_confidence: float = CW_CONFIDENCE
    n_queries: int = 5000
    p_init: float = 0.8
    square_schedule: str = "budget"  # "budget": p schedule compressed to n_queries; "paper": fixed for 10,000
    version: str = "standard"
    seed: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        where = f"attack {self.name!r}"
        if self.kind not in ATTACK_KINDS:
            raise ConfigError(f"{where}: unknown kind {self.kind!r}; choose one of {', '.join(ATTACK_KINDS)}.")
        if self.loss not in LOSS_NAMES:
            raise ConfigError(f"{where}: unknown loss {self.loss!r}; choose one of {', '.join(LOSS_NAMES)}.")
        if self.loss == "kl":
            # The KL attack ascends towards given soft labels (a teacher's), which a spec cannot hold.
            raise ConfigError(f"{where}: loss 'kl' needs target probabilities; call pgd(loss='kl', target_probs=...).")
        if self.random_start not in RANDOM_STARTS:
            raise ConfigError(
                f"{where}: unknown random_start {self.random_start!r}; choose one of {', '.join(RANDOM_STARTS)}."
            )
        if self.kind in ("pgd", "divergence"):
            if self.steps < 1:
                raise ConfigError(f"{where}: PGD needs steps >= 1, got {self.steps}.")
            if self.step_size is None:
                raise ConfigError(f"{where}: PGD needs a step_size in pixel units, e.g. 2/255.")
        if self.step_size is not None:
            check_eps(self.step_size, name=f"{where} step_size")
        if self.kind == "square" and self.n_queries < 1:
            raise ConfigError(f"{where}: n_queries must be >= 1, got {self.n_queries}.")
        if self.square_schedule not in ("budget", "paper"):
            raise ConfigError(f"{where}: square_schedule must be budget or paper, got {self.square_schedule!r}.")

    @property
    def is_white_box(self) -> bool:
        """True for the gradient attacks that :func:`run_white_box` runs."""
        return self.kind in WHITE_BOX_KINDS


ATTACK_PRESETS: dict[str, AttackSpec] = {
    spec.name: spec
    for spec in (
        AttackSpec("fgsm", "fgsm", steps=1, description="FGSM: one cross-entropy step of size eps, no random start"),
        AttackSpec(
            "pgd_sat", "pgd", steps=20, step_size=2 / 255, loss="ce", random_start="uniform",
            description="PGD_SAT: 20 steps of 2/255, uniform start, cross-entropy",
        ),
        AttackSpec(
            "pgd_trades", "pgd", steps=20, step_size=0.003, loss="ce", random_start="uniform",
            description="PGD_TRADES: 20 steps of 0.003, uniform start, cross-entropy",
        ),
        AttackSpec(
            "cw", "pgd", steps=20, step_size=2 / 255, loss="cw", random_start="uniform",
            description="CW-inf: 20 PGD steps of 2/255 on the CW margin loss (confidence 50), uniform start",
        ),
        AttackSpec("autoattack", "autoattack", version="standard", description="AutoAttack standard (official)"),
        AttackSpec("square", "square", n_queries=5000, p_init=0.8,
                   description="Square, 5000 queries, p_init 0.8, p schedule compressed to the budget"),
        AttackSpec(
            "divergence", "divergence", steps=20, step_size=2 / 255, random_start="uniform",
            description="divergence (DIVA): PGD-20 of 2/255 on p_float(y) - p_edge(y), uniform start",
        ),
    )
}


def get_attack(name: str) -> AttackSpec:
    """The preset called ``name`` (case and ``-``/``_`` insensitive: ``PGD-SAT`` works); ConfigError otherwise."""
    key = name.strip().lower().replace("-", "_")
    if key in ATTACK_PRESETS:
        return ATTACK_PRESETS[key]
    raise unknown_name_error("attack", name, ATTACK_PRESETS)


def run_white_box(
    spec: AttackSpec,
    model_fn: ModelFn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run the FGSM / PGD attack ``spec`` at budget ``eps``; ConfigError for the non-gradient kinds."""
    if spec.kind == "fgsm":
        return fgsm(model_fn, x, y, eps=eps)
    if spec.kind == "pgd":
        assert spec.step_size is not None  # checked in __post_init__
        return pgd(
            model_fn, x, y, eps=eps, step_size=spec.step_size, steps=spec.steps, loss=spec.loss,
            random_start=spec.random_start, generator=generator, cw_confidence=spec.cw_confidence,
        )
    raise ConfigError(
        f"attack {spec.name!r} ({spec.kind}) is not a white-box attack; "
        f"white-box attacks are: {', '.join(n for n, s in ATTACK_PRESETS.items() if s.is_white_box)}."
    )
