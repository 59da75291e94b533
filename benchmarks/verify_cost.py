"""What verify's attacks on an exported artifact cost: white-box on its twin vs on the checkpoint, Square vs a bare
``session.run`` loop.

    python benchmarks/verify_cost.py --checkpoint resnet18-fastat.pt --arch resnet18 \
        --artifacts teacher.int8.onnx,teacher.int8-trt.onnx --n 100 --square-queries 300

1. White-box: PGD-20 (``pgd_sat``) crafted on the same ``--n`` test images, once on the checkpoint (PyTorch) and once
   on each artifact's differentiable twin; seconds per image, and the twin / checkpoint ratio (the aim:
   about what white-box costs on the checkpoint).
2. Square: the attack on each artifact through verify's Runner (``spinning=False``, as verify opens it), every
   ``session.run`` call recorded (batch size, seconds); then a bare loop of ``session.run`` on a default session over
   the very same sequence of batch sizes. Image-forwards per second of both (the aim: the attack
   within 10 % of the bare loop). Also the share of the attack's wall time spent inside ``session.run``.

Prints the CPU model, threads and versions first. Heavy: run it alone, on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from rslad_edge.attacks import get_attack, run_white_box, square
from rslad_edge.bench.env import cpu_model
from rslad_edge.data import load_dataset, subset, to_float
from rslad_edge.models import load_checkpoint
from rslad_edge.runtime import load_runner, onnx_twin


class RecordedSession:
    """An ONNX Runtime session whose ``run`` calls are timed, with the batch size of each."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.batches: list[int] = []
        self.seconds = 0.0

    def run(self, outputs: Any, feeds: dict[str, np.ndarray], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.session.run(outputs, feeds, *args)
        finally:
            self.seconds += time.perf_counter() - start
            self.batches.append(len(next(iter(feeds.values()))))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


def time_pgd(model_fn: Any, x: torch.Tensor, y: torch.Tensor, eps: float, batch_size: int) -> float:
    """Seconds for pgd_sat on all of ``x``, in batches (one warm-up batch first, not timed)."""
    spec = get_attack("pgd_sat")
    generator = torch.Generator().manual_seed(0)
    run_white_box(spec, model_fn, x[:8], y[:8], eps=eps, generator=generator)
    start = time.perf_counter()
    for first in range(0, len(x), batch_size):
        part = slice(first, first + batch_size)
        run_white_box(spec, model_fn, x[part], y[part], eps=eps, generator=generator)
    return time.perf_counter() - start


def square_against_bare_loop(path: Path, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace
                             ) -> dict[str, Any]:
    runner = load_runner(path, "cpu", threads=args.threads, spinning=False)
    correct = torch.from_numpy(runner.predict(x.numpy()).argmax(axis=1)) == y
    recorded = RecordedSession(runner.session)
    runner.session = recorded
    start = time.perf_counter()
    result = square(lambda images: runner.predict(images.numpy()), x[correct], y[correct], eps=args.eps,
                    n_queries=args.square_queries, seed=0)
    attack_seconds = time.perf_counter() - start
    images = sum(recorded.batches)

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    bare = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    inputs = {size: np.random.default_rng(size).random((size, *x.shape[1:]), dtype=np.float32)
              for size in set(recorded.batches)}
    name = bare.get_inputs()[0].name
    for size in inputs:  # warm-up: one run per batch size
        bare.run(None, {name: inputs[size]})
    start = time.perf_counter()
    for size in recorded.batches:
        bare.run(None, {name: inputs[size]})
    bare_seconds = time.perf_counter() - start
    return {"artifact": path.name, "attacked": int(correct.sum()), "queries": int(result.queries.sum()),
            "session_runs": len(recorded.batches), "images": images, "attack_seconds": attack_seconds,
            "inside_session_run_seconds": recorded.seconds, "bare_seconds": bare_seconds,
            "attack_forwards_per_s": images / attack_seconds, "bare_forwards_per_s": images / bare_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--arch", default=None)
    parser.add_argument("--artifacts", required=True, help="comma-separated ONNX files exported from --checkpoint")
    parser.add_argument("--dataset", default="imagefolder")
    parser.add_argument("--data-root", default="/tmp/rslad-data/cifar10")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--square-queries", type=int, default=300)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", default="", help="white-box or square: leave that part out")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    test = subset(load_dataset(args.dataset, args.data_root, "test"), args.n, seed=0)
    x, y = to_float(test.images), test.labels
    artifacts = [Path(p) for p in args.artifacts.split(",")]
    print(f"# {cpu_model()}, {args.threads} threads, torch {torch.__version__}, onnxruntime {ort.__version__}; "
          f"{args.n} {args.dataset} test images", flush=True)
    rows: dict[str, Any] = {"white_box": [], "square": []}
    if "white-box" not in args.skip:
        model, _ = load_checkpoint(args.checkpoint, arch=args.arch)
        checkpoint_seconds = time_pgd(model.eval(), x, y, args.eps, args.batch_size)
        print(f"pgd_sat on the checkpoint {args.checkpoint.name}: {checkpoint_seconds:.1f} s = "
              f"{1000 * checkpoint_seconds / len(x):.0f} ms per image", flush=True)
        for path in artifacts:
            twin_seconds = time_pgd(onnx_twin(path), x, y, args.eps, args.batch_size)
            rows["white_box"].append({"artifact": path.name, "twin_seconds": twin_seconds,
                                      "checkpoint_seconds": checkpoint_seconds})
            print(f"pgd_sat on the twin of {path.name}: {twin_seconds:.1f} s = {1000 * twin_seconds / len(x):.0f} ms "
                  f"per image, {twin_seconds / checkpoint_seconds:.2f}x the checkpoint", flush=True)
    if "square" not in args.skip:
        for path in artifacts:
            row = square_against_bare_loop(path, x, y, args)
            rows["square"].append(row)
            ratio = row["attack_forwards_per_s"] / row["bare_forwards_per_s"]
            print(f"square ({args.square_queries} queries) on {path.name}: {row['images']:,} image-forwards in "
                  f"{row['session_runs']} session.run calls; attack {row['attack_forwards_per_s']:,.0f} forwards/s, "
                  f"bare session.run loop over the same batches {row['bare_forwards_per_s']:,.0f} forwards/s "
                  f"({ratio:.0%}); {row['inside_session_run_seconds'] / row['attack_seconds']:.0%} of the attack's "
                  "time inside session.run", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "threads": args.threads, **rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
