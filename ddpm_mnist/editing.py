"""Inpainting, SDEdit and interpolation with a checkpoint: the loops of `maths.editing`, run batch
by batch as `ddpm sample` runs its own (a `SamplingJob`, `sample.generate`).

Image k of a job draws its noise from its own generator, seeded from (seed, SAMPLE_NOISE, k), as
`ddpm sample` does: so the results do not depend on the batch, and an edit at strength 1 draws
what `ddpm sample` draws. A conditional model is asked for one digit (`digit`, with the job's
guidance), or else runs its unconditional half: the input decides the digit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from ddpm_mnist.config import Config, SampleRequest
from ddpm_mnist.data import to_model_range, to_uint8
from ddpm_mnist.errors import UserError
from ddpm_mnist.maths.editing import (
    GivenNoise,
    edit_loop,
    inpaint_loop,
    repaint_calls,
    repaint_positions,
    slerp,
    start_step,
)
from ddpm_mnist.maths.samplers import SAMPLERS, NoiseSource
from ddpm_mnist.sample import Guided, Loop, SamplingJob, generate, prepare_sampling, reverse_loop, sampling_configs

if TYPE_CHECKING:
    from ddpm_mnist.checkpoint import Checkpoint


def configured(ckpt_path: Path, request: SampleRequest, overrides: list[str] | None, command: str, *,
               deterministic: bool = False) -> tuple[Checkpoint, Config]:
    """Read the checkpoint and check the request and the sampler against it, before any work:
    (the checkpoint, for `prepared`; the config the job will run)."""
    checkpoint, (cfg,) = sampling_configs(ckpt_path, [request], overrides)
    check_sampler(cfg, command, deterministic=deterministic)
    return checkpoint, cfg


def prepared(checkpoint: Checkpoint, request: SampleRequest, overrides: list[str] | None,
             device_name: str | None) -> SamplingJob:
    """The model and sampler of a checked request (`configured`), as `ddpm sample` builds them."""
    return prepare_sampling(checkpoint.path, request, overrides, device_name, checkpoint=checkpoint)


def check_sampler(cfg: Config, command: str, *, deterministic: bool = False) -> None:
    """Refuse a sampler the command cannot run, in one line: a multistep one (its state needs the
    steps before the one an edit starts at, or jumps back to), or for an interpolation between two
    x_T one that adds noise at each step."""
    name, s = cfg.sample.sampler, cfg.sample
    if SAMPLERS[name].multistep and not deterministic:
        raise UserError(f"ddpm {command}: the {name} sampler keeps state from step to step, which starting "
                        "mid-way or jumping back would break; use ancestral, ddim, euler or euler_ancestral")
    if deterministic and (name in ("ancestral", "euler_ancestral") or (name == "ddim" and s.eta > 0)):
        raise UserError(f"ddpm {command}: --mode noise needs a deterministic sampler, and {name}"
                        + (f" with eta {s.eta:g}" if name == "ddim" else "") + " adds fresh noise at every step, "
                        "so the frames between two seeds would not follow one path; use ddim (eta 0), dpmpp_2m, "
                        "euler, heun or lms")


def conditioned(job: SamplingJob, count: int, digit: int | None) -> nn.Module:
    """The model for `count` images: a conditional one asked for `digit` with the job's guidance,
    or its unconditional half when no digit is given; an unconditional one as it is."""
    num_classes = job.cfg.model.num_classes
    if not num_classes:
        return job.model
    labels = torch.full((count,), 0 if digit is None else digit, dtype=torch.long, device=job.runtime.device)
    return Guided(job.model, labels, 0.0 if digit is None else job.cfg.sample.guidance, num_classes)


def run(job: SamplingJob, count: int, calls: int, digit: int | None, noise_for: Callable[[range], NoiseSource],
        loop_for: Callable[[range], Loop], desc: str) -> torch.Tensor:
    """Images 0 .. count-1, batch by batch, each batch with its noise (`noise_for(indices)`) and
    loop (`loop_for(indices)`), `calls` model calls per image: uint8 (count, 1, 28, 28)."""
    size = min(job.cfg.sample.batch_size, count)
    job.check_memory(count, size, images_kept=count)
    done = []
    with tqdm(total=calls * math.ceil(count / size), unit="step", dynamic_ncols=True, desc=desc) as bar:
        for first in range(0, count, size):
            indices = range(first, min(first + size, count))
            x = generate(conditioned(job, len(indices), digit), job.sampler, noise_for(indices), job.runtime,
                         progress=bar.update, static=job.static, loop=loop_for(indices))
            done.append(to_uint8(x.cpu()))
    return torch.cat(done)


def per_image_noise(job: SamplingJob, seed: int) -> Callable[[range], NoiseSource]:
    """Image k's noise from (seed, k), as `ddpm sample` draws it."""
    return functools.partial(NoiseSource, seed, device=job.runtime.device)


