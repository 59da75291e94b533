"""The int8 search: when the default int8 model loses parity or robustness, find one that does not.

``rslad-edge export --precision int8 --search`` tries quantization recipes, fastest first, and ships the first one
that passes the gate on held-out images; the parity check on test images then runs on it as on any export.

Candidates, in order (``--search-budget`` of them at most):

1. every layer in int8 (equally fast): the default recipe (minmax ranges, per-channel weights), then percentile
   and entropy ranges, per-tensor weights and, for ``--target cpu``, 7-bit weights (``reduce_range``: x86 CPUs
   without VNNI can saturate on full-range weights);
2. with ``--qat-epochs N``: the best of those, trained for N epochs by quantization-aware training of its own
   graph (export/qat.py): still every layer in int8, so as fast as the first candidates;
3. the best all-int8 recipe with its most sensitive layers in float32 (1, 2, 4, 8, ... of them, never all: that
   would be the fp32 model with extra conversions; :func:`keep_float`).
   Sensitivity is robustness-aware: the KL divergence from the float model's predictions, on clean images and on
   PGD examples crafted on the float model, that keeping one layer in float32 removes (measured with ONNX Runtime
   on the candidate's own graph, one layer at a time).

Every candidate is judged on training images it was not calibrated on, in two disjoint seeded splits (never the
test images parity and verify report on): a search split screens (agreement, then robust accuracy), and only a
candidate that passes it faces the confirmation split, whose verdict ships it. The gate, on the confirmation split:

- the lower end of the 95 % (Wilson) interval of its top-1 agreement with the float model clears
  ``--min-agreement`` (97 % by default: a bar on the point estimate is a coin toss near it);
- its robust accuracy is at most ``--max-drop`` points below the float model's (paired, same images). Robust
  accuracy is per image the worse of PGD through the candidate's differentiable twin (white-box on what it
  computes) and PGD transferred from the float model: a quantized model can mask gradients, so either alone may
  overstate it. The float model faces PGD white-box. Every attack is judged by ONNX Runtime's predictions.

Latency at batch 1 and 64 is measured for every candidate on this machine, for the trade-off table (sidecar,
``search``); a candidate less than ``--min-speedup`` times as fast as the fp32 ONNX at batch 64 (1 by default: not
faster) is not judged: float layers between int8 ones add conversions, and a slower "int8" artifact is worth less
than the exact fp32 one. No candidate passing: the best one is kept under a name that says so (exit 3).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from rslad_edge.attacks.evaluate import adversarial_examples, evaluate_attack
from rslad_edge.attacks.presets import AttackSpec
from rslad_edge.errors import GateFailedError
from rslad_edge.export.precision import keep_float, quantizable_nodes, quantize_int8
from rslad_edge.export.qat import QatSettings, describe, train_int8
from rslad_edge.stats import paired_drop_ci95_pp, wilson_ci95

logger = logging.getLogger(__name__)

# The attack of the search: PGD-10, step eps/4, uniform start (the training-time PGD of the paper's recipes). Its
# verdict is confirmed later by verify's full suite on test images; here it ranks and gates candidates.
SEARCH_STEPS = 10
SENSITIVITY_N = 256  # search-split images (each also as its float-PGD example) that rank the layers
LATENCY_BATCHES = (1, 64)


@dataclass(frozen=True)
class Recipe:
    """How one candidate is quantized (the knobs of :func:`quantize_int8`)."""

    calib_method: str = "minmax"
    per_channel: bool = True
    reduce_range: bool = False
    float_nodes: tuple[str, ...] = ()
    qat_epochs: int = 0  # quantization-aware training of the quantized graph (export/qat.py)

    @property
    def label(self) -> str:
        """``minmax``, ``entropy per-tensor``, ``minmax 7-bit``, ``minmax +2 fp32``, ``minmax +QAT 3 ep``
        (per-channel 8-bit unless said)."""
        return " ".join([self.calib_method, *(["per-tensor"] if not self.per_channel else []),
                         *(["7-bit"] if self.reduce_range else []),
                         *([f"+{len(self.float_nodes)} fp32"] if self.float_nodes else []),
                         *([f"+QAT {self.qat_epochs} ep"] if self.qat_epochs else [])])

    def to_json(self) -> dict[str, Any]:
        return {"calib_method": self.calib_method, "per_channel": self.per_channel,
                "reduce_range": self.reduce_range, "float_nodes": list(self.float_nodes),
                "qat_epochs": self.qat_epochs}


@dataclass
class Split:
    """Held-out training images, with what the float model does on them (computed once, shared by candidates)."""

    name: str
    images: np.ndarray  # float32 (N, C, H, W) in [0, 1]
    labels: np.ndarray  # int64 (N,)
    float_logits: np.ndarray = field(init=False)
    float_adversarial: np.ndarray = field(init=False)  # PGD on the float model: its white-box examples
    float_adversarial_logits: np.ndarray = field(init=False)
    float_robust: torch.Tensor = field(init=False)  # (N,) bool: clean-correct and correct on its PGD example

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Judgement:
    """One candidate on one split: agreement with the float model, and (when screened that far) robustness."""

    n: int
    agreement: float
    agreement_ci95: tuple[float, float]
    accuracy: float
    robust: float | None = None  # worst of twin PGD and transfer PGD, per image
    float_robust: float | None = None
    drop_pp: float | None = None
    drop_ci95_pp: float | None = None
    twin_agreement: float | None = None  # None: no twin (an op it cannot emulate), so transfer PGD only

    def to_json(self) -> dict[str, Any]:
        return {key: (list(value) if isinstance(value, tuple) else value) for key, value in self.__dict__.items()}


@dataclass
class Candidate:
    """A recipe tried: its speed, its judgements, and the verdict in words."""

    recipe: Recipe
    latency_ms: dict[int, float] = field(default_factory=dict)  # batch -> p50 milliseconds
    search: Judgement | None = None
    confirmation: Judgement | None = None
    verdict: str = ""
    passed: bool = False
    seconds: float = 0.0
    path: Path | None = field(default=None, repr=False)  # the candidate's ONNX, in the search's work folder
    quant_info: dict[str, Any] = field(default_factory=dict, repr=False)  # quantize_int8's account of it
    qat: dict[str, Any] | None = None  # a QAT candidate: its training, epoch by epoch (export/qat.py)

    def score(self) -> tuple[float, float]:
        """For choosing the best of the failures: the split that went furthest, agreement, then robustness."""
        judged = self.confirmation or self.search
        if judged is None:
            return (-1.0, -1.0)
        return (judged.agreement, judged.robust if judged.robust is not None else -1.0)

    def to_json(self) -> dict[str, Any]:
        return {"recipe": self.recipe.to_json(), "label": self.recipe.label,
                "latency_ms": {str(batch): round(ms, 4) for batch, ms in self.latency_ms.items()},
                "search": self.search.to_json() if self.search else None,
                "confirmation": self.confirmation.to_json() if self.confirmation else None,
                "verdict": self.verdict, "passed": self.passed, "seconds": round(self.seconds, 1),
                **({"qat": self.qat} if self.qat else {})}


@dataclass
class SearchResult:
    """Every candidate tried, in order, and the one chosen (None: none passed the gate)."""

    candidates: list[Candidate]
    chosen: Candidate | None
    settings: dict[str, Any]
    sensitivity: list[tuple[str, float]] = field(default_factory=list)  # layer -> KL removed, most sensitive first

    @property
    def best(self) -> Candidate:
        """The chosen candidate, else the one that came closest."""
        return self.chosen or max(self.candidates, key=Candidate.score)

    def to_json(self) -> dict[str, Any]:
        return {**self.settings, "candidates": [candidate.to_json() for candidate in self.candidates],
                "chosen": None if self.chosen is None else self.candidates.index(self.chosen),
                "sensitivity": [[name, round(value, 6)] for name, value in self.sensitivity]}


SEARCH_TABLE_HEADER = ["#", "recipe", "ms b=1", "ms b=64", "agreement % (95% low)", "robust % / float (change)",
                       "verdict"]


def table_rows(search: dict[str, Any]) -> list[list[str]]:
    """Rows of the trade-off table from a search's JSON (``SearchResult.to_json``, a sidecar's ``search``): #,
    recipe, p50 ms at batch 1 and 64, agreement (on the furthest split it reached), robust accuracy, verdict."""
    rows = []
    for index, candidate in enumerate(search["candidates"]):
        split = "confirmation" if candidate["confirmation"] else "search"
        judged = candidate[split]
        agreement = robust = "-"
        if judged:
            agreement = f"{100 * judged['agreement']:.1f} (≥{100 * judged['agreement_ci95'][0]:.1f})"
            if judged["robust"] is not None:
                robust = (f"{100 * judged['robust']:.1f} / {100 * judged['float_robust']:.1f} "
                          f"({-judged['drop_pp']:+.1f}±{judged['drop_ci95_pp'] or 0:.1f})")
        latency = [f"{candidate['latency_ms'][str(b)]:.2f}" if str(b) in candidate["latency_ms"] else "-"
                   for b in LATENCY_BATCHES]
        verdict = "shipped" if index == search["chosen"] else candidate["verdict"]
        rows.append([str(index + 1), candidate["label"], *latency, agreement, robust, verdict])
    fp32 = search.get("fp32_latency_ms") or {}
    rows.append(["", "fp32 (no int8)", *(f"{fp32[str(b)]:.2f}" if str(b) in fp32 else "-" for b in LATENCY_BATCHES),
                 "", "", ""])
    return rows


def qat_lines(search: dict[str, Any]) -> list[str]:
    """One line per QAT candidate of a search's JSON: its agreement on the search split epoch by epoch."""
    lines = []
    for candidate in search["candidates"]:
        qat = candidate.get("qat")
        if qat:
            epochs = ", ".join(f"{100 * entry['search_agreement']:.1f}" for entry in qat["history"])
            seconds = statistics.median(entry["seconds"] for entry in qat["history"]) if qat["history"] else 0
            lines.append(f"{candidate['label']}: QAT of {qat['base']} on {qat['images']:,} training images "
                         f"({qat['loss']}), agreement % on the search split by epoch: {epochs} (best: epoch "
                         f"{qat['best_epoch']}); {seconds:.0f} s per epoch")
    return lines


