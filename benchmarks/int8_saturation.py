"""What an x86 CPU without VNNI does to an int8 graph: ONNX Runtime's fused kernels against the graph's own Q/DQ
semantics, with 8-bit and 7-bit weights.

    python benchmarks/int8_saturation.py runs/mnv2/student.pt --dataset imagefolder --data-root data/cifar10 \\
        --threads 2 --n 1000

On an x86 CPU without VNNI (AVX2; ``rslad_edge.device.cpu_saturates_u8s8``), ONNX Runtime's uint8 x int8 kernels
add pairs of products in 16 bits with saturation (``vpmaddubsw``); 8-bit weights overflow it (255 x 127 x 2 >
32767), 7-bit weights (``reduce_range``) do not. Each row is made by ``rslad_edge.export.export`` (the CLI's path,
``--min-agreement 0`` so it is kept whatever its parity): ``--target cpu`` with ``--no-reduce-range`` and with
``--reduce-range``, and ``--target trt`` (S8S8, TensorRT's scheme, always 8-bit). On the same seeded test images
(verify's sample), each is run twice by ONNX Runtime on this CPU: as it runs by default (graph optimizations on:
fused int8 kernels) and with optimizations off (dequantize, float operator, quantize: the graph's semantics, what
TensorRT computes); printed: each one's top-1 agreement with the checkpoint (95% interval) and the two runs'
agreement with each other and max |logit difference|. On a CPU with VNNI or on ARM the two runs agree.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from int8_calibrations import agreement, checkpoint_on_test_images  # this folder's: the same sample and measure

from rslad_edge.bench.env import cpu_model
from rslad_edge.console import setup_logging
from rslad_edge.device import cpu_saturates_u8s8
from rslad_edge.export import ExportConfig, export
from rslad_edge.runtime import OnnxRunner
from rslad_edge.versions import package_versions

ROWS = [("--target cpu, 8-bit weights (--no-reduce-range)", dict(target="cpu", reduce_range=False, name="cpu-8bit")),
        ("--target cpu, 7-bit weights (--reduce-range)", dict(target="cpu", reduce_range=True, name="cpu-7bit")),
        ("--target trt, 8-bit weights (S8S8)", dict(target="trt", name="trt"))]


def cell(figures: dict[str, Any]) -> str:
    low, high = figures["agreement_ci95"]
    return f"{figures['agreement']:.1%} [{low:.1%}, {high:.1%}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--arch", default=None, help="architecture of a bare state dict (see `rslad-edge models`)")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=1000, help="test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/int8-saturation"), help="where the exports go")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    setup_logging()
    torch.set_num_threads(args.threads)
    versions = package_versions(("torch", "onnxruntime"))
    saturates = cpu_saturates_u8s8()
    print(f"# {datetime.date.today()}, {cpu_model()} ({'x86 without VNNI' if saturates else 'VNNI or not x86'}), "
          f"{args.threads} threads; {versions}", flush=True)
    images = reference = None
    rows = []
    for label, options in ROWS:
        result = export(ExportConfig(checkpoint=args.checkpoint, arch=args.arch, out=args.out, dataset=args.dataset,
                                     data_root=args.data_root, precision="int8", min_agreement=0.0, **options))
        if images is None:
            images, reference = checkpoint_on_test_images(result.path, args)
        fused = OnnxRunner(result.path, threads=args.threads, reference=False).predict(images)
        exact = OnnxRunner(result.path, threads=args.threads, reference=True).predict(images)
        row = {"label": label, "fused": agreement(fused, reference), "qdq": agreement(exact, reference),
               "fused_vs_qdq": float((fused.argmax(1) == exact.argmax(1)).mean()),
               "max_abs_diff_fused_vs_qdq": float(np.abs(fused - exact).max())}
        rows.append(row)
        print(f"| {label} | {cell(row['fused'])} | {cell(row['qdq'])} | {row['fused_vs_qdq']:.1%}, "
              f"{row['max_abs_diff_fused_vs_qdq']:.3g} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "cpu": cpu_model(), "saturates":
                                         saturates, "threads": args.threads, "versions": versions, "n": args.n,
                                         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
