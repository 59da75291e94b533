"""Quantization-aware training of the int8 graph the exporter emits: the int8 search's last all-int8 candidate.

When no post-training recipe keeps parity, ``rslad-edge export --precision int8 --search --qat-epochs N`` trains the
best one's own Q/DQ graph (ONNX Runtime's U8S8 for ``--target cpu``, S8S8 for ``trt``) through its trainable twin
(``OnnxTwin(trainable=True)``): its int8 weights and int32 biases on the graph's own grid (rounding straight-through),
the float classifier's weights, and with ``--qat-scale-lr`` > 0 its activation scales (LSQ; each layer's bias grid
follows its input scale). What is trained is therefore exactly what ONNX Runtime then runs: the trained integers and
scales are written back into the same graph (``OnnxTwin.quantized_onnx``). For ``--format executorch`` the
trained graph is PT2E's own QAT graph of the best recipe (``executorch_export.QatProgram``: the XNNPACK quantizer's
QAT configuration, fake-quantized weights with BatchNorm folded in, activation ranges tracked by moving averages),
converted and lowered to a ``.pte`` after each epoch. Both are a :class:`TrainableGraph` to :func:`train_graph`.

The loss is RSLAD's with the float checkpoint as its own teacher: ``alpha * KL(F(x) || Q(x')) + (1 - alpha) *
KL(F(x) || Q(x))``, F the float model, Q the int8 graph, x' crafted by PGD on Q (KL to F's soft labels, RSLAD's inner
attack). The float model, not the robust teacher it was distilled from, gives the soft labels because the gate is
parity with it (agreement, and robust accuracy within ``--max-drop`` of its own); ``--qat-alpha 0`` trains on clean
images only (about four times cheaper). Weights: SGD with momentum, its learning rate decaying to 0 along a cosine over
the epochs, the gradient norm clipped at 1 (Adam's normalised steps move int32 biases by many grid steps at once).
Activation scales: Adam on the log of each scale's ratio to its calibrated value, at ``--qat-scale-lr`` along the
same cosine, so that a step changes a scale by about that fraction whatever its size.

Training images are ``--qat-n`` training images after the search's splits (disjoint from calibration, search and
confirmation). After each epoch the graph is written and its agreement measured on the search split; the best epoch
is the QAT candidate, which the search then judges like any other (search split, then confirmation split).

Resumable: after each epoch the state (weights, optimizer, best epoch so far) is saved in ``state_dir``; the same
command run again continues from the last finished epoch (a changed base graph, training images or setting starts
over, with a warning). Ctrl-C loses at most the epoch in progress.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from rslad_edge.errors import TrainingDivergedError, TrainingInterrupted

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
BEST_STEM = "best"  # the best epoch's artifact: best.onnx, best.pte


@dataclass(frozen=True)
class QatSettings:
    """How the int8 graph is trained (ExportConfig's ``--qat-*`` values, resolved)."""

    epochs: int
    lr: float = 3e-3
    alpha: float = 5 / 6  # weight of the adversarial term; 0: clean images only
    attack_steps: int = 3
    eps: float = 8 / 255
    batch_size: int = 64
    momentum: float = 0.9
    max_grad_norm: float = 1.0  # clip each step's gradient norm (an int8 graph far from its float model can diverge)
    scale_lr: float = 1e-3  # Adam's step on the log activation scales (LSQ); 0: activation scales as calibrated
    seed: int = 0

    def lr_at(self, step: int, steps: int) -> float:
        """Cosine decay from ``lr`` to 0 over ``steps`` (fine-tuning an already good graph: the last epochs settle)."""
        return 0.5 * self.lr * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))

    @property
    def step_size(self) -> float:
        return 2.5 * self.eps / self.attack_steps

    def fingerprint(self) -> dict[str, Any]:
        """What a saved state must match to be resumed: everything but the epoch count, which may grow (the cosine
        then stretches over the new count)."""
        return {key: value for key, value in asdict(self).items() if key != "epochs"} | {"schedule": "cosine"}


@dataclass
class QatResult:
    """The trained graph of the best epoch (on the search split) and each epoch's figures."""

    path: Path
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "history": self.history, "resumed_from": self.resumed_from}


class TrainableGraph(Protocol):
    """What QAT trains: an int8 candidate's fake-quantized graph, and how it becomes the artifact again."""

    suffix: str  # the artifact's, ".onnx" or ".pte"
    module: torch.nn.Module  # the graph, trained in place
    sha256: str  # of what it was built from: a saved state for another base is not resumed

    def scale_parameters(self) -> list[torch.nn.Parameter]: ...  # learnt by Adam on their logs (LSQ); may be empty

    def write(self, path: Path) -> None: ...  # the artifact of the graph as it is now

    def predict(self, path: Path, images: np.ndarray) -> np.ndarray: ...  # logits of a written artifact


