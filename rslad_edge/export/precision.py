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
import hashlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from rslad_edge.errors import ExportError
from rslad_edge.export.onnx_export import INPUT_NAME, sort_topologically
from rslad_edge.io import sha256_file

logger = logging.getLogger(__name__)

CALIB_BATCH = 64  # images per calibration run for a dynamic-batch model
# Entropy: a 2048-bin histogram per tensor over [-max|x|, max|x|], and the threshold t whose 8-bit version of
# [-t, t] loses the least information (KL divergence). 256 quantized bins = 8 bits over [-t, t], which is what
# TensorRT's 128 bins over |x| amount to; ONNX Runtime's calibrator defaults to 128 (7 bits). A tensor that is never
# negative (a ReLU output) holds a spike of exact zeros in one bin: ONNX Runtime's KL search spreads that bin over
# its neighbours in every candidate but the narrowest, whose quantized bins are the histogram's own, so it picked the
# narrowest for every ReLU output (1/8 of the observed max), clipping 0.2-1.6% of their largest values (the briefly
# trained MobileNetV2 of the README: agreement with PyTorch 86.0% on 1,000 test images; minmax 92.8%). Zeros are
# exact in any uint8 / int8 range, so the spike is left out of the search, and a never-negative tensor's uint8
# range gets 8 bits over [0, t], 512 quantized bins over [-t, t] (:func:`_entropy_ranges`): 96.4% there.
ENTROPY_BINS = 2048
ENTROPY_QUANTIZED_BINS = 256
# Entropy ranges of the last (prepared model, calibration images, symmetry): the int8 search quantizes one model
# several times with them, and ONNX Runtime computes them in Python (seconds per tensor on large histograms).
_ENTROPY_RANGES: dict[tuple[str, str, bool], dict[str, list[dict]]] = {}
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


