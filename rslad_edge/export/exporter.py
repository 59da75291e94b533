"""The export stage: checkpoint -> checked ONNX (fp32 / fp16 / int8) -> optionally a TensorRT engine or an ORT-format
model (ONNX Runtime Mobile); or checkpoint -> checked ExecuTorch program (``.pte``, XNNPACK; fp32 / int8).

Order of work, and why:

1. load the checkpoint and the data first, so a bad path or a missing dataset fails before minutes of export;
2. export fp32 with the dynamo exporter, optionally simplify, then convert (fp16) or quantize (int8); or, for
   ExecuTorch, torch.export (+ PT2E int8) and lower to XNNPACK;
3. ``onnx.checker`` (full check), then the parity check against PyTorch, on the artifact's own runtime (ONNX
   Runtime on the CPU, ExecuTorch's runtime for a .pte), on a fixed seeded sample of the TEST split (calibration
   uses the TRAIN split, so int8 is never judged on what it saw);
4. only an artifact that passed is renamed to its final name, with the parity figures in its metadata (ONNX
   ``metadata_props``, which a ``.ort`` keeps) and its sidecar. A failure leaves nothing under the final name (a
   stale file from an earlier run is removed too, so a pipeline never picks up an artifact that does not match the
   settings it asked for). Every format shares steps 1, 3 and 4: the data, the reference logits, the parity check
   and the metadata are made here once.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from rslad_edge import __version__
from rslad_edge.errors import (
    ConfigError,
    DatasetError,
    ExportParityError,
    RsladEdgeError,
    RuntimeUnavailableError,
)
from rslad_edge.export.config import PARITY_DEFAULTS, ExportConfig
from rslad_edge.export.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    check,
    drop_unused_opsets,
    graph_summary,
    simplify,
    torch_to_onnx,
)
from rslad_edge.export.parity import ParityReport, compare_logits
from rslad_edge.export.precision import quantize_int8, to_fp16
from rslad_edge.export.search import SearchFailedError
from rslad_edge.export.trt_engine import TensorRTUnavailableError, build_engine, plan_build, trtexec_command
from rslad_edge.io import sha256_file, write_json
from rslad_edge.record import Artifact
from rslad_edge.runtime import ENGINE_SUFFIXES
from rslad_edge.runtime.metadata import encode_props, sidecar_path
from rslad_edge.versions import package_versions

logger = logging.getLogger(__name__)

METADATA_FORMAT = "rslad-edge/artifact/1"
# A TensorRT engine is compared with PyTorch like the ONNX, except that fp32 GPU kernels sum in other orders than
# the CPU: 1e-3 instead of 1e-4 (TF32 is switched off, so a larger difference is a real fault).
ENGINE_PARITY_DEFAULTS = {**PARITY_DEFAULTS, "fp32": (1e-3, 1.0)}
# What shapes every artifact, recorded in its metadata; a format adds its own (ExecuTorch, TensorRT).
EXPORT_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxscript", "onnxslim")


@dataclass
class ExportedFile:
    """One artifact an export wrote: the file, how it compared with PyTorch, and its metadata (its sidecar)."""

    path: Path
    parity: ParityReport
    metadata: dict[str, Any]

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.path)

    def artifact(self) -> Artifact:
        """This file, typed for the run record."""
        return Artifact.from_file(self.path, precision=self.metadata.get("precision", "fp32"), metadata=self.metadata)


@dataclass
class ExportResult:
    """What an export wrote, in order: the ONNX first when there is one, then what was built from it (an engine, a
    .ort); an ExecuTorch export writes one .pte. The last one is what ``--format`` asked for."""

    written: list[ExportedFile]
    trtexec: dict[str, str] = field(default_factory=dict)

    @property
    def final(self) -> ExportedFile:
        return self.written[-1]

    @property
    def path(self) -> Path:
        return self.final.path

    @property
    def parity(self) -> ParityReport:
        return self.final.parity

    @property
    def metadata(self) -> dict[str, Any]:
        return self.final.metadata

    @property
    def onnx(self) -> ExportedFile | None:
        return next((f for f in self.written if f.path.suffix == ".onnx"), None)

    @property
    def onnx_path(self) -> Path | None:
        return self.onnx.path if self.onnx is not None else None

    @property
    def onnx_sidecar(self) -> Path | None:
        return self.onnx.sidecar if self.onnx is not None else None

    @property
    def engine(self) -> ExportedFile | None:
        return next((f for f in self.written if f.path.suffix.lower() in ENGINE_SUFFIXES), None)

    @property
    def engine_path(self) -> Path | None:
        return self.engine.path if self.engine is not None else None

    @property
    def engine_parity(self) -> ParityReport | None:
        return self.engine.parity if self.engine is not None else None

    def artifacts(self) -> list[Artifact]:
        """What this export made, typed for the run record, in the order it was made."""
        return [written.artifact() for written in self.written]

    @property
    def files(self) -> list[Path]:
        """Every file written, sidecars included (what a re-run replaces)."""
        return [path for written in self.written for path in (written.path, written.sidecar)]


@dataclass
class _Data:
    """The images an export needs, float32 in [0, 1]: test images (parity) and train images (int8 calibration)."""

    parity_images: np.ndarray
    parity_labels: np.ndarray
    calib_images: np.ndarray | None
    search_splits: tuple[Any, Any] | None  # --search: (search, confirmation) held-out training images
    qat_images: np.ndarray | None  # --qat-epochs: training images after the search's splits
    description: str
    dataset: str
    classes: list[str]
    input_size: tuple[int, int]
    preprocess: dict[str, Any] | None  # how the images were brought to input_size (data/imagefolder.py)


def export(cfg: ExportConfig) -> ExportResult:
    """Run the export stage described by ``cfg`` and return what it wrote (see the module docstring)."""
    from rslad_edge.models import load_checkpoint

    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file; give a directory (it is created if missing)")
    model, info = load_checkpoint(cfg.checkpoint, arch=cfg.arch, num_classes=cfg.num_classes)
    data = _load_data(cfg, info)
    input_shape = (3, *data.input_size)  # the checkpoint's size (a bare state dict: its data's)
    out.mkdir(parents=True, exist_ok=True)
    source = _Source(model, info, input_shape, sha256_file(cfg.checkpoint))
    reference = _torch_logits(model, info, cfg, data.parity_images)

    if cfg.format == "executorch":
        return ExportResult([_export_pte(cfg, source, reference, data)])
    result = ExportResult([_export_onnx(cfg, source, reference, data)])
    if cfg.format == "ort":
        result.written.append(_export_ort(cfg, result.written[0], reference, data))
    if cfg.format == "trt":
        _export_engine(cfg, result, input_shape, reference, data)
    return result


@dataclass(frozen=True)
class _Source:
    """The checkpoint being exported, loaded once."""

    model: torch.nn.Module
    info: dict[str, Any]
    input_shape: tuple[int, int, int]
    sha256: str


def _export_onnx(cfg: ExportConfig, source: _Source, reference: np.ndarray, data: _Data) -> ExportedFile:
    from rslad_edge.runtime import OnnxRunner

    onnx_path = Path(cfg.out) / cfg.onnx_name
    with tempfile.TemporaryDirectory(prefix=".export-", dir=cfg.out) as workdir_name:
        workdir = Path(workdir_name)
        try:
            proto, precision_info = _build_onnx(cfg, source.model, source.info, source.input_shape, data, workdir)
        except SearchFailedError as exc:
            _keep_failed_candidate(cfg, source, data, exc, onnx_path)
            raise
        graph = graph_summary(proto)
        metadata = _metadata(cfg, source, data, artifact=onnx_path.name, precision_info=precision_info, details={
            "opset": graph["opset"], "graph": {"nodes": graph["nodes"], "op_types": graph["op_types"]},
            "exporter": "torch.onnx.export(dynamo=True)" + (" + onnxslim" if cfg.simplify else "")})
        candidate = workdir / onnx_path.name
        _save_onnx(proto, metadata, candidate)
        try:
            parity = _check_parity(OnnxRunner(candidate, device="cpu", reference=_reference_semantics(cfg)),
                                   reference, data, cfg.thresholds, onnx_path, searched=cfg.search)
        except ExportParityError as exc:
            if not cfg.search:
                raise
            raise _refuted(exc, candidate, metadata, onnx_path) from exc
        metadata["parity"] = parity.to_dict()
        _save_onnx(proto, metadata, candidate)  # again, now carrying its parity figures
        os.replace(candidate, onnx_path)
    write_json(sidecar_path(onnx_path), metadata)
    shutil.rmtree(qat_state_dir(cfg), ignore_errors=True)  # its training is in the written graph now
    logger.info("wrote %s: %s", onnx_path, parity.summary())
    return ExportedFile(onnx_path, parity, metadata)


def _reference_semantics(cfg: ExportConfig) -> bool:
    """The int8 graph's parity is checked on its Q/DQ semantics (runtime.onnx_runner.qdq_semantics_on_cpu); said
    explicitly because the graph being checked carries no metadata yet."""
    from rslad_edge.runtime.onnx_runner import qdq_semantics_on_cpu

    return cfg.precision == "int8" and qdq_semantics_on_cpu(str(cfg.target))


def qat_state_dir(cfg: ExportConfig) -> Path:
    """Where --qat-epochs keeps its resumable state: OUT/.NAME.int8.onnx.qat (.pte.qat), removed once the export is
    written."""
    return Path(cfg.out) / f".{cfg.pte_name if cfg.format == 'executorch' else cfg.onnx_name}.qat"


def _failed_gate_path(final: Path) -> Path:
    """Where an int8 that failed the search's gate is kept: NAME.int8.failed-gate.onnx beside NAME.int8.onnx (and
    .pte beside .pte)."""
    return final.with_name(final.name.removesuffix(final.suffix) + ".failed-gate" + final.suffix)


def _refuted(exc: ExportParityError, candidate: Path, metadata: dict[str, Any], final: Path,
             twin: onnx.ModelProto | None = None) -> SearchFailedError:
    """The search's choice, refuted by the test images' parity check: kept under its failed-gate name (with its
    staged ``twin`` ONNX, a .pte's)."""
    kept = _failed_gate_path(final)
    os.replace(candidate, kept)
    metadata = {**metadata, "artifact": kept.name, "gate": "failed"}
    if kept.suffix == ".pte":
        _place_twin(None, final, {})
        _place_twin(twin, kept, metadata)
    write_json(sidecar_path(kept), metadata)
    search = metadata["quantization"]["search"]
    chosen = search["candidates"][search["chosen"]]
    return SearchFailedError(
        f"the int8 search's choice ({chosen['label']}) passed on held-out training images, but the test images "
        f"refute it: {'; '.join(exc.report.failures)}. Kept it as {kept}; nothing under {final.name}", search, kept)


def _keep_failed_candidate(cfg: ExportConfig, source: _Source, data: _Data, exc: Any, final: Path, *,
                           graph: Any = None) -> None:
    """The search's closest candidate under a name that says it failed the gate (NAME.int8.failed-gate.onnx or
    .pte, with the search table in its sidecar, and a .pte's twin ONNX made from ``graph``, what it computes);
    nothing under the final name (a stale one is removed)."""
    kept = _failed_gate_path(final)
    best = exc.result.best
    metadata = _metadata(cfg, source, data, artifact=kept.name, precision_info={
        "recipe": best.recipe.to_json(), "search": exc.result.to_json()}, details={"gate": "failed"})
    staged = kept.with_name(f".{kept.name}.tmp")
    if kept.suffix == ".onnx":
        _save_onnx(drop_unused_opsets(onnx.load(best.path)), metadata, staged)
    else:
        shutil.copyfile(best.path, staged)
        _place_twin(None, final, {})
        _place_twin(_stage_twin(cfg, source, graph, metadata), kept, metadata)
    os.replace(staged, kept)
    write_json(sidecar_path(kept), metadata)
    for stale in (final, sidecar_path(final)):
        stale.unlink(missing_ok=True)
    exc.kept = kept
    exc.args = (f"{exc.args[0]}. Kept it as {kept}; nothing written under {final.name}",)


def _export_ort(cfg: ExportConfig, onnx_file: ExportedFile, reference: np.ndarray, data: _Data) -> ExportedFile:
    """The checked ONNX in ORT format (ONNX Runtime Mobile), checked against PyTorch again: the conversion fuses
    and re-lays the graph, so the .ort is its own artifact."""
    from rslad_edge.export.ort_format import onnx_to_ort
    from rslad_edge.runtime import OnnxRunner

    ort_path = Path(cfg.out) / cfg.ort_name
    metadata = {key: value for key, value in onnx_file.metadata.items() if key != "parity"}
    metadata.update(artifact=ort_path.name, onnx=onnx_file.path.name, onnx_sha256=sha256_file(onnx_file.path),
                    onnx_parity=onnx_file.parity.to_dict())
    proto = onnx.load(onnx_file.path)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=cfg.out) as workdir_name:
        workdir = Path(workdir_name)
        staged, candidate = workdir / onnx_file.path.name, workdir / ort_path.name
        _save_onnx(proto, metadata, staged)  # the .ort keeps the ONNX's metadata_props: give it its own
        metadata["ort_conversion"] = onnx_to_ort(staged, candidate)
        parity = _check_parity(OnnxRunner(candidate, device="cpu"), reference, data, cfg.thresholds, ort_path,
                               searched=cfg.search)
        metadata["parity"] = parity.to_dict()
        _save_onnx(proto, metadata, staged)
        onnx_to_ort(staged, candidate)  # again, now carrying its parity figures
        os.replace(candidate, ort_path)
    write_json(sidecar_path(ort_path), metadata)
    logger.info("wrote %s: %s", ort_path, parity.summary())
    return ExportedFile(ort_path, parity, metadata)


