"""Data parallelism for the trainers over `torch.distributed`, inert in a single process.

Under ``torchrun --nproc-per-node N`` or ``accelerate launch --num_processes N`` (both set
``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR``), `init` joins the process group (gloo on CPU,
NCCL on GPUs); each rank plays its share of the queries, gradients are summed across
ranks before every optimizer step, and rank 0 logs and saves. Without those variables
every function is a no-op, so the same trainer code runs in one process.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def init() -> None:
    """Join the process group when launched with several processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("PXR_DIST_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend=backend)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Give every rank rank 0's weights."""
    if rank_and_world()[1] > 1:
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)


def average_gradients(model: torch.nn.Module) -> None:
    """Replace each gradient by its mean over ranks (callers scale losses for a sum)."""
    world = rank_and_world()[1]
    if world > 1:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= world


def all_reduce_sum(value: float) -> float:
    """The sum of `value` over ranks."""
    if rank_and_world()[1] == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def gather_objects(items: list[Any]) -> list[Any]:
    """Every rank's `items`, concatenated in rank order, on every rank."""
    world = rank_and_world()[1]
    if world == 1:
        return list(items)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, list(items))
    return [x for part in gathered for x in part]