class SearchFailedError(GateFailedError):
    """No candidate passed the gate, or the test images refuted the one that did; it is kept beside the final name
    (exit 3). ``result``: the SearchResult, or its JSON."""

    def __init__(self, message: str, result: SearchResult | dict[str, Any], kept: Path | None) -> None:
        super().__init__(message)
        self.result, self.kept = result, kept


@dataclass
class SearchSettings:
    """What the search is asked (ExportConfig's values, resolved)."""

    target: str
    static_batch: int | None
    eps: float
    min_agreement: float
    max_drop: float  # points
    budget: int  # candidates
    seed: int
    threads: int | None = None
    qat: QatSettings | None = None  # None: no QAT candidate
    min_speedup: float = 1.0  # a candidate's speed at batch 64 over the fp32 ONNX's, at least (0: any)

    @property
    def attack(self) -> AttackSpec:
        return AttackSpec("pgd10", "pgd", steps=SEARCH_STEPS, step_size=self.eps / 4, loss="ce",
                          random_start="uniform")


def first_recipes(target: str) -> list[Recipe]:
    """Every-layer-int8 recipes, the default first (a model that passes with it costs one candidate)."""
    recipes = [Recipe(), Recipe(calib_method="percentile"), Recipe(calib_method="entropy"),
               Recipe(per_channel=False)]
    if target == "cpu":
        recipes.append(Recipe(reduce_range=True))
    return recipes


