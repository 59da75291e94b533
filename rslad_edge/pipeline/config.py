"""The pipeline's configuration: one YAML with a section per stage, whose keys are that stage's CLI options.

The presets are written as commented YAML, so ``rslad-edge pipeline --print-config --preset NAME`` prints exactly
what a run of that preset uses, with the reasons, ready to edit. :func:`check_pipeline_config` turns every section
into its stage's typed config before any stage runs: an unknown key (with a close match), a wrong type or an
impossible value in any section is one line naming the section and the key.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rslad_edge.bench.suite import BenchConfig
from rslad_edge.distill.config import DistillConfig, resolve_config
from rslad_edge.errors import ConfigError, PipelineConfigError, unknown_name_error
from rslad_edge.export.config import FORMAT_PRECISIONS, FORMATS, ExportConfig, not_a_choice
from rslad_edge.io import read_yaml_mapping
from rslad_edge.options import Spec, comma_list, key_table, normal_key, option, read_mapping, specs
from rslad_edge.verify.run import VerifyConfig

STAGES = ("distill", "export", "verify", "bench")

PRESET_YAML: dict[str, str] = {
    "smoke": """\
# rslad-edge pipeline, preset smoke: fully offline on a CPU, a few minutes on 2 cores.
# Synthetic `shapes` data, a small teacher trained adversarially on the spot (fast AT), an RSLAD student, its ONNX
# exports, verification with small but real attack budgets, CPU latency, then report.md / report.html.
distill:                  # keys: the options of `rslad-edge distill` (see its --help)
  preset: smoke           # shapes, smallcnn student, 4 epochs, PGD-3 training attack
  method: rslad
  # teacher: path/to/teacher.pt   # omitted: the smoke preset trains one (smallcnn-wide, SAT) under OUT/teacher
export:                   # keys: the options of `rslad-edge export`, plus `formats` and `precisions`
  formats: [onnx]         # also: ort (ONNX Runtime Mobile), executorch (.pte, XNNPACK; the mobile extra)
  precisions: [fp32, int8]  # fp16 and a TensorRT engine are added where a CUDA GPU / TensorRT is present
  target: cpu             # int8 activation format: cpu = uint8 (ONNX Runtime's fast path), trt = symmetric int8
  calib-n: 512            # training images for int8 calibration
  parity-n: 256           # test images for the parity check against PyTorch
  # search: true          # int8: try other recipes when the default loses parity or robustness (off: minutes)
  # qat-epochs: 3         # with search: train the int8 graph itself when no recipe passes (minutes per epoch)
verify:                   # keys: the options of `rslad-edge verify` (checkpoint- / export-attacks: separate lists)
  # Every artifact faces the same columns: white-box (an export through its differentiable twin, judged by the
  # export itself) and Square; the exports also transfer (crafted on student.pt) and divergence (float vs export).
  # autoattack: add it (slow on a CPU).
  attacks: [fgsm, pgd_sat, pgd_trades, cw, transfer_pgd, transfer_cw, divergence, square]
  n: 100                  # seeded test images
  eps: 8/255
  square-queries: 100     # the paper uses 5000; small here so the demo stays within minutes
  max-drop: 10            # gate: fail when an export's worst case (or any attack) is > 10 points below student.pt's
bench:                    # keys: the options of `rslad-edge bench`
  device: cpu
  batch: [1, 64]
  seconds: 1              # timed seconds per batch size, after warm-up
  threads: 2
""",
    "cifar10-rslad": """\
# rslad-edge pipeline, preset cifar10-rslad: the paper's CIFAR-10 setting, for a GPU (days on a CPU).
# Teacher: the TRADES WRN-34-10 (RobustBench Zhang2019Theoretically, robustbench extra) or your own via --teacher.
distill:
  preset: paper           # SGD 0.1, wd 2e-4, batch 128, 300 epochs, lr x0.1 from 216/261/286, PGD-10 of 2/255
  method: rslad
  student: mobilenetv2
  teacher: robustbench:Zhang2019Theoretically
  dataset: cifar10
  data-root: data         # torchvision's CIFAR-10 folder (downloaded there when missing)
