"""Robust int8 for one student: fp32 against the default int8, the searched int8 (``export --search``) and the QAT
int8 (``export --search --qat-epochs N``), on ONNX Runtime and ExecuTorch: size, latency, agreement with the
checkpoint and worst-case robust accuracy.

    python benchmarks/robust_int8.py runs/mnv2/student.pt --dataset imagefolder --data-root data/cifar10 \\
        --threads 2 --n 1000 --qat-epochs 4 --out /tmp/robust-int8 --json robust-int8.json

Every artifact is made by ``rslad_edge.export.export`` (the CLI's path): ONNX fp32, ONNX int8 with the default
recipe (``--min-agreement 0``: kept whatever its agreement, so it can be measured), ONNX int8 with ``--search``
(when no recipe passes, its closest candidate, ``*.failed-gate.onnx``, is measured and the row says so), with
``--qat-epochs N`` the search stopped right after its QAT candidate (the all-int8 recipes, then QAT of the best;
no layer in fp32), and with the mobile extra the same for the .pte: fp32, int8 with the default recipe, searched,
and QAT.
Then, with --threads for every runtime and on the same --n seeded test images:

- agreement: top-1 agreement with the checkpoint, with its 95% Wilson interval;
- robust accuracy: ``rslad-edge verify`` against the checkpoint: PGD_SAT and CW (white-box, through the artifact's
  twin; a .pte's is the ``.twin.onnx`` export writes beside it), transfer PGD from the checkpoint; the worst case
  per image, and its drop against the checkpoint's worst case with the paired 95% interval;
- latency: ``rslad-edge bench``'s loop, p50 at batch 1 and 64 over --seconds.

Figures are only meaningful on a quiet machine: run it alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rslad_edge.bench.core import bench
from rslad_edge.bench.env import cpu_model, probe_env
from rslad_edge.console import setup_logging
from rslad_edge.data import load_sample, to_float
from rslad_edge.export import ExportConfig, SearchFailedError, export
from rslad_edge.export.search import first_recipes
from rslad_edge.runtime import load_runner
from rslad_edge.runtime.executorch_runner import executorch_missing
from rslad_edge.stats import wilson_ci95
from rslad_edge.versions import package_versions

BATCHES = (1, 64)
ATTACKS = ["pgd_sat", "cw", "transfer_pgd"]


def make_artifacts(args: argparse.Namespace) -> list[dict[str, Any]]:
    common = dict(checkpoint=args.checkpoint, out=args.out, dataset=args.dataset, data_root=args.data_root,
                  parity_n=args.parity_n)
    plans: list[tuple[str, dict[str, Any]]] = [
        ("ONNX fp32", dict(precision="fp32")),
        ("ONNX int8, default recipe", dict(precision="int8", min_agreement=0.0, name="default")),
        ("ONNX int8, --search", dict(precision="int8", search=True, search_budget=args.search_budget,
                                     confirm_n=args.confirm_n, name="searched")),
    ]
    if args.qat_epochs:
        plans.append((f"ONNX int8, QAT {args.qat_epochs} epochs", dict(
            precision="int8", search=True, search_budget=len(first_recipes("cpu")) + 1, qat_epochs=args.qat_epochs,
            qat_alpha=args.qat_alpha, confirm_n=args.confirm_n, name="qat")))
    if executorch_missing() is None:
        plans += [(".pte fp32", dict(format="executorch", precision="fp32")),
                  (".pte int8, default recipe", dict(format="executorch", precision="int8", min_agreement=0.0)),
                  (".pte int8, --search", dict(format="executorch", precision="int8", search=True,
                                               search_budget=args.search_budget, confirm_n=args.confirm_n,
                                               name="searched"))]
        if args.qat_epochs:
            plans.append((f".pte int8, QAT {args.qat_epochs} epochs", dict(
                format="executorch", precision="int8", search=True,
                search_budget=len(first_recipes("executorch")) + 1, qat_epochs=args.qat_epochs,
                qat_alpha=args.qat_alpha, confirm_n=args.confirm_n, name="qat")))
    made = []
    for label, options in plans:
        started = time.perf_counter()
        item: dict[str, Any] = {"label": label}
        try:
            result = export(ExportConfig(**{**common, **options}))
            item.update(path=result.path, parity=result.parity.to_dict(),
                        search=(result.metadata.get("quantization") or {}).get("search"))
        except SearchFailedError as failed:
            search = failed.result if isinstance(failed.result, dict) else failed.result.to_json()
            item.update(path=failed.kept, parity=None, search=search, label=f"{label} (failed gate)")
        item["export_s"] = time.perf_counter() - started
        item["size_mb"] = item["path"].stat().st_size / 1e6
        print(f"  {item['label']}: {item['path'].name} in {item['export_s']:.0f} s", flush=True)
        made.append(item)
    return made


def measure(item: dict[str, Any], reference: np.ndarray, images: np.ndarray, args: argparse.Namespace,
            env: Any) -> None:
    from rslad_edge.verify import VerifyConfig, verify_artifact
    from rslad_edge.verify.report import WORST_CASE_ROW

    runner = load_runner(item["path"], threads=args.threads)
    agreeing = int((runner.predict(images).argmax(1) == reference).sum())
    item["agreement"] = agreeing / len(reference)
    item["agreement_ci95"] = wilson_ci95(agreeing, len(reference))
    report = bench(runner, batches=list(BATCHES), seconds=args.seconds, threads=args.threads, env=env)
    item["p50_ms"] = {row.batch: row.p50_ms for row in report.results}
    del runner
    started = time.perf_counter()
    verified = verify_artifact(VerifyConfig(
        artifact=item["path"], reference=args.checkpoint, dataset=args.dataset, data_root=args.data_root, n=args.n,
        attacks=ATTACKS, threads=args.threads, device="cpu", seed=args.seed))
    item["verify"] = {"clean_acc": verified.clean_acc, "worst_case_acc": verified.worst_case_acc,
                      "worst_case_ci95": verified.accuracy_ci95(WORST_CASE_ROW),
                      "reference_worst_case_acc": verified.reference.worst_case_acc if verified.reference else None,
                      "robust_acc": verified.robust_acc, "drop_pp": verified.drop_pp(WORST_CASE_ROW),
                      "drop_ci95_pp": verified.drop_ci95_pp(WORST_CASE_ROW), "warnings": list(verified.warnings),
                      "seconds": time.perf_counter() - started}
    print(f"  {item['label']}: agreement {item['agreement']:.1%}, worst case {verified.worst_case_acc:.1%} "
          f"(drop {item['verify']['drop_pp']:+.1f} pp), {item['verify']['seconds']:.0f} s", flush=True)


def print_table(made: list[dict[str, Any]], n: int) -> None:
    print(f"\n| artifact | MB | p50 ms b=1 | p50 ms b=64 | agreement with .pt ({n} test images) | worst-case robust "
          "(drop vs .pt, paired 95%) |")
    print("|---|---|---|---|---|---|")
    for item in made:
        low, high = item["agreement_ci95"]
        verify = item["verify"]
        drop = verify["drop_pp"]
        drop_text = "" if drop is None else f" ({drop:+.1f} ± {verify['drop_ci95_pp'] or 0:.1f} pp)"
        print(f"| {item['label']} | {item['size_mb']:.2f} | {item['p50_ms'][1]:.2f} | {item['p50_ms'][64]:.1f} | "
              f"{item['agreement']:.1%} [{low:.1%}, {high:.1%}] | {verify['worst_case_acc']:.1%}{drop_text} |")
    checkpoint = next((i["verify"]["reference_worst_case_acc"] for i in made
                       if i["verify"]["reference_worst_case_acc"] is not None), None)
    if checkpoint is not None:
        print(f"\nstudent.pt worst case on the same images: {checkpoint:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=2, help="threads for every runtime (and torch)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per artifact and batch")
    parser.add_argument("--n", type=int, default=1000, help="test images for agreement and verify")
    parser.add_argument("--parity-n", type=int, default=256)
    parser.add_argument("--search-budget", type=int, default=12)
    parser.add_argument("--confirm-n", type=int, default=1000)
    parser.add_argument("--qat-epochs", type=int, default=0, help="add the QAT int8 row (0: none)")
    parser.add_argument("--qat-alpha", type=float, default=5 / 6, help="export --qat-alpha of that row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/robust-int8"), help="where the exports go")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    setup_logging()  # the search's progress: one line per candidate
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    versions = package_versions(("torch", "onnxruntime", "executorch"))
    print(f"# {cpu_model()}, {args.threads} threads; {versions}", flush=True)
    made = make_artifacts(args)
    metadata = json.loads(Path(f"{made[0]['path']}.json").read_text())
    dataset, data_root = metadata.get("trained_on") or args.dataset, args.data_root
    test = load_sample(args.dataset or dataset, data_root, "test", args.n, args.seed,
                       input_size=tuple(metadata["input_size"]))
    images = to_float(test.read()).numpy()
    reference = load_runner(args.checkpoint, threads=args.threads).predict(images).argmax(1)
    env = probe_env(with_gpu=False)
    for item in made:
        measure(item, reference, images, args, env)
    print_table(made, len(images))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "threads": args.threads, "versions": versions,
                                         "n": len(images), "artifacts": made}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
