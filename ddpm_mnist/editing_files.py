"""`ddpm inpaint`, `ddpm edit` and `ddpm interpolate`: read the inputs, check every argument and
output before any work (no output may be an input), run the job (`editing`), and write a grid
(a row per input: the input, then its results), a `--tensor` file, and for an interpolation a GIF.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ddpm_mnist import editing
from ddpm_mnist.errors import UserError
from ddpm_mnist.images import save_gif, save_grid, save_tensor, shaded
from ddpm_mnist.inputs import indices_from, mask_from, read_inputs
from ddpm_mnist.paths import check_paths, check_suffix, ensure_writable
from ddpm_mnist.sample_files import beside_checkpoint, write_output

if TYPE_CHECKING:
    from ddpm_mnist.config import SampleRequest

MAX_IMAGES = 100_000  # results of one command (inputs x --n), all held in memory
MAX_FRAMES = 100


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Where an editing command's inputs come from, as given on the command line."""

    images: list[Path] = dataclasses.field(default_factory=list)  # --image PNGs
    test_digits: str | None = None  # --test-digits I,J,...
    invert: bool = False  # a dark pen on light paper
    data_root: str | None = None  # --data: the folder holding MNIST/raw/ (default: the run's data.root)


@dataclasses.dataclass(frozen=True)
class Outputs:
    """Where an editing command writes: a grid or strip PNG (None: beside the checkpoint), a tensor file."""

    out: Path | None = None
    tensor: Path | None = None


def check_range(value: float, flag: str, low: float, high: float) -> None:
    """low <= value <= high (and a number), or one UserError line."""
    if not (isinstance(value, int | float) and math.isfinite(value) and low <= value <= high):
        raise UserError(f"{flag} {value}: give {low:g} to {high:g}")


def check_outputs(ckpt_path: Path, inputs: Inputs, outputs: dict[str, Path | None], mask: Path | None = None) -> None:
    """Before any work: no output is the checkpoint, an input (a mask PNG included) or another
    output, and each can be written."""
    images = {f"--image {path}": path for path in inputs.images}
    check_paths(outputs, inputs={"--ckpt": ckpt_path, "--mask": mask, **images})
    for path in outputs.values():
        if path is not None:
            ensure_writable(path)


def check_suffixes(outputs: Outputs) -> None:
    """Each output's extension matches what is written into it."""
    if outputs.out is not None:
        check_suffix(outputs.out, "--out", (".png",))
    if outputs.tensor is not None:
        check_suffix(outputs.tensor, "--tensor", (".pt", ".npz"))


def with_digit(request: SampleRequest, digit: int | None) -> SampleRequest:
    """The request with `digit` as the one digit asked for (checked against the model like --digit)."""
    if digit is None:
        return request
    check_range(digit, "--digit", 0, 9)
    return dataclasses.replace(request, digits=(digit,))


def write_results(outputs: Outputs, grid: torch.Tensor, columns: int, results: torch.Tensor,
                  labels: torch.Tensor | None) -> list[Path]:
    """The grid (uint8 rows of `columns`) and the tensor file of the results; returns the paths written."""
    write_output(outputs.out, save_grid, grid, outputs.out, columns)
    written = [outputs.out]
    if outputs.tensor is not None:
        written.append(write_output(outputs.tensor, save_tensor, results, outputs.tensor, labels))
    return written


def rows(first: torch.Tensor, results: torch.Tensor, n: int) -> torch.Tensor:
    """A grid's images: each input's first image, then its n results. uint8 (N * (n + 1), 1, 28, 28)."""
    per_input = results.view(len(first), n, *results.shape[1:])
    return torch.cat([first[:, None], per_input], dim=1).flatten(0, 1)


def asked_labels(labels: torch.Tensor | None, digit: int | None, n: int) -> torch.Tensor | None:
    """The digit each result should read as: the asked --digit, else the test digit's own label (None
    for PNGs without --digit). (N * n,) int64."""
    if digit is not None:
        count = n * (1 if labels is None else len(labels))
        return torch.full((count,), digit, dtype=torch.long)
    return None if labels is None else labels.repeat_interleave(n)


