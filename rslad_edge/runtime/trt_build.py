"""How a TensorRT engine is built from an exported ONNX: the build plan by TensorRT version, and the one ``trtexec``
command line that builds it. Export prints and records it (and builds the same plan with the Python API); bench
runs it on a Jetson before timing. Pure and testable without TensorRT.

What changes between versions (shared/TENSORRT_JETSON.md):

- TensorRT 10 (JetPack 6 stays on 10.x; the same flags work back to 8.x): a weakly typed network plus precision
  builder flags: FP16 for an fp16 ONNX; INT8 (+ FP16 for the layers the Q/DQ graph leaves unquantized, and because
  the DLA has no fp32) for an int8 Q/DQ ONNX. Implicit calibration (calibrators) is deprecated and never used: int8
  is always explicit Q/DQ.
- TensorRT 11: strongly typed only; the FP16 / INT8 flags are gone, so precision comes from the ONNX itself (the
  fp16 ONNX's float16 tensors, the Q/DQ nodes of the int8 ONNX).
- fp32 on either: TF32 is switched off, so an "fp32" engine computes in fp32 (TF32 is on by default on Ampere and
  Orin and would move logits by ~1e-3).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from rslad_edge.errors import ConfigError, RuntimeUnavailableError

SUPPORTED_MAJORS = (10, 11)
PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_INPUT_NAME = "input"  # the project's input contract: input "input", output "logits"
_OPTION_FOR_BUILDER_FLAG = {"FP16": "--fp16", "INT8": "--int8", "GPU_FALLBACK": "--allowGPUFallback"}

Shape = tuple[int, ...]


@dataclass(frozen=True)
class BuildPlan:
    """Everything that decides the engine, independent of the TensorRT module (so it is testable without one)."""

    trt_major: int
    precision: str  # fp32 | fp16 | int8: the ONNX's precision
    strongly_typed: bool
    builder_flags: tuple[str, ...]  # names in trt.BuilderFlag to set
    cleared_flags: tuple[str, ...]  # names in trt.BuilderFlag to clear
    profile: tuple[Shape, Shape, Shape] | None  # (min, opt, max) input shapes; None: the ONNX's static shape
    workspace_bytes: int | None  # None: TensorRT's default (no --memPoolSize, which trtexec < 8.4 lacks)
    dla_core: int | None
    input_name: str = DEFAULT_INPUT_NAME

    @property
    def network_flags(self) -> tuple[str, ...]:
        """Names in trt.NetworkDefinitionCreationFlag (explicit batch is the only mode since 10: no flag)."""
        return ("STRONGLY_TYPED",) if self.strongly_typed else ()


def parse_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise ConfigError(f"cannot read a TensorRT major version from '{version}'") from None


def plan_build(
    trt_version: str | int,
    precision: str,
    input_shape: tuple[int, int, int],
    *,
    batch: int | None = None,
    min_batch: int = 1,
    opt_batch: int = 64,
    max_batch: int = 256,
    workspace_gib: float | None = 2.0,
    dla_core: int | None = None,
    input_name: str = DEFAULT_INPUT_NAME,
) -> BuildPlan:
    """The build for ``precision`` on TensorRT ``trt_version``.

    ``batch=None``: a dynamic-batch ONNX, profile ``min_batch`` / ``opt_batch`` / ``max_batch`` (bench gives all
    three the same batch: one engine tuned for exactly that batch); ``batch=N``: a static ONNX, no profile.
    """
    major = parse_major(str(trt_version))
    if major not in SUPPORTED_MAJORS:
        raise RuntimeUnavailableError(
            f"TensorRT {trt_version} is not supported: rslad-edge builds engines with TensorRT 10 (JetPack 6) or 11"
        )
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be fp32, fp16 or int8, got '{precision}'")
    if dla_core is not None and precision == "fp32":
        raise ConfigError("--dla-core needs --precision fp16 or int8: the DLA has no fp32")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ConfigError(f"the batch profile must satisfy 1 <= min <= opt <= max, got {min_batch} / {opt_batch} / "
                          f"{max_batch}")
    strongly_typed = major >= 11
    flags: list[str] = []
    cleared: list[str] = []
    if precision == "fp32":
        cleared.append("TF32")  # (unsure on 11: assumed kept, as it is no reduced-precision flag)
    elif not strongly_typed:
        flags += {"fp16": ["FP16"], "int8": ["INT8", "FP16"]}[precision]
    if dla_core is not None:
        flags.append("GPU_FALLBACK")  # layers the DLA cannot run go to the GPU instead of failing the build
    channels, height, width = input_shape
    profile = None
    if batch is None:
        profile = tuple((b, channels, height, width) for b in (min_batch, opt_batch, max_batch))
    return BuildPlan(
        trt_major=major, precision=precision, strongly_typed=strongly_typed, builder_flags=tuple(flags),
        cleared_flags=tuple(cleared), profile=profile,
        workspace_bytes=int(workspace_gib * (1 << 30)) if workspace_gib is not None else None, dla_core=dla_core,
        input_name=input_name,
    )


def shape_arg(input_name: str, shape: Shape) -> str:
    """``input:8x3x32x32``: how trtexec names an input shape (``--minShapes``, ``--shapes``, ...)."""
    return f"{input_name}:{'x'.join(map(str, shape))}"


def trtexec_build_args(
    plan: BuildPlan, onnx_path: str | Path, engine_path: str | Path, *, timing_cache: str | None = None,
    skip_inference: bool = False,
) -> list[str]:
    """The trtexec arguments that build the engine ``plan`` describes (what the Python API build builds).

    ``timing_cache`` reuses kernel timings across builds (bench builds one engine per batch size);
    ``skip_inference`` builds without the short benchmark trtexec runs after a build.
    """
    args = [f"--onnx={onnx_path}", f"--saveEngine={engine_path}"]
    if plan.workspace_bytes is not None:
        args.append(f"--memPoolSize=workspace:{max(plan.workspace_bytes >> 20, 1)}M")
    if plan.profile is not None:
        for option, shape in zip(("--minShapes", "--optShapes", "--maxShapes"), plan.profile, strict=True):
            args.append(f"{option}={shape_arg(plan.input_name, shape)}")
    if plan.strongly_typed and plan.trt_major < 11:
        args.append("--stronglyTyped")  # opt-in on 10; the only mode (and the default) on 11
    if plan.dla_core is not None:
        args.append(f"--useDLACore={plan.dla_core}")
    args += [_OPTION_FOR_BUILDER_FLAG[flag] for flag in plan.builder_flags]
    if "TF32" in plan.cleared_flags:
        args.append("--noTF32")
    if timing_cache is not None:
        args.append(f"--timingCacheFile={timing_cache}")
    if skip_inference:
        args.append("--skipInference")
    return args


def trtexec_command(
    plan: BuildPlan, onnx_path: str | Path, engine_path: str | Path, *, trtexec: str = "trtexec"
) -> str:
    """The shell command line that builds the engine of ``plan``, quoted for a POSIX shell.

    trtexec ships with JetPack at /usr/src/tensorrt/bin/trtexec.
    """
    return shlex.join([trtexec, *trtexec_build_args(plan, onnx_path, engine_path)])
