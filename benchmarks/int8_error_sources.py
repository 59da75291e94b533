"""Where an int8 model's disagreement with its checkpoint comes from: activation rounding, weight rounding, or the
checkpoint's own near-ties.

    python benchmarks/int8_error_sources.py runs/mnv2/student.pt runs/mnv2/export/student.int8.onnx \\
        --dataset imagefolder --data-root data/cifar10 --n 1000 --threads 2

On --n seeded test images it prints top-1 agreement with the checkpoint (95% Wilson interval) of:

- the int8 ONNX in ONNX Runtime, and its differentiable twin (they should agree);
- the twin with ``round_activations=False``: int8 weights, each activation clipped to its quantized range but not
  rounded. The gap to the row above is what activation rounding costs; the gap to 100% is the weights' share;

and how near-tied the checkpoint's own predictions are: quantiles of its top-2 logit margin, the share of images
whose margin is below 0.02 / 0.05 / 0.1, and the median |logit difference| int8 makes. When many images are tied
within that difference, no int8 graph agrees on them except by chance.

Last, the noise floor of the int8 graph itself: the same graph run by ONNX Runtime with its graph optimizations off
(each QuantizeLinear / DequantizeLinear and float op as the ONNX spec writes it, no fused int8 kernels) agrees with
the fused run and with the twin on how many images, and by depth, on how many activations the twin and that
reference differ by a quantization step or more (--trace-n images). Exact implementations of one graph differ only
by float rounding order; a rounding that flips early in the graph can flip others downstream, and when the flips
grow with depth the graph's predictions on near-tied images depend on the implementation: no training of the graph
moves agreement with the checkpoint above the agreement between its implementations.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from rslad_edge.bench.env import cpu_model
from rslad_edge.data import load_sample, to_float
from rslad_edge.models import load_checkpoint
from rslad_edge.runtime import load_runner
from rslad_edge.runtime.twin import OnnxTwin
from rslad_edge.stats import wilson_ci95


def line(label: str, predictions: torch.Tensor, reference: torch.Tensor) -> str:
    agree = int((predictions == reference).sum())
    low, high = wilson_ci95(agree, len(reference))
    return f"  {label:<44} {100 * agree / len(reference):5.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("int8_onnx", type=Path)
    parser.add_argument("--dataset", default="imagefolder")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trace-n", type=int, default=100, help="images for the per-depth activation comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, info = load_checkpoint(args.checkpoint)
    model.eval()
    size = (info.get("input") or {}).get("size")
    test = load_sample(args.dataset, args.data_root, "test", args.n, args.seed,
                       input_size=tuple(size) if size else None)
    x = to_float(test.read())
    graph = onnx.load(str(args.int8_onnx))
    with torch.no_grad():
        logits = torch.cat([model(batch) for batch in x.split(250)])
        twin = torch.cat([OnnxTwin(graph)(batch) for batch in x.split(250)])
        unrounded = torch.cat([OnnxTwin(graph, round_activations=False)(batch) for batch in x.split(250)])
    runtime = torch.from_numpy(load_runner(args.int8_onnx, "cpu", threads=args.threads).predict(x.numpy()))
    reference = logits.argmax(1)
    print(f"# {cpu_model()}, {args.threads} threads; {args.int8_onnx.name} vs {args.checkpoint.name}, "
          f"{len(x)} test images (seed {args.seed})")
    print("agreement with the checkpoint:")
    print(line("int8 ONNX (ONNX Runtime)", runtime.argmax(1), reference))
    print(line("its twin", twin.argmax(1), reference))
    print(line("its twin, activations not rounded", unrounded.argmax(1), reference))
    top = logits.topk(2, dim=1).values
    margin = (top[:, 0] - top[:, 1]).numpy()
    levels = (0.05, 0.25, 0.5)
    quantiles = ", ".join(f"p{int(100 * q)} {v:.3f}" for q, v in zip(levels, np.quantile(margin, levels), strict=True))
    shares = ", ".join(f"< {d:g}: {100 * (margin < d).mean():.1f}%" for d in (0.02, 0.05, 0.1))
    print(f"checkpoint's top-2 logit margin: {quantiles}; images with a margin {shares}")
    print(f"median |logit difference| int8 vs checkpoint: {float((runtime - logits).abs().median()):.3f}")
    implementation_noise(args, graph, x, runtime, twin, reference)


def _session(model: onnx.ModelProto, threads: int) -> Any:
    """ONNX Runtime with graph optimizations off: the Q/DQ arithmetic as the spec writes it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def implementation_noise(args: argparse.Namespace, graph: onnx.ModelProto, x: torch.Tensor, runtime: torch.Tensor,
                         twin: torch.Tensor, reference: torch.Tensor) -> None:
    from onnx import numpy_helper

    session = _session(graph, args.threads)
    name = session.get_inputs()[0].name
    spec = torch.cat([torch.from_numpy(session.run(None, {name: batch.numpy()})[0]) for batch in x.split(250)])
    print("the same int8 graph, implemented three ways:")
    print(line("ONNX Runtime, optimizations off, vs the checkpoint", spec.argmax(1), reference))
    print(line("ONNX Runtime fused vs optimizations off", runtime.argmax(1), spec.argmax(1)))
    print(line("twin vs ONNX Runtime, optimizations off", twin.argmax(1), spec.argmax(1)))
    constants = {initializer.name: initializer for initializer in graph.graph.initializer}
    activations = [(node.output[0], float(numpy_helper.to_array(constants[node.input[1]])))
                   for node in graph.graph.node if node.op_type == "DequantizeLinear" and node.input[0] not in constants
                   and node.input[1] in constants and constants[node.input[1]].dims == []]
    traced = onnx.ModelProto()
    traced.CopyFrom(graph)
    for output, _ in activations:
        traced.graph.output.append(onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None))
    sample = x[:args.trace_n]
    tracing = _session(traced, args.threads)
    reference_values = dict(zip([o.name for o in tracing.get_outputs()],
                                tracing.run(None, {name: sample.numpy()}), strict=True))
    with torch.no_grad():
        twin_values = OnnxTwin(graph).trace(sample, [output for output, _ in activations])
    shares = [float((np.abs(twin_values[output].numpy() - reference_values[output]) >= 0.5 * scale).mean())
              for output, scale in activations]
    depths = sorted({0, len(shares) // 4, len(shares) // 2, 3 * len(shares) // 4, len(shares) - 1})
    print(f"activations differing by >= 1 step, twin vs optimizations off ({len(sample)} images), by depth of "
          f"{len(shares)} quantized tensors: " + ", ".join(f"#{d + 1} {100 * shares[d]:.3g}%" for d in depths))


if __name__ == "__main__":
    main()