def inpaint_files(ckpt_path: Path, inputs: Inputs, outputs: Outputs, *, mask: str, n: int, resample: int,
                  jump: int, request: SampleRequest, overrides: list[str] | None, device_name: str | None,
                  digit: int | None) -> Path:
    """`ddpm inpaint`: n RePaint completions of each input's hole; returns the grid's path."""
    check_range(n, "--n", 1, MAX_IMAGES)
    check_range(resample, "--resample", 1, 100)
    check_suffixes(outputs)
    hole = mask_from(mask)
    request = with_digit(request, digit)
    checkpoint, cfg = editing.configured(ckpt_path, request, overrides, "inpaint")
    check_range(jump, "--jump", 1, cfg.reverse_steps)
    images, labels, lines = read_inputs(inputs.images, inputs.test_digits, inputs.invert,
                                        inputs.data_root or cfg.data.root, cfg.data.download)
    check_range(len(images) * n, "inputs x --n", 1, MAX_IMAGES)
    mask_file = Path(mask) if mask.lower().endswith(".png") else None
    name = mask_file.stem if mask_file else mask
    out = outputs.out or beside_checkpoint(
        ckpt_path, f"inpaint_{name}_{cfg.sample.sampler}{cfg.reverse_steps}_r{resample}_seed{cfg.seed}.png")
    outputs = dataclasses.replace(outputs, out=out)
    check_outputs(ckpt_path, inputs, {"--out": out, "--tensor": outputs.tensor}, mask_file)
    job = editing.prepared(checkpoint, dataclasses.replace(request, n=len(images) * n), overrides, device_name)
    for line in lines:
        print(line)
    print(f"inpainting {len(images)} inputs ({n} completions each, mask {mask}, {int(hole.sum())} pixels to draw) "
          f"with RePaint, resample {resample}, jump {jump}: {job.note}")
    started = time.perf_counter()
    results = editing.inpaint(job, images, ~hole, n, resample=resample, jump=jump, digit=digit)
    grid = rows(shaded(images, hole), results, n)
    written = write_results(outputs, grid, n + 1, results, asked_labels(labels, digit, n))
    print(f"inpainted {len(results)} images in {time.perf_counter() - started:.1f} s: "
          + ", ".join(map(str, written)))
    return out


def edit_files(ckpt_path: Path, inputs: Inputs, outputs: Outputs, *, strength: float, n: int,
               request: SampleRequest, overrides: list[str] | None, device_name: str | None,
               digit: int | None) -> Path:
    """`ddpm edit`: n SDEdit variations of each input at `strength`; returns the grid's path."""
    check_range(strength, "--strength", 0, 1)
    check_range(n, "--n", 1, MAX_IMAGES)
    check_suffixes(outputs)
    request = with_digit(request, digit)
    checkpoint, cfg = editing.configured(ckpt_path, request, overrides, "edit")
    images, labels, lines = read_inputs(inputs.images, inputs.test_digits, inputs.invert,
                                        inputs.data_root or cfg.data.root, cfg.data.download)
    check_range(len(images) * n, "inputs x --n", 1, MAX_IMAGES)
    out = outputs.out or beside_checkpoint(
        ckpt_path, f"edit_s{strength:g}_{cfg.sample.sampler}{cfg.reverse_steps}_seed{cfg.seed}.png")
    outputs = dataclasses.replace(outputs, out=out)
    check_outputs(ckpt_path, inputs, {"--out": out, "--tensor": outputs.tensor})
    job = editing.prepared(checkpoint, dataclasses.replace(request, n=len(images) * n), overrides, device_name)
    start = editing.start_step(job.sampler.num_steps, strength)
    for line in lines:
        print(line)
    t = f"t = {int(job.sampler.timesteps[start])}" if start < job.sampler.num_steps else "nothing: strength 0"
    print(f"editing {len(images)} inputs ({n} variations each) with SDEdit at strength {strength:g} (noised to {t}, "
          f"{job.sampler.num_steps - start} of {job.sampler.num_steps} steps): {job.note}")
    started = time.perf_counter()
    results = editing.edit(job, images, strength, n, digit=digit)
    written = write_results(outputs, rows(images, results, n), n + 1, results, asked_labels(labels, digit, n))
    print(f"edited {len(results)} images in {time.perf_counter() - started:.1f} s: " + ", ".join(map(str, written)))
    return out


