"""Time one RSLAD training step: a plain fp32 eager transcription of the authors' loop vs rslad-edge's step.

Same teacher, same batch, same student initialisation; batch 128, PGD-10 (the paper's setting). Prints the median
step time and images/s of each path and the ratio to the transcription. Run on a quiet machine:

    .venv/bin/python benchmarks/distill_step.py --threads 2 --repeats 3

Measured on the project's 2-core AVX-512 BF16 machine (2026-11-25, shared teacher):

    mobilenetv2  authors loop, fp32 eager       12.67 s/step    10.1 img/s
    mobilenetv2  rslad-edge fp32                10.92 s/step    11.7 img/s  x1.16
    mobilenetv2  rslad-edge bf16                 4.04 s/step    31.6 img/s  x3.13
    resnet18     authors loop, fp32 eager       18.96 s/step     6.8 img/s
    resnet18     rslad-edge fp32                17.96 s/step     7.1 img/s  x1.06
    resnet18     rslad-edge bf16                 9.00 s/step    14.2 img/s  x2.11
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rslad_edge.distill import ddp
from rslad_edge.distill.config import DistillConfig
from rslad_edge.distill.trainer import _build, train_step
from rslad_edge.models import create_model, load_checkpoint, save_checkpoint

SHARED_TEACHER = Path(__file__).resolve().parents[2] / "shared" / "models" / "resnet18-cifar10-fastat.pt"


def authors_step(student, teacher, optimizer, x, eps=8 / 255, step_size=2 / 255, steps=10):
    """The authors' RSLAD step, transcribed plainly (fp32, eager, elementwise-mean KL)."""
    kl_sum = torch.nn.KLDivLoss(reduction="sum")
    kl_elementwise = torch.nn.KLDivLoss(reduction="none")
    teacher_logits = teacher(x)
    student.eval()
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = kl_sum(F.log_softmax(student(x_adv), dim=1), F.softmax(teacher_logits, dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    student.train()
    optimizer.zero_grad()
    adv_logits = student(x_adv)
    nat_logits = student(x)
    target = F.softmax(teacher_logits.detach(), dim=1)
    loss = 5 / 6 * kl_elementwise(F.log_softmax(adv_logits, dim=1), target).mean() + 1 / 6 * kl_elementwise(
        F.log_softmax(nat_logits, dim=1), target
    ).mean()
    loss.backward()
    optimizer.step()
    return loss.item()


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (and compilation, for --compile)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", default="mobilenetv2,resnet18")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time rslad-edge with --compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        if SHARED_TEACHER.exists():
            teacher, _ = load_checkpoint(SHARED_TEACHER, arch="resnet18")
            teacher_path, teacher_name = SHARED_TEACHER, "shared robust ResNet-18"
        else:
            teacher = create_model("resnet18").eval()
            teacher_path = save_checkpoint(Path(tmp) / "t.pt", teacher, "resnet18", num_classes=10, input_size=(32, 32))
            teacher_name = "random ResNet-18"
        teacher.requires_grad_(False)
        print(f"teacher: {teacher_name}; batch {args.batch}; PGD-10; {args.threads} threads; median of {args.repeats}")
        x = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        y = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(1))

        variants = [("fp32", False), ("auto", False)] + ([("auto", True)] if args.compile else [])
        for name in args.students.split(","):
            torch.manual_seed(0)
            student = create_model(name)
            optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
            baseline = median_seconds(functools.partial(authors_step, student, teacher, optimizer, x), args.repeats)
            print(f"{name:12s} {'authors loop, fp32 eager':28s} {baseline:7.2f} s/step  "
                  f"{args.batch / baseline:6.1f} img/s")
            for precision, compiled in variants:
                cfg = DistillConfig(
                    out=tmp, student=name, teacher=str(teacher_path), teacher_arch="resnet18", dataset="shapes",
                    train_subset=args.batch, batch_size=args.batch, eval_n=1, precision=precision, device="cpu",
                    compile=compiled, preset="smoke",
                )
                run = _build(cfg, ddp.DistInfo())
                xs = x.contiguous(memory_format=torch.channels_last) if run.precision.channels_last else x
                generator = torch.Generator().manual_seed(0)
                seconds = median_seconds(functools.partial(train_step, run, xs, y, 1, generator), args.repeats)
                label = f"rslad-edge {run.precision.name}{' compiled' if compiled else ''}"
                print(f"{name:12s} {label:28s} {seconds:7.2f} s/step  {args.batch / seconds:6.1f} img/s  "
                      f"x{baseline / seconds:.2f}")


if __name__ == "__main__":
    main()
