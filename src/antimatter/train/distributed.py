"""Processes and collectives: one code path for plain `python` (one process) and `torchrun`.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR/PORT or a c10d rendezvous); without them we
are a single process. Backend: NCCL on CUDA, gloo on CPU. How the model is spread over the processes (DDP or
FSDP2, `train.parallel`) is train/parallelize.py's part; the gradient sync of an accumulation is here.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from antimatter.device import pick_device


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_pref: str = "auto") -> Dist:
    """Join the process group if torchrun started us; otherwise a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world <= 1:
        return Dist(0, 0, 1, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return Dist(rank, local_rank, world, device, backend)


def shutdown(world: Dist) -> None:
    if world.enabled and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool):
    """Gradient all-reduce only on the last micro-batch of an accumulation: DDP's no_sync, FSDP2's
    set_requires_gradient_sync. Nothing to do for a single process."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
        yield
    elif hasattr(model, "no_sync") and not sync:  # DDP
        with model.no_sync():
            yield
    else:
        yield


def all_reduce_sum(tensor: torch.Tensor, world: Dist) -> torch.Tensor:
    if world.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, world: Dist):
    """Rank 0's python object on every rank (small things: the training state, a resume path)."""
    if not world.enabled:
        return obj
    box = [obj if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, world: Dist) -> list:
    """Every rank's object, on every rank (used for per-rank RNG states)."""
    if not world.enabled:
        return [obj]
    out: list = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


class StopFlag:
    """Agree across ranks whether to stop after this step (a signal arrived, or time is up somewhere).
    Uses a gloo group on the host, so the check needs no GPU sync even under NCCL."""

    def __init__(self, world: Dist):
        self.world = world
        self.group = None
        if world.enabled:
            self.group = dist.new_group(backend="gloo") if world.backend != "gloo" else dist.group.WORLD

    def any(self, local: bool) -> bool:
        if not self.world.enabled:
            return local
        flag = torch.tensor([1 if local else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
