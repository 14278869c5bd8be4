"""Running under torchrun: process group, ranks, and the few collectives training needs.

One process (no torchrun, or WORLD_SIZE=1) is the same code with `world_size == 1`, where every
function here does nothing. Under torchrun: NCCL on CUDA, gloo on CPU, plus a gloo group for
small host-side agreements (stop requests, errors) that must not touch the GPU stream.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ddpm_mnist.errors import UserError


@dataclass
class Dist:
    """This process's place: rank, world size, local rank (its GPU), and the host-side group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    host_group: Any = None

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, grids and checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> Dist:
    """Join torchrun's process group when WORLD_SIZE > 1 (backend from the device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if device_name.startswith("cuda:"):
        raise UserError("under torchrun each process takes the GPU of its LOCAL_RANK: use --device cuda, not cuda:N")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    host_group = dist.new_group(backend="gloo") if use_cuda else dist.group.WORLD
    return Dist(rank, world, local_rank, host_group)


def device_for(ddp: Dist, device: torch.device) -> torch.device:
    """Under torchrun on CUDA, this process's GPU."""
    if ddp.enabled and device.type == "cuda":
        return torch.device("cuda", ddp.local_rank)
    return device


def any_true(ddp: Dist, flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a host-side all-reduce)."""
    if not ddp.enabled:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=ddp.host_group)
    return bool(value.item())


def gather(ddp: Dist, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not ddp.enabled:
        return [obj]
    out: list[Any] = [None] * ddp.world_size
    dist.all_gather_object(out, obj, group=ddp.host_group)
    return out


def share_error(ddp: Dist, error: UserError | None) -> None:
    """Raise on every rank the error any rank met (say rank 0, refusing a run folder); else return."""
    messages = [m for m in gather(ddp, None if error is None else str(error)) if m is not None]
    if error is not None:
        raise error
    if messages:
        raise UserError(messages[0])


def parameters_digest(module: torch.nn.Module) -> str:
    """A hash of every parameter's bytes (to check that ranks hold the same weights)."""
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def close(ddp: Dist) -> None:
    """Leave the process group."""
    if ddp.enabled and dist.is_initialized():
        dist.destroy_process_group()