def fallback_counts(layers: int) -> Iterator[int]:
    """1, 2, 4, ... layers in float32, fewer than all of them (all in float32 is the fp32 model, slower)."""
    count = 1
    while count < layers:
        yield count
        count *= 2


def search_int8(
    fp32_path: Path,
    model: torch.nn.Module,
    calib_images: np.ndarray,
    search: Split,
    confirmation: Split,
    settings: SearchSettings,
    workdir: Path,
    *,
    qat_images: np.ndarray | None = None,
    qat_state: Path | None = None,
) -> SearchResult:
    """Run the search (see the module docstring); ``model`` is the float checkpoint in eval mode on the CPU.
    ``qat_images`` (training images disjoint from the splits and calibration) and ``qat_state`` (the folder that
    makes the training resumable) are needed when ``settings.qat`` is set."""
    started = time.perf_counter()
    for split in (search, confirmation):
        _prepare_split(split, model, settings)
    from rslad_edge.runtime import OnnxRunner

    result = SearchResult([], None, {
        "fp32_latency_ms": {str(batch): round(ms, 4) for batch, ms in _latency(
            OnnxRunner(fp32_path, device="cpu", threads=settings.threads), search.images).items()},
        "splits": {split.name: len(split) for split in (search, confirmation)},
        "gate": {"min_agreement_low95": settings.min_agreement, "max_drop_pp": settings.max_drop},
        "attack": f"PGD-{SEARCH_STEPS}, step eps/4, uniform start; twin (white-box) and transfer from the float "
                  "model, worst per image; the float model: PGD white-box",
        "eps": settings.eps, "budget": settings.budget, "target": settings.target,
    })
    def build(recipe: Recipe, *, keep_activations: bool = False) -> tuple[Path, dict[str, Any]]:
        folder = Path(tempfile.mkdtemp(prefix="candidate-", dir=workdir))
        path = folder / "int8.onnx"
        info = quantize_int8(fp32_path, path, calib_images, target=settings.target, method=recipe.calib_method,
                             static_batch=settings.static_batch, workdir=folder, per_channel=recipe.per_channel,
                             reduce_range=recipe.reduce_range, float_nodes=recipe.float_nodes,
                             keep_activations=keep_activations)
        return path, info

    def attempt(recipe: Recipe, built: tuple[Path, dict[str, Any]] | None = None) -> bool:
        path, info = built or build(recipe)
        candidate = _try(recipe, path, search, confirmation, settings, fp32_ms=result.settings["fp32_latency_ms"])
        candidate.path, candidate.quant_info = path, info
        candidate.seconds = time.perf_counter() - started - sum(c.seconds for c in result.candidates)
        result.candidates.append(candidate)
        logger.info("int8 search %d/%d: %s: %s", len(result.candidates), settings.budget, recipe.label,
                    candidate.verdict)
        if candidate.passed:
            result.chosen = candidate
        return candidate.passed or len(result.candidates) >= settings.budget

    for recipe in first_recipes(settings.target):
        if attempt(recipe):
            return result
    best = max(result.candidates, key=Candidate.score)
    if settings.qat is not None:
        assert qat_images is not None and qat_state is not None
        trained = train_int8(best.path, model, qat_images, (search.images, search.float_logits.argmax(1)),
                             settings.qat, qat_state, threads=settings.threads)
        qat_info = {**describe(settings.qat, len(qat_images)), **trained.to_json(), "base": best.recipe.label}
        done = attempt(replace(best.recipe, qat_epochs=settings.qat.epochs),
                       (trained.path, {**best.quant_info, "qat": qat_info}))
        result.candidates[-1].qat = qat_info
        if done:
            return result
    base = best.recipe
    base_path, _ = build(base, keep_activations=True)  # ReLU / Clip as nodes, so a float layer keeps them
    result.sensitivity = _sensitivity(base_path, base_path.parent / "prepared.onnx", search, settings)
    ranked = [name for name, _ in result.sensitivity]
    for count in fallback_counts(len(ranked)):
        if attempt(replace(base, float_nodes=tuple(ranked[:count]))):
            return result
    return result


