"""The export stage: a checkpoint becomes ONNX (fp32 / fp16 / int8 Q/DQ) and TensorRT engines, each checked
against PyTorch before it is written under its final name."""

from rslad_edge.export.config import PARITY_DEFAULTS, ExportConfig
from rslad_edge.export.exporter import ENGINE_PARITY_DEFAULTS, ExportResult, export
from rslad_edge.export.parity import ParityReport, compare_logits
from rslad_edge.export.search import SEARCH_TABLE_HEADER, SearchFailedError, qat_lines, table_rows
from rslad_edge.export.trt_engine import (
    BuildPlan,
    TensorRTUnavailableError,
    build_engine,
    plan_build,
    trtexec_command,
)

__all__ = [
    "ENGINE_PARITY_DEFAULTS",
    "PARITY_DEFAULTS",
    "SEARCH_TABLE_HEADER",
    "BuildPlan",
    "ExportConfig",
    "ExportResult",
    "ParityReport",
    "SearchFailedError",
    "TensorRTUnavailableError",
    "build_engine",
    "compare_logits",
    "export",
    "plan_build",
    "qat_lines",
    "table_rows",
    "trtexec_command",
]
