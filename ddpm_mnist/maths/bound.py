"""A model's variational bound over its timesteps (Ho et al. 2020, Eq. 5), term by term: each term
is a formula of `likelihood.py`, at the model's step from x_t drawn by q(x_t | x_0).

The sum over t = 1 .. T-1 is exact (every timestep), or estimated from one timestep drawn in each
of K equal strata, weighted by the stratum's size: unbiased, with less spread than K uniform draws.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ddpm_mnist.config import ScheduleConfig
from ddpm_mnist.maths.diffusion import add_noise, model_log_variance, predict_x0, split_output
from ddpm_mnist.maths.likelihood import posterior_mean_log_variance, prior_nats, step_nats
from ddpm_mnist.maths.samplers import NoiseSource
from ddpm_mnist.maths.schedule import NoiseSchedule, make_schedule
from ddpm_mnist.rng import NLL_NOISE

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # model(x_t, t) -> its output, (B, C, 28, 28)


def strata(T: int, count: int) -> list[tuple[int, int]]:
    """(first timestep, size) of `count` strata covering 1 .. T-1 as evenly as integers allow."""
    edges = [1 + (k * (T - 1)) // count for k in range(count + 1)]
    return [(edges[k], edges[k + 1] - edges[k]) for k in range(count)]


def step_term(model: Denoiser, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
              prediction_type: str, variance_type: str) -> torch.Tensor:
    """The term of timesteps t (B,) for images x0 (B, 1, 28, 28) in [-1, 1], (B,) float64 nats: x_t
    from q(x_t | x_0) (Eq. 4), the model's step from it (the posterior mean at its x0_hat, clipped
    to [-1, 1]; the variance `variance_type`: fixed, or learned from the output's second channel),
    then `step_nats`."""
    x_t = add_noise(schedule, x0, eps, t)
    output, v = split_output(model(x_t, t).float(), x0.shape[1])
    sqrt_abar = schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    sqrt_one_minus_abar = schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    x0_hat = predict_x0(sqrt_abar, sqrt_one_minus_abar, x_t, output, prediction_type).clamp(-1, 1)
    mean, _ = posterior_mean_log_variance(schedule, x0_hat.double(), x_t.double(), t)
    return step_nats(schedule, x0, x_t, t, mean, model_log_variance(schedule, t, variance_type, v))


def bound(model: Denoiser, schedule_cfg: ScheduleConfig, x0: torch.Tensor, indices: range, *, seed: int,
          prediction_type: str, variance_type: str, timesteps: int | None = None,
          progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """The bound's parts for images x0 (B, 1, 28, 28) in [-1, 1], each (B,) float64 nats: `prior`,
    `steps` (the sum over t = 1 .. T-1: every t, or `timesteps` of them, one drawn uniformly in each
    of that many equal strata and weighted by its stratum's size, an unbiased estimate) and
    `decoder` (t = 0), for a model trained with the schedule of `schedule_cfg`. Image k's noise and
    timesteps come from (seed, k) alone (`indices`)."""
    schedule = make_schedule(schedule_cfg).to(x0.device)
    T, device = schedule.num_timesteps, x0.device
    noise = NoiseSource(seed, indices, device, stream=NLL_NOISE)
    decoder_eps = noise.next()  # first, so that the decoder term does not depend on `timesteps`
    count = T - 1 if timesteps is None else min(timesteps, T - 1)
    offsets = torch.stack([torch.rand(count, generator=g, device=device) for g in noise.generators])  # (B, K)
    steps = torch.zeros(len(x0), dtype=torch.float64, device=device)
    for k, (first, size) in enumerate(strata(T, count)):
        t = first + (offsets[:, k] * size).long().clamp(max=size - 1)  # (B,): uniform in its stratum
        steps += size * step_term(model, schedule, x0, t, noise.next(), prediction_type, variance_type)
        if progress is not None:
            progress(1)
    t0 = torch.zeros(len(x0), dtype=torch.long, device=device)
    decoder = step_term(model, schedule, x0, t0, decoder_eps, prediction_type, variance_type)
    return {"prior": prior_nats(schedule, x0), "steps": steps, "decoder": decoder}
