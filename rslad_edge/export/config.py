"""What `rslad-edge export` is asked to do, validated once, with messages that name the CLI flag at fault."""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rslad_edge.attacks.eps import parse_eps
from rslad_edge.errors import ConfigError, UsageError
from rslad_edge.options import option

FORMATS = ("onnx", "trt", "ort", "executorch")
PRECISIONS = ("fp32", "fp16", "int8")
TARGETS = ("cpu", "trt")
CALIB_METHODS = ("minmax", "entropy", "percentile", "histogram")
# What each format can be asked for. ort: ONNX Runtime Mobile's form of the fp32 or int8 (U8S8) ONNX, for phone
# CPUs, which have no fp16 path in ONNX Runtime's CPU kernels. executorch: a .pte lowered to XNNPACK, fp32 or int8
# through PT2E with the XNNPACK quantizer (static int8 activations, per-channel symmetric int8 weights).
FORMAT_PRECISIONS = {"onnx": PRECISIONS, "trt": PRECISIONS, "ort": ("fp32", "int8"), "executorch": ("fp32", "int8")}
# Calibration: ONNX Runtime's quantizer takes minmax / entropy / percentile; the XNNPACK quantizer's activation
# observers are minmax (MinMaxObserver, as our ONNX int8) or histogram (its own default, HistogramObserver: the
# range with the least L2 quantization error, which may clip the large activations robust models rely on).
FORMAT_CALIB_METHODS = {"onnx": CALIB_METHODS[:3], "trt": CALIB_METHODS[:3], "ort": CALIB_METHODS[:3],
                        "executorch": ("minmax", "histogram")}
EXECUTORCH_DEFAULT_BATCH = 1  # a .pte is static in the batch; 1 is what an app classifying one image runs
MIN_OPSET = 13  # per-channel QuantizeLinear / DequantizeLinear need 13; TensorRT 10's parser reads 9 and up
DEFAULT_OPSET = 18  # the dynamo exporter's native opset: no version conversion; ONNX Runtime and TensorRT 10 read it

# Parity thresholds against PyTorch fp32 on --parity-n test images: (max |logit difference| or None, top-1 agreement).
# fp32: the same arithmetic in another order, so 1e-4 and every prediction identical (the bar for an fp32 export).
# fp16: 11-bit mantissas flip only predictions whose top-2 margin is within rounding (measured on the shared
#   ResNet-18 teacher: max |diff| 0.0012 on logits of magnitude ~10, 100% agreement on 256 CIFAR-10 images); 0.1
#   catches a broken conversion (an overflow or a wrong cast is off by whole units) while leaving room for deeper
#   nets, and 99% allows two flips in 256.
# int8: post-training quantization moves logits by a few percent and flips low-margin predictions, and robust
#   models have many low-margin images (the shared teacher, minmax: 98.4% agreement, max |diff| 0.07). 97% allows
#   ~8 flips in 256 while a broken calibration (wrong range, wrong preprocessing) falls far below it; no bound on
#   |diff|, whose size depends on the logit scale of each model.
PARITY_DEFAULTS: dict[str, tuple[float | None, float]] = {
    "fp32": (1e-4, 1.0),
    "fp16": (0.1, 0.99),
    "int8": (None, 0.97),
}


def choose(value: str, choices: tuple[str, ...], flag: str) -> str:
    """``value`` if it is one of ``choices``, else a ConfigError naming ``flag`` and the closest choice."""
    lowered = value.lower()
    if lowered in choices:
        return lowered
    raise ConfigError(f"{flag} {not_a_choice(value, choices)}")


