"""Reduced-precision ONNX: fp16 (float16 weights and compute, float32 I/O) and int8 (explicit Q/DQ quantization).

Both keep the float32 [0, 1] input contract, so a caller (an attack, a benchmark, a TensorRT engine) never changes.

- fp16: ONNX Runtime's copy of onnxconverter-common's converter (``onnxruntime.transformers.float16``) with
  ``keep_io_types``: weights become float16 and Cast nodes sit at the graph's input and output. It runs on the fp32
  ONNX, after the exporter folded BatchNorm in float32, so no folding happens in half precision. No new dependency.
  TensorRT 11 builds it as a strongly typed network as is.
- int8: ``onnxruntime.quantization.quantize_static`` in QDQ format with per-channel symmetric int8 weights. The
  activation format depends on where the model runs (measured on a 2-core x86-64 CPU: ONNX Runtime, 2 threads,
  batch 64):
  ``cpu`` -> U8S8 (uint8 asymmetric activations: 3.8x faster than fp32 on ResNet-18, the fast path of ONNX
  Runtime's x86 / ARM kernels); ``trt`` -> S8S8 with symmetric activations (zero point 0), the only form
  TensorRT's explicit quantization accepts. Calibration: minmax (ranges = observed min / max), percentile
  (99.999th percentile of |x|, ONNX Runtime's default), entropy (KL-divergence thresholds, TensorRT's classic
  method; computed here because quantize_static's own entropy setting degenerates to minmax, see below).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from rslad_edge.errors import ExportError
from rslad_edge.export.onnx_export import INPUT_NAME, sort_topologically

logger = logging.getLogger(__name__)

CALIB_BATCH = 64  # images per calibration run for a dynamic-batch model
# Entropy: a 2048-bin histogram per tensor over [-max|x|, max|x|], and the threshold t whose 8-bit version of
# [-t, t] loses the least information (KL divergence). 256 quantized bins = 8 bits over [-t, t], which is what
# TensorRT's 128 bins over |x| amount to; ONNX Runtime's calibrator defaults to 128 (7 bits). On the shared
# teacher entropy clips ReLU outputs to 1/5-1/3 of their range and agrees with PyTorch on only 92.6% of 256 test
# images (minmax 98.4%, percentile 98.8%): robust models' large activations carry the decision. It stays an
# option (it suits other models); the parity check rejects it where it hurts.
ENTROPY_BINS = 2048
ENTROPY_QUANTIZED_BINS = 256
# ONNX Runtime's calibrators hold every activation of every calibration image until the end (ResNet-18 at 32x32:
# about 5 MB per image). Its option to merge ranges every k batches (CalibMaxIntermediateOutputs) is not used: in
# onnxruntime 1.32 it discards the batches instead of merging them, and then fails or calibrates on a remainder.


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """float16 weights and compute, float32 input and output (Cast nodes at both ends)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(model, keep_io_types=True)
    # The converter appends its input / output Casts at the end of the node list; the checker wants them sorted.
    return sort_topologically(converted)