export:
  precisions: [fp32, int8]
  target: cpu
  calib-n: 512
  search: true            # int8: the default recipe first; when it loses parity or robustness, other calibrations,
                          # then QAT of the int8 graph, then the most sensitive layers in fp32 (export --search;
                          # its table lands in the report)
  qat-epochs: 5           # quantization-aware training of the int8 graph, RSLAD's loss with the float student as
                          # teacher (export --qat-epochs; resumable)
verify:
  # the paper's white-box columns on every artifact (exports through their twin), then transfer, divergence, Square
  attacks: [fgsm, pgd_sat, pgd_trades, cw, autoattack, transfer_pgd, transfer_cw, divergence, square]
  n: 1000
  eps: 8/255
  square-queries: 5000    # the paper's black-box budget
  max-drop: 5
bench:
  device: auto
  batch: [1, 8, 64]
  seconds: 5
""",
    "cifar100-rslad": """\
# rslad-edge pipeline, preset cifar100-rslad: the paper's CIFAR-100 setting, for a GPU.
# Teacher: WRN-70-16 (RobustBench Gowal2020Uncovering, robustbench extra) or your own via --teacher.
distill:
  preset: paper
  method: rslad
  student: mobilenetv2
  teacher: robustbench:Gowal2020Uncovering
  dataset: cifar100
  data-root: data
export:
  precisions: [fp32, int8]
  target: cpu
  calib-n: 512
  search: true            # int8: the default recipe first; when it loses parity or robustness, other calibrations,
                          # then QAT of the int8 graph, then the most sensitive layers in fp32 (export --search;
                          # its table lands in the report)
  qat-epochs: 5           # quantization-aware training of the int8 graph, RSLAD's loss with the float student as
                          # teacher (export --qat-epochs; resumable)
verify:
  # the paper's white-box columns on every artifact (exports through their twin), then transfer, divergence, Square
  attacks: [fgsm, pgd_sat, pgd_trades, cw, autoattack, transfer_pgd, transfer_cw, divergence, square]
  n: 1000
  eps: 8/255
  square-queries: 5000
  max-drop: 5
bench:
  device: auto
  batch: [1, 8, 64]
  seconds: 5
""",
}


def _searched(export: dict[str, Any], precision: str) -> dict[str, Any]:
    """The export section for one precision: the search and its QAT for int8 only."""
    searched = bool(export.get("search", False)) and precision == "int8"
    return {**export, "search": searched, "qat_epochs": export.get("qat_epochs", 0) if searched else 0}


def preset_text(name: str) -> str:
    if name not in PRESET_YAML:
        raise unknown_name_error("pipeline --preset", name, PRESET_YAML)
    return PRESET_YAML[name]


def _sections(data: Any, source: str) -> dict[str, dict[str, Any]]:
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping with sections {', '.join(STAGES)}")
    unknown = set(data) - set(STAGES)
    if unknown:
        name = sorted(unknown)[0]
        close = difflib.get_close_matches(name, STAGES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{source}: unknown section '{name}'{hint}; sections are {', '.join(STAGES)}")
    sections = {}
    for stage in STAGES:
        section = data.get(stage) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{source}: section '{stage}' must be a mapping of option: value")
        sections[stage] = {normal_key(k): v for k, v in section.items()}
    return sections


def load_pipeline_config(
    preset: str | None = None, path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """The stage sections: the preset's, updated key by key by the file's, then by ``overrides``."""
    sections = _sections(yaml.safe_load(preset_text(preset or "smoke")), f"preset {preset or 'smoke'}")
    if path is not None:
        data = read_yaml_mapping(path)
        for stage, section in _sections(data, f"--config {path}").items():
            sections[stage].update(section)
    for stage, section in (overrides or {}).items():
        sections[stage].update({k: v for k, v in section.items() if v is not None})
    return sections


@dataclass
class ExportSection:
    """The export section's keys besides ExportConfig's options: the pipeline exports once per format and
    precision."""

    formats: list[str] = option(
        ["onnx"], parse=comma_list, help="onnx, ort (ONNX Runtime Mobile; the ONNX too) and/or executorch (.pte); a "
        "TensorRT engine is built from the ONNX where TensorRT and a GPU are present.")
    precisions: list[str] = option(
        ["fp32", "int8"], parse=comma_list, help="Each format's precisions among these (fp16 is added on a GPU).")


@dataclass
class VerifySection:
    """The verify section's keys besides VerifyConfig's options: separate lists for the checkpoint and the exports,
    when ``attacks`` (one list for every artifact) is not given."""

    checkpoint_attacks: list[str] | None = option(None, parse=comma_list, help="Attacks on the student checkpoint.")
    export_attacks: list[str] | None = option(None, parse=comma_list, help="Attacks on each export.")


# What each section holds: its stage config's options (and the pipeline's own keys for that stage).
SECTION_CONFIGS: dict[str, tuple[type, ...]] = {
    "distill": (DistillConfig,),
    "export": (ExportConfig, ExportSection),
    "verify": (VerifyConfig, VerifySection),
    "bench": (BenchConfig,),
}
# Options the pipeline sets itself: a section may not.
OWNED_KEYS: dict[str, tuple[str, ...]] = {
    "distill": ("out",),
    "export": ("checkpoint", "out", "precision", "format"),
    "verify": ("artifact", "reference", "json_path"),
    "bench": (),
}


def section_keys(stage: str) -> dict[str, Spec]:
    """Key -> option, for every key the pipeline's ``stage`` section takes."""
    return key_table(*SECTION_CONFIGS[stage], exclude=OWNED_KEYS[stage])


