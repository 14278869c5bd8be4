"""A training run: its folder, its processes and its device around the loop (`loop.py`).

`run_training(cfg)` sets up torchrun's process group (when there is one) and the device, locks the run
folder and applies --resume / --overwrite, then runs the loop of Algorithm 1. Ctrl-C or SIGTERM
before the loop, or a second one within a step, stops at once with the last checkpoint kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ddpm_mnist.checkpoint import Checkpoint, load
from ddpm_mnist.device import setup_runtime
from ddpm_mnist.distributed import Dist, close, gather, init_distributed, on_main
from ddpm_mnist.errors import Stopped
from ddpm_mnist.loop import Hooks, run_steps
from ddpm_mnist.runfolder import RunFolder

if TYPE_CHECKING:
    from ddpm_mnist.config import Config


def run_training(
    cfg: Config, *, hooks: Hooks | None = None, resume: bool = False, overwrite: bool = False,
    device_name: str | None = None, change_world_size: bool = False, config_file: Path | None = None,
) -> Path:
    """Train the config's model on MNIST; return the run folder `out_dir/name`.

    Writes there: config.yaml, checkpoints/ (latest.pt and numbered ones) and the TensorBoard event
    file (and what the hooks write, such as samples/). Under torchrun, trains with
    DistributedDataParallel (rank 0 writes and holds the folder's lock). Raises `Stopped` after
    saving when stopped by Ctrl-C or SIGTERM (a second Ctrl-C stops at once, keeping the last checkpoint).
    `config_file`: the --config file cfg came from, which the run folder's files never replace.
    """
    ddp = init_distributed(device_name or cfg.runtime.device)
    folder = RunFolder(cfg.run_dir)
    try:
        resume_from = open_run(folder, cfg, ddp, resume, overwrite, config_file)
        runtime = setup_runtime(cfg.runtime, device_name, local_rank=ddp.local_rank if ddp.enabled else None,
                                seed=cfg.seed, rank=ddp.rank, training=True,
                                recorded_threads=None if resume_from is None else resume_from.cpu_threads)
        return run_steps(cfg, ddp, runtime, folder, resume_from, hooks or Hooks(), change_world_size)
    except KeyboardInterrupt as interrupt:  # before the loop, or a second Ctrl-C within a step
        latest = folder.latest
        kept = f"the run's last checkpoint, {latest}, is kept; continue with --resume" if latest.exists() else \
            "no checkpoint was written"
        raise Stopped.after(interrupt, kept) from None
    finally:
        folder.release()
        close(ddp)


def open_run(folder: RunFolder, cfg: Config, ddp: Dist, resume: bool, overwrite: bool,
             config_file: Path | None = None) -> Checkpoint | None:
    """Rank 0 locks the folder and applies --resume / --overwrite; every rank gets the checkpoint to resume."""

    def prepare() -> Checkpoint | None:
        folder.lock()
        return folder.prepare(cfg, resume, overwrite, config_file)

    found = on_main(ddp, prepare)
    chosen = gather(ddp, None if found is None else str(found.path))[0]
    if chosen is not None and found is None:  # the other ranks read the file rank 0 chose
        found = load(chosen)
    return found
