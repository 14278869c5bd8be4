"""What a trained model does besides sampling from noise: complete a digit, redraw a sketch, morph
one sample into another. Each is the reverse loop of `sample.reverse_loop` with a different start
or with known pixels put back at each step, so each takes the same `step(i, x, z)` (a model call
and the sampler's step) and a `NoiseSource`, and runs with any sampler whose steps stand alone
(`Sampler.multistep` is False: ancestral, ddim, euler, euler_ancestral).

    edit_loop        SDEdit (Meng et al. 2022): the input noised to step `start`, then denoised
    inpaint_loop     RePaint (Lugmayr et al. 2022, Algorithm 1): known pixels noised to each step,
                     with jumps back (`repaint_positions`) that let the two regions agree
    slerp            spherical interpolation between two x_T (Song et al. 2021, DDIM, Sec. 5.3)

Positions: 0 is x_T (before step 0), i is x after step i - 1 (before step i), num_steps is x_0.
"""

from __future__ import annotations

import math

import torch

from ddpm_mnist.maths.samplers import NoiseSource, Sampler, StepFn


def start_step(num_steps: int, strength: float) -> int:
    """The step SDEdit starts at for a strength S in [0, 1], as diffusers' img2img pipelines count it:
    num_steps - floor(num_steps * S). S = 1 starts at step 0 (x_T, an ordinary sample); S = 0 at
    num_steps (the input itself); in between, at the first step whose noise level is about S of
    the way up."""
    return num_steps - math.floor(num_steps * strength)


def edit_loop(sampler: Sampler, noise: NoiseSource, step: StepFn, x0: torch.Tensor, start: int) -> torch.Tensor:
    """SDEdit: x at step `start` = the input x0 (B, 1, 28, 28) in [-1, 1] noised in closed form
    (`Sampler.noised`, Eq. 4 of Ho et al.), then the reverse loop's steps from there. At start = 0
    it is the plain loop from x_T = init_noise_sigma * z (the input is forgotten), drawing the same
    noise as `reverse_loop`; at start = num_steps it returns x0 unchanged."""
    eps = noise.initial()  # z ~ N(0, I): x_T, or the noise the input is noised with
    if start == 0:
        x = eps * sampler.init_noise_sigma if sampler.init_noise_sigma != 1 else eps
    else:
        x = sampler.noised(start, x0, eps)
    sampler.start(x)
    for i in range(start, sampler.num_steps):
        z = noise.next() if sampler.needs_noise[i] else None
        x = step(i, x, z)
    return x


def repaint_positions(num_steps: int, resample: int, jump: int) -> list[int]:
    """The positions RePaint's loop visits, from 0 (x_T) to num_steps (x_0): one step down at a time;
    at the positions num_steps - 1 - k * jump (k = 0, 1, ...; at least `jump`) it goes back up
    `jump` positions and down again, resample - 1 times, as Lugmayr et al.'s schedule
    (`get_schedule_jump`). resample = 1 is the plain loop: 0, 1, ..., num_steps."""
    jumps_left = {p: resample - 1 for p in range(num_steps - 1, jump - 1, -jump)}
    positions, p = [0], 0
    while p < num_steps:
        p += 1
        positions.append(p)
        if jumps_left.get(p, 0) > 0:
            jumps_left[p] -= 1
            for _ in range(jump):
                p -= 1
                positions.append(p)
    return positions


def repaint_calls(positions: list[int]) -> int:
    """The model calls of a loop along `positions`: one per step down (a jump back up calls none)."""
    return sum(b > a for a, b in zip(positions, positions[1:], strict=False))


def inpaint_loop(sampler: Sampler, noise: NoiseSource, step: StepFn, x0: torch.Tensor, known: torch.Tensor,
                 positions: list[int]) -> torch.Tensor:
    """RePaint, Lugmayr et al. 2022, Algorithm 1, on any sampler whose steps stand alone.

    x0: (B, 1, 28, 28) in [-1, 1], the input; known: bool, broadcasting over x0, True where the
    input's pixels are kept. From x_T = init_noise_sigma * z, along `positions`:
    - down (p -> p + 1): the unknown pixels from the sampler's step (line 7), the known ones from
      the input noised to p + 1 with fresh noise (line 5), joined (line 8). At num_steps the known
      pixels are the input's exactly.
    - up (p + 1 -> p): one forward step q(x_t | x_(t-1)) with fresh noise (`Sampler.renoise`, line 12).
    """
    x = noise.initial()  # z ~ N(0, I)
    if sampler.init_noise_sigma != 1:
        x = x * sampler.init_noise_sigma
    sampler.start(x)
    for p, p_next in zip(positions, positions[1:], strict=False):
        if p_next > p:
            z = noise.next() if sampler.needs_noise[p] else None
            x_unknown = step(p, x, z)
            x_known = sampler.noised(p_next, x0, noise.next())
            x = torch.where(known, x_known, x_unknown)
        else:
            x = sampler.renoise(p_next, x, noise.next())
    return x


class GivenNoise:
    """A `NoiseSource` whose x_T is given (an interpolation between two seeds' x_T), for a
    deterministic sampler, which draws no other noise."""

    def __init__(self, x_T: torch.Tensor) -> None:
        self.x_T = x_T  # (B, 1, 28, 28)

    def initial(self) -> torch.Tensor:
        """The given x_T."""
        return self.x_T

    def next(self) -> torch.Tensor:
        raise RuntimeError("a deterministic sampler draws no noise after x_T")


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between two noise images, each image on its own: sin((1 - alpha)
    theta) / sin(theta) z0 + sin(alpha theta) / sin(theta) z1, theta the angle between them. It keeps
    the norm a Gaussian x_T has, where a straight line between two draws passes through images of
    too little noise. Computed in float64: alpha = 0 gives z0 and alpha = 1 gives z1 exactly.
    z0, z1: (B, 1, 28, 28)."""
    a, b = z0.double().flatten(1), z1.double().flatten(1)
    cos = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).clamp(-1, 1)
    theta = torch.arccos(cos).view(-1, 1)  # (B, 1)
    if bool((theta.sin() < 1e-6).any()):  # (anti)parallel draws: a straight line is the same path
        return ((1 - alpha) * a + alpha * b).view_as(z0).to(z0.dtype)
    mixed = (torch.sin((1 - alpha) * theta) * a + torch.sin(alpha * theta) * b) / theta.sin()
    return mixed.view_as(z0).to(z0.dtype)