def inpaint(job: SamplingJob, inputs: torch.Tensor, known: torch.Tensor, n: int, *, resample: int = 1,
            jump: int = 10, digit: int | None = None) -> torch.Tensor:
    """RePaint: n completions of each input, uint8 (N * n, 1, 28, 28), completion j of input m at
    m * n + j. inputs: uint8 (N, 1, 28, 28); known: bool (N or 1, 1, 28, 28), True where the input's
    pixels are kept (in the result they are the input's, exactly)."""
    device = job.runtime.device
    x0 = to_model_range(inputs).repeat_interleave(n, 0)  # (N * n, 1, 28, 28)
    known = known.expand(len(inputs), -1, -1, -1).repeat_interleave(n, 0)
    positions = repaint_positions(job.sampler.num_steps, resample, jump)
    calls = repaint_calls(positions)

    def loop_for(indices: range) -> Loop:
        return functools.partial(inpaint_loop, x0=x0[indices.start:indices.stop].to(device),
                                 known=known[indices.start:indices.stop].to(device), positions=positions)

    return run(job, len(x0), calls, digit, per_image_noise(job, job.cfg.seed), loop_for, "inpaint")


def edit(job: SamplingJob, inputs: torch.Tensor, strength: float, n: int, *, digit: int | None = None
         ) -> torch.Tensor:
    """SDEdit at `strength` in [0, 1]: n variations of each input, uint8 (N * n, 1, 28, 28),
    variation j of input m at m * n + j. Strength 0 returns the inputs; 1 draws what `ddpm sample`
    draws for those image numbers."""
    x0 = to_model_range(inputs).repeat_interleave(n, 0)
    start = start_step(job.sampler.num_steps, strength)
    return blend_edits(job, x0, start, per_image_noise(job, job.cfg.seed), digit, "edit")


def blend_edits(job: SamplingJob, x0: torch.Tensor, start: int, noise_for: Callable[[range], NoiseSource],
                digit: int | None, desc: str) -> torch.Tensor:
    """`edit_loop` from step `start` for each image of x0 (K, 1, 28, 28) in [-1, 1]: uint8 (K, 1, 28, 28)."""
    device = job.runtime.device

    def loop_for(indices: range) -> Loop:
        return functools.partial(edit_loop, x0=x0[indices.start:indices.stop].to(device), start=start)

    return run(job, len(x0), job.sampler.num_steps - start, digit, noise_for, loop_for, desc)


def interpolate_noise(job: SamplingJob, seeds: tuple[int, int], frames: int, *, digit: int | None = None
                      ) -> torch.Tensor:
    """Frames between the first image `ddpm sample --seed A` and `--seed B` draw: x_T of frame k is
    slerp(x_T of A, x_T of B, k / (frames - 1)), then the (deterministic) reverse loop. The end
    frames are those two samples. uint8 (frames, 1, 28, 28)."""
    device = job.runtime.device
    ends = [NoiseSource(seed, [0], device).initial() for seed in seeds]  # image 0's x_T of each seed
    x_T = torch.cat([slerp(ends[0], ends[1], k / (frames - 1)) for k in range(frames)])  # (frames, 1, 28, 28)

    def noise_for(indices: range) -> GivenNoise:
        return GivenNoise(x_T[indices.start:indices.stop])

    def loop_for(indices: range) -> Loop:
        return reverse_loop

    return run(job, frames, job.sampler.num_steps, digit, noise_for, loop_for, "interpolate")


def interpolate_images(job: SamplingJob, pair: torch.Tensor, t: int, frames: int, *, digit: int | None = None
                       ) -> torch.Tensor:
    """Frames between two images (uint8 (2, 1, 28, 28)), as lucidrains' `interpolate`: both noised to
    timestep t, mixed (1 - lambda) x_t(A) + lambda x_t(B), lambda = k / (frames - 1), then denoised
    from there. Both are noised with the same noise (image 0's of the seed), so the mix is the
    blend (1 - lambda) A + lambda B noised to t (Eq. 4 is linear in x_0), with the full noise level
    (with two independent draws, the mix would hold too little noise). Every frame draws the same
    noise after it too, so only lambda changes along the strip. uint8 (frames, 1, 28, 28)."""
    a, b = to_model_range(pair)
    x0 = torch.stack([(1 - k / (frames - 1)) * a + k / (frames - 1) * b for k in range(frames)])
    start = first_step_at_or_below(job, t)
    seed = job.cfg.seed

    def noise_for(indices: range) -> NoiseSource:
        return NoiseSource(seed, [0] * len(indices), job.runtime.device)

    return blend_edits(job, x0, start, noise_for, digit, "interpolate")


def first_step_at_or_below(job: SamplingJob, t: int) -> int:
    """The first step whose timestep is at most t (num_steps if none is: the images themselves)."""
    timesteps = job.sampler.timesteps.cpu().tolist()
    return next((i for i, step_t in enumerate(timesteps) if step_t <= t), len(timesteps))
