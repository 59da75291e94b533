"""AutoAttack (Croce & Hein 2020), the official implementation (PyPI ``pyautoattack``), as RSLAD reports it.

``version="standard"`` runs APGD-CE, APGD-T (9 target classes), FAB-T (9) and Square (5000 queries), each only on the
points still robust, and keeps the first adversarial example found per sample. torchattacks' re-implementation gives
different numbers (RSLAD.md, "Known traps"), hence the official package.

Logging: pyautoattack >= 0.2 writes its progress to the ``"auto-attack"`` logger at DEBUG and its sanity checks
("randomized defense", "output is a probability distribution", "Square beat the white-box attacks") at WARNING. We
leave the warnings to propagate (they flag gradient masking and wrong model outputs), and with ``log_path`` also
write the full DEBUG log to a file, the way the official scripts keep ``log_file``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from rslad_edge.attacks.eps import check_eps
from rslad_edge.errors import ConfigError

AUTOATTACK_VERSIONS: tuple[str, ...] = ("standard", "plus", "rand", "apgd")
# "apgd": the standard version's two gradient attacks, APGD-CE and APGD-T (9 target classes, one restart each, as
# standard sets them), without FAB-T and Square. On a CPU they are a third of standard's cost, FAB-T rarely adds a
# point on robust models, and verify runs Square as its own column. Not the paper's AA column: say so when quoting it.
APGD_ONLY = ["apgd-ce", "apgd-t"]
AUTOATTACK_LOGGER = "auto-attack"


def autoattack(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    version: str = "standard",
    batch_size: int = 250,
    seed: int = 0,
    log_path: str | Path | None = None,
    state_path: str | Path | None = None,
) -> torch.Tensor:
    """Return AutoAttack's ``x_adv`` (like ``x``): adversarial where some attack succeeded, else the clean input.

    Args:
        model: ``x -> logits`` (an ``nn.Module`` in eval mode or any differentiable callable), on ``x``'s device.
        x, y: clean inputs (float NCHW in [0, 1]) and labels; the attack runs on ``x.device``.
        eps: L-inf budget in pixel units (8/255; the TRADES line of work used 0.031, which AA numbers show).
        version: ``"standard"`` (RSLAD's AA column), ``"plus"``, ``"rand"`` (randomized defenses) or ``"apgd"``
            (APGD-CE + APGD-T of standard, see :data:`APGD_ONLY`).
        batch_size: samples per attack batch (250 in the official scripts).
        seed: seed of every sub-attack (the official default ``None`` uses the time, not reproducible).
        log_path: if given, the full DEBUG log of the run is appended to this file.
        state_path: if given, the official resumable evaluation state (JSON) is kept there.
    """
    eps = check_eps(eps)
    if version not in AUTOATTACK_VERSIONS:
        raise ConfigError(f"unknown AutoAttack version {version!r}; choose one of {', '.join(AUTOATTACK_VERSIONS)}.")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}.")
    try:
        from pyautoattack import AutoAttack
    except ImportError as error:
        raise ConfigError(
            "AutoAttack needs the official package: pip install pyautoattack (or pip install 'rslad-edge[autoattack]')."
        ) from error

    x = x.detach()
    y = y.detach().to(device=x.device, dtype=torch.long)
    aa_logger = logging.getLogger(AUTOATTACK_LOGGER)
    handler: logging.Handler | None = None
    previous_level = aa_logger.level
    if log_path is not None:
        handler = logging.FileHandler(log_path, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        aa_logger.addHandler(handler)
        aa_logger.setLevel(logging.DEBUG)
    # fork_rng: every sub-attack re-seeds the global RNG; a training loop calling this keeps its own stream.
    rng_devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()] if x.is_cuda else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            if version == "apgd":
                adversary = AutoAttack(model, norm="Linf", eps=eps, version="custom", attacks=APGD_ONLY, seed=seed,
                                       device=x.device)
                adversary.apgd.n_restarts = 1  # as the standard version sets it (custom keeps the class's 5)
                adversary.apgd_targeted.n_target_classes = 9
            else:
                adversary = AutoAttack(model, norm="Linf", eps=eps, version=version, seed=seed, device=x.device)
            result = adversary.run_standard_evaluation(
                x, y, batch_size=batch_size, state_path=Path(state_path) if state_path is not None else None
            )
    finally:
        if handler is not None:
            aa_logger.removeHandler(handler)
            handler.close()
            aa_logger.setLevel(previous_level)
    # pyautoattack >= 0.2 returns (x_adv, y_adv); the original auto-attack returns x_adv.
    x_adv = result[0] if isinstance(result, tuple) else result
    return x_adv.detach().to(dtype=x.dtype)