def _export_pte(cfg: ExportConfig, source: _Source, reference: np.ndarray, data: _Data) -> ExportedFile:
    """torch.export (+ PT2E int8, or the int8 search's choice) lowered to XNNPACK, checked on ExecuTorch's own
    runtime."""
    from rslad_edge.export.executorch_export import LOWERING, torch_to_pte
    from rslad_edge.runtime.executorch_runner import ExecuTorchRunner

    pte_path = Path(cfg.out) / cfg.pte_name
    assert cfg.batch is not None  # ExportConfig gives a .pte its static batch
    with tempfile.TemporaryDirectory(prefix=".export-", dir=cfg.out) as workdir_name:
        workdir = Path(workdir_name)
        if cfg.search:
            built = _search_pte(cfg, source, data, workdir, pte_path)
        else:
            built = torch_to_pte(source.model, source.input_shape, batch=cfg.batch, precision=cfg.precision,
                                 arch=source.info["arch"], calib_images=data.calib_images,
                                 calib_method=cfg.calib_method)
        quantization = built.quantization
        if quantization is not None:
            quantization["calib_data"] = f"{data.dataset} train, seed {cfg.seed}"
        metadata = _metadata(cfg, source, data, artifact=pte_path.name, precision_info=quantization or {},
                             details={"exporter": LOWERING, "delegation": built.delegation},
                             versions=("executorch", "torchao"))
        twin = _stage_twin(cfg, source, built.graph, metadata)
        candidate = workdir / pte_path.name
        candidate.write_bytes(built.data)
        runner = ExecuTorchRunner(candidate)
        try:
            parity = _check_parity(runner, reference, data, cfg.thresholds, pte_path, searched=cfg.search)
        except ExportParityError as exc:
            if not cfg.search:
                _place_twin(None, pte_path, {})  # no stale twin beside no .pte
                raise
            del runner
            raise _refuted(exc, candidate, metadata, pte_path, twin) from exc
        del runner  # the runtime maps the file: release it before the rename
        os.replace(candidate, pte_path)
        _place_twin(twin, pte_path, metadata)
    metadata["parity"] = parity.to_dict()
    write_json(sidecar_path(pte_path), metadata)
    shutil.rmtree(qat_state_dir(cfg), ignore_errors=True)  # its training is in the written program now
    twin_note = f"; twin {metadata['twin_onnx']}" if metadata.get("twin_onnx") else ""
    logger.info("wrote %s (%s): %s%s", pte_path, _delegation_summary(built.delegation), parity.summary(), twin_note)
    return ExportedFile(pte_path, parity, metadata)


