"""Process-group set-up and data parallelism, applied from outside the model.

The same training loop runs as one process (CPU or one GPU) and under ``torchrun`` (DDP over
several GPUs or processes): ``torchrun --nproc_per_node=8 -m unmask train ...``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: str) -> tuple[World, torch.device]:
    """Join the torchrun process group if WORLD_SIZE > 1; pick this process's device.

    ``device``: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N".
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return World(rank, world_size, local_rank), dev


def parallelize(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """Wrap for data parallelism when there is more than one process; otherwise return the model."""
    if world.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def local_rows(world: World, batch_size: int) -> slice:
    """This rank's rows of a global batch of ``world_size * batch_size`` rows."""
    return slice(world.rank * batch_size, (world.rank + 1) * batch_size)


def all_reduce_mean(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.AVG)
    return value


def barrier(world: World) -> None:
    if world.world_size > 1:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
