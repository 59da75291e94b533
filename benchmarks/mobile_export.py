"""Phone formats on this CPU: ExecuTorch (.pte, XNNPACK) fp32 / int8 against ONNX Runtime fp32 / int8, per model.

    python benchmarks/mobile_export.py runs/mnv2/student.pt resnet18-fastat.pt --arch resnet18 \\
        --dataset imagefolder --data-root data/cifar10 --threads 2 --out /tmp/mobile-figures --json mobile.json

For each checkpoint it exports, through ``rslad_edge.export.export`` (the CLI's path, parity check included):
ONNX fp32, ONNX int8 (U8S8, ONNX Runtime's CPU fast path), and .pte fp32 / int8 (XNNPACK, PT2E) for batch 1 and
for batch 64 (a .pte is static in the batch). Then, with --threads for every runtime:

- latency: ``rslad_edge.bench.core.bench`` (what ``rslad-edge bench`` runs; p50 over --seconds after warm-up) at
  batch 1 and 64; a batch-1 .pte at batch 64 runs 64 calls (its row says so), the batch-64 .pte one call;
- the same p50 from a bare loop over ExecuTorch's runtime (``method.execute([x])`` on a preallocated tensor, no
  input checks, no copies), to show what the runner adds (it should stay within 15%);
- parity against PyTorch on --parity-n test images (max |logit diff|, top-1 agreement) and the file size (with
  --min-agreement 0 an int8 export below export's 97% bar is kept and its agreement reported, not refused);
- unless --skip-verify: ``rslad-edge verify`` of each batch-1 .pte against its checkpoint on --verify-n test images
  (transfer PGD-20 / CW crafted on the checkpoint, and Square with --square-queries queries), and the drop of the
  worst case.

Figures are only meaningful on a quiet machine: run it alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rslad_edge.bench.core import bench
from rslad_edge.bench.env import cpu_model, probe_env
from rslad_edge.export import ExportConfig, export
from rslad_edge.models.checkpoint import FORMAT, read_checkpoint
from rslad_edge.runtime import load_runner

BIG_BATCH = 64


def bare_executorch_p50_ms(path: Path, batch: int, threads: int, seconds: float) -> float:
    """p50 of ``method.execute([x])`` over ExecuTorch's runtime, nothing of rslad-edge in the loop."""
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    if portable_lib._threadpool_get_thread_count() != threads:  # only with no program loaded: see the runner
        portable_lib._unsafe_reset_threadpool(threads)
    method = Runtime.get().load_program(path).load_method("forward")
    x = torch.rand(batch, 3, 32, 32)
    for _ in range(10):
        method.execute([x])
    times: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(times) < 30:
        start = time.perf_counter()
        method.execute([x])
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def export_all(checkpoint: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every artifact of one checkpoint, with its parity; returns one dict per file."""
    bare = read_checkpoint(checkpoint).get("format") != FORMAT
    common = dict(checkpoint=checkpoint, out=args.out / checkpoint.stem, dataset=args.dataset,
                  data_root=args.data_root, arch=args.arch if bare else None, parity_n=args.parity_n,
                  min_agreement=args.min_agreement)
    plans = [("onnx", "fp32", None), ("onnx", "int8", None)]
    for batch in (1, BIG_BATCH):
        plans += [("executorch", "fp32", batch), ("executorch", "int8", batch)]
    made = []
    for export_format, precision, batch in plans:
        started = time.perf_counter()
        result = export(ExportConfig(format=export_format, precision=precision, batch=batch, **common))
        seconds = time.perf_counter() - started
        made.append({"path": result.path, "format": export_format, "precision": precision, "batch": batch,
                     "size_mb": result.path.stat().st_size / 1e6, "export_s": seconds,
                     "parity": result.parity.to_dict()})
        print(f"  exported {result.path.name} in {seconds:.0f} s: {result.parity.summary()}", flush=True)
    return made


def time_all(made: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """bench p50 (and the bare loop for .pte) at the batches each artifact is meant for."""
    env = probe_env(with_gpu=False)
    for item in made:
        batches = [1, BIG_BATCH] if item["batch"] in (None, 1) else [item["batch"]]
        runner = load_runner(item["path"], threads=args.threads)
        report = bench(runner, batches=batches, seconds=args.seconds, threads=args.threads, env=env)
        item["provider"] = runner.provider
        item["rows"] = {row.batch: {"p50_ms": row.p50_ms, "images_per_s": row.images_per_s,
                                    "iterations": row.iterations, "notes": row.notes} for row in report.results}
        del runner
        if item["format"] == "executorch":
            own = item["batch"]
            item["bare_p50_ms"] = bare_executorch_p50_ms(item["path"], own, args.threads, args.seconds)
            item["bench_over_bare"] = item["rows"][own]["p50_ms"] / item["bare_p50_ms"]


def verify_all(checkpoint: Path, made: list[dict[str, Any]], args: argparse.Namespace) -> None:
    from rslad_edge.verify import VerifyConfig, verify_artifact
    from rslad_edge.verify.report import WORST_CASE_ROW

    bare = read_checkpoint(checkpoint).get("format") != FORMAT
    for item in made:
        if item["format"] != "executorch" or item["batch"] != 1:
            continue
        started = time.perf_counter()
        report = verify_artifact(VerifyConfig(
            artifact=item["path"], reference=checkpoint, arch=args.arch if bare else None, dataset=args.dataset,
            data_root=args.data_root, n=args.verify_n, square_queries=args.square_queries, threads=args.threads,
            device="cpu", json_path=args.out / checkpoint.stem / f"verify-{item['path'].name}.json"))
        item["verify"] = {"clean_acc": report.clean_acc, "worst_case_acc": report.worst_case_acc,
                          "reference_worst_case_acc": report.reference.worst_case_acc if report.reference else None,
                          "robust_acc": report.robust_acc, "drop_pp": report.drop_pp(WORST_CASE_ROW),
                          "drop_ci95_pp": report.drop_ci95_pp(WORST_CASE_ROW),
                          "seconds": time.perf_counter() - started}
        print(f"  verified {item['path'].name}: worst case {report.worst_case_acc:.1%}, drop "
              f"{item['verify']['drop_pp']:+.1f} pp ({item['verify']['seconds']:.0f} s)", flush=True)


def print_table(name: str, made: list[dict[str, Any]]) -> None:
    print(f"\n{name}")
    print(f"{'artifact':<38} {'MB':>6} {'max|diff|':>9} {'agree':>7} {'b1 p50 ms':>10} {'b1 img/s':>9} "
          f"{'b64 p50 ms':>11} {'b64 img/s':>10} {'bench/bare':>10} {'drop pp':>8}")
    for item in made:
        rows = item.get("rows", {})
        b1, b64 = rows.get(1), rows.get(BIG_BATCH)
        verify = item.get("verify")

        def cell(row: dict[str, Any] | None, key: str, fmt: str) -> str:
            return format(row[key], fmt) if row else "-"

        print(f"{item['path'].name:<38} {item['size_mb']:>6.2f} {item['parity']['max_abs_diff']:>9.2e} "
              f"{item['parity']['agreement']:>7.2%} {cell(b1, 'p50_ms', '.2f'):>10} "
              f"{cell(b1, 'images_per_s', ',.0f'):>9} "
              f"{cell(b64, 'p50_ms', '.1f'):>11} {cell(b64, 'images_per_s', ',.0f'):>10} "
              f"{format(item['bench_over_bare'], '.3f') if 'bench_over_bare' in item else '-':>10} "
              f"{format(verify['drop_pp'], '+.1f') if verify else '-':>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--arch", help="architecture of the bare state dicts among the checkpoints")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=2, help="threads for every runtime (and torch)")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per artifact and batch")
    parser.add_argument("--parity-n", type=int, default=256)
    parser.add_argument("--min-agreement", type=float, default=None,
                        help="int8 parity bar (default: export's, 97%%); 0 measures agreement without gating")
    parser.add_argument("--verify-n", type=int, default=200)
    parser.add_argument("--square-queries", type=int, default=300)
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("/tmp/rslad-mobile-figures"), help="where the exports go")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from importlib.metadata import version

    print(f"# {cpu_model()}, {args.threads} threads; torch {torch.__version__}, onnxruntime "
          f"{version('onnxruntime')}, executorch {version('executorch')}; p50 over {args.seconds:g} s per row")
    results: dict[str, list[dict[str, Any]]] = {}
    for checkpoint in args.checkpoints:
        print(f"{checkpoint}:", flush=True)
        made = export_all(checkpoint, args)
        time_all(made, args)
        if not args.skip_verify:
            verify_all(checkpoint, made, args)
        results[str(checkpoint)] = made
        print_table(str(checkpoint), made)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "threads": args.threads, "results": results},
                                        indent=2, default=str) + "\n")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