class ImageReader:
    """ONNX Runtime's CalibrationDataReader over float32 images: ``{"input": batch}`` until exhausted.

    A static-batch model gets exactly ``batch`` images per run: the remainder that does not fill a batch is
    dropped (padding it with repeats would weight those images twice in the histograms).
    """

    def __init__(self, images: np.ndarray, batch: int, *, static: bool) -> None:
        if static and len(images) < batch:
            raise ExportError(f"--calib-n {len(images)} is smaller than --batch {batch}: calibrate on at least one "
                              f"full batch")
        stop = len(images) - len(images) % batch if static else len(images)
        self.count = stop
        self._batches: Iterator[np.ndarray] = (images[i : min(i + batch, stop)] for i in range(0, stop, batch))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch)}


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calib_images: np.ndarray,
    *,
    target: str,
    method: str,
    static_batch: int | None,
    workdir: Path,
) -> dict[str, Any]:
    """Quantize ``fp32_path`` into ``out_path`` (QDQ, per-channel int8 weights); returns what was done, for metadata.

    ``calib_images``: float32 (N, C, H, W) in [0, 1], training images (never the test images parity uses).

    The classifier (the node that outputs the logits) stays float: it is ~0.01% of the compute, and quantizing
    its output to 8 bits alone moved the shared ResNet-18 teacher's logits by up to 1.4 (256 CIFAR-10 test images,
    minmax): top-1 agreement with PyTorch 96.9% with it quantized, 98.4% (cpu) / 98.0% (trt) with it float.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    symmetric = target == "trt"
    activation_type = QuantType.QInt8 if symmetric else QuantType.QUInt8
    calibrate_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.MinMax,
                        "percentile": CalibrationMethod.Percentile}[method]
    # The input contract fixes the input's range: [0, 1] exactly, so uint8 holds 8-bit pixels without loss.
    input_range = {INPUT_NAME: [{"rmin": np.array(0.0, dtype=np.float32), "rmax": np.array(1.0, dtype=np.float32)}]}
    extra_options: dict[str, Any] = {"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                                     "TensorQuantOverrides": input_range}

    # Pre-processing (ONNX Runtime's recommendation): symbolic shape inference and graph optimisation (fold
    # constants, fuse what the quantizer would otherwise quantize twice), so Q/DQ land where kernels fuse them.
    prepared = workdir / "prepared.onnx"

    def reader(images: np.ndarray) -> CalibrationDataReader:
        reader_type = type("CalibrationReader", (ImageReader, CalibrationDataReader), {})
        return reader_type(images, static_batch or CALIB_BATCH, static=static_batch is not None)

    calibration = reader(calib_images)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):  # the histogram calibrators print progress on stdout
            quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
            classifier = _logits_producer(prepared)
            if method == "entropy":
                # quantize_static's own entropy calibrator gets 128 histogram bins for 128 quantized bins, which
                # leaves it one candidate threshold: the min / max (onnxruntime 1.32; the shared teacher's int8
                # model came out byte-identical to minmax). So ranges come from ORT's entropy calibrator with
                # TensorRT's settings and are handed to quantize_static as overrides; its own calibration pass
                # then needs only one batch.
                overrides = _entropy_ranges(prepared, calibration, symmetric, workdir)
                extra_options["TensorQuantOverrides"] = {**overrides, **input_range}
                calibration = reader(calib_images[: static_batch or CALIB_BATCH])
            quantize_static(
                str(prepared), str(out_path), calibration,
                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=activation_type,
                weight_type=QuantType.QInt8, calibrate_method=calibrate_method, extra_options=extra_options,
                nodes_to_exclude=[classifier.name],
            )
    except ExportError:
        raise
    except Exception as exc:  # the quantizer raises bare ValueError / RuntimeError / ORT Fail
        first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"int8 quantization ({method}, --target {target}) failed: {first_line}") from exc
    finally:
        if printed.getvalue().strip():
            logger.debug("onnxruntime.quantization: %s", printed.getvalue().strip())
    return {
        "format": "QDQ",
        "target": target,
        "activations": "int8 symmetric (zero point 0)" if symmetric else "uint8 asymmetric",
        "weights": "int8 symmetric, per channel",
        "calib_method": method,
        "calib_n": calibration.count if method != "entropy" else int(len(calib_images)),
        "float_nodes": [f"{classifier.op_type} {classifier.name} (the classifier: float logits)"],
    }


def _entropy_ranges(model_path: Path, reader: Any, symmetric: bool, workdir: Path) -> dict[str, list[dict]]:
    """Activation ranges by KL-divergence (entropy) calibration, as quantize_static TensorQuantOverrides."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(
        model_path, None, augmented_model_path=str(workdir / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS, "symmetric": symmetric},
    )
    calibrator.collect_data(reader)
    ranges = calibrator.compute_data()
    # The entropy threshold t gives a range (-t, t); clamp it to what was observed, or a ReLU output (never below
    # 0) would spend half of its uint8 codes on negative values.
    observed = calibrator.collector.get_histogram_dict()  # name -> (hist, edges, min, max, threshold)
    overrides = {}
    for name, data in ranges.items():
        low, high = (float(v) for v in data.range_value)
        seen_min, seen_max = float(observed[name][2]), float(observed[name][3])
        low, high = max(low, min(seen_min, 0.0)), min(high, max(seen_max, 0.0))
        overrides[name] = [{"rmin": np.array(low, dtype=np.float32), "rmax": np.array(high, dtype=np.float32)}]
    return overrides


def _logits_producer(model_path: Path) -> onnx.NodeProto:
    """The node that computes the logits: it stays in float (see :func:`quantize_int8`)."""
    model = onnx.load(model_path)
    output = model.graph.output[0].name
    producer = next((node for node in model.graph.node if output in node.output), None)
    if producer is None:
        raise ExportError(f"no node computes the graph output '{output}' of {model_path.name}")
    return producer
