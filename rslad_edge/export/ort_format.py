"""ONNX -> ORT format (``.ort``): the form ONNX Runtime Mobile loads on phones, made by ONNX Runtime's own converter.

This is ``python -m onnxruntime.tools.convert_onnx_models_to_ort`` called as a function, with the settings its
documentation gives for a model that runs on a phone's CPU: the "Fixed" optimization style at level "all" (graph
optimizations applied once, at conversion, and saved; Q/DQ pairs fused into quantized operators), for the ARM
platform (no x86-only NCHWc layout, int8 Q/DQ fusion allowed). The ``metadata_props`` of the ONNX are kept in the
``.ort`` (ONNX Runtime reads them back as the session's ``custom_metadata_map``).

A full ONNX Runtime build (the pip wheel) runs ``.ort`` files too, so the parity check, verify and bench run the
converted file itself here. On x86 the pip wheel may still apply its x86 layout optimizations when it loads the
file (it loads every model with all optimizations on); a phone's ONNX Runtime runs the graph as saved.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from rslad_edge.errors import ExportError

logger = logging.getLogger(__name__)

TARGET_PLATFORM = "arm"  # phones; "amd64" would save x86-only NCHWc nodes that an ARM build cannot run
OPTIMIZATION = "Fixed style, level all"


def onnx_to_ort(onnx_path: Path, ort_path: Path) -> dict[str, Any]:
    """Convert ``onnx_path`` to ``ort_path`` (written whole or not at all); returns what was done, for metadata."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # it logs every config file at INFO
    printed = io.StringIO()
    with tempfile.TemporaryDirectory(prefix=".ort-", dir=ort_path.parent) as workdir_name:
        converted = Path(workdir_name) / Path(onnx_path).with_suffix(".ort").name  # where the converter puts it
        try:
            with contextlib.redirect_stdout(printed):  # it prints each step
                convert_onnx_models_to_ort(Path(onnx_path), output_dir=Path(workdir_name),
                                           target_platform=TARGET_PLATFORM,
                                           optimization_styles=[OptimizationStyle.Fixed])
        except Exception as exc:  # ONNX Runtime's Fail / InvalidGraph and the tool's own errors
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ExportError(f"ONNX Runtime could not convert {Path(onnx_path).name} to ORT format: {first_line}"
                              ) from exc
        finally:
            if printed.getvalue().strip():
                logger.debug("convert_onnx_models_to_ort: %s", printed.getvalue().strip())
        if not converted.is_file():
            raise ExportError(f"ONNX Runtime's converter wrote no {converted.name} for {Path(onnx_path).name}")
        os.replace(converted, ort_path)
    return {"tool": "onnxruntime.tools.convert_onnx_models_to_ort", "optimization": OPTIMIZATION,
            "target_platform": TARGET_PLATFORM}