def _try(recipe: Recipe, path: Path, search: Split, confirmation: Split, settings: SearchSettings, *,
         fp32_ms: dict[str, float]) -> Candidate:
    """Judge one candidate: cheap checks first (speed against the fp32 ONNX's ``fp32_ms``, agreement), the
    confirmation split only for what passed the search split."""
    from rslad_edge.runtime import OnnxRunner

    candidate = Candidate(recipe)
    runner = OnnxRunner(path, device="cpu", threads=settings.threads)
    candidate.latency_ms = _latency(runner, search.images)
    batch = max(LATENCY_BATCHES)
    speedup = fp32_ms[str(batch)] / candidate.latency_ms[batch]
    if settings.min_speedup > 0 and speedup < settings.min_speedup:
        candidate.verdict = (f"{speedup:.2f}x fp32's speed < --min-speedup {settings.min_speedup:g} "
                             f"({candidate.latency_ms[batch]:.1f} vs {fp32_ms[str(batch)]:.1f} ms at batch {batch})")
        return candidate
    threshold = settings.min_agreement
    for split, slot in ((search, "search"), (confirmation, "confirmation")):
        logits = runner.predict(split.images)  # (N, classes): shared by the agreement and the robustness check
        judged = _agreement(logits, split)
        setattr(candidate, slot, judged)
        low = judged.agreement_ci95[0]
        if (judged.agreement if slot == "search" else low) < threshold:
            bound = "" if slot == "search" else " (95% low)"
            candidate.verdict = f"agreement{bound} < {threshold:.0%} ({slot})"
            return candidate
        judged = _robustness(runner, path, split, logits, judged, settings)
        setattr(candidate, slot, judged)
        assert judged.drop_pp is not None
        if judged.drop_pp > settings.max_drop + 1e-9:
            candidate.verdict = f"drop > {settings.max_drop:g} pp ({slot})"
            return candidate
    assert candidate.confirmation is not None and candidate.confirmation.drop_pp is not None
    candidate.passed = True
    candidate.verdict = (f"passed: agreement {candidate.confirmation.agreement:.1%} (low "
                         f"{candidate.confirmation.agreement_ci95[0]:.1%}), robust drop "
                         f"{candidate.confirmation.drop_pp:+.1f} pp on {candidate.confirmation.n} images")
    return candidate