def _search_pte(cfg: ExportConfig, source: _Source, data: _Data, workdir: Path, pte_path: Path) -> Any:
    """The int8 search over .pte programs: the chosen program (a PteProgram, its quantization with the search);
    raises SearchFailedError, the closest kept under its failed-gate name, when nothing passed."""
    from rslad_edge.export.executorch_export import PteProgram
    from rslad_edge.export.search import PteCandidates

    settings = _search_settings(cfg, source.info, target="executorch")
    assert data.calib_images is not None
    artifacts = PteCandidates(source.model.eval(), source.input_shape, data.calib_images, settings, workdir,
                              arch=source.info["arch"])
    try:
        result = _search(cfg, source.model, artifacts, settings, data)
    except SearchFailedError as exc:
        _keep_failed_candidate(cfg, source, data, exc, pte_path, graph=artifacts.graph(exc.result.best.path))
        raise
    quantization = {**result.chosen.quant_info, "search": result.to_json()}
    delegation = quantization.pop("delegation")
    return PteProgram(data=result.chosen.path.read_bytes(), delegation=delegation, quantization=quantization,
                      graph=artifacts.graph(result.chosen.path))


def _stage_twin(cfg: ExportConfig, source: _Source, graph: Any, metadata: dict[str, Any]) -> onnx.ModelProto | None:
    """The ONNX of ``graph``, what a .pte computes (executorch_export.twin_onnx): verify attacks the .pte through its
    twin. None, with the reason in ``metadata`` and a warning, when there is none: the .pte is still exported."""
    from rslad_edge.export.executorch_export import twin_onnx

    try:
        return twin_onnx(graph, source.input_shape, opset=cfg.opset, arch=source.info["arch"])
    except RsladEdgeError as exc:
        metadata["twin_onnx_error"] = str(exc)
        logger.warning("%s: no twin ONNX (%s); verify will attack it by transfer and Square only",
                       metadata["artifact"], exc)
        return None