class OnnxGraph:
    """An ONNX Q/DQ candidate, trained through its trainable twin and written back into the same graph."""

    suffix = ".onnx"

    def __init__(self, base_path: Path, settings: QatSettings, *, threads: int | None = None,
                 reference: bool = False) -> None:
        from rslad_edge.runtime.twin import OnnxTwin

        self.base, self.threads, self.reference = onnx.load(str(base_path)), threads, reference
        self.module = OnnxTwin(self.base, source=base_path.name, trainable=True, learn_scales=settings.scale_lr > 0)
        self.sha256 = _sha256(base_path.read_bytes())

    def scale_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.module.scale_parameters())

    def write(self, path: Path) -> None:
        onnx.save(self.module.quantized_onnx(self.base), str(path))

    def predict(self, path: Path, images: np.ndarray) -> np.ndarray:
        from rslad_edge.runtime import OnnxRunner

        return OnnxRunner(path, device="cpu", threads=self.threads, reference=self.reference).predict(images)


def train_int8(
    base_path: Path,
    model: torch.nn.Module,
    images: np.ndarray,
    judge: tuple[np.ndarray, np.ndarray],
    settings: QatSettings,
    state_dir: Path,
    *,
    threads: int | None = None,
) -> QatResult:
    """Train the ONNX int8 graph at ``base_path`` (:func:`train_graph`)."""
    return train_graph(OnnxGraph(base_path, settings, threads=threads), model, images, judge, settings, state_dir)


def train_graph(
    graph: TrainableGraph,
    model: torch.nn.Module,
    images: np.ndarray,
    judge: tuple[np.ndarray, np.ndarray],
    settings: QatSettings,
    state_dir: Path,
) -> QatResult:
    """Train ``graph`` toward the float ``model`` (eval mode, CPU) on ``images``; after each epoch, agreement of its
    written artifact with the float model's ``judge`` = (images, float predictions) picks the best epoch. Returns
    the best epoch's artifact (in ``state_dir``); ``graph.module`` is left with the best epoch's state."""
    twin = graph.module
    optimizer = _Optimizers(twin, graph.scale_parameters(), settings)
    fingerprint = {**settings.fingerprint(), "state_format": 2, "base_sha256": graph.sha256,
                   "images_sha256": _sha256(np.ascontiguousarray(images).tobytes())}
    state_dir.mkdir(parents=True, exist_ok=True)
    result = QatResult(state_dir / f"{BEST_STEM}{graph.suffix}", best_epoch=0)
    best_agreement, start, best_state = -1.0, 1, None
    saved = _load_state(state_dir, fingerprint)
    if saved is not None:
        twin.load_state_dict(saved["twin"])
        optimizer.load_state_dict(saved["optimizer"])
        result.history, result.best_epoch = list(saved["history"]), int(saved["best_epoch"])
        best_agreement, start = float(saved["best_agreement"]), int(saved["epoch"]) + 1
        best_state = saved["best_twin"]
        result.resumed_from = int(saved["epoch"])
        logger.info("int8 QAT: resuming after epoch %d (state in %s)", saved["epoch"], state_dir)

    x_all = torch.from_numpy(images)
    with torch.no_grad():
        soft_all = torch.cat([model(batch) for batch in x_all.split(256)]).float()
    judge_images, judge_predictions = judge
    epoch = start
    try:
        for epoch in range(start, settings.epochs + 1):
            started = time.perf_counter()
            loss, norm = _train_epoch(twin, optimizer, x_all, soft_all, settings, epoch)
            staged = state_dir / f".epoch{epoch}{graph.suffix}"
            graph.write(staged)
            agreement = float((graph.predict(staged, judge_images).argmax(1) == judge_predictions).mean())
            seconds = time.perf_counter() - started
            result.history.append({"epoch": epoch, "loss": round(loss, 6), "search_agreement": agreement,
                                   "grad_norm_p50": round(norm, 6), "seconds": round(seconds, 1)})
            if agreement >= best_agreement:  # ties: the later epoch, trained longer toward the float model
                best_agreement, result.best_epoch = agreement, epoch
                best_state = {key: value.detach().clone() for key, value in twin.state_dict().items()}
                os.replace(staged, result.path)
            else:
                staged.unlink()
            _save_state(state_dir, {"fingerprint": fingerprint, "epoch": epoch, "twin": twin.state_dict(),
                                    "optimizer": optimizer.state_dict(), "history": result.history,
                                    "best_epoch": result.best_epoch, "best_agreement": best_agreement,
                                    "best_twin": best_state})
            logger.info("int8 QAT epoch %d/%d: loss %.4f (gradient norm p50 %.3g), agreement %.1f%% on the search "
                        "split, %.0f s", epoch, settings.epochs, loss, norm, 100 * agreement, seconds)
    except KeyboardInterrupt:
        finished = "epoch 1" if epoch == 2 else f"epochs 1-{epoch - 1}"
        done = f"{finished} saved in {state_dir}" if epoch > 1 else "no epoch had finished"
        raise TrainingInterrupted(f"int8 QAT interrupted in epoch {epoch}; {done}: the same command continues "
                                  "from there") from None
    if not result.path.is_file() or best_state is None:
        raise FileNotFoundError(f"int8 QAT: {result.path} is missing from its state folder; remove {state_dir} and "
                                "run again")
    twin.load_state_dict(best_state)
    return result