def _prepare_split(split: Split, model: torch.nn.Module, settings: SearchSettings) -> None:
    """The float model's logits and PGD examples on ``split`` (its robust flags, and the transfer examples)."""
    x, y = torch.from_numpy(split.images), torch.from_numpy(split.labels).long()
    with torch.no_grad():
        split.float_logits = torch.cat([model(batch) for batch in x.split(256)]).float().numpy()
    generator = torch.Generator().manual_seed(settings.seed)
    adversarial = adversarial_examples(model, x, y, settings.attack, eps=settings.eps, generator=generator)
    split.float_adversarial = adversarial.numpy()
    with torch.no_grad():
        split.float_adversarial_logits = torch.cat([model(batch) for batch in adversarial.split(256)]).float().numpy()
    clean_correct = torch.from_numpy(split.float_logits.argmax(1)) == y
    split.float_robust = clean_correct & (torch.from_numpy(split.float_adversarial_logits.argmax(1)) == y)


def _agreement(logits: np.ndarray, split: Split) -> Judgement:
    predictions = logits.argmax(1)
    agreeing = int((predictions == split.float_logits.argmax(1)).sum())
    return Judgement(n=len(split), agreement=agreeing / len(split), agreement_ci95=wilson_ci95(agreeing, len(split)),
                     accuracy=float((predictions == split.labels).mean()))


