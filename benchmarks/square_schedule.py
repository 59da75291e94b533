"""Which Square setting is strongest for the budget: p schedules measured at 150, 1,000 and 5,000 queries.

    python benchmarks/square_schedule.py --model student.int8.onnx --dataset imagefolder \
        --data-root /tmp/rslad-data/cifar10 --budgets 150,1000 --n 200 --seeds 0,1,2
    PYTHONPATH=/tmp/art-pkg python benchmarks/square_schedule.py ... --art   # also ART's SquareAttack, same session

Each setting is ``schedule:p_init``: ``paper:0.8`` is the paper's and AutoAttack's (the p schedule fixed for 10,000
queries), ``budget:P`` the same schedule compressed to the query budget, starting from squares of P of the image.
Every setting runs :func:`rslad_edge.attacks.square` (the official ``pyautoattack`` search) against the ONNX Runtime
session of ``--model`` on the images it classifies correctly; robust accuracy is over all ``--n`` images, judged by
the session. Lower is a stronger attack.

Cost is counted in image-forwards: every image the session evaluated for the attack (its queries and its initial
check; the final judging is not counted). ``--art`` adds ART's ``SquareAttack`` (``max_iter`` = the budget, p_init
0.8, its own schedule rescaled to ``max_iter``) on a ``BlackBoxClassifierNeuralNetwork`` over the same session,
counted the same way. ART is not a dependency: put its pure-python wheel (and ``six``) on ``PYTHONPATH``.

Prints one line per (budget, setting): robust accuracy per seed, mean image-forwards, seconds; and the CPU model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rslad_edge.attacks import square
from rslad_edge.bench.env import cpu_model
from rslad_edge.data import load_dataset, subset, to_float
from rslad_edge.runtime import load_runner


class CountingPredict:
    """The session's logits for torch tensors or numpy arrays, counting the images it evaluated."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.images = 0
        self.seconds = 0.0

    def __call__(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        array = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
        start = time.perf_counter()
        logits = self.runner.predict(np.ascontiguousarray(array, dtype=np.float32))
        self.seconds += time.perf_counter() - start
        self.images += len(array)
        return logits


def run_ours(runner: Any, x: torch.Tensor, y: torch.Tensor, budget: int, schedule: str, p_init: float, seed: int,
             eps: float) -> dict[str, Any]:
    counter = CountingPredict(runner)
    start = time.perf_counter()
    result = square(counter, x, y, eps=eps, n_queries=budget, p_init=p_init, seed=seed, schedule=schedule)
    seconds = time.perf_counter() - start
    robust = runner.predict(result.x_adv.numpy()).argmax(axis=1) == y.numpy()  # judged, not counted
    return {"robust": int(robust.sum()), "forwards": counter.images, "seconds": seconds,
            "runtime_seconds": counter.seconds}


def run_art(runner: Any, x: torch.Tensor, y: torch.Tensor, budget: int, seed: int, eps: float) -> dict[str, Any]:
    from art.attacks.evasion import SquareAttack
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    counter = CountingPredict(runner)
    classifier = BlackBoxClassifierNeuralNetwork(counter, input_shape=tuple(x.shape[1:]),
                                                 nb_classes=int(runner.num_classes), clip_values=(0.0, 1.0))
    attack = SquareAttack(classifier, norm=np.inf, max_iter=budget, eps=eps, p_init=0.8, nb_restarts=1,
                          batch_size=len(x), verbose=False)
    np.random.seed(seed)
    start = time.perf_counter()
    x_adv = attack.generate(x.numpy(), y=np.eye(int(runner.num_classes), dtype=np.float32)[y.numpy()])
    seconds = time.perf_counter() - start
    robust = runner.predict(np.ascontiguousarray(x_adv, dtype=np.float32)).argmax(axis=1) == y.numpy()
    return {"robust": int(robust.sum()), "forwards": counter.images, "seconds": seconds,
            "runtime_seconds": counter.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="an ONNX model (fp32 / fp16 / int8)")
    parser.add_argument("--dataset", default="imagefolder")
    parser.add_argument("--data-root", default="/tmp/rslad-data/cifar10")
    parser.add_argument("--n", type=int, default=200, help="seeded test images (all budgets unless --n-per-budget)")
    parser.add_argument("--n-per-budget", default="", help="e.g. 5000:64 for fewer images at a large budget")
    parser.add_argument("--budgets", default="150,1000,5000")
    parser.add_argument("--settings", default="paper:0.8,budget:0.8,budget:0.3,budget:0.1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--art", action="store_true", help="also ART's SquareAttack (ART on PYTHONPATH)")
    parser.add_argument("--art-seeds", default=None, help="seeds for ART (default: --seeds); it costs ~3x ours")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    runner = load_runner(args.model, "cpu", threads=args.threads, spinning=False)
    test = load_dataset(args.dataset, args.data_root, "test")
    sizes = dict(item.split(":") for item in args.n_per_budget.split(",") if item)
    print(f"# {cpu_model()}, {args.threads} threads; {args.model.name}; eps {args.eps:.5f}; lower robust accuracy = "
          "stronger attack; forwards = images evaluated by ONNX Runtime (mean over seeds)", flush=True)
    rows = []
    for budget in [int(b) for b in args.budgets.split(",")]:
        data = subset(test, int(sizes.get(str(budget), args.n)), seed=0)
        x_all, y_all = to_float(data.images), data.labels
        correct = torch.from_numpy(runner.predict(x_all.numpy()).argmax(axis=1)) == y_all
        x, y = x_all[correct], y_all[correct]
        settings = [tuple(s.split(":")) for s in args.settings.split(",")] + ([("art", "0.8")] if args.art else [])
        for schedule, p_init in settings:
            runs = []
            seeds = args.art_seeds if schedule == "art" and args.art_seeds else args.seeds
            for seed in [int(s) for s in seeds.split(",")]:
                if schedule == "art":
                    runs.append(run_art(runner, x, y, budget, seed, args.eps))
                else:
                    runs.append(run_ours(runner, x, y, budget, schedule, float(p_init), seed, args.eps))
            accuracies = [run["robust"] / len(y_all) for run in runs]
            row = {"budget": budget, "setting": f"{schedule}:{p_init}", "n": len(y_all), "attacked": len(y),
                   "robust_acc": accuracies, "mean_robust_acc": float(np.mean(accuracies)),
                   "mean_forwards": float(np.mean([run["forwards"] for run in runs])),
                   "mean_seconds": float(np.mean([run["seconds"] for run in runs])),
                   "runtime_share": float(np.sum([r["runtime_seconds"] for r in runs]) /
                                          np.sum([r["seconds"] for r in runs]))}
            rows.append(row)
            print(f"{budget:>5} queries, {row['setting']:<12} n={len(y_all)}: robust "
                  f"{' / '.join(f'{100 * a:.1f}' for a in accuracies)} % (mean {100 * row['mean_robust_acc']:.1f}), "
                  f"{row['mean_forwards']:,.0f} forwards, {row['mean_seconds']:.1f} s "
                  f"({row['runtime_share']:.0%} inside the runtime)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_model(), "model": str(args.model), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