def default_reduce_range(target: str) -> bool:
    """7-bit weights for ``--target cpu`` where this CPU is x86 without VNNI (its U8S8 kernels saturate on 8-bit
    weights, :func:`rslad_edge.device.cpu_saturates_u8s8`); TensorRT's weights (``trt``) keep 8 bits."""
    from rslad_edge.device import cpu_saturates_u8s8

    return target == "cpu" and cpu_saturates_u8s8()


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calib_images: np.ndarray,
    *,
    target: str,
    method: str,
    static_batch: int | None,
    workdir: Path,
    per_channel: bool = True,
    reduce_range: bool | None = None,
    float_nodes: tuple[str, ...] = (),
    keep_activations: bool = False,
) -> dict[str, Any]:
    """Quantize ``fp32_path`` into ``out_path`` (QDQ, int8 weights); returns what was done, for metadata.

    ``calib_images``: float32 (N, C, H, W) in [0, 1], training images (never the test images parity uses).
    ``per_channel``: one weight scale per output channel (the default) or one per tensor. ``reduce_range``: 7-bit
    weights, for x86 CPUs without VNNI, whose uint8 x int8 kernels saturate on full-range weights; None:
    :func:`default_reduce_range`.
    ``float_nodes``: nodes that run in float32 (:func:`keep_float`), by name, as :func:`quantizable_nodes` gives them.
    The prepared (pre-processed float) model is left in ``workdir`` as ``prepared.onnx``. ``keep_activations``
    (implied by ``float_nodes``): ReLU / Clip stay nodes of the graph instead of being folded into the range of the
    quantized tensor before them (the same numbers while that tensor is quantized; a float layer needs them).

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

    if reduce_range is None:
        reduce_range = default_reduce_range(target)
    symmetric = target == "trt"
    activation_type = QuantType.QInt8 if symmetric else QuantType.QUInt8
    calibrate_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.MinMax,
                        "percentile": CalibrationMethod.Percentile}[method]
    # The input contract fixes the input's range: [0, 1] exactly, so uint8 holds 8-bit pixels without loss.
    input_range = {INPUT_NAME: [{"rmin": np.array(0.0, dtype=np.float32), "rmax": np.array(1.0, dtype=np.float32)}]}
    extra_options: dict[str, Any] = {"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                                     "TensorQuantOverrides": input_range,
                                     "QDQKeepRemovableActivations": keep_activations or bool(float_nodes)}

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
                key = (sha256_file(prepared), hashlib.sha256(calib_images.tobytes()).hexdigest(), symmetric)
                if key not in _ENTROPY_RANGES:
                    _ENTROPY_RANGES.clear()  # one model at a time: the search quantizes the same one repeatedly
                    _ENTROPY_RANGES[key] = _entropy_ranges(prepared, calibration, symmetric, workdir)
                overrides = _ENTROPY_RANGES[key]
                extra_options["TensorQuantOverrides"] = {**overrides, **input_range}
                calibration = reader(calib_images[: static_batch or CALIB_BATCH])
            quantize_static(
                str(prepared), str(out_path), calibration,
                quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=reduce_range,
                activation_type=activation_type, weight_type=QuantType.QInt8, calibrate_method=calibrate_method,
                extra_options=extra_options, nodes_to_exclude=[classifier.name],
            )
        if float_nodes:
            onnx.save(keep_float(onnx.load(out_path), onnx.load(prepared), float_nodes), out_path)
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
        "weights": f"int{7 if reduce_range else 8} symmetric, per {'channel' if per_channel else 'tensor'}",
        "calib_method": method,
        "calib_n": calibration.count if method != "entropy" else int(len(calib_images)),
        "float_nodes": [f"{classifier.op_type} {classifier.name} (the classifier: float logits)",
                        *(f"{name} (fp32: chosen by the int8 search)" for name in float_nodes)],
    }


# Nodes whose weights the quantizer stores as integers: the layers a search may send back to float32.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """The quantized layers of a Q/DQ model (a weighted op fed by a DequantizeLinear of an integer initializer), in
    graph order: what :func:`keep_float` can send back to float32."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    dequantized = {node.output[0] for node in model.graph.node
                   if node.op_type == "DequantizeLinear" and node.input[0] in initializers}
    return [node.name for node in model.graph.node
            if node.op_type in WEIGHTED_OPS and any(name in dequantized for name in node.input)]