def interpolate_files(ckpt_path: Path, inputs: Inputs, outputs: Outputs, *, mode: str, seeds: str | None,
                      frames: int, t: int | None, request: SampleRequest, overrides: list[str] | None,
                      device_name: str | None, digit: int | None) -> Path:
    """`ddpm interpolate`: a strip of frames from one end to the other, and a GIF beside it.
    Returns the strip's path."""
    check_range(frames, "--frames", 2, MAX_FRAMES)
    check_suffixes(outputs)
    pair = check_mode(mode, seeds, inputs)
    if mode == "noise" and request.seed is not None:
        raise UserError("--seed is for --mode images; --mode noise draws from the two seeds of --seeds A,B")
    sampler_given = request.sampler is not None or any(o.startswith("sample.sampler") for o in overrides or [])
    if mode == "noise" and not sampler_given:
        request = dataclasses.replace(request, sampler="ddim")  # deterministic, so frames follow one path
    request = with_digit(request, digit)
    checkpoint, cfg = editing.configured(ckpt_path, request, overrides, "interpolate", deterministic=mode == "noise")
    t = cfg.schedule.num_timesteps // 2 if t is None else t
    check_range(t, "--t", 0, cfg.schedule.num_timesteps - 1)
    images, lines = None, []
    if mode == "images":
        images, _, lines = read_inputs(inputs.images, inputs.test_digits, inputs.invert,
                                       inputs.data_root or cfg.data.root, cfg.data.download)
        if len(images) != 2:
            raise UserError(f"--mode images: give two inputs, got {len(images)}")
    ends = f"seed{pair[0]}-{pair[1]}" if mode == "noise" else f"t{t}_seed{cfg.seed}"
    out = outputs.out or beside_checkpoint(
        ckpt_path, f"interpolate_{mode}_{cfg.sample.sampler}{cfg.reverse_steps}_{ends}.png")
    outputs, gif = dataclasses.replace(outputs, out=out), out.with_suffix(".gif")
    check_outputs(ckpt_path, inputs, {"--out": out, "--out's GIF": gif, "--tensor": outputs.tensor})
    job = editing.prepared(checkpoint, dataclasses.replace(request, n=frames), overrides, device_name)
    for line in lines:
        print(line)
    started = time.perf_counter()
    results = interpolated(job, mode, pair, images, t, frames, digit)
    written = write_results(outputs, results, frames, results, None)
    written.insert(1, write_output(gif, save_gif, results, gif))
    print(f"interpolated {frames} frames in {time.perf_counter() - started:.1f} s: " + ", ".join(map(str, written)))
    return out


def interpolated(job: editing.SamplingJob, mode: str, pair: tuple[int, int], images: torch.Tensor | None, t: int,
                 frames: int, digit: int | None) -> torch.Tensor:
    """The frames of either mode, after one line on what is drawn: uint8 (frames, 1, 28, 28)."""
    if mode == "noise":
        print(f"interpolating {frames} frames between the first samples of seeds {pair[0]} and {pair[1]} "
              f"(slerp between their x_T): {job.note}")
        return editing.interpolate_noise(job, pair, frames, digit=digit)
    print(f"interpolating {frames} frames between two inputs noised to t = {t}: {job.note}")
    return editing.interpolate_images(job, images, t, frames, digit=digit)


def check_mode(mode: str, seeds: str | None, inputs: Inputs) -> tuple[int, int]:
    """--mode noise takes --seeds A,B and no inputs; --mode images two inputs and no --seeds.
    Returns the two seeds ((0, 0) for images)."""
    given_inputs = bool(inputs.images) or inputs.test_digits is not None
    if mode == "noise":
        if seeds is None or given_inputs:
            raise UserError("--mode noise interpolates between two seeds' noise: give --seeds A,B (and no "
                            "--image or --test-digits; those are for --mode images)")
        pair = indices_from(seeds, "--seeds")
        if len(pair) != 2:
            raise UserError(f"--seeds {seeds}: give two seeds, A,B")
        for seed in pair:
            check_range(seed, "--seeds", 0, 2**63 - 1)
        return pair[0], pair[1]
    if mode == "images":
        if seeds is not None:
            raise UserError("--seeds is for --mode noise; --mode images takes two --image PNGs or --test-digits I,J")
        return 0, 0
    raise UserError(f"--mode {mode}: give noise or images")
