"""The int8 search: when the default int8 model loses parity or robustness, find one that does not.

``rslad-edge export --precision int8 --search`` tries quantization recipes, fastest first, and ships the first one
that passes the gate on held-out images; the parity check on test images then runs on it as on any export. The
candidates are ONNX Q/DQ graphs (:class:`OnnxCandidates`) or, for ``--format executorch``, ``.pte`` programs
(:class:`PteCandidates`); the search is the same.

Candidates, in order (``--search-budget`` of them at most):

1. every layer in int8 (equally fast): the default recipe (minmax ranges, per-channel weights), then percentile
   and entropy ranges, per-tensor weights (each with 7-bit weights under ``--reduce-range``, on by default where
   this CPU is x86 without VNNI); for a ``.pte``: minmax, histogram, per-tensor weights;
2. with ``--qat-epochs N`` (ONNX): the best of those, trained for N epochs by quantization-aware training of its
   own graph (export/qat.py): still every layer in int8, so as fast as the first candidates;
3. the best all-int8 recipe with its most sensitive layers in float32 (1, 2, 4, 8, ... of them, never all: that
   would be the fp32 model with extra conversions; :func:`keep_float`).
   Sensitivity is robustness-aware: the KL divergence from the float model's predictions, on clean images and on
   PGD examples crafted on the float model, that keeping one layer in float32 removes (measured with ONNX Runtime
   on the candidate's own graph, one layer at a time; for a ``.pte``, on its twin).

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
faster; the two timed in alternating rounds, so that a busy machine slows both alike) is not judged: float layers
between int8 ones add conversions, and a slower "int8" artifact is worth less than the exact fp32 one. No candidate
passing: the best one is kept under a name that says so (exit 3).
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
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
from rslad_edge.export.qat import OnnxGraph, QatSettings, describe, train_graph
from rslad_edge.stats import paired_drop_ci95_pp, wilson_ci95

logger = logging.getLogger(__name__)

# The attack of the search: PGD-10, step eps/4, uniform start (the training-time PGD of the paper's recipes). Its
# verdict is confirmed later by verify's full suite on test images; here it ranks and gates candidates.
SEARCH_STEPS = 10
SENSITIVITY_N = 256  # search-split images (each also as its float-PGD example) that rank the layers
LATENCY_BATCHES = (1, 64)
PAIRED_ROUNDS, PAIRED_ITERS = 4, 3  # the speed gate: candidate and fp32 model timed in turn, rounds x calls each


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
    speedup: float | None = None  # over the fp32 model at the largest batch, both timed in alternating rounds
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
                "speedup": None if self.speedup is None else round(self.speedup, 3),
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

    target: str  # cpu, trt (ONNX Q/DQ schemes) or executorch (the .pte's XNNPACK scheme)
    static_batch: int | None
    eps: float
    min_agreement: float
    max_drop: float  # points
    budget: int  # candidates
    seed: int
    threads: int | None = None
    qat: QatSettings | None = None  # None: no QAT candidate
    min_speedup: float = 1.0  # a candidate's speed at batch 64 over the fp32 ONNX's, at least (0: any)
    reduce_range: bool = False  # --target cpu: 7-bit weights in every recipe (x86 CPUs without VNNI)

    @property
    def attack(self) -> AttackSpec:
        return AttackSpec("pgd10", "pgd", steps=SEARCH_STEPS, step_size=self.eps / 4, loss="ce",
                          random_start="uniform")


def first_recipes(target: str, reduce_range: bool = False) -> list[Recipe]:
    """Every-layer-int8 recipes for ``target`` (cpu, trt: ONNX; executorch: the .pte), the default first (a model
    that passes with it costs one candidate); 7-bit weights in each with ``reduce_range`` (``--target cpu``)."""
    if target == "executorch":  # XNNPACK's quantizer: the two activation observers export offers, per-tensor weights
        return [Recipe(), Recipe(calib_method="histogram"), Recipe(per_channel=False)]
    return [Recipe(calib_method=method, per_channel=per_channel, reduce_range=reduce_range)
            for method, per_channel in (("minmax", True), ("percentile", True), ("entropy", True), ("minmax", False))]


def fallback_counts(layers: int) -> Iterator[int]:
    """1, 2, 4, ... layers in float32, fewer than all of them (all in float32 is the fp32 model, slower)."""
    count = 1
    while count < layers:
        yield count
        count *= 2


def search_int8(
    artifacts: OnnxCandidates | PteCandidates,
    model: torch.nn.Module,
    search: Split,
    confirmation: Split,
    settings: SearchSettings,
    *,
    qat_images: np.ndarray | None = None,
    qat_state: Path | None = None,
) -> SearchResult:
    """Run the search (see the module docstring) on the candidates ``artifacts`` makes; ``model`` is the float
    checkpoint in eval mode on the CPU. ``qat_images`` (training images disjoint from the splits and calibration)
    and ``qat_state`` (the folder that makes the training resumable) are needed when ``settings.qat`` is set (ONNX
    candidates only)."""
    started = time.perf_counter()
    for split in (search, confirmation):
        _prepare_split(split, model, settings)
    fp32_timer = artifacts.fp32_runner()
    result = SearchResult([], None, {
        "format": artifacts.format,
        "fp32_latency_ms": {str(batch): round(ms, 4) for batch, ms in _latency(fp32_timer, search.images).items()},
        "splits": {split.name: len(split) for split in (search, confirmation)},
        "gate": {"min_agreement_low95": settings.min_agreement, "max_drop_pp": settings.max_drop},
        "attack": f"PGD-{SEARCH_STEPS}, step eps/4, uniform start; twin (white-box) and transfer from the float "
                  "model, worst per image; the float model: PGD white-box",
        "eps": settings.eps, "budget": settings.budget, "target": settings.target,
    })

    def attempt(recipe: Recipe, built: tuple[Path, dict[str, Any]] | None = None) -> bool:
        path, info = built or artifacts.build(recipe)
        candidate = _try(recipe, artifacts, path, search, confirmation, settings, fp32_timer=fp32_timer)
        candidate.path, candidate.quant_info = path, info
        candidate.seconds = time.perf_counter() - started - sum(c.seconds for c in result.candidates)
        result.candidates.append(candidate)
        logger.info("int8 search %d/%d: %s: %s", len(result.candidates), settings.budget, recipe.label,
                    candidate.verdict)
        if candidate.passed:
            result.chosen = candidate
        return candidate.passed or len(result.candidates) >= settings.budget

    for recipe in first_recipes(settings.target, settings.reduce_range):
        if attempt(recipe):
            return result
    best = max(result.candidates, key=Candidate.score)
    if settings.qat is not None:
        assert qat_images is not None and qat_state is not None
        trained = train_graph(artifacts.trainable(best), model, qat_images,
                              (search.images, search.float_logits.argmax(1)), settings.qat, qat_state)
        qat_info = {**describe(settings.qat, len(qat_images)), **trained.to_json(), "base": best.recipe.label}
        done = attempt(replace(best.recipe, qat_epochs=settings.qat.epochs),
                       artifacts.trained(trained.path, {**best.quant_info, "qat": qat_info}))
        result.candidates[-1].qat = qat_info
        if done:
            return result
    result.sensitivity = artifacts.sensitivity(best.recipe, best.path, search)
    ranked = [name for name, _ in result.sensitivity]
    for count in fallback_counts(len(ranked)):
        if attempt(replace(best.recipe, float_nodes=tuple(ranked[:count]))):
            return result
    return result


class OnnxCandidates:
    """ONNX int8 candidates (``--format onnx``, ``ort``, ``trt``): :func:`quantize_int8` of the fp32 ONNX for the
    target's Q/DQ scheme, run by ONNX Runtime, attacked through :class:`OnnxTwin`; a float layer is
    :func:`keep_float`'s."""

    format = "onnx"

    def __init__(self, fp32_path: Path, calib_images: np.ndarray, settings: SearchSettings, workdir: Path) -> None:
        self.fp32_path, self.calib_images, self.settings, self.workdir = fp32_path, calib_images, settings, workdir

    def fp32_runner(self) -> Any:
        return self.timer(self.fp32_path)

    def runner(self, path: Path) -> Any:
        """What judges a candidate: for --target trt on an x86 CPU without VNNI, its Q/DQ semantics (TensorRT's),
        not the CPU's saturating fused kernels."""
        from rslad_edge.runtime import OnnxRunner

        return OnnxRunner(path, device="cpu", threads=self.settings.threads, reference=self.reference)

    @property
    def reference(self) -> bool:
        from rslad_edge.runtime.onnx_runner import qdq_semantics_on_cpu

        return qdq_semantics_on_cpu(self.settings.target)

    def timer(self, path: Path) -> Any:
        """What times a candidate: ONNX Runtime's fused kernels, as bench runs it."""
        from rslad_edge.runtime import OnnxRunner

        return OnnxRunner(path, device="cpu", threads=self.settings.threads, reference=False)

    def build(self, recipe: Recipe, *, keep_activations: bool = False) -> tuple[Path, dict[str, Any]]:
        folder = Path(tempfile.mkdtemp(prefix="candidate-", dir=self.workdir))
        path = folder / "int8.onnx"
        info = quantize_int8(self.fp32_path, path, self.calib_images, target=self.settings.target,
                             method=recipe.calib_method, static_batch=self.settings.static_batch, workdir=folder,
                             per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
                             float_nodes=recipe.float_nodes, keep_activations=keep_activations)
        return path, info

    def trainable(self, candidate: Candidate) -> OnnxGraph:
        """``candidate``'s graph for QAT (export/qat.py)."""
        assert candidate.path is not None and self.settings.qat is not None
        return OnnxGraph(candidate.path, self.settings.qat, threads=self.settings.threads, reference=self.reference)

    def trained(self, path: Path, info: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
        """The QAT candidate's graph (written by the training) as a built candidate."""
        return path, info

    def twin(self, path: Path) -> torch.nn.Module:
        """Raises TwinUnavailableError for an op the twin cannot emulate."""
        from rslad_edge.runtime.twin import OnnxTwin

        return OnnxTwin(onnx.load(path), source=path.name).eval()

    def sensitivity(self, recipe: Recipe, built: Path, split: Split) -> list[tuple[str, float]]:
        """Each quantized node of ``recipe``'s graph, with the KL divergence from the float model's predictions that
        keeping it in float32 removes (ONNX Runtime, on clean and float-PGD images of ``split``); most sensitive
        first. The graph is built again (``built``, the candidate's, fuses ReLU / Clip into the layers' ranges, and
        a float layer must keep them as nodes)."""
        path, _ = self.build(recipe, keep_activations=True)
        base, prepared = onnx.load(path), onnx.load(path.parent / "prepared.onnx")
        probe = path.parent / "probe.onnx"

        def divergence_without(name: str | None) -> float:
            if name is None:
                return _divergence(self.runner(path).predict, split)
            onnx.save(keep_float(base, prepared, [name]), probe)
            return _divergence(self.runner(probe).predict, split)

        return _rank(quantizable_nodes(base), divergence_without)


class PteCandidates:
    """ExecuTorch int8 candidates (``--format executorch``): PT2E with the XNNPACK quantizer (minmax or histogram
    activation ranges, per-channel or per-tensor weights, modules left in float by the quantizer's filter), lowered
    to XNNPACK and run by ExecuTorch's runtime at the program's batch; attacked through the calibrated PT2E graph
    with fake quantization (executorch_export.fake_quantized), on which the layers are also ranked."""

    format = "executorch"

    def __init__(self, model: torch.nn.Module, input_shape: tuple[int, int, int], calib_images: np.ndarray,
                 settings: SearchSettings, workdir: Path, arch: str = "model") -> None:
        self.model, self.input_shape, self.calib_images = model, input_shape, calib_images
        self.settings, self.workdir, self.arch = settings, workdir, arch
        self.batch = settings.static_batch or 1
        self._calibrated: dict[Path, Any] = {}  # candidate -> the PT2E graph its twin is made from
        self._graphs: dict[Path, Any] = {}  # candidate -> what it computes, for any batch (PteProgram.graph)
        self.groups: dict[str, tuple[str, ...]] = {}  # layer (module name) -> the graph nodes it needs in float
        self._training: Any = None  # the QatProgram of the QAT candidate

    def _write(self, precision: str, recipe: Recipe | None = None) -> tuple[Path, Any]:
        from rslad_edge.export.executorch_export import torch_to_pte

        recipe = recipe or Recipe()
        nodes = tuple(dict.fromkeys(node for layer in recipe.float_nodes for node in self.groups[layer]))
        program = torch_to_pte(self.model, self.input_shape, batch=self.batch, precision=precision, arch=self.arch,
                               calib_images=self.calib_images, calib_method=recipe.calib_method,
                               per_channel=recipe.per_channel, float_nodes=nodes)
        path = Path(tempfile.mkdtemp(prefix="candidate-", dir=self.workdir)) / f"{precision}.pte"
        path.write_bytes(program.data)
        return path, program

    def fp32_runner(self) -> Any:
        return self.runner(self._write("fp32")[0])

    def timer(self, path: Path) -> Any:
        return self.runner(path)

    def runner(self, path: Path) -> Any:
        from rslad_edge.runtime.executorch_runner import ExecuTorchRunner

        return ExecuTorchRunner(path, threads=self.settings.threads)

    def build(self, recipe: Recipe) -> tuple[Path, dict[str, Any]]:
        path, program = self._write("int8", recipe)
        self._calibrated[path], self._graphs[path] = program.calibrated, program.graph
        chosen = [f"{layer} (fp32, graph nodes {', '.join(self.groups[layer])}: chosen by the int8 search)"
                  for layer in recipe.float_nodes]
        float_nodes = [name for name in program.quantization["float_nodes"] if "(the classifier" in name]
        return path, {**program.quantization, "float_nodes": float_nodes + chosen, "delegation": program.delegation}

    def trainable(self, candidate: Candidate) -> Any:
        """``candidate``'s recipe prepared for QAT (executorch_export.QatProgram; per-tensor or per-channel weights
        as the recipe, activation ranges tracked by PT2E's fake quantizers from the calibration images on)."""
        from rslad_edge.export.executorch_export import QatProgram

        self._training = QatProgram(self.model, self.input_shape, self.calib_images, batch=self.batch,
                                    per_channel=candidate.recipe.per_channel, threads=self.settings.threads)
        return self._training

    def trained(self, path: Path, info: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
        """The QAT candidate (its best epoch, written by the training) as a built candidate, its twin made from the
        trained graph converted."""
        assert self._training is not None
        program = self._training.program()
        self._calibrated[path] = self._graphs[path] = program.graph
        return path, {**info, "flow": "PT2E QAT (torchao prepare_qat_pt2e / convert_pt2e)",
                      "activations": "int8 per tensor, asymmetric, moving-average min / max (QAT)",
                      "delegation": program.delegation}

    def graph(self, path: Path) -> Any:
        """What the candidate at ``path`` computes, for any batch (None: its batch is static): its twin ONNX's
        source once it is chosen."""
        return self._graphs.get(path)

    def twin(self, path: Path) -> torch.nn.Module:
        from rslad_edge.export.executorch_export import fake_quantized
        from rslad_edge.runtime.twin import TwinUnavailableError

        calibrated = self._calibrated.get(path)
        if calibrated is None:
            raise TwinUnavailableError("torch.export could not make the model's batch dynamic, so its calibrated "
                                       "graph runs one batch size only")
        return fake_quantized(calibrated)

    def sensitivity(self, recipe: Recipe, built: Path, split: Split) -> list[tuple[str, float]]:
        """Each quantized module of the program ``built`` (``recipe``'s), with the KL divergence from the float
        model's predictions that leaving it in float removes, measured on its twin (clean and float-PGD images of
        ``split``); most sensitive first. No twin: no ranking, so no float layers to try."""
        from rslad_edge.export.executorch_export import float_groups, layers_in_float
        from rslad_edge.runtime.twin import TwinUnavailableError

        del recipe  # the program is built already
        try:
            twin = self.twin(built)
        except TwinUnavailableError as exc:
            logger.warning("int8 search: %s; no layer is tried in float", exc)
            return []
        groups = float_groups(twin)
        self.groups.update(groups)

        def divergence_without(name: str | None) -> float:
            if name is None:
                return _divergence(_torch_predict(twin), split)
            with layers_in_float(twin, groups[name]) as probe:
                return _divergence(_torch_predict(probe), split)

        return _rank(list(groups), divergence_without)


def _torch_predict(module: torch.nn.Module) -> Any:
    def predict(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([module(batch) for batch in torch.from_numpy(images).split(256)]).numpy()
    return predict


def _try(recipe: Recipe, artifacts: OnnxCandidates | PteCandidates, path: Path, search: Split, confirmation: Split,
         settings: SearchSettings, *, fp32_timer: Any) -> Candidate:
    """Judge one candidate: cheap checks first (speed against the fp32 model, timed by ``fp32_timer`` in rounds
    alternating with the candidate's, then agreement), the confirmation split only for what passed the search
    split."""
    candidate = Candidate(recipe)
    runner = artifacts.runner(path)
    timer = artifacts.timer(path)
    batch = max(LATENCY_BATCHES)  # timed against the fp32 model; the smaller batches alone, for the table
    candidate.latency_ms = _latency(timer, search.images, [b for b in LATENCY_BATCHES if b != batch])
    candidate_ms, fp32_ms = _paired_latency(timer, fp32_timer, search.images, batch)
    candidate.latency_ms[batch], candidate.speedup = candidate_ms, fp32_ms / candidate_ms
    if settings.min_speedup > 0 and candidate.speedup < settings.min_speedup:
        candidate.verdict = (f"{candidate.speedup:.2f}x fp32's speed < --min-speedup {settings.min_speedup:g} "
                             f"({candidate_ms:.1f} vs {fp32_ms:.1f} ms at batch {batch}, timed in turn)")
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
        judged = _robustness(runner, artifacts, path, split, logits, judged, settings)
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


def _robustness(runner: Any, artifacts: OnnxCandidates | PteCandidates, path: Path, split: Split,
                clean_logits: np.ndarray, judged: Judgement, settings: SearchSettings) -> Judgement:
    """Robust accuracy (twin PGD and transfer PGD, worst per image) against the float model's, on ``split``
    (``clean_logits``: the candidate's on its images)."""
    from rslad_edge.runtime.twin import TwinUnavailableError, twin_agreement

    x, y = torch.from_numpy(split.images), torch.from_numpy(split.labels).long()

    def predict(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(runner.predict(images.detach().cpu().numpy()).argmax(1))

    logits = torch.from_numpy(clean_logits)
    clean_correct = logits.argmax(1) == y
    robust = clean_correct & (predict(torch.from_numpy(split.float_adversarial)) == y)  # transfer
    agreement = None
    try:
        twin = artifacts.twin(path)
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


def _latency(runner: Any, images: np.ndarray, batches: Sequence[int] = LATENCY_BATCHES) -> dict[int, float]:
    """p50 milliseconds per call at each of ``batches``: bench's timing loop, kept short (enough to rank
    candidates; ``rslad-edge bench`` times the shipped one properly)."""
    from rslad_edge.bench.timing import measure

    latency = {}
    for batch in batches:
        x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
        run = measure(lambda x=x: runner.predict(x), warmup=1, warmup_seconds=0.0, iters=30 if batch == 1 else 10)
        latency[batch] = float(statistics.median(run.latencies_ms))
    return latency


def _paired_latency(timer: Any, fp32_timer: Any, images: np.ndarray, batch: int,
                    rounds: int = PAIRED_ROUNDS) -> tuple[float, float]:
    """p50 milliseconds at ``batch`` of the candidate and of the fp32 model, timed in alternating rounds: a busy or
    drifting machine (another process, a clock change) slows both alike, so their ratio, which the speed gate
    decides on, holds where two timings minutes apart do not (on 2 cores they differed by 20% for one graph)."""
    from rslad_edge.bench.timing import measure

    x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for runner, kept in zip((timer, fp32_timer), samples, strict=True):
            kept.extend(measure(lambda runner=runner: runner.predict(x), warmup=1, warmup_seconds=0.0,
                                iters=PAIRED_ITERS).latencies_ms)
    return float(statistics.median(samples[0])), float(statistics.median(samples[1]))


def _divergence(predict: Any, split: Split) -> float:
    """KL divergence from the float model's predictions of ``predict``'s (images -> logits), on the first
    SENSITIVITY_N images of ``split`` and their float-PGD examples."""
    n = min(SENSITIVITY_N, len(split))
    images = np.concatenate([split.images[:n], split.float_adversarial[:n]])
    reference = torch.log_softmax(torch.from_numpy(np.concatenate(
        [split.float_logits[:n], split.float_adversarial_logits[:n]])), 1)
    logits = torch.from_numpy(predict(images))
    return torch.nn.functional.kl_div(torch.log_softmax(logits, 1), reference, log_target=True,
                                      reduction="batchmean").item()


def _rank(layers: list[str], divergence_without: Any) -> list[tuple[str, float]]:
    """``layers`` with the divergence each removes when it alone is float (``divergence_without(name)``;
    ``None``: every layer quantized), most sensitive first."""
    start = divergence_without(None)
    gains = sorted(((name, start - divergence_without(name)) for name in layers), key=lambda item: -item[1])
    logger.info("int8 search: ranked %d layers by sensitivity (KL %.4f with all in int8; most sensitive: %s)",
                len(gains), start, ", ".join(f"{name} {gain:.4f}" for name, gain in gains[:3]))
    return gains