@dataclass(frozen=True)
class PipelineConfig:
    """Every section as its stage's typed config, checked before any work. ``exports`` and ``verify_*`` are built
    for ``OUT/student.pt``, the file distill will write; dataset and data root are distill's, resolved once."""

    sections: dict[str, dict[str, Any]]  # as given (after presets and overrides), for the report and stage keys
    distill: DistillConfig
    exports: list[ExportConfig]  # one per format and precision
    verify_checkpoint: VerifyConfig  # for the student checkpoint (white-box suite)
    verify_export: VerifyConfig  # template for each export (artifact replaced), with the student as reference
    bench: BenchConfig
    dataset: dict[str, str | None]


def check_pipeline_config(sections: dict[str, dict[str, Any]], out: str | Path, *, with_fp16: bool = False,
                          engines: bool = False) -> PipelineConfig:
    """Build every stage's config from ``sections``; raises :class:`PipelineConfigError` (exit 2) naming the
    section and the key at fault. ``with_fp16`` / ``engines``: add fp16 / build TensorRT engines (a GPU is here)."""
    from rslad_edge.models.external import is_factory_spec
    from rslad_edge.verify.suite import checkpoint_attacks as checkpoint_attacks_of
    from rslad_edge.verify.suite import parse_attacks

    out = Path(out)
    distill = _read(sections, "distill")
    preset = distill.pop("preset", None)
    distill_cfg = _in_section("distill", lambda: resolve_config(
        preset, cli_values={**distill, "out": str(out)}, source="pipeline section 'distill'"))
    dataset = {"name": distill_cfg.dataset, "root": distill_cfg.data_root}
    student = out / "student.pt"

    # A student built by package.module:factory is rebuilt from its checkpoint only when named (it runs code).
    factory = {"arch": distill_cfg.student} if is_factory_spec(distill_cfg.student) else {}
    export = {**factory, **_read(sections, "export")}
    plan = _split(export, ExportSection)
    formats = _in_section("export", lambda: export_formats(plan.formats), key="formats")
    export.setdefault("dataset", dataset["name"])
    export.setdefault("data_root", dataset["root"])
    exports = []
    for export_format in formats:
        format_precisions = [p for p in plan.precisions if p in FORMAT_PRECISIONS[export_format]]
        if export_format == "onnx" and with_fp16 and "fp16" not in format_precisions:
            format_precisions.append("fp16")  # fp16 pays off on GPUs only
        if not format_precisions:
            raise PipelineConfigError(f"pipeline section 'export': format {export_format} takes precisions "
                                      f"{', '.join(FORMAT_PRECISIONS[export_format])}; none is in 'precisions'")
        if export_format == "onnx" and engines:
            export_format = "trt"  # the ONNX, then an engine built on this GPU
        # search and its QAT: the int8 exports'; fp32 / fp16 export as they are.
        exports += [_in_section("export", lambda p=precision, f=export_format: ExportConfig(
            checkpoint=student, precision=p, out=out / "export", format=f, **_searched(export, p)))
            for precision in format_precisions]

    verify = {**factory, **_read(sections, "verify")}
    lists = _split(verify, VerifySection)
    for key, names in (("checkpoint-attacks", lists.checkpoint_attacks), ("export-attacks", lists.export_attacks)):
        if names is not None:
            _in_section("verify", lambda names=names: parse_attacks(names), key=key)
    verify.setdefault("dataset", dataset["name"])
    verify.setdefault("data_root", dataset["root"])
    max_drop = verify.pop("max_drop", None)
    attacks = verify.pop("attacks", None)
    # One list for every artifact: each export faces all of it; the checkpoint its white-box and query attacks
    # (transfer and divergence need a float model beside it), which is also exactly what it faces as each export's
    # reference, so its own worst case is the one every export's drop is measured against.
    export_list = attacks or lists.export_attacks
    checkpoint_list = lists.checkpoint_attacks if not attacks else None
    if checkpoint_list is None and export_list is not None:
        checkpoint_list = _in_section("verify", lambda: checkpoint_attacks_of(export_list), key="attacks")
    verify_checkpoint = _in_section("verify", lambda: VerifyConfig(
        artifact=student, attacks=checkpoint_list or None, **verify))
    verify_export = _in_section("verify", lambda: VerifyConfig(
        artifact=out / "export" / "student.onnx", reference=student, max_drop=max_drop, attacks=export_list, **verify))

    bench = _in_section("bench", lambda: BenchConfig(**_read(sections, "bench")))
    phone_formats = [f for f in formats if f in ("ort", "executorch")]
    if phone_formats and bench.resolved_device() != "cpu":
        raise PipelineConfigError(f"pipeline section 'bench': device {bench.resolved_device()} cannot run the "
                                  f"{' and '.join(phone_formats)} exports (phone CPU formats): set device: cpu")
    return PipelineConfig(sections=sections, distill=distill_cfg, exports=exports,
                          verify_checkpoint=verify_checkpoint, verify_export=verify_export, bench=bench,
                          dataset=dataset)


