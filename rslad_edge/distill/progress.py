"""Rich progress for a training run (CLI layer: `distill` and `pipeline` show it; the trainer only logs)."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rslad_edge.console import console


class RichObserver:
    """A progress bar per epoch (loss, img/s, ETA) and one compact line when an epoch ends."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  {task.fields[ips]:.0f} img/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
        )
        self.task = None
        self.epochs = 0

    def epoch_started(self, epoch: int, epochs: int, batches: int, done: int) -> None:
        self.epochs = epochs
        if self.task is None:
            self.progress.start()
        else:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"epoch {epoch}/{epochs}", total=batches, completed=done, loss=0.0, ips=0.0)

    def batch_done(self, loss: float, images_per_s: float) -> None:
        self.progress.update(self.task, advance=1, loss=loss, ips=images_per_s)

    def evaluating(self, n: int) -> None:
        self.progress.update(self.task, description=f"evaluating on {n} images (clean, PGD-20)")

    def epoch_done(self, m: dict[str, Any]) -> None:
        acc = (f"{m.get('eval_split') or ''} clean {m['clean_acc']:6.1%}  PGD {m['robust_acc']:6.1%}"
               if m["clean_acc"] is not None else "(not evaluated)")
        self.progress.console.print(
            f"epoch {m['epoch']:>3}/{self.epochs}  loss {m['train_loss']:.4f}  {acc}  lr {m['lr']:.4g}  "
            f"{m['images_per_s']:.0f} img/s  {m['seconds']:.0f} s", highlight=False,
        )

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()