def keep_float(quantized: onnx.ModelProto, prepared: onnx.ModelProto, names: tuple[str, ...] | list[str],
               ) -> onnx.ModelProto:
    """A copy of the Q/DQ model ``quantized`` in which the layers ``names`` compute in float32.

    A layer is a weighted node and the single-input ops that feed it back to the previous weighted node (ReLU,
    Clip, MaxPool, Reshape, ...: each re-quantizes its output, so a float convolution behind a quantized MaxPool
    would still read rounded values). In each of these nodes an input that came through QuantizeLinear ->
    DequantizeLinear reads the float tensor before that pair instead (other consumers of the tensor keep their
    quantized copy), and an integer weight or bias is replaced by its float32 original from ``prepared``, the model
    the quantizer was given (same node names). The layer's output is untouched: a quantized consumer still
    quantizes it. Unused Q/DQ nodes and integer initializers are removed. ONNX Runtime then runs those nodes with
    its float kernels, and the twin (runtime/twin.py) emulates exactly that graph.

    ``quantize_static(nodes_to_exclude=...)`` does not do this: it leaves an excluded node's input activations
    quantized whenever their producer is quantized, so the rounding this is meant to remove stays.
    """
    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    by_name = {node.name: node for node in graph.node}
    missing = sorted(set(names) - set(by_name))
    if missing:
        raise ExportError(f"no node named {', '.join(missing)} in the quantized model")
    initializers = {tensor.name for tensor in graph.initializer}
    originals = {node.name: node for node in prepared.graph.node}
    prepared_initializers = {tensor.name: tensor for tensor in prepared.graph.initializer}

    def unquantized(name: str) -> str | None:
        """The float tensor behind a QuantizeLinear -> DequantizeLinear pair, or None."""
        dequantize = producers.get(name)
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            return None
        source = producers.get(dequantize.input[0])
        return source.input[0] if source is not None and source.op_type == "QuantizeLinear" else None

    def layer(node: onnx.NodeProto) -> list[onnx.NodeProto]:
        nodes, frontier = [node], [node]
        while frontier:
            for name in frontier.pop().input:
                upstream = producers.get(unquantized(name) or "")
                if (upstream is not None and upstream.op_type not in (*WEIGHTED_OPS, "QuantizeLinear",
                                                                       "DequantizeLinear")
                        and len(upstream.input) == 1 and upstream not in nodes):
                    nodes.append(upstream)
                    frontier.append(upstream)
        return nodes

    for node in [member for name in names for member in layer(by_name[name])]:
        original = originals.get(node.name)
        for i, name in enumerate(node.input):
            source = unquantized(name)
            if source is not None:  # an activation: the float tensor before its rounding
                node.input[i] = source
                continue
            dequantize = producers.get(name)
            if dequantize is None or dequantize.op_type != "DequantizeLinear":
                continue
            if dequantize.input[0] not in initializers:
                continue
            # An integer weight or bias: its float original, from the same node before quantization.
            float_name = original.input[i] if original is not None and len(original.input) == len(node.input) else ""
            if float_name not in prepared_initializers:
                raise ExportError(f"cannot keep {node.name} in float32: the model before quantization has no float "
                                  f"constant for its input {i}")
            restored = f"{float_name}_fp32"  # the quantizer may name its DequantizeLinear output float_name
            if restored not in initializers:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(prepared_initializers[float_name])
                tensor.name = restored
                graph.initializer.append(tensor)
                initializers.add(restored)
            node.input[i] = restored
    _remove_unused(graph)
    return model


def _remove_unused(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing reads (repeatedly: a Q feeding only a dropped DQ goes too), then the
    initializers nothing reads."""
    outputs = {value.name for value in graph.output}
    while True:
        read = {name for node in graph.node for name in node.input} | outputs
        unused = [node for node in graph.node if not any(output in read for output in node.output)]
        if not unused:
            break
        for node in unused:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input}
    for tensor in [tensor for tensor in graph.initializer if tensor.name not in read]:
        graph.initializer.remove(tensor)


def _entropy_ranges(model_path: Path, reader: Any, symmetric: bool, workdir: Path) -> dict[str, list[dict]]:
    """Activation ranges by KL-divergence (entropy) calibration, as quantize_static TensorQuantOverrides."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(
        model_path, None, augmented_model_path=str(workdir / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy, extra_options={"num_bins": ENTROPY_BINS, "symmetric": symmetric},
    )
    calibrator.collect_data(reader)
    overrides = {}
    # name -> (hist, edges, min, max, threshold): the histogram over [-max|x|, max|x|], bin len // 2 starting at 0
    for name, (hist, edges, seen_min, seen_max, _) in calibrator.collector.get_histogram_dict().items():
        one_sided = float(seen_min) >= 0
        if one_sided:  # exact zeros (see ENTROPY_BINS): the zero bin counted like its neighbour
            hist = hist.copy()
            hist[len(hist) // 2] = hist[len(hist) // 2 + 1]
        # uint8 spends its 256 codes on [0, t] for a tensor that is never negative: 8 bits over half the histogram
        bins = 2 * ENTROPY_QUANTIZED_BINS if one_sided and not symmetric else ENTROPY_QUANTIZED_BINS
        threshold = calibrator.collector.get_entropy_threshold((hist, edges, seen_min, seen_max), bins)
        # The threshold t gives a range (-t, t); clamp it to what was observed, or a ReLU output (never below 0)
        # would spend half of its uint8 codes on negative values.
        low = max(float(threshold[0]), min(float(seen_min), 0.0))
        high = min(float(threshold[1]), max(float(seen_max), 0.0))
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
