"""int8 by target and calibration, before any search: how far each default int8 artifact of a checkpoint is from it.

    python benchmarks/int8_calibrations.py runs/cpu30-rslad/student.pt --dataset imagefolder \\
        --data-root data/cifar10 --threads 2 --n 1000 --robust-n 200 --json int8-calibrations.json

For each int8 recipe ``rslad-edge export`` offers without ``--search`` (ONNX ``--target cpu`` (U8S8) and ``--target
trt`` (S8S8) with each ``--calib-method``; with the mobile extra, the .pte with each of its calibrations), the
artifact is made by ``rslad_edge.export.export`` (the CLI's path) with ``--min-agreement 0`` (kept whatever its
parity, so it can be measured), then, on the same seeded test images (verify's sample: seed 0):

- agreement: top-1 agreement with the checkpoint on ``--n`` images, with its 95% Wilson interval, and the median
  |logit difference|;
- robust accuracy: ``rslad-edge verify ARTIFACT --reference CHECKPOINT`` on the first ``--robust-n`` of them:
  PGD_SAT and CW through the artifact's differentiable twin (a .pte's: the ``.twin.onnx`` export writes beside it),
  PGD transferred from the checkpoint, and Square (``--square-queries``); the worst case per image over all of them
  and its drop against the checkpoint's worst case over the same attacks, with the paired 95% interval. The
  checkpoint's own rows are measured once and reused.

No timings: agreement and robustness only (latency: ``benchmarks/robust_int8.py``, ``rslad-edge bench``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rslad_edge.bench.env import cpu_model
from rslad_edge.console import setup_logging
from rslad_edge.data import load_sample, to_float
from rslad_edge.device import cpu_saturates_u8s8
from rslad_edge.export import ExportConfig, export
from rslad_edge.export.config import FORMAT_CALIB_METHODS
from rslad_edge.runtime import load_runner
from rslad_edge.runtime.executorch_runner import executorch_missing
from rslad_edge.stats import wilson_ci95
from rslad_edge.versions import package_versions

ATTACKS = ["pgd_sat", "cw", "transfer_pgd", "square"]


def recipes(with_pte: bool) -> list[tuple[str, dict[str, Any]]]:
    """(label, ExportConfig options) of every int8 recipe export offers without --search."""
    plans = [(f"ONNX --target {target}, {method}", dict(format="onnx", target=target, calib_method=method,
                                                        name=f"{target}-{method}"))
             for target in ("cpu", "trt") for method in FORMAT_CALIB_METHODS["onnx"]]
    if with_pte:
        plans += [(f".pte, {method}", dict(format="executorch", calib_method=method, name=f"pte-{method}"))
                  for method in FORMAT_CALIB_METHODS["executorch"]]
    return plans


def checkpoint_on_test_images(artifact: Path, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Verify's seeded test sample (``args.n`` images, ``args.seed``) at the exported ``artifact``'s input size, and
    the checkpoint's logits on it."""
    metadata = json.loads(Path(f"{artifact}.json").read_text())
    test = load_sample(args.dataset or metadata.get("trained_on"), args.data_root, "test", args.n, args.seed,
                       input_size=tuple(metadata["input_size"]))
    images = to_float(test.read()).numpy()
    return images, load_runner(args.checkpoint, arch=args.arch, threads=args.threads).predict(images)