def _read(sections: dict[str, dict[str, Any]], stage: str) -> dict[str, Any]:
    """The ``stage`` section as field name -> value: every key known, every value of its field's type."""
    owned = {key: "the pipeline sets it" for cls in SECTION_CONFIGS[stage] for name, spec in specs(cls).items()
             if name in OWNED_KEYS[stage] for key in spec.keys}
    return read_mapping(sections[stage], section_keys(stage), where=f"pipeline section '{stage}'",
                        error=PipelineConfigError, reserved=owned)


def _split(values: dict[str, Any], cls: type) -> Any:
    """``cls`` (a section's own keys) built from the entries of ``values`` that are its fields, taken out."""
    return cls(**{name: values.pop(name) for name in specs(cls) if name in values})


def export_formats(formats: list[str]) -> list[str]:
    """The export section's ``formats``, checked; ``ort`` makes the ONNX too (the .ort is converted from it), so a
    list with both exports each ONNX once."""
    choices = tuple(f for f in FORMATS if f != "trt")  # engines are built where TensorRT and a GPU are present
    for name in formats:
        if name not in choices:
            raise ConfigError(not_a_choice(name, choices))
    chosen = list(dict.fromkeys(formats))
    if not chosen:
        raise ConfigError(f"give at least one of {', '.join(choices)}")
    return [name for name in chosen if not (name == "onnx" and "ort" in chosen)]


def _in_section(stage: str, build: Any, key: str | None = None) -> Any:
    """``build()``, with a ConfigError's message prefixed by the section (and key) it came from."""
    try:
        return build()
    except ConfigError as exc:
        where = f"pipeline section '{stage}'" + (f", key '{key}'" if key else "")
        message = str(exc)
        raise PipelineConfigError(message if message.startswith("pipeline section") else f"{where}: {message}") \
            from None
