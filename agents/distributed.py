"""Data parallelism and sharding for the trainers over `torch.distributed`, inert in a single process.

Under ``torchrun --nproc-per-node N`` or ``accelerate launch --num_processes N`` (both set
``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR``), `init` joins the process group (gloo on CPU,
NCCL on GPUs); each rank plays its share of the queries, gradients are summed across
ranks before every optimizer step, and rank 0 logs and saves. Without those variables
every function is a no-op, so the same trainer code runs in one process.

With `shard` (FSDP2, ``fully_shard``) each rank keeps a shard of the trained weights, of
their gradients and of the optimizer state; a block's full weights are gathered for its
forward and backward passes, and FSDP reduces the gradients itself. `unsharded`,
`full_state` and `load_full_state` are what rollouts and checkpoints need on top of that.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard


def init() -> None:
    """Join the process group when launched with several processes (on GPUs: one per process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("PXR_DIST_BACKEND") != "gloo" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)


def finish() -> None:
    """Leave the process group, after a last barrier: the communication threads are joined
    before the interpreter exits (a process that exits with them running can abort)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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
    """Replace each gradient by its mean over ranks (callers scale losses for a sum); nothing
    to do when `shard` sharded `model`, as FSDP averages its gradients in the backward pass."""
    world = rank_and_world()[1]
    if world > 1 and not is_sharded(model):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads:  # one all-reduce of all gradients flattened: per-call latency dominates small tensors
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= world
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))


def _reduction_device() -> torch.device:
    """Where a reduced scalar must live: NCCL reduces GPU tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(value: float) -> float:
    """The sum of `value` over ranks."""
    if rank_and_world()[1] == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_reduction_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def all_reduce_max(value: int) -> int:
    """The largest `value` over ranks."""
    if rank_and_world()[1] == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_reduction_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def barrier() -> None:
    """Wait for every rank (e.g. while rank 0 evaluates or saves)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def gather_objects(items: list[Any]) -> list[Any]:
    """Every rank's `items`, concatenated in rank order, on every rank."""
    world = rank_and_world()[1]
    if world == 1:
        return list(items)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, list(items))
    return [x for part in gathered for x in part]


# ---- sharding (FSDP2) ---------------------------------------------------------------------


def shard(module: nn.Module, model: nn.Module) -> None:
    """Shard `module` over the ranks with FSDP2: each transformer block of the transformers model
    `model` (the classes its ``_no_split_modules`` names: decoder layers, vision blocks), then
    `model`, then, when `module` wraps `model`, each other child of `module` (a value head).

    Those last ones are roots: each is called on its own, and FSDP gathers a unit's weights
    in the forward pass of the module holding them. Build the optimizer after this.
    """
    mesh = init_device_mesh(next(model.parameters()).device.type, (rank_and_world()[1],))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for block in [m for m in model.modules() if type(m).__name__ in blocks]:
        fully_shard(block, mesh=mesh)
    for root in [model] if module is model else list(module.children()):
        fully_shard(root, mesh=mesh)


def is_sharded(module: nn.Module) -> bool:
    """Whether `shard` sharded (part of) `module`."""
    return any(isinstance(m, FSDPModule) for m in module.modules())


@contextmanager
def unsharded(module: nn.Module) -> Iterator[None]:
    """Hold the full weights of a sharded `module` on every rank within the block (a no-op otherwise).

    Rollouts and scoring run a different number of forward passes on each rank, and
    FSDP's gathers in every forward pass must be joined by all ranks; gathered once here,
    the weights stay in place and forward passes communicate nothing. Enter it on every
    rank at once (the gather is a collective).
    """
    parts = [m for m in module.modules() if isinstance(m, FSDPModule)]
    inner = {sub for part in parts for sub in list(part.modules())[1:]}
    for part in parts:
        part.set_reshard_after_forward(False, recurse=False)
        part.unshard()
    try:
        yield
    finally:
        for part in parts:
            part.reshard()
            # FSDP's defaults: blocks free their weights after forward, roots keep them for backward
            part.set_reshard_after_forward(part in inner, recurse=False)


def _rekey(state: Mapping[str, Any], key: Sequence[Any] | Mapping[Any, Any]) -> dict[str, Any]:
    """An optimizer state dict with every parameter key ``k`` (an index or a name) replaced by ``key[k]``."""
    groups = [{**group, "params": [key[k] for k in group["params"]]} for group in state["param_groups"]]
    return {"state": {key[k]: v for k, v in state["state"].items()}, "param_groups": groups}


def _parameter_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names in `module` of `optimizer`'s parameters, in its order (the indices of its state dict)."""
    names = {p: name for name, p in module.named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def full_state(module: nn.Module, optimizer: torch.optim.Optimizer | None = None
               ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The state dicts of a sharded `module` and its `optimizer` with full tensors, on rank 0's CPU.

    A collective (call it on every rank); the other ranks get empty dicts. The
    optimizer's is keyed by parameter index, as `optimizer.state_dict()` is in one
    process, so a checkpoint written from it loads without FSDP. ``(None, None)`` when
    `module` is not sharded: its own state dicts are full.
    """
    if not is_sharded(module):
        return None, None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(module, options=options)
    if optimizer is None:
        return model_state, None
    optimizer_state = get_optimizer_state_dict(module, optimizer, options=options)
    if optimizer_state:
        optimizer_state = _rekey(optimizer_state, {n: i for i, n in enumerate(_parameter_names(module, optimizer))})
    return model_state, optimizer_state


def load_full_state(module: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: Mapping[str, Any],
                    optimizer_state: Mapping[str, Any] | None) -> None:
    """Load full state dicts (`full_state`'s, or a one-process run's) into a sharded `module` and
    its `optimizer`, every rank keeping its shards; call it on every rank with the same dicts."""
    set_model_state_dict(module, dict(model_state), options=StateDictOptions(full_state_dict=True))
    if optimizer is not None and optimizer_state is not None:
        # strict=False: parameters that never had a gradient have no saved state
        set_optimizer_state_dict(module, optimizer, _rekey(optimizer_state, _parameter_names(module, optimizer)),
                                 options=StateDictOptions(full_state_dict=True, strict=False))
