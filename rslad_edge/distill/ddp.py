"""Data parallelism under ``torchrun``: each rank takes its shard of every global batch; gradients are averaged.

Gradients are all-reduced by hand (one flat buffer per step) rather than through DistributedDataParallel: every
method runs several forwards per step (attack, adversarial and clean batch, teacher), and DDP's reducer expects
one forward per backward. Only rank 0 evaluates, logs and writes. NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this call created the process group, so its shutdown destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()


def init_from_env() -> DistInfo:
    """Join the process group torchrun describes in the environment; a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistInfo()
    owns_group = not torch_dist.is_initialized()
    if owns_group:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch_dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    info = DistInfo(torch_dist.get_rank(), torch_dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                    owns_group)
    if not info.is_main:
        logging.getLogger("rslad_edge").setLevel(logging.WARNING)  # only rank 0 talks
    return info


def shutdown(info: DistInfo) -> None:
    """Leave the process group if ``info`` created it; one joined from an enclosing run stays up for that run."""
    if info.owns_group and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


@contextlib.contextmanager
def process_group() -> Iterator[DistInfo]:
    """The process group for everything inside (several training runs share it), left when the block ends."""
    info = init_from_env()
    try:
        yield info
    finally:
        shutdown(info)


def all_reduce_gradients(model: nn.Module, info: DistInfo) -> None:
    """Average the gradients over ranks: the update of one process with the whole global batch."""
    if info.world_size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch_dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def broadcast_parameters(model: nn.Module, info: DistInfo) -> None:
    if info.world_size > 1:
        for tensor in list(model.parameters()) + list(model.buffers()):
            torch_dist.broadcast(tensor.data, src=0)


def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """BN running statistics drift apart per rank (each normalises its shard); use rank 0's everywhere."""
    if info.world_size > 1:
        for buffer in model.buffers():
            torch_dist.broadcast(buffer.data, src=0)


def sum_over_ranks(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The elementwise sum of ``values`` (same shape on every rank) over the ranks; ``values`` itself alone."""
    if info.world_size > 1:
        values = values.clone()
        torch_dist.all_reduce(values)
    return values