def agreement(logits: np.ndarray, reference_logits: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement with the checkpoint (95% Wilson interval) and the median |logit difference|."""
    agreeing = int((logits.argmax(1) == reference_logits.argmax(1)).sum())
    return {"agreement": agreeing / len(logits), "agreement_ci95": wilson_ci95(agreeing, len(logits)),
            "median_abs_logit_diff": float(np.median(np.abs(logits - reference_logits)))}


def measure_robust(path: Path, args: argparse.Namespace, reference_rows: dict[str, Any]) -> dict[str, Any]:
    """verify against the checkpoint; ``reference_rows``: the checkpoint's own rows, measured once and reused."""
    from rslad_edge.verify import VerifyConfig, verify_artifact
    from rslad_edge.verify.report import WORST_CASE_ROW

    attacks = ATTACKS
    started = time.perf_counter()
    report = verify_artifact(VerifyConfig(
        artifact=path, reference=args.checkpoint, arch=args.arch, dataset=args.dataset, data_root=args.data_root,
        n=args.robust_n, attacks=attacks, square_queries=args.square_queries, threads=args.threads, device="cpu",
        seed=args.seed), reference_measured=reference_rows.get("checkpoint"))
    reference_rows.setdefault("checkpoint", report.reference)
    return {"attacks": attacks, "clean_acc": report.clean_acc, "robust_acc": report.robust_acc,
            "worst_case_acc": report.worst_case_acc, "worst_case_ci95": report.accuracy_ci95(WORST_CASE_ROW),
            "reference_worst_case_acc": report.reference.worst_case_acc,
            "drop_pp": report.drop_pp(WORST_CASE_ROW), "drop_ci95_pp": report.drop_ci95_pp(WORST_CASE_ROW),
            "warnings": list(report.warnings), "seconds": round(time.perf_counter() - started, 1)}


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n{args.checkpoint}: agreement on {args.n} seeded test images; worst case on the first {args.robust_n} "
          f"(PGD_SAT, CW through the twin, transfer PGD, Square {args.square_queries})")
    print("| recipe | agreement, 95% interval | median abs Δlogit | worst-case robust: artifact / checkpoint | "
          "drop, paired 95% |")
    print("|---|---|---|---|---|")
    for row in rows:
        low, high = row["agreement_ci95"]
        robust = row.get("robust")
        cells = ["", ""]
        if robust:
            cells = [f"{robust['worst_case_acc']:.1%} / {robust['reference_worst_case_acc']:.1%}",
                     f"{robust['drop_pp']:+.1f} ± {robust['drop_ci95_pp'] or 0:.1f} pp"]
        print(f"| {row['label']} | {row['agreement']:.1%} [{low:.1%}, {high:.1%}] | "
              f"{row['median_abs_logit_diff']:.3f} | {' | '.join(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--arch", default=None, help="architecture of a bare state dict (see `rslad-edge models`)")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=2, help="threads for every runtime (and torch)")
    parser.add_argument("--n", type=int, default=1000, help="test images for agreement")
    parser.add_argument("--robust-n", type=int, default=200, help="the first of them for verify (0: none)")
    parser.add_argument("--square-queries", type=int, default=1000)
    parser.add_argument("--only", default=None, help="comma-separated substrings: measure the recipes whose label "
                        "contains one (e.g. 'cpu,.pte')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/int8-calibrations"), help="where the exports go")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    setup_logging()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    versions = package_versions(("torch", "onnxruntime", "executorch"))
    weights = ("7-bit weights for --target cpu: this CPU is x86 without VNNI (export's default there)"
               if cpu_saturates_u8s8() else "8-bit weights")
    print(f"# {cpu_model()}, {args.threads} threads; {weights}; {versions}", flush=True)
    plans = recipes(with_pte=executorch_missing() is None)
    if args.only:
        wanted = args.only.split(",")
        plans = [(label, options) for label, options in plans if any(w in label for w in wanted)]
    rows: list[dict[str, Any]] = []
    images = reference_logits = None
    reference_rows: dict[str, Any] = {}
    for label, options in plans:
        result = export(ExportConfig(checkpoint=args.checkpoint, arch=args.arch, out=args.out, dataset=args.dataset,
                                     data_root=args.data_root, precision="int8", min_agreement=0.0, **options))
        if images is None:
            images, reference_logits = checkpoint_on_test_images(result.path, args)
        logits = load_runner(result.path, threads=args.threads).predict(images)
        row = {"label": label, "path": str(result.path), **agreement(logits, reference_logits)}
        if args.robust_n:
            row["robust"] = measure_robust(result.path, args, reference_rows)
        robust = row.get("robust")
        print(f"  {label}: agreement {row['agreement']:.1%}" + (
            f", worst case {robust['worst_case_acc']:.1%} vs {robust['reference_worst_case_acc']:.1%} "
            f"({robust['seconds']:.0f} s)" if robust else ""), flush=True)
        rows.append(row)
        if args.json:  # after every row: a long run stopped early keeps what it measured
            args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "cpu": cpu_model(), "threads":
                                             args.threads, "versions": versions, "n": args.n, "robust_n":
                                             args.robust_n, "square_queries": args.square_queries, "rows": rows},
                                            indent=2, default=str) + "\n")
    print_table(rows, args)


if __name__ == "__main__":
    main()
