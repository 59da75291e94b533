"""Verify's cost on exported models: n=200 images, Square with 1000 queries (plus the transfer attacks), on the fp32
and int8 ONNX of MobileNetV2 on this CPU, and the share of it spent inside ONNX Runtime (the rest is overhead).

    python benchmarks/verify_speed.py                          # random-init MobileNetV2 on shapes images, 2 threads
    python benchmarks/verify_speed.py --checkpoint runs/mnv2/student.pt --dataset imagefolder \
        --data-root /tmp/rslad-data/cifar10                    # a trained model on CIFAR-10: the figure to quote
    python benchmarks/verify_speed.py --arch smallcnn --n 16 --square-queries 20 --threads 1   # a smoke check

What runs is ``verify(onnx_runner, x, y, attacks=--attacks, sources=[the PyTorch model])``: transfer examples crafted
on the PyTorch model and evaluated on the artifact, and Square against the artifact's own predictions. The reference
side (the same attacks on the PyTorch model) is left out unless ``--with-reference``: it costs the same again and is
not the artifact's cost.

Three clocks: the whole verify call; the time inside the runner's ``predict`` (verify's own count, which includes the
runner's input checks and batching); and the time inside ONNX Runtime's ``session.run`` (wrapped here). Square's
share inside the runtime is the figure to watch: what is left is the search's own tensor work plus copies.

Labels: with ``--checkpoint``, the dataset's. A random-init model is right on ~10% of the images, so its own clean
predictions are used as labels instead and all n images are attacked. Square stops on an image once it is fooled, so
the time depends on robustness: a random-init MobileNetV2 predicts nearly one class with a margin 8/255 cannot
overturn, so every image takes the whole budget (n x queries model evaluations): the upper bound of the time. A
trained robust student is fooled on part of the images early; ``--checkpoint`` gives its figure.

Measured once here (AMD EPYC, 2 cores; another one-thread job ran on the other core), a smoke-sized run:
``taskset -c 0 python benchmarks/verify_speed.py --n 50 --square-queries 200 --threads 1 --calib-n 64``:
random-init MobileNetV2, fp32 479 queries/s (verify 46.9 s, 99% of Square's time inside predict), int8 1,091
queries/s (verify 36.2 s, 97%). ``predict`` and ``session.run`` times agree within 0.2 s: the runner adds nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from rslad_edge.bench.env import cpu_model
from rslad_edge.data import load_dataset, subset, to_float
from rslad_edge.export.onnx_export import torch_to_onnx
from rslad_edge.export.precision import quantize_int8
from rslad_edge.models import create_model, load_checkpoint
from rslad_edge.runtime import OnnxRunner
from rslad_edge.verify import verify


class TimedSession:
    """An ONNX Runtime session whose ``run`` calls are timed; everything else passes through."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.seconds = 0.0
        self.calls = 0

    def run(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.session.run(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def time_artifact(path: Path, precision: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                  args: argparse.Namespace) -> dict[str, Any]:
    """One verify call on ``path``, with the three clocks."""
    runner = OnnxRunner(path, threads=args.threads, batch_size=args.batch_size)
    timed = TimedSession(runner.session)
    runner.session = timed
    reference = model if args.with_reference else None
    report = verify(runner, x, y, attacks=args.attacks, eps=args.eps, reference=reference, sources=[model],
                    square_queries=args.square_queries, batch_size=args.batch_size, seed=0)
    square = report.artifact.queries.get("square")
    row = {
        "precision": precision, "n": report.n, "clean_acc": report.clean_acc, "robust_acc": report.robust_acc,
        "verify_s": report.seconds, "attack_s": report.attack_seconds,
        "inside_predict_s": report.artifact.runtime_seconds, "inside_session_run_s": timed.seconds,
        "session_run_calls": timed.calls,
    }
    if square is not None:
        row.update(square_s=square.seconds, square_queries=square.total, square_images=square.attacked,
                   queries_per_s=square.per_second, square_inside_predict_share=square.runtime_seconds / square.seconds)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", help="architecture: randomly initialised without --checkpoint (default mobilenetv2), "
                        "else that of a bare-state-dict checkpoint")
    parser.add_argument("--checkpoint", help="time this checkpoint's exports instead (labels: the dataset's)")
    parser.add_argument("--n", type=int, default=200, help="test images")
    parser.add_argument("--square-queries", type=int, default=1000)
    parser.add_argument("--attacks", default="transfer_pgd,transfer_cw,square")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--batch-size", type=int, default=256, help="images per runtime call and crafting batch")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and ONNX Runtime")
    parser.add_argument("--with-reference", action="store_true", help="also run every attack on the PyTorch model")
    parser.add_argument("--precisions", default="fp32,int8")
    parser.add_argument("--calib-n", type=int, default=256, help="int8 calibration images (train split)")
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    if args.checkpoint:
        model, info = load_checkpoint(args.checkpoint, arch=args.arch)
        arch, name = info["arch"], f"{info['arch']} ({Path(args.checkpoint).name})"
    else:
        torch.manual_seed(0)
        arch = args.arch or "mobilenetv2"
        model, name = create_model(arch).eval(), f"{arch} (random init)"
    test = subset(load_dataset(args.dataset, args.data_root, "test"), args.n, seed=0)
    x, y = to_float(test.images), test.labels
    if not args.checkpoint:
        with torch.inference_mode():
            y = model(x).argmax(dim=1)  # see the module docstring
    calib = to_float(subset(load_dataset(args.dataset, args.data_root, "train"), args.calib_n, seed=0).images).numpy()

    print(f"# {cpu_model()}, {args.threads} threads, torch {torch.__version__}, onnxruntime "
          f"{__import__('onnxruntime').__version__}; {name}, {len(y)} {args.dataset} images, attacks {args.attacks}, "
          f"Square {args.square_queries} queries", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths = {"fp32": Path(folder) / "model.onnx", "int8": Path(folder) / "model.int8.onnx"}
        onnx.save(torch_to_onnx(model, (3, 32, 32), opset=18, batch=None, arch=arch), paths["fp32"])
        for precision in args.precisions.split(","):
            if precision == "int8":
                quantize_int8(paths["fp32"], paths["int8"], calib, target="cpu", method="minmax", static_batch=None,
                              workdir=Path(folder))
            row = time_artifact(paths[precision], precision, model, x, y, args)
            rows.append(row)
            attacks = ", ".join(f"{k} {v:.1f} s" for k, v in row["attack_s"].items())
            print(f"{precision}: verify {row['verify_s']:.1f} s ({attacks}); inside ONNX Runtime session.run "
                  f"{row['inside_session_run_s']:.1f} s = {row['inside_session_run_s'] / row['verify_s']:.0%} "
                  f"of verify, inside predict {row['inside_predict_s']:.1f} s", flush=True)
            if "square_s" in row:
                print(f"  square: {row['square_queries']:,} queries on {row['square_images']} images in "
                      f"{row['square_s']:.1f} s = {row['queries_per_s']:,.0f} queries/s, "
                      f"{row['square_inside_predict_share']:.0%} of it inside predict; robust "
                      f"{json.dumps({k: round(v, 3) for k, v in row['robust_acc'].items()})}", flush=True)
    if args.json:
        meta = {"cpu": cpu_model(), "threads": args.threads, "model": name, "dataset": args.dataset,
                "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
                "numpy": np.__version__}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
