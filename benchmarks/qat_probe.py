"""Quantization-aware training on the exported int8 graph itself: how far it brings parity back.

    python benchmarks/qat_probe.py runs/mnv2/student.pt runs/mnv2/export/student.int8.onnx \\
        --dataset imagefolder --data-root data/cifar10 --lr 3e-3 --train-n 2048 --epochs 2 --alpha 0 --out /tmp/qat

The int8 ONNX (made by ``rslad-edge export --precision int8 --min-agreement 0``) becomes a trainable twin
(``OnnxTwin(trainable=True)``: its integer weights and biases as parameters on the graph's own grid, activation
ranges fixed from calibration). Each step fits it to the float checkpoint's soft labels with RSLAD's loss form,
``alpha * KL(float(x) || int8(x')) + (1 - alpha) * KL(float(x) || int8(x))``, x' crafted by PGD through the twin
(``--alpha 0``: clean images only, no attack, ~4x cheaper). SGD with momentum: Adam moves the int32 biases by many
grid steps at once. After each epoch the trained integers are written back (``twin.quantized_onnx``) and ONNX
Runtime's agreement with the checkpoint is measured on ``--test-n`` seeded test images, with its 95% interval.

This is a probe, not the shipped command: the train images are a seeded sample of the train split (the checkpoint
may have trained on them), and the test images both measure and (by the reader's choice of epoch) select.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F

from rslad_edge.attacks.pgd import pgd
from rslad_edge.data import load_sample, to_float
from rslad_edge.distill.losses import rslad_terms
from rslad_edge.models import load_checkpoint
from rslad_edge.runtime import OnnxTwin, load_runner
from rslad_edge.stats import wilson_ci95


def agreement(path: Path, x: torch.Tensor, reference: torch.Tensor, threads: int) -> str:
    predicted = torch.from_numpy(load_runner(path, "cpu", threads=threads).predict(x.numpy())).argmax(1)
    agree = int((predicted == reference).sum())
    low, high = wilson_ci95(agree, len(x))
    return f"agreement {100 * agree / len(x):.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("int8_onnx", type=Path)
    parser.add_argument("--dataset", default="imagefolder")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--train-n", type=int, default=2048)
    parser.add_argument("--test-n", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=5 / 6, help="weight of the adversarial term (0: clean only)")
    parser.add_argument("--attack-steps", type=int, default=3)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/qat-probe"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    student, _ = load_checkpoint(args.checkpoint)
    student.eval()
    model = onnx.load(str(args.int8_onnx))
    twin = OnnxTwin(model, trainable=True)
    train = to_float(load_sample(args.dataset, args.data_root, "train", args.train_n, 1).read())
    test = to_float(load_sample(args.dataset, args.data_root, "test", args.test_n, 0).read())
    with torch.no_grad():
        reference = torch.cat([student(batch) for batch in test.split(250)]).argmax(1)
    print(f"start: {agreement(args.int8_onnx, test, reference, args.threads)}", flush=True)

    optimizer = torch.optim.SGD(twin.parameters(), lr=args.lr, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(1, args.epochs + 1):
        started, total = time.perf_counter(), 0.0
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), args.batch_size):
            x = train[order[start:start + args.batch_size]]
            with torch.no_grad():
                soft = student(x)
            if args.alpha > 0:
                x_adv = pgd(twin, x, None, eps=args.eps, step_size=2.5 * args.eps / args.attack_steps,
                            steps=args.attack_steps, loss="kl", random_start="normal",
                            target_probs=F.softmax(soft, dim=1), clamp_start=False)
                loss = rslad_terms(twin(x_adv), twin(x), soft, alpha=args.alpha).total
            else:
                loss = rslad_terms(twin(x), twin(x), soft, alpha=0.0).total
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        path = args.out / f"qat.e{epoch}.onnx"
        onnx.save(twin.quantized_onnx(model), str(path))
        steps = math.ceil(len(train) / args.batch_size)
        print(f"epoch {epoch}: loss {total / steps:.4f}, {time.perf_counter() - started:.0f} s, "
              f"{agreement(path, test, reference, args.threads)}", flush=True)


if __name__ == "__main__":
    main()