def _train_epoch(twin: torch.nn.Module, optimizer: _Optimizers, x_all: torch.Tensor,
                 soft_all: torch.Tensor, settings: QatSettings, epoch: int) -> tuple[float, float]:
    """One epoch over ``x_all`` in a seeded order (the same on a resume); (mean loss, median gradient norm)."""
    from rslad_edge.attacks.pgd import pgd
    from rslad_edge.distill.losses import rslad_terms

    batches = math.ceil(len(x_all) / settings.batch_size)
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch)
    order = torch.randperm(len(x_all), generator=generator)
    total, norms = 0.0, []
    for index in range(batches):
        optimizer.set_lr(settings, (epoch - 1) * batches + index, settings.epochs * batches)
        chosen = order[index * settings.batch_size:(index + 1) * settings.batch_size]
        x, soft = x_all[chosen], soft_all[chosen]
        if settings.alpha > 0:
            x_adv = pgd(twin, x, None, eps=settings.eps, step_size=settings.step_size, steps=settings.attack_steps,
                        loss="kl", random_start="normal", target_probs=F.softmax(soft, dim=1), generator=generator,
                        clamp_start=False)
            loss = rslad_terms(twin(x_adv), twin(x), soft, alpha=settings.alpha).total
        else:
            loss = rslad_terms(twin(x), twin(x), soft, alpha=0.0).total
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"int8 QAT: the loss is {loss.item()} at epoch {epoch}, batch {index + 1}; the last finished epoch "
                f"is saved: lower --qat-lr (now {settings.lr:g})")
        optimizer.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(optimizer.weights, settings.max_grad_norm)))
        optimizer.step()
        total += loss.item()
    return total / batches, float(np.median(norms))


class _Optimizers:
    """SGD for the weights, Adam for the log activation scales (when they learn), stepped as one optimizer."""

    def __init__(self, twin: Any, scales: list[torch.nn.Parameter], settings: QatSettings) -> None:
        self.weights = [parameter for parameter in twin.parameters() if all(parameter is not s for s in scales)]
        self.rates: list[tuple[torch.optim.Optimizer, float]] = [
            (torch.optim.SGD(self.weights, lr=settings.lr, momentum=settings.momentum), settings.lr)]
        if scales:
            self.rates.append((torch.optim.Adam(scales, lr=settings.scale_lr), settings.scale_lr))

    def set_lr(self, settings: QatSettings, step: int, steps: int) -> None:
        """Each along the cosine: from its rate to 0 over the epochs asked."""
        factor = settings.lr_at(step, steps) / settings.lr
        for optimizer, lr in self.rates:
            for group in optimizer.param_groups:
                group["lr"] = lr * factor

    def zero_grad(self) -> None:
        for optimizer, _ in self.rates:
            optimizer.zero_grad()

    def step(self) -> None:
        for optimizer, _ in self.rates:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer, _ in self.rates]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for (optimizer, _), saved in zip(self.rates, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _load_state(state_dir: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state when it belongs to this training (same base graph, images and settings), else None."""
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: data, never code
        logger.warning("int8 QAT: cannot read %s (%s); training from the start", path, exc)
        return None
    if saved.get("fingerprint") != fingerprint:
        changed = sorted(key for key in fingerprint if (saved.get("fingerprint") or {}).get(key) != fingerprint[key])
        logger.warning("int8 QAT: %s was saved for another training (%s changed); training from the start", path,
                       ", ".join(changed))
        return None
    return saved


def _save_state(state_dir: Path, state: dict[str, Any]) -> None:
    staged = state_dir / f".{STATE_FILE}.tmp"
    torch.save(state, staged)
    os.replace(staged, state_dir / STATE_FILE)


def describe(settings: QatSettings, n: int) -> dict[str, Any]:
    """What the training was, for the search's record."""
    loss = ("KL to the float model's soft labels on clean images" if settings.alpha == 0 else
            f"RSLAD form, alpha {settings.alpha:.3g}, PGD-{settings.attack_steps} (KL, step 2.5 eps / steps) inside")
    return {"epochs": settings.epochs, "images": n, "lr": settings.lr, "batch_size": settings.batch_size,
            "optimizer": f"SGD, momentum {settings.momentum}, cosine to 0, gradient norm clipped at "
                         f"{settings.max_grad_norm:g}", "loss": loss, "eps": settings.eps,
            "soft_labels": "the float checkpoint", "trained": "int8 weights, int32 biases, float classifier; "
            + (f"activation scales (LSQ, Adam at {settings.scale_lr:g} on their logs)" if settings.scale_lr > 0
               else "activation ranges as calibrated")}
