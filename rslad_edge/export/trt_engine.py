"""TensorRT engines from the exported ONNX: the Python API build of a :class:`BuildPlan`, and the error that carries
the trtexec commands when TensorRT or a GPU is missing here.

The plan by TensorRT version and its trtexec command line live in :mod:`rslad_edge.runtime.trt_build` (bench runs
the same command on a Jetson); they are re-exported here for the export stage.

:func:`build_engine` imports TensorRT lazily and HAS NEVER RUN ON REAL HARDWARE in this project (no GPU where it was
written): run ``pytest -m gpu`` on a GPU / Jetson before relying on it. Where the docs were unclear (marked
"unsure"), a missing attribute fails loudly with the TensorRT version in the message instead of building something
else.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rslad_edge.errors import ExportError, RuntimeUnavailableError
from rslad_edge.runtime.trt_build import BuildPlan, parse_major, plan_build, trtexec_command

logger = logging.getLogger(__name__)

__all__ = [
    "BuildPlan",
    "TensorRTUnavailableError",
    "build_engine",
    "plan_build",
    "trtexec_command",
]


class TensorRTUnavailableError(RuntimeUnavailableError):
    """No TensorRT or no GPU here: the ONNX was written; ``commands`` build the same engine on the target."""

    def __init__(self, message: str, onnx_path: Path, commands: dict[str, str]) -> None:
        super().__init__(message)
        self.onnx_path = onnx_path
        self.commands = commands  # {"TensorRT 10": "trtexec ...", "TensorRT 11": "trtexec ..."}


def build_engine(plan: BuildPlan, onnx_path: Path, engine_path: Path) -> Path:
    """Build ``onnx_path`` into a serialized engine at ``engine_path`` (written whole or not at all).

    Lazy TensorRT import. NEVER RUN ON REAL HARDWARE here: see the module docstring.
    """
    from rslad_edge.io import atomic_write
    from rslad_edge.runtime.tensorrt_runner import import_tensorrt

    trt = import_tensorrt()
    if parse_major(trt.__version__) != plan.trt_major:
        raise ExportError(f"the build plan is for TensorRT {plan.trt_major} but TensorRT {trt.__version__} is loaded")
    trt_logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(trt_logger)
    except (RuntimeError, TypeError) as exc:  # no usable CUDA driver: the builder cannot be constructed
        raise RuntimeUnavailableError(f"TensorRT {trt.__version__} cannot start a builder (no usable GPU / CUDA "
                                      f"driver here): {exc}") from exc
    network_flags = 0
    for name in plan.network_flags:
        network_flags |= 1 << int(_member(trt, trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT {trt.__version__} cannot parse '{onnx_path}': {errors[:500]}")

    config = builder.create_builder_config()
    if plan.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for name in plan.builder_flags:
        config.set_flag(_member(trt, trt.BuilderFlag, name))
    for name in plan.cleared_flags:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    if plan.profile is not None:
        profile = builder.create_optimization_profile()
        profile.set_shape(plan.input_name, *plan.profile)
        config.add_optimization_profile(profile)
    if plan.dla_core is not None:
        if builder.num_DLA_cores <= plan.dla_core:
            raise RuntimeUnavailableError(f"--dla-core {plan.dla_core}: this device has {builder.num_DLA_cores} "
                                          f"DLA cores (Orin Nano has none)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core

    logger.info("building a TensorRT %s %s engine from %s (minutes on a Jetson)", trt.__version__, plan.precision,
                onnx_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {trt.__version__} failed to build an engine from '{onnx_path}' (see its log)")
    return atomic_write(engine_path, lambda tmp: tmp.write_bytes(bytes(serialized)))


def _member(trt: object, enum: object, name: str) -> object:
    if not hasattr(enum, name):
        raise RuntimeUnavailableError(
            f"TensorRT {getattr(trt, '__version__', '?')} has no {getattr(enum, '__name__', enum)}.{name}: this "
            f"version is not one rslad-edge was written for (10.x or 11.x)"
        )
    return getattr(enum, name)