def _place_twin(twin: onnx.ModelProto | None, artifact: Path, metadata: dict[str, Any]) -> None:
    """Write ``twin`` as NAME.twin.onnx beside ``artifact`` (NAME.pte), with the artifact's metadata, and name it with
    its sha256 in ``metadata``; without one, remove a stale twin of an earlier export."""
    target = artifact.with_name(artifact.name.removesuffix(artifact.suffix) + ".twin.onnx")
    if twin is None:
        target.unlink(missing_ok=True)
        return
    staged = target.with_name(f".{target.name}.tmp")
    _save_onnx(twin, {**metadata, "artifact": target.name, "batch": "dynamic", "twin_of": artifact.name}, staged)
    os.replace(staged, target)
    metadata.update(twin_onnx=target.name, twin_onnx_sha256=sha256_file(target))


def _delegation_summary(delegation: dict[str, Any]) -> str:
    outside = ", ".join(f"{op} x{n}" for op, n in delegation["outside_nodes"].items())
    return (f"{delegation['delegated_nodes']} of {delegation['graph_nodes']} nodes delegated to "
            f"{delegation['backend']}" + (f"; outside: {outside}" if outside else ""))


def _load_data(cfg: ExportConfig, info: dict[str, Any]) -> _Data:
    """Parity images from the test split; calibration images from the train split (int8 only): only the images
    used are read, brought to the checkpoint's input size as it was trained (``input.preprocess``)."""
    from rslad_edge.data import check_class_count, dataset_for_model, load_sample, preprocess_for_model, to_float

    dataset, data_root = dataset_for_model(cfg.dataset, cfg.data_root, info)
    size = (info.get("input") or {}).get("size")
    input_size = tuple(int(s) for s in size) if size else None
    crop_pct = (preprocess_for_model(info) or {}).get("crop_pct")

    def load(split: str, n: int, purpose: str) -> Any:
        try:
            images = load_sample(dataset, data_root, split, n, cfg.seed, input_size=input_size, crop_pct=crop_pct)
        except (RsladEdgeError, OSError, RuntimeError) as exc:
            raise DatasetError(
                f"{purpose} needs {split} images of the model's dataset and '{dataset}' could not be loaded from "
                f"{data_root or 'its default folder'} ({exc}); pass --dataset and --data-root"
            ) from exc
        if len(images) == 0:
            raise DatasetError(f"--dataset {dataset}: the {split} split is empty (--data-root {data_root})")
        check_class_count(info["num_classes"], images.num_classes, model=Path(cfg.checkpoint).name,
                          data=f"--dataset {dataset}", fix="pass the dataset the model was trained on")
        return images

    # Calibration first: for int8, a missing dataset is first of all missing calibration data. The search's splits
    # follow the calibration images in the same seeded permutation: the calibration sample is the one an export
    # without --search takes, and no image is in two of them.
    calib, search_splits, qat_images = None, None, None
    if cfg.precision == "int8":
        wanted = (cfg.calib_n + (cfg.search_n + cfg.confirm_n if cfg.search else 0)
                  + (cfg.qat_n if cfg.qat_epochs else 0))
        train = load("train", wanted, "int8 calibration")
        images, labels = to_float(train.read()).numpy(), train.labels.numpy()
        calib = images[: cfg.calib_n]
        if cfg.search:
            search_splits = _search_splits(cfg, images, labels, dataset)
        if cfg.qat_epochs:
            qat_images = images[cfg.calib_n + cfg.search_n + cfg.confirm_n:]
            if len(qat_images) < cfg.qat_n:
                raise DatasetError(f"--qat-epochs needs --calib-n + --search-n + --confirm-n + --qat-n = {wanted} "
                                   f"training images of {dataset}; it has {len(images)}: lower --qat-n")
    test = load("test", cfg.parity_n, "the parity check against PyTorch")
    return _Data(
        parity_images=to_float(test.read()).numpy(),
        parity_labels=test.labels.numpy(),
        calib_images=calib,
        search_splits=search_splits,
        qat_images=qat_images,
        description=f"{dataset} test, {len(test)} images, seed {cfg.seed}",
        dataset=dataset,
        classes=list(test.classes),
        input_size=test.input_size,
        preprocess=test.preprocess,
    )


