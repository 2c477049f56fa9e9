"""Process-group set-up and data parallelism, applied from outside the model.

The same training loop runs as one process (CPU or one GPU) and under ``torchrun`` with DDP or
FSDP2 (``torch.distributed.fsdp.fully_shard`` on each block, then on the root, as torchtitan
does): ``torchrun --nproc_per_node=8 -m unmask train --parallel fsdp ...``. Nothing in the
objectives, evaluation or samplers depends on the wrapper: they call ``model(x, t=t)``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from unmask.errors import OptionError


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: str, parallel: str = "ddp") -> tuple[World, torch.device]:
    """Join the torchrun process group if WORLD_SIZE > 1; pick this process's device.

    ``device``: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N". With
    ``parallel="fsdp"`` one process also gets a (one-member) process group, so that FSDP, its
    sharded checkpoints and their resume on another number of processes take the same code path.
    Backend: nccl on CUDA, gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "LOCAL_RANK" in os.environ:  # started by a launcher (torchrun)
        end_with_launcher()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend)
    elif world_size == 1 and parallel == "fsdp" and not dist.is_initialized():
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return World(rank, world_size, local_rank), dev


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_launcher() -> None:
    """End this process when the process that started it (torchrun) dies, even by SIGKILL.

    Without it, killing torchrun leaves its ranks training on their own, unsupervised and still
    writing the run folder. Linux: the kernel sends SIGKILL on the parent's death (``prctl
    PR_SET_PDEATHSIG``); elsewhere a daemon thread watches for the parent to change.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    else:
        threading.Thread(target=_watch_parent, args=(os.getppid(),), name="unmask-launcher-watch", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every block's activations in the backward pass instead of keeping them.

    The block's ``forward`` is replaced on the instance, so parameter names (and checkpoints) do
    not change. Non-reentrant checkpointing, as FSDP2 needs.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        inner = block.forward
        block.forward = functools.partial(checkpoint, inner, use_reentrant=False)


def parallelize(
    model: nn.Module,
    world: World,
    device: torch.device,
    parallel: str = "ddp",
    param_dtype: torch.dtype | None = None,
    compile: bool = False,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Apply activation checkpointing, torch.compile and data parallelism, in that order.

    ``parallel="ddp"``: DistributedDataParallel when there is more than one process, else the
    model itself. ``"fsdp"``: FSDP2 ``fully_shard`` on each block, then on the root; with
    ``param_dtype`` (bf16 on a GPU) the blocks compute in it while the sharded master weights and
    the gradient reductions stay fp32. The model is modified in place and keeps its parameter
    names; the returned module is the one to call.
    """
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        for block in model.blocks:  # per block, as torchtitan: repeated structure compiles once
            block.compile()
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():
            raise OptionError("parallel", "{parallel} fsdp needs a process group; call unmask.distributed.init_world(device, 'fsdp') first")
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype is not None else MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    if world.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def grad_sync(net: nn.Module, enabled: bool):
    """Context for one micro-batch's backward: reduce gradients across processes only if ``enabled``
    (the last micro-batch of a step); earlier ones accumulate locally (DDP ``no_sync``, FSDP2
    ``set_requires_gradient_sync``)."""
    if enabled:
        if hasattr(net, "set_requires_gradient_sync"):
            net.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if hasattr(net, "no_sync"):
        return net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):
        net.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def full_value(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a (possibly distributed) tensor: DTensor -> its full value."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def local_rows(world: World, batch_size: int, micro: int = 0) -> slice:
    """This rank's rows of micro-batch ``micro`` of a global batch laid out as (micro, rank, row)."""
    start = (micro * world.world_size + world.rank) * batch_size
    return slice(start, start + batch_size)


def all_reduce_mean(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.AVG)
    return value


def barrier(world: World) -> None:
    if world.world_size > 1:
        dist.barrier()


def broadcast_object(obj, world: World):
    """``obj`` of rank 0 on every rank."""
    if world.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(world: World) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
