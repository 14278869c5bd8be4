"""The processes of a run: torchrun's process group, the agreements every rank must share, and stopping.

One process (no torchrun, or WORLD_SIZE=1) is the same code with `world_size == 1`, where every
collective here does nothing. Under torchrun: NCCL on CUDA, gloo on CPU, plus a gloo group for
small host-side agreements (stop requests, errors) that must not touch the GPU stream. A stop
request (Ctrl-C, SIGTERM) is one of those agreements: every rank stops at the same step.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ddpm_mnist.errors import UserError, note


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


Result = TypeVar("Result")


def on_main(ddp: Dist, work: Callable[[], Result]) -> Result | None:
    """Run `work` on rank 0 alone; a UserError it raises is raised on every rank. Returns its result on rank 0."""
    error, result = None, None
    if ddp.is_main:
        try:
            result = work()
        except UserError as exc:
            error = exc
    share_error(ddp, error)
    return result


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


def check_replicas(ddp: Dist, model: torch.nn.Module) -> None:
    """Under torchrun, check that every rank ended with the same weights (they must)."""
    if not ddp.enabled:
        return
    digests = gather(ddp, parameters_digest(model))
    if len(set(digests)) != 1:
        raise UserError(f"the {ddp.world_size} processes ended with different weights: a bug, please report")
    if ddp.is_main:
        print(f"checked: all {ddp.world_size} processes hold identical weights")


def check_resume_world_size(saved: int, ddp: Dist, batch_size: int, images: int, allowed: bool) -> None:
    """A run resumed on another number of processes is another run: refuse it unless `allowed`,
    and then say exactly what changes."""
    if saved == ddp.world_size:
        return
    before, after = batch_size * saved, batch_size * ddp.world_size
    epoch_before, epoch_after = images // saved // batch_size, images // ddp.world_size // batch_size
    change = (f"the effective batch would go from {before} to {after}, an epoch from {epoch_before} to "
              f"{epoch_after} steps, and the data shards and noise streams would be new")
    if not allowed:
        raise UserError(
            f"--resume: the run was trained by {saved} process(es) and this is {ddp.world_size}: {change}; "
            f"resume with {saved}, or pass --change-world-size to continue anyway"
        )
    if ddp.is_main:
        note(f"resuming a {saved}-process run on {ddp.world_size}: {change} (--change-world-size)")


def close(ddp: Dist) -> None:
    """Leave the process group, together: a rank that tears down gloo while a peer still uses its
    connections can abort ("terminate called without an active exception")."""
    if ddp.enabled and dist.is_initialized():
        try:  # bounded: a peer that failed alone never arrives
            dist.monitored_barrier(group=ddp.host_group, timeout=datetime.timedelta(seconds=30))
        except RuntimeError:
            pass
        dist.destroy_process_group()


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM asks the run to save and stop at the end of the current step;
    a second Ctrl-C stops at once. `agreed()` is true on every rank once any rank was asked."""

    def __init__(self, ddp: Dist) -> None:
        self.ddp = ddp
        self.requested = False
        self.terminated = False  # the request was SIGTERM (the CLI then exits with 143, not 130)
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.terminated = signum == signal.SIGTERM

    def agreed(self) -> bool:
        """Whether to stop after this step (a host-side all-reduce under torchrun)."""
        return any_true(self.ddp, self.requested)

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