def _search_splits(cfg: ExportConfig, images: np.ndarray, labels: np.ndarray, dataset: str) -> tuple[Any, Any]:
    """(search, confirmation) splits of the training images after the calibration ones."""
    from rslad_edge.export.search import Split

    confirm_start = cfg.calib_n + cfg.search_n
    if len(images) < confirm_start + 1:
        raise DatasetError(f"--search needs --calib-n + --search-n + --confirm-n = "
                           f"{cfg.calib_n + cfg.search_n + cfg.confirm_n} training images of {dataset}; it has "
                           f"{len(images)}: lower --search-n / --confirm-n")
    if len(images) < confirm_start + cfg.confirm_n:
        logger.warning("--confirm-n %d: %s has only %d training images after calibration and the search split; "
                       "confirming on %d", cfg.confirm_n, dataset, len(images) - confirm_start,
                       len(images) - confirm_start)
    search, confirmation = slice(cfg.calib_n, confirm_start), slice(confirm_start, confirm_start + cfg.confirm_n)
    return (Split(f"{dataset} train, search", images[search], labels[search]),
            Split(f"{dataset} train, confirmation", images[confirmation], labels[confirmation]))


def _torch_logits(model: torch.nn.Module, info: dict[str, Any], cfg: ExportConfig, images: np.ndarray) -> np.ndarray:
    from rslad_edge.runtime import TorchRunner

    return TorchRunner(model, info, cfg.checkpoint, device="cpu", batch_size=128).predict(images)


