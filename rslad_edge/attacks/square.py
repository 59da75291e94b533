"""The Square attack (Andriushchenko et al. 2020), L-inf, from the official implementation in ``pyautoattack``.

Square needs nothing but logits, so it attacks whatever actually runs on the device: an ONNX Runtime session, an
INT8 model whose gradients are masked, a TensorRT engine. That is why verify runs it against the exported artifact
itself (RSLAD.md, "Known traps"): transferring gradient attacks from the float model can overstate an INT8 model's
robustness. RSLAD's black-box row uses 5000 queries and p_init 0.8.

What the official code does, and what this wrapper keeps:

- It attacks only the samples the predictor classifies correctly; the others come back unchanged (0 queries).
  ``SquareAttack.perturb`` also returns the clean input for samples it did not fool.
- The loss is the margin ``z_y - max_{j != y} z_j`` (``loss="margin"``); a sample stops once it is fooled.
- The p schedule (the fraction of pixels a square covers, halved at fixed iterations) comes in two settings:
  ``schedule="paper"`` keeps it fixed for 10,000 queries, as the paper and AutoAttack run it (``resc_schedule=False``);
  ``schedule="budget"`` compresses it to ``n_queries`` (``SquareAttack``'s own default), so a short attack also
  reaches the small squares that finish off the last images. Measured with ``benchmarks/square_schedule.py`` (200
  CIFAR-10 test images, robust accuracy, lower = stronger; README, verify): on a non-robust CNN "budget" is far
  stronger (1,000 queries: 6.8 % vs 17.8 %; 150: 33.5 % vs 39.3 %); on the robust int8 ResNet-18 the two tie at
  1,000 (48.0 % vs 48.2 %) and "paper" leads at 150 (51.8 % vs 54.0 %). At 5,000 queries (verify's default; the
  int8 RSLAD MobileNetV2 of README's cpu-30min table, 100 test images, seeds 0/1/2) they tie: "paper" 9.0 / 12.0 /
  11.0 %, "budget" 11.0 / 12.0 / 11.0 %, ART's SquareAttack 11.0 % (seed 0) with 251,828 image-forwards against
  our 48,765-60,408. "budget" is the default: never far behind, and at least as strong as ART's SquareAttack
  everywhere measured, with a sixth to a third of its forwards at 150-1,000 queries and under a quarter at 5,000.
- Its tensor work runs on one torch thread: the tensors are a few hundred KB, and extra threads only fight the
  runtime's own threads for the cores between queries (on 2 cores, with ONNX Runtime's threads spinning, the attack's
  small ops took 60 % of the wall time; on one thread, 2 %).
- ``perturb`` re-seeds the *global* torch RNG with ``seed``; we run it inside ``torch.random.fork_rng`` so a training
  loop that calls it keeps its own random stream.

To return the queries each sample used (which ``perturb`` drops), this module repeats ``perturb``'s few lines for one
restart around the official ``attack_single_run``, which does the search.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch

from rslad_edge.attacks.eps import check_eps
from rslad_edge.errors import ConfigError

logger = logging.getLogger(__name__)

PredictFn = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]
ProgressFn = Callable[[int, int], None]
SQUARE_SCHEDULES: tuple[str, ...] = ("budget", "paper")
DEFAULT_SCHEDULE = "budget"


class SquareResult(NamedTuple):
    """``x_adv`` (like ``x``) and ``queries`` (N,) int64: model queries spent on each sample, 0 if not attacked."""

    x_adv: torch.Tensor
    queries: torch.Tensor


def square(
    predict_fn: PredictFn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    n_queries: int = 5000,
    p_init: float = 0.8,
    seed: int = 0,
    progress: ProgressFn | None = None,
    schedule: str = DEFAULT_SCHEDULE,
) -> SquareResult:
    """Run the official L-inf Square attack with only ``predict_fn`` (no gradients, no ``nn.Module``).

    Args:
        predict_fn: ``x -> logits``. It receives a plain tensor on ``x``'s device (a CPU tensor when ``x`` is on the
            CPU; ``.numpy()`` works on it) and may return a tensor or a numpy array ``(N, classes)``; the result is
            copied to float32 on ``x``'s device (the official code writes into the logits it gets).
        x: clean inputs, float NCHW in [0, 1]. y: true labels ``(N,)``.
        eps: L-inf budget in pixel units.
        n_queries: maximum number of search iterations (queries per sample, plus the initial one).
        p_init: initial fraction of pixels changed by a square (0.8 in RSLAD and AutoAttack).
        seed: seed of the search; results are reproducible for a given seed and input.
        progress: called as ``progress(iterations_done, n_queries)`` after each query of the search loop, and once
            with ``(n_queries, n_queries)`` at the end (the search stops early when every sample is fooled).
        schedule: ``"budget"`` (the p schedule compressed to ``n_queries``) or ``"paper"`` (fixed for 10,000
            queries, as the paper and AutoAttack); see the module docstring.

    Returns:
        :class:`SquareResult` ``(x_adv, queries)``; ``x_adv`` differs from ``x`` only where the attack succeeded.
    """
    eps = check_eps(eps)
    if n_queries < 1:
        raise ConfigError(f"--n-queries must be >= 1 for the Square attack, got {n_queries}.")
    if not 0 < p_init <= 1:
        raise ConfigError(f"--p-init must be in (0, 1], got {p_init}.")
    if schedule not in SQUARE_SCHEDULES:
        raise ConfigError(f"--square-schedule must be one of {', '.join(SQUARE_SCHEDULES)}, got {schedule!r}.")
    square_attack_class = _import_square_attack()

    x = x.detach()
    y = y.detach().to(device=x.device, dtype=torch.long)
    queries = torch.zeros(x.shape[0], dtype=torch.long)
    x_adv = x.clone()
    if x.shape[0] == 0 or eps == 0:
        return SquareResult(x_adv, queries)

    predict = _QueryCounter(predict_fn, x.device, progress, n_queries)
    attacker = square_attack_class(
        predict,
        norm="Linf",
        n_queries=n_queries,
        eps=eps,
        p_init=p_init,
        n_restarts=1,
        seed=seed,
        verbose=False,
        loss="margin",
        resc_schedule=schedule == "budget",
        device=x.device,
    )
    # fork_rng: the official code re-seeds the global RNG; restore the caller's stream afterwards.
    rng_devices = [x.device.index if x.device.index is not None else torch.cuda.current_device()] if x.is_cuda else []
    n_fooled = 0
    with torch.no_grad(), torch.random.fork_rng(devices=rng_devices), _one_thread():
        attacker.init_hyperparam(x)
        clean_correct = predict(x).argmax(dim=1) == y  # (N,)
        attacked_idx = clean_correct.nonzero().flatten()  # only what is still correct, as perturb does
        if attacked_idx.numel() > 0:
            # perturb() seeds here, after its clean forward: same random stream as the official attack.
            torch.random.manual_seed(seed)
            if x.is_cuda:
                torch.cuda.random.manual_seed(seed)
            predict.searching = True
            used_queries, x_search = attacker.attack_single_run(x[attacked_idx], y[attacked_idx])
            predict.searching = False
            fooled = predict(x_search).argmax(dim=1) != y[attacked_idx]  # (n_attacked,)
            x_adv[attacked_idx[fooled]] = x_search[fooled].to(x.dtype)
            queries[attacked_idx.cpu()] = used_queries.long().cpu()
            n_fooled = int(fooled.sum())
    if progress is not None:
        progress(n_queries, n_queries)
    logger.debug("square: fooled %d of %d clean-correct samples with at most %d queries (%d given)",
                 n_fooled, attacked_idx.numel(), int(queries.max()), n_queries)
    return SquareResult(x_adv, queries)


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one intra-op thread while the search runs (see the module docstring), restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _QueryCounter:
    """Adapts ``predict_fn`` to what ``SquareAttack`` needs (a float32 tensor it may write into); reports progress."""

    def __init__(self, predict_fn: PredictFn, device: torch.device, progress: ProgressFn | None, total: int) -> None:
        self.predict_fn = predict_fn
        self.device = device
        self.progress = progress
        self.total = total
        self.searching = False
        self.search_queries = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits: Any = self.predict_fn(x.detach().contiguous())
        if isinstance(logits, np.ndarray):
            logits = torch.from_numpy(np.ascontiguousarray(logits))
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"predict_fn must return a torch.Tensor or numpy array of logits, got {type(logits)}")
        if self.searching:
            # The first call of the search is its initial point; the following ones are iterations.
            if self.progress is not None and self.search_queries > 0:
                self.progress(min(self.search_queries, self.total), self.total)
            self.search_queries += 1
        # copy=True: SquareAttack sets logits[u, y] = -inf in place, which must not reach the caller's buffers.
        return logits.detach().to(device=self.device, dtype=torch.float32, copy=True)


def _import_square_attack() -> type:
    try:
        from pyautoattack.square import SquareAttack
    except ImportError as error:
        raise ConfigError(
            "the Square attack needs the official AutoAttack package: pip install pyautoattack "
            "(or pip install 'rslad-edge[autoattack]')."
        ) from error
    return SquareAttack