def _robustness(runner: Any, path: Path, split: Split, clean_logits: np.ndarray, judged: Judgement,
                settings: SearchSettings) -> Judgement:
    """Robust accuracy (twin PGD and transfer PGD, worst per image) against the float model's, on ``split``
    (``clean_logits``: the candidate's on its images)."""
    from rslad_edge.runtime.twin import OnnxTwin, TwinUnavailableError, twin_agreement

    x, y = torch.from_numpy(split.images), torch.from_numpy(split.labels).long()

    def predict(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(runner.predict(images.detach().cpu().numpy()).argmax(1))

    logits = torch.from_numpy(clean_logits)
    clean_correct = logits.argmax(1) == y
    robust = clean_correct & (predict(torch.from_numpy(split.float_adversarial)) == y)  # transfer
    agreement = None
    try:
        twin = OnnxTwin(onnx.load(path), source=path.name).eval()
    except TwinUnavailableError as exc:  # an op the twin cannot emulate: transfer only, said in the verdict
        logger.warning("int8 search: %s; candidates are judged by transfer PGD only", exc)
    else:
        generator = torch.Generator().manual_seed(settings.seed)
        robust &= evaluate_attack(twin, x, y, settings.attack, eps=settings.eps, generator=generator,
                                  clean_correct=clean_correct, predict=predict).robust_correct
        agreement = twin_agreement(twin, logits, x).agreement
    drop = 100 * (split.float_robust.float().mean() - robust.float().mean()).item()
    return replace(judged, robust=robust.float().mean().item(), float_robust=split.float_robust.float().mean().item(),
                   drop_pp=drop, drop_ci95_pp=paired_drop_ci95_pp(split.float_robust, robust),
                   twin_agreement=agreement)


def _latency(runner: Any, images: np.ndarray) -> dict[int, float]:
    """p50 milliseconds per call at each of LATENCY_BATCHES: bench's timing loop, kept short (enough to rank
    candidates; ``rslad-edge bench`` times the shipped one properly)."""
    from rslad_edge.bench.timing import measure

    latency = {}
    for batch in LATENCY_BATCHES:
        x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
        run = measure(lambda x=x: runner.predict(x), warmup=1, warmup_seconds=0.0, iters=30 if batch == 1 else 10)
        latency[batch] = float(statistics.median(run.latencies_ms))
    return latency


def _sensitivity(base_path: Path, prepared_path: Path, split: Split, settings: SearchSettings,
                 ) -> list[tuple[str, float]]:
    """Each quantized layer of the base candidate, with the KL divergence from the float model's predictions that
    keeping it in float32 removes, on clean and float-PGD images of the search split; most sensitive first."""
    from rslad_edge.runtime import OnnxRunner

    base, prepared = onnx.load(base_path), onnx.load(prepared_path)
    n = min(SENSITIVITY_N, len(split))
    images = np.concatenate([split.images[:n], split.float_adversarial[:n]])
    with torch.no_grad():
        reference = torch.log_softmax(torch.from_numpy(np.concatenate(
            [split.float_logits[:n], split.float_adversarial_logits[:n]])), 1)

    def divergence(path: Path) -> float:
        logits = torch.from_numpy(OnnxRunner(path, device="cpu", threads=settings.threads).predict(images))
        return torch.nn.functional.kl_div(torch.log_softmax(logits, 1), reference, log_target=True,
                                          reduction="batchmean").item()

    start = divergence(base_path)
    gains = []
    probe = base_path.parent / "probe.onnx"
    for name in quantizable_nodes(base):
        onnx.save(keep_float(base, prepared, [name]), probe)
        gains.append((name, start - divergence(probe)))
    logger.info("int8 search: ranked %d layers by sensitivity (KL %.4f with all in int8; most sensitive: %s)",
                len(gains), start, ", ".join(f"{name} {gain:.4f}" for name, gain in
                                             sorted(gains, key=lambda item: -item[1])[:3]))
    return sorted(gains, key=lambda item: -item[1])