def _build_onnx(
    cfg: ExportConfig, model: torch.nn.Module, info: dict[str, Any], input_shape: tuple[int, int, int],
    data: _Data, workdir: Path,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """fp32 export (+ simplify), then the precision step; returns the model and what the precision step did."""
    proto = torch_to_onnx(model, input_shape, opset=cfg.opset, batch=cfg.batch, arch=info["arch"])
    if cfg.simplify:
        proto = simplify(proto)
    check(proto, f"the fp32 export of {cfg.checkpoint}")
    if cfg.precision == "fp32":
        return proto, {}
    if cfg.precision == "fp16":
        return to_fp16(proto), {"method": "onnxruntime.transformers.float16, keep_io_types", "io": "float32"}
    fp32_path = workdir / "fp32.onnx"
    onnx.save(proto, fp32_path)
    assert data.calib_images is not None
    if cfg.search:  # the chosen candidate as the search built it (same calibration images, same recipe)
        from rslad_edge.export.search import OnnxCandidates

        settings = _search_settings(cfg, info, target=str(cfg.target))
        search = _search(cfg, model, OnnxCandidates(fp32_path, data.calib_images, settings, workdir), settings, data)
        quantized_path, quant_info = search.chosen.path, {**search.chosen.quant_info, "search": search.to_json()}
    else:
        quantized_path = workdir / "int8.onnx"
        quant_info = quantize_int8(fp32_path, quantized_path, data.calib_images, target=cfg.target,
                                   reduce_range=cfg.seven_bit_weights,
                                   method=cfg.calib_method, static_batch=cfg.batch, workdir=workdir)
    quant_info["calib_data"] = f"{data.dataset} train, seed {cfg.seed}"
    if _reference_semantics(cfg):
        quant_info["checked_on"] = ("ONNX Runtime CPU with graph optimizations off (the Q/DQ semantics TensorRT "
                                    "runs): this CPU's fused S8S8 kernels saturate (x86 without VNNI)")
    if cfg.seven_bit_weights and cfg.reduce_range is None:
        quant_info["reduce_range"] = ("7-bit weights: the CPU that exported it is x86 without VNNI, whose uint8 x "
                                      "int8 kernels saturate on 8-bit weights (--no-reduce-range for other targets)")
    return drop_unused_opsets(onnx.load(quantized_path)), quant_info


def _search_settings(cfg: ExportConfig, info: dict[str, Any], *, target: str) -> Any:
    """What the int8 search is asked (export/search.py), from ``cfg`` and the checkpoint's ``info`` (its eps)."""
    from rslad_edge.export.qat import QatSettings
    from rslad_edge.export.search import SearchSettings

    eps = cfg.eps if cfg.eps is not None else float((info.get("meta") or {}).get("eps") or 8 / 255)
    qat = (QatSettings(cfg.qat_epochs, lr=cfg.qat_lr, alpha=cfg.qat_alpha, eps=eps, seed=cfg.seed,
                       scale_lr=cfg.qat_scale_lr)
           if cfg.qat_epochs else None)
    return SearchSettings(target=target, static_batch=cfg.batch, eps=eps, min_agreement=cfg.thresholds[1],
                          max_drop=cfg.max_drop, budget=cfg.search_budget, seed=cfg.seed, qat=qat,
                          min_speedup=cfg.min_speedup, reduce_range=cfg.seven_bit_weights)


def _search(cfg: ExportConfig, model: torch.nn.Module, artifacts: Any, settings: Any, data: _Data) -> Any:
    """The int8 search (export/search.py) over ``artifacts``' candidates; raises SearchFailedError, carrying the
    result, when nothing passed."""
    from rslad_edge.export.search import search_int8

    assert data.search_splits is not None
    result = search_int8(artifacts, model.eval(), *data.search_splits, settings, qat_images=data.qat_images,
                         qat_state=qat_state_dir(cfg))
    if result.chosen is None:
        best = result.best
        raise SearchFailedError(
            f"no int8 recipe passed the gate in {len(result.candidates)} candidate(s) (--search-budget "
            f"{cfg.search_budget}); the closest, {best.recipe.label}: {best.verdict}", result, best.path)
    return result


def _metadata(
    cfg: ExportConfig, source: _Source, data: _Data, *, artifact: str, precision_info: dict[str, Any],
    details: dict[str, Any], versions: tuple[str, ...] = (),
) -> dict[str, Any]:
    """What every artifact's metadata says (the model, its input contract, where it came from), plus ``details``
    of its format."""
    info = source.info
    meta = info.get("meta") or {}
    int8_target = cfg.target if cfg.precision == "int8" and cfg.format != "executorch" else None
    metadata = {
        "format": METADATA_FORMAT,
        "artifact": artifact,
        "arch": info["arch"],
        "arch_kwargs": info.get("arch_kwargs") or None,
        "num_classes": info["num_classes"],
        "classes": data.classes,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_size": list(source.input_shape[1:]),
        "preprocess": data.preprocess,
        "input_range": [0.0, 1.0],
        "input_layout": "NCHW",
        "input_dtype": "float32",
        "batch": "dynamic" if cfg.batch is None else cfg.batch,
        "precision": cfg.precision,
        "target": int8_target,
        "quantization" if cfg.precision == "int8" else "conversion": precision_info or None,  # None for fp32
        "eps": meta.get("eps"),
        "method": meta.get("method"),
        "teacher": meta.get("teacher"),
        "trained_on": meta.get("dataset"),
        "source": str(cfg.checkpoint),
        "source_sha256": source.sha256,
        "source_format": info.get("format"),
        **details,
        "versions": package_versions((*EXPORT_PACKAGES, *versions)),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return {key: value for key, value in metadata.items() if value is not None}  # the same keys in props and JSON


def _save_onnx(proto: onnx.ModelProto, metadata: dict[str, Any], path: Path) -> None:
    """Write ``proto`` with ``metadata`` as its metadata_props, after the full checker."""
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, encode_props(metadata))
    proto.producer_name, proto.producer_version = "rslad-edge", __version__
    check(proto, path.name)
    onnx.save(proto, path)


def _check_parity(
    runner: Any, reference: np.ndarray, data: _Data, thresholds: tuple[float | None, float], final: Path, *,
    searched: bool = False,
) -> ParityReport:
    """The candidate (opened as ``runner``, on its own runtime) against PyTorch's logits; raises, removing any stale
    ``final``, when it misses ``thresholds``. ``searched``: a recipe --search confirmed on held-out images, which the
    test images may refute but not re-decide (ParityReport.agreement_rule)."""
    report = compare_logits(reference, runner.predict(data.parity_images), data.parity_labels,
                            max_abs_diff=thresholds[0], min_agreement=thresholds[1], data=data.description,
                            agreement_rule="not contradicted" if searched else "point")
    _raise_unless_passed(report, final)
    return report


def _raise_unless_passed(report: ParityReport, final: Path) -> None:
    if report.passed:
        return
    stale = [p for p in (final, sidecar_path(final)) if p.exists()]
    for path in stale:
        path.unlink()
    removed = f"; removed the stale {final.name} of an earlier run" if stale else ""
    error = ExportParityError(
        f"parity check failed for {final.name} vs PyTorch on {report.data}: {'; '.join(report.failures)} "
        f"(accuracy torch {report.torch_accuracy:.2%}, artifact {report.artifact_accuracy:.2%}). Nothing "
        f"written{removed}. Loosen with --max-abs-diff / --min-agreement only if that difference is expected"
    )
    error.report = report
    raise error


def _export_engine(
    cfg: ExportConfig, result: ExportResult, input_shape: tuple[int, int, int], reference: np.ndarray, data: _Data,
) -> None:
    """Build the engine here when TensorRT and a GPU are present; else record and raise the trtexec commands."""
    from rslad_edge.runtime.tensorrt_runner import TensorRTRunner, import_tensorrt

    onnx_file = result.written[0]
    engine_path = Path(cfg.out) / cfg.engine_name
    options = dict(batch=cfg.batch, opt_batch=cfg.opt_batch, max_batch=cfg.max_batch,
                   workspace_gib=cfg.workspace_gib, dla_core=cfg.dla_core)
    commands = {f"TensorRT {major}": trtexec_command(plan_build(major, cfg.precision, input_shape, **options),
                                                     onnx_file.path, engine_path)
                for major in (10, 11)}
    result.trtexec = commands
    onnx_file.metadata["trtexec"] = commands
    write_json(onnx_file.sidecar, onnx_file.metadata)
    reason, trt = None, None
    try:
        trt = import_tensorrt()
    except RuntimeUnavailableError as exc:
        reason = str(exc).split(":")[0]  # "TensorRT is not installed here"
    if trt is not None and not torch.cuda.is_available():
        reason = f"TensorRT {trt.__version__} is installed but no CUDA GPU is visible"
    if reason is not None:
        raise TensorRTUnavailableError(
            f"{reason}, so no engine was built (an engine is specific to a GPU model and a TensorRT version): the "
            f"ONNX is at {onnx_file.path}; build the engine on the target with the trtexec command printed above "
            f"(also in {onnx_file.sidecar.name})",
            onnx_file.path, commands,
        )

    plan = plan_build(trt.__version__, cfg.precision, input_shape, **options)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=cfg.out) as workdir_name:
        candidate = Path(workdir_name) / engine_path.name
        build_engine(plan, onnx_file.path, candidate)
        runner = TensorRTRunner(candidate, device="cuda")
        report = _check_parity(runner, reference, data, cfg.parity_thresholds(ENGINE_PARITY_DEFAULTS), engine_path)
        gpu = runner.provider
        del runner
        os.replace(candidate, engine_path)
    engine_metadata = {
        **onnx_file.metadata,
        "artifact": engine_path.name,
        "onnx": onnx_file.path.name,
        "onnx_sha256": sha256_file(onnx_file.path),
        "built_with": gpu,
        "build": {"trt_major": plan.trt_major, "strongly_typed": plan.strongly_typed,
                  "builder_flags": list(plan.builder_flags), "cleared_flags": list(plan.cleared_flags),
                  "profile": plan.profile, "workspace_bytes": plan.workspace_bytes, "dla_core": plan.dla_core},
        "trtexec": trtexec_command(plan, onnx_file.path, engine_path),
        "parity": report.to_dict(),
        "onnx_parity": onnx_file.parity.to_dict(),
        "versions": package_versions((*EXPORT_PACKAGES, "tensorrt")),
    }
    engine_metadata["versions"]["tensorrt"] = trt.__version__
    write_json(sidecar_path(engine_path), engine_metadata)
    logger.info("wrote %s: %s", engine_path, report.summary())
    result.written.append(ExportedFile(engine_path, report, engine_metadata))