def not_a_choice(value: str, choices: tuple[str, ...]) -> str:
    """"'onx' is not one of onnx, trt. Did you mean 'onnx'?" """
    close = difflib.get_close_matches(value.lower(), choices, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"'{value}' is not one of {', '.join(choices)}.{hint}"


def _thresholds_text() -> str:
    parts = []
    for precision, (diff, agreement) in PARITY_DEFAULTS.items():
        diff_text = f"max |diff| {diff:g}, " if diff is not None else ""
        parts.append(f"{precision}: {diff_text}agreement {agreement:.0%}")
    return "; ".join(parts)


def _choice(choices: tuple[str, ...], flag: str) -> Callable[[str], str]:
    return functools.partial(choose, choices=choices, flag=flag)


@dataclass
class ExportConfig:
    """One export: each field is an option of ``rslad-edge export`` (rslad_edge.options). ``None`` means "the
    default derived from the rest" (said in its help)."""

    checkpoint: Path = option(
        positional=True, metavar="CHECKPOINT",
        help="Checkpoint to export (rslad-edge format, or a bare state dict with --arch).")
    format: str = option(
        "onnx", parse=_choice(FORMATS, "--format"),
        help="onnx; trt (the ONNX, then a TensorRT engine built on this GPU); ort (the ONNX, then its ONNX Runtime "
        "Mobile form, .ort); executorch (a .pte lowered to XNNPACK, fp32 or int8, and beside it NAME.twin.onnx, "
        "the graph verify attacks it through; needs the mobile extra).")
    precision: str = option("fp32", parse=_choice(PRECISIONS, "--precision"),
                            help="fp32, fp16 (float32 I/O kept) or int8 (Q/DQ, calibrated).")
    opset: int = option(DEFAULT_OPSET, help="ONNX opset.")
    batch: int | None = option(
        None, default_text="dynamic; 1 for executorch, whose programs are static in the batch",
        help="A static batch of N.")
    simplify: bool = option(False, flags=("--simplify",), help="Run onnxslim on the fp32 graph first.")
    out: Path | None = option(None, default_text="<checkpoint folder>/export", help="Output folder.")
    name: str | None = option(None, default_text="the checkpoint's", help="File stem.")
    target: str | None = option(
        None, parse=_choice(TARGETS, "--target"), default_text="trt with --format trt, else cpu",
        help="Where the int8 model runs: cpu (uint8 activations (U8S8), ONNX Runtime's fast path) or trt "
        "(symmetric int8 (S8S8), what TensorRT needs).")
    reduce_range: bool | None = option(
        None, flags=("--reduce-range/--no-reduce-range",), default_text="on where this CPU is x86 without VNNI",
        help="int8 --target cpu: 7-bit weights (ONNX Runtime's reduce_range). An x86 CPU without VNNI (AVX2 only) "
        "adds uint8 x int8 products in 16 bits with saturation, which 8-bit weights overflow: there the int8 model "
        "disagrees with its own graph on many images. Export checks parity on this CPU, so it is on here when this "
        "CPU is one; pass it when the target is one, --no-reduce-range for an ARM or VNNI target.")
    calib_n: int = option(512, help="Training images to calibrate int8 on.")
    calib_method: str = option(
        "minmax", parse=_choice(CALIB_METHODS, "--calib-method"),
        help="Activation ranges: minmax, entropy or percentile (ONNX); minmax or histogram (executorch).")
    dataset: str | None = option(
        None, default_text="the checkpoint's, else cifar10",
        help="Images for parity (test split) and int8 calibration (train split): cifar10, cifar100, imagefolder, "
        "shapes.")
    data_root: str | None = option(None, default_text="the checkpoint's, else the dataset's",
                                   help="Dataset folder.")
    arch: str | None = option(None, help="Architecture of a bare state dict (see `rslad-edge models`).")
    num_classes: int | None = option(None, help="Class count of a bare state dict.")
    parity_n: int = option(256, help="Test images for the parity check against PyTorch.")
    max_abs_diff: float | None = option(
        None, default_text=_thresholds_text(), help="Parity: max |logit difference| allowed.")
    min_agreement: float | None = option(
        None, default_text="by precision, as for --max-abs-diff",
        help="Parity: minimum top-1 agreement, a fraction (0.99).")
    seed: int = option(0, help="Seed of the parity, calibration and search samples.")
    search: bool = option(
        False, flags=("--search",),
        help="int8: try quantization recipes, fastest first (every layer int8 with each calibration, then the most "
        "sensitive layers in fp32), and ship the first that passes the gate on held-out training images: agreement's "
        "lower 95% bound >= --min-agreement and robust drop <= --max-drop (PGD through the twin and transferred "
        "from the float model). None passing: the best is kept as NAME.int8.failed-gate.onnx (.pte), exit 3.")
    search_budget: int = option(12, metavar="N", help="--search: candidates to try at most.")
    search_n: int = option(500, help="--search: training images that screen each candidate (a seeded split, "
                                     "disjoint from calibration).")
    confirm_n: int = option(1000, help="--search: training images that confirm a candidate (disjoint from the rest; "
                                       "1,000 bound 97% agreement to within about 1 point).")
    max_drop: float = option(1.0, metavar="PP", help="--search: robust accuracy a candidate may lose, in points.")
    min_speedup: float = option(
        1.0, metavar="X", help="--search: a candidate must run at least X times as fast as the fp32 model at batch 64 "
        "on this machine, else it is not judged (float layers between int8 ones add conversions); 0: any speed.")
    eps: float | str | None = option(
        None, default_text="the checkpoint's training eps, else 8/255",
        help="--search: L-inf budget of its PGD, in pixel units (8/255).")
    qat_epochs: int = option(
        0, metavar="N", help="--search: when no all-int8 recipe passes, train the best one's own int8 graph for N "
        "epochs (quantization-aware, RSLAD's loss with the float model as teacher, PGD inside) before keeping "
        "layers in fp32; resumable (state in OUT/.NAME.int8.onnx.qat, .pte.qat). 0: off.")
    qat_n: int = option(4096, help="--qat-epochs: training images per epoch (after the search's splits).")
    qat_lr: float = option(3e-3, help="--qat-epochs: SGD learning rate (momentum 0.9), decayed to 0 along a cosine.")
    qat_alpha: float = option(
        5 / 6, default_text="5/6, RSLAD's", help="--qat-epochs: weight of the adversarial term; 0 trains on clean "
        "images only (about 4x cheaper).")
    qat_scale_lr: float = option(
        1e-3, help="--qat-epochs: Adam's learning rate on the log activation scales, which then learn too (LSQ; each "
        "layer's int32 bias grid follows its input scale); 0 keeps the calibrated ranges. ONNX only: a .pte's "
        "ranges are tracked by moving averages.")
    workspace_gib: float = option(2.0, flags=("--workspace",), help="TensorRT builder workspace, GiB.")
    dla_core: int | None = option(None, help="TensorRT: build for this DLA core (GPU fallback on).")
    # TensorRT optimization profile for a dynamic batch: min 1, opt, max
    opt_batch: int = option(64, help="TensorRT profile: the batch size to optimise for.")
    max_batch: int = option(256, help="TensorRT profile: the largest batch (the smallest is 1).")

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)
        self.format = choose(self.format, FORMATS, "--format")
        self.precision = choose(self.precision, PRECISIONS, "--precision")
        self.calib_method = choose(self.calib_method, CALIB_METHODS, "--calib-method")
        if self.precision not in FORMAT_PRECISIONS[self.format]:
            allowed = " or ".join(FORMAT_PRECISIONS[self.format])
            raise ConfigError(f"--format {self.format} takes --precision {allowed}, not {self.precision}")
        if self.calib_method not in FORMAT_CALIB_METHODS[self.format]:
            raise ConfigError(f"--calib-method {self.calib_method} does not apply to --format {self.format}: use "
                              f"{' or '.join(FORMAT_CALIB_METHODS[self.format])}")
        if self.format in ("ort", "executorch") and self.target == "trt":
            raise ConfigError(f"--target trt builds int8 for TensorRT; --format {self.format} runs on phone CPUs: drop "
                              "--target")
        if self.target is None:
            self.target = "trt" if self.format == "trt" else "cpu"
        self.target = choose(self.target, TARGETS, "--target")
        if self.format == "trt" and self.precision == "int8" and self.target != "trt":
            raise ConfigError("--target cpu gives uint8 activations (U8S8), which TensorRT cannot build: drop "
                              "--target or use --target trt with --format trt")
        if self.reduce_range is not None and (self.precision != "int8" or self.target != "cpu"
                                              or self.format == "executorch"):
            raise UsageError("--reduce-range applies to int8 ONNX for --target cpu (ONNX Runtime's U8S8 kernels); "
                              "drop it")
        if self.format == "executorch":
            self._check_executorch()
        import onnx

        highest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= self.opset <= highest:
            raise ConfigError(f"--opset must be between {MIN_OPSET} and {highest} (this onnx), got {self.opset}")
        if self.batch is not None and self.batch < 1:
            raise ConfigError(f"--batch must be at least 1, got {self.batch}")
        for flag, value in (("--calib-n", self.calib_n), ("--parity-n", self.parity_n),
                            ("--opt-batch", self.opt_batch), ("--max-batch", self.max_batch)):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1, got {value}")
        if self.opt_batch > self.max_batch:
            raise ConfigError(f"--opt-batch {self.opt_batch} exceeds --max-batch {self.max_batch}")
        self._check_search()
        if self.max_abs_diff is not None and self.max_abs_diff < 0:
            raise ConfigError(f"--max-abs-diff must be >= 0, got {self.max_abs_diff}")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise ConfigError(f"--min-agreement is a fraction in [0, 1] (0.99 for 99%), got {self.min_agreement}")
        if self.workspace_gib <= 0:
            raise ConfigError(f"--workspace is in GiB and must be > 0, got {self.workspace_gib}")
        if self.dla_core is not None:
            if self.dla_core < 0:
                raise ConfigError(f"--dla-core must be >= 0, got {self.dla_core}")
            if self.format != "trt":
                raise ConfigError("--dla-core applies to --format trt")
            if self.precision == "fp32":
                raise ConfigError("--dla-core needs --precision fp16 or int8: the DLA has no fp32")
        if self.out is None:
            self.out = self.checkpoint.parent / "export"
        self.out = Path(self.out)
        if self.name is None:
            self.name = self.checkpoint.stem
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"--name must be a plain file stem like 'student', got '{self.name}'")

    def _check_search(self) -> None:
        if self.search and self.precision != "int8":
            raise UsageError(f"--search looks for an int8 recipe; --precision is {self.precision}: drop --search or "
                             "use --precision int8")
        for flag, value in (("--search-budget", self.search_budget), ("--search-n", self.search_n),
                            ("--confirm-n", self.confirm_n), ("--qat-n", self.qat_n)):
            if value < 1:
                raise UsageError(f"{flag} must be at least 1 (one candidate, one image), got {value}")
        if self.qat_epochs < 0:
            raise UsageError(f"--qat-epochs must be >= 0 (0: no quantization-aware training), got {self.qat_epochs}")
        if self.qat_epochs and not self.search:
            raise UsageError("--qat-epochs trains a candidate of the int8 search: add --search")
        if not self.qat_lr > 0:
            raise UsageError(f"--qat-lr must be > 0, got {self.qat_lr:g}")
        if not self.qat_scale_lr >= 0:
            raise UsageError(f"--qat-scale-lr must be >= 0 (0: activation scales as calibrated), got "
                             f"{self.qat_scale_lr:g}")
        if not 0.0 <= self.qat_alpha <= 1.0:
            raise UsageError(f"--qat-alpha is a weight in [0, 1] (RSLAD's 5/6; 0: clean only), got {self.qat_alpha:g}")
        if not self.min_speedup >= 0:
            raise UsageError(f"--min-speedup is a ratio to the fp32 ONNX's speed (1: faster; 0: any), got "
                             f"{self.min_speedup:g}")
        if self.max_drop < 0:
            raise UsageError(f"--max-drop is a bound in points and must be >= 0, got {self.max_drop:g}")
        if self.eps is not None:
            self.eps = parse_eps(self.eps)

    @property
    def seven_bit_weights(self) -> bool:
        """--reduce-range resolved: as given, else on for int8 ONNX --target cpu where this CPU saturates."""
        if self.reduce_range is not None:
            return self.reduce_range
        from rslad_edge.export.precision import default_reduce_range

        return self.precision == "int8" and self.format != "executorch" and default_reduce_range(str(self.target))

    def _check_executorch(self) -> None:
        """ExecuTorch is installed (the mobile extra), and the options make sense for a .pte."""
        from rslad_edge.runtime.executorch_runner import executorch_missing

        missing = executorch_missing()
        if missing is not None:
            raise ConfigError(f"--format executorch needs the mobile extra ({missing})")
        if self.simplify:
            raise ConfigError("--simplify runs onnxslim on an ONNX graph; --format executorch makes no ONNX")
        if self.batch is None:
            self.batch = EXECUTORCH_DEFAULT_BATCH  # torch.export specialises the batch: a .pte is static in it

    @property
    def thresholds(self) -> tuple[float | None, float]:
        """(max |logit difference| or None, minimum top-1 agreement) for this precision, flags overriding."""
        return self.parity_thresholds(PARITY_DEFAULTS)

    def parity_thresholds(self, defaults: dict[str, tuple[float | None, float]]) -> tuple[float | None, float]:
        """:attr:`thresholds` from another table of per-precision defaults (a TensorRT engine's), flags overriding."""
        default_diff, default_agreement = defaults[self.precision]
        max_abs_diff = default_diff if self.max_abs_diff is None else self.max_abs_diff
        min_agreement = default_agreement if self.min_agreement is None else self.min_agreement
        return max_abs_diff, min_agreement

    @property
    def onnx_name(self) -> str:
        """student.onnx, student.fp16.onnx, student.int8.onnx (U8S8 for the CPU) or student.int8-trt.onnx (S8S8)."""
        if self.precision == "fp32":
            return f"{self.name}.onnx"
        if self.precision == "int8" and self.target == "trt":
            return f"{self.name}.int8-trt.onnx"
        return f"{self.name}.{self.precision}.onnx"

    @property
    def ort_name(self) -> str:
        """student.ort, student.int8.ort: the ONNX's name with .ort (ONNX Runtime's converter names them so)."""
        return self.onnx_name.removesuffix(".onnx") + ".ort"

    @property
    def pte_name(self) -> str:
        """student.pte, student.int8.pte; a batch other than 1 is in the name (student.b64.pte), since a .pte is
        static in the batch and exports for two batch sizes should not overwrite each other."""
        batch = "" if self.batch in (None, EXECUTORCH_DEFAULT_BATCH) else f".b{self.batch}"
        precision = "" if self.precision == "fp32" else f".{self.precision}"
        return f"{self.name}{batch}{precision}.pte"

    @property
    def engine_name(self) -> str:
        """student.engine, student.fp16.engine, student.int8.engine."""
        return f"{self.name}.engine" if self.precision == "fp32" else f"{self.name}.{self.precision}.engine"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["checkpoint"], data["out"] = str(self.checkpoint), str(self.out)
        return data
