"""`ddpm sample`: images from a checkpoint, streamed batch by batch to their files.

Every argument (extensions, distinct paths, writable folders, the memory the run needs) is
checked before any sampling starts. Each batch goes to `--images-dir` as soon as it is made; only
the grid (its first GRID_MAX images) and a `--tensor` file are held in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ddpm_mnist.config import Config, SampleRequest
from ddpm_mnist.data import to_model_range
from ddpm_mnist.errors import Stopped, UserError
from ddpm_mnist.images import TRAJECTORY_IMAGES, TrajectoryRecorder, save_each, save_grid, save_tensor, strip_path
from ddpm_mnist.paths import check_paths, check_suffix, ensure_writable, resolved
from ddpm_mnist.sample import SamplingJob, prepare_sampling

GRID_MAX = 10_000  # images in a grid PNG (100 x 100 tiles); --images-dir and --tensor take every image


def sample_from_checkpoint(
    ckpt_path: Path,
    *,
    request: SampleRequest | None = None,
    device_name: str | None = None,
    out: Path | None = None,
    images_dir: Path | None = None,
    tensor_path: Path | None = None,
    trajectory: Path | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """Sample images from a checkpoint and write them; return the grid's path.

    `request` holds the sample-time settings asked for (None keeps the checkpoint's value). The
    same checkpoint, seed and request give the same images, byte for byte, on the same machine,
    whatever the batch size. Every argument is checked before any sampling starts.
    """
    check_suffixes(out, tensor_path, trajectory)  # before loading anything
    run = prepare_sampling(ckpt_path, request or SampleRequest(), overrides, device_name)
    s = run.cfg.sample
    out = out or default_grid_path(ckpt_path, run.cfg)
    check_outputs(ckpt_path, out, images_dir, tensor_path, trajectory)
    run.check_memory(s.n, s.batch_size, images_kept=s.n if tensor_path is not None else min(s.n, GRID_MAX))
    recorder = TrajectoryRecorder(run.sampler, min(TRAJECTORY_IMAGES, s.n)) if trajectory else None
    print(f"sampling {s.n} images: {run.note}")
    started = time.perf_counter()
    grid, kept = stream(run, images_dir, tensor_path is not None, out, recorder)
    elapsed = time.perf_counter() - started
    write_output(out, save_grid, to_model_range(torch.cat(grid)), out, grid_columns(run.cfg))
    written = [out] if images_dir is None else [out, images_dir]
    if tensor_path is not None:
        written.append(write_output(tensor_path, save_tensor, torch.cat(kept), tensor_path, run.labels(s.n)))
    if recorder is not None:
        written += write_output(trajectory, recorder.save, grid[0][: recorder.count], trajectory)
    shown = f" (the grid shows the first {GRID_MAX:,})" if s.n > GRID_MAX else ""
    rate = s.n * run.cfg.reverse_steps / elapsed
    print(f"sampled {s.n} images in {elapsed:.1f} s ({rate:.0f} image-steps/s){shown}: "
          + ", ".join(str(p) for p in written))
    return out


def stream(run: SamplingJob, images_dir: Path | None, keep_all: bool, out: Path,
           recorder: TrajectoryRecorder | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Sample batch by batch, each batch to `images_dir` as soon as it is made; return the grid's
    images (its first GRID_MAX) and, with `keep_all`, every batch. Ctrl-C says what was kept."""
    s, grid, kept, done = run.cfg.sample, [], [], 0
    on_step = recorder.on_step if recorder is not None else None
    try:
        for first, batch in run.batches(s.n, run.cfg.seed, s.batch_size, on_step=on_step):
            if images_dir is not None:
                write_output(images_dir, save_each, batch, images_dir, first)
            done = first + len(batch)
            grid.append(batch[: max(0, GRID_MAX - first)])
            if keep_all:
                kept.append(batch)
    except KeyboardInterrupt as interrupt:
        written = f"the first {done:,} images are in {images_dir}; " if images_dir is not None and done else ""
        raise Stopped.after(interrupt, f"{written}{out} was not written") from None
    return grid, kept


def grid_columns(cfg: Config) -> int | None:
    """10 columns for a conditional model drawing 0 to 9 in turn (a column per digit); else the default."""
    return 10 if cfg.model.num_classes and not cfg.sample.digits else None


def check_suffixes(out: Path | None, tensor_path: Path | None, trajectory: Path | None) -> None:
    """Each output's extension matches what is written into it."""
    for path, option, suffixes in ((out, "--out", (".png",)), (tensor_path, "--tensor", (".pt", ".npz")),
                                   (trajectory, "--trajectory", (".gif",))):
        if path is not None:
            check_suffix(path, option, suffixes)


def check_outputs(ckpt_path: Path, out: Path, images_dir: Path | None, tensor_path: Path | None,
                  trajectory: Path | None) -> None:
    """Before sampling: no output is the checkpoint or another output, and each can be written."""
    check_paths({"--out": out, "--tensor": tensor_path, "--trajectory": trajectory,
                 "--trajectory's strip": strip_path(trajectory) if trajectory else None, "--images-dir": images_dir},
                inputs={"--ckpt": ckpt_path})
    for path in (out, tensor_path, trajectory):
        if path is not None:
            ensure_writable(path)
    if images_dir is not None:
        ensure_writable(images_dir, folder=True)


def default_grid_path(ckpt_path: Path, cfg: Config) -> Path:
    """`<run>/samples/<sampler><steps>_seed<seed>_n<n>.png` for a checkpoint inside a run folder,
    else next to the checkpoint."""
    s = cfg.sample
    spacing = f"_{s.timestep_spacing}" if cfg.reverse_steps < cfg.schedule.num_timesteps and \
        s.timestep_spacing != "leading" else ""
    conditioning = ""
    if cfg.model.num_classes:
        conditioning = f"_w{s.guidance:g}" + (f"_digits{''.join(map(str, s.digits))}" if s.digits else "")
    weights = "" if s.use_ema else "_raw"
    spacing += "_karras" if s.sigma_schedule == "karras" else ""
    spacing += "_thresholded" if s.thresholding else ""
    name = f"{s.sampler}{cfg.reverse_steps}{spacing}{conditioning}_seed{cfg.seed}_n{s.n}{weights}.png"
    return beside_checkpoint(ckpt_path, name)


def beside_checkpoint(ckpt_path: Path, name: str) -> Path:
    """`<run>/samples/<name>` for a checkpoint inside a run folder, else `<checkpoint's stem>_<name>`
    next to it: where a command that reads a checkpoint writes by default."""
    if ckpt_path.name in ("", ".", ".."):  # `--ckpt .` inside an exported folder: name it by its real name
        ckpt_path = resolved(ckpt_path)
    if ckpt_path.parent.name == "checkpoints":
        return ckpt_path.parent.parent / "samples" / name
    return ckpt_path.with_name(f"{ckpt_path.stem}_{name}")


def write_output(path: Path, writer: Callable[..., Any], *args: Any) -> Any:
    """Call a writer, turning a refused write (no space, no permission) into one UserError line."""
    try:
        return writer(*args)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
