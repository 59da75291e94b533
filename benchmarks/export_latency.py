"""CPU latency of each export artifact: PyTorch eager fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8 (U8S8).

    python benchmarks/export_latency.py                       # MobileNetV2 + ResNet-18, batch 1 and 64, 2 threads
    python benchmarks/export_latency.py --checkpoint runs/x/student.pt --threads 4 --json bench.json
    python benchmarks/export_latency.py --models smallcnn --batches 1,4 --iters 3 --warmup 1   # a smoke check

Figures are only meaningful on a quiet machine: nothing else running, the same --threads for every backend (set
explicitly for torch and for ONNX Runtime, intra-op; inter-op 1). Each figure is the median of --iters timed calls
after --warmup untimed ones; a call is exactly ``model(x)`` under ``torch.inference_mode`` or ``session.run``
(no input checks, no copies). Latency depends on the weights only through int8 calibration ranges, so random
initialisation is fine for timing (``--checkpoint`` times a real model). int8 is calibrated on --calib-n images of
--dataset (default: the synthetic shapes, offline); accuracy is not measured here (the export parity check does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from rslad_edge.bench.env import cpu_model
from rslad_edge.export.onnx_export import torch_to_onnx
from rslad_edge.export.precision import quantize_int8
from rslad_edge.models import create_model, load_checkpoint
from rslad_edge.runtime import OnnxRunner


def median_ms(call: Callable[[], object], warmup: int, iters: int) -> float:
    """Median wall time of ``call`` in ms, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def calibration_images(dataset: str, data_root: str | None, n: int) -> np.ndarray:
    from rslad_edge.data import load_dataset, subset, to_float

    return to_float(subset(load_dataset(dataset, data_root, "train"), n, seed=0).images).numpy()


def bench_model(name: str, model: torch.nn.Module, args: argparse.Namespace, calib: np.ndarray) -> list[dict]:
    """Time the three artifacts of one model at every batch size; returns one row per (batch, backend)."""
    model = model.eval()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        fp32_path, int8_path = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        onnx.save(torch_to_onnx(model, (3, 32, 32), opset=18, batch=None, arch=name), fp32_path)
        quantize_int8(fp32_path, int8_path, calib, target="cpu", method="minmax", static_batch=None,
                      workdir=Path(folder))
        sessions = {
            "onnxruntime fp32": OnnxRunner(fp32_path, threads=args.threads).session,
            "onnxruntime int8 (U8S8)": OnnxRunner(int8_path, threads=args.threads).session,
        }
        for batch in args.batches:
            x = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)
            x_torch = torch.from_numpy(x)
            with torch.inference_mode():
                eager = median_ms(lambda x_torch=x_torch: model(x_torch), args.warmup, args.iters)
            timings = {"torch eager fp32": eager}
            for label, session in sessions.items():
                feed = {"input": x}
                timings[label] = median_ms(lambda s=session, f=feed: s.run(["logits"], f), args.warmup, args.iters)
            for label, ms in timings.items():
                rows.append({"model": name, "batch": batch, "backend": label, "median_ms": ms,
                             "images_per_s": batch / ms * 1e3,
                             "speedup_vs_torch": timings["torch eager fp32"] / ms,
                             "speedup_vs_ort_fp32": timings["onnxruntime fp32"] / ms})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mobilenetv2,resnet18", help="architectures, randomly initialised")
    parser.add_argument("--checkpoint", help="time this checkpoint instead of --models")
    parser.add_argument("--arch", help="architecture of a bare state dict --checkpoint")
    parser.add_argument("--batches", default="1,64", help="batch sizes, comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and ONNX Runtime")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls first")
    parser.add_argument("--iters", type=int, default=50, help="timed calls; the median is reported")
    parser.add_argument("--calib-n", type=int, default=256, help="int8 calibration images")
    parser.add_argument("--dataset", default="shapes", help="calibration data (train split)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    if args.checkpoint:
        model, info = load_checkpoint(args.checkpoint, arch=args.arch)
        models = {f"{info['arch']} ({Path(args.checkpoint).name})": model}
    else:
        torch.manual_seed(0)
        models = {name: create_model(name) for name in args.models.split(",")}
    calib = calibration_images(args.dataset, args.data_root, args.calib_n)

    print(f"# {cpu_model()}, {args.threads} threads, torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}; median of {args.iters} after {args.warmup} warm-up")
    width = max(28, *(len(name) for name in models))
    print(f"{'model':<{width}} {'batch':>5}  {'backend':<24} {'median ms':>10} {'images/s':>10} "
          f"{'x torch':>8} {'x ORT fp32':>10}")
    rows = []
    for name, model in models.items():
        for row in bench_model(name, model, args, calib):
            rows.append(row)
            print(f"{row['model']:<{width}} {row['batch']:>5}  {row['backend']:<24} {row['median_ms']:>10.2f} "
                  f"{row['images_per_s']:>10.0f} {row['speedup_vs_torch']:>8.2f} {row['speedup_vs_ort_fp32']:>10.2f}",
                  flush=True)
    if args.json:
        meta = {"cpu": cpu_model(), "threads": args.threads, "iters": args.iters, "warmup": args.warmup,
                "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
