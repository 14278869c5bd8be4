"""Beta schedules and every quantity derived from them.

Timestep convention (stated once, as in diffusers): timesteps are 0-indexed, t = 0 is the first
noising step and t = T-1 the last, so `alphas_cumprod[t]` is the paper's alpha-bar_{t+1}.

Everything is computed in float64 and stored in float32. The formulas follow diffusers'
`DDPMScheduler`, so that the same settings give the same numbers in both tools; so do the names,
but one: our `cosine` is diffusers' `squaredcos_cap_v2` (with our `cosine_s` and `max_beta` at
their defaults, 0.008 and 0.999, which diffusers fixes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from ddpm_mnist.config import ScheduleConfig


def make_betas(
    beta_schedule: str,
    num_timesteps: int,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """beta_t for t = 0 .. T-1 as a float64 tensor of shape (T,)."""
    T = num_timesteps
    if beta_schedule == "linear":  # Ho et al. 2020, Sec. 4
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if beta_schedule == "scaled_linear":  # linear in sqrt(beta), the Stable Diffusion schedule
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if beta_schedule == "cosine":  # Nichol & Dhariwal 2021, Eq. (17); diffusers' squaredcos_cap_v2
        step = torch.arange(T + 1, dtype=torch.float64) / T
        alpha_bar = torch.cos((step + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2  # f(t)
        return torch.clamp(1 - alpha_bar[1:] / alpha_bar[:-1], max=max_beta)
    if beta_schedule == "sigmoid":  # as in diffusers (GeoDiff)
        x = torch.linspace(-6, 6, T, dtype=torch.float64)
        return torch.sigmoid(x) * (beta_end - beta_start) + beta_start
    raise ValueError(f"unknown beta schedule {beta_schedule!r}")  # config validation stops this earlier


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha-bar) so that alpha-bar_{T-1} = 0 (Lin et al. 2023, Algorithm 1)."""
    sqrt_abar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)  # keeps abar_0, makes abar_{T-1} = 0
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class NoiseSchedule:
    """Per-timestep float32 tensors of shape (T,), each named after its symbol."""

    betas: torch.Tensor  # beta_t
    alphas: torch.Tensor  # alpha_t = 1 - beta_t (the CSV of `ddpm schedule` reads it)
    alphas_cumprod: torch.Tensor  # abar_t = prod_{s<=t} alpha_s
    alphas_cumprod_prev: torch.Tensor  # abar_{t-1}, with abar_{-1} = 1
    sqrt_alphas_cumprod: torch.Tensor  # sqrt(abar_t)
    sqrt_one_minus_alphas_cumprod: torch.Tensor  # sqrt(1 - abar_t)
    posterior_variance: torch.Tensor  # beta-tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t), Eq. (7)
    posterior_mean_coef1: torch.Tensor  # sqrt(abar_{t-1}) beta_t / (1 - abar_t), multiplies x0, Eq. (7)
    posterior_mean_coef2: torch.Tensor  # sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t), multiplies x_t
    snr: torch.Tensor  # abar_t / (1 - abar_t)
    sigmas: torch.Tensor  # sqrt((1 - abar_t) / abar_t): x_t / sqrt(abar_t) = x0 + sigma_t eps (the sigma samplers')

    @property
    def num_timesteps(self) -> int:
        """T."""
        return self.betas.shape[0]

    @property
    def init_noise_sigma(self) -> float:
        """max_t sigma_t: the scale of x_T in the sigma view, where the euler, heun and lms samplers
        start (`maths.samplers.SigmaSampler`, which uses diffusers' exact rule for its timesteps)."""
        return float(self.sigmas.max())

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """A copy with every tensor on `device` (this object is left as it is)."""
        return NoiseSchedule(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def make_schedule(cfg: ScheduleConfig) -> NoiseSchedule:
    """Build the schedule a config describes."""
    betas = make_betas(
        cfg.beta_schedule, cfg.num_timesteps, cfg.beta_start, cfg.beta_end, cfg.cosine_s, cfg.max_beta
    )
    if cfg.rescale_zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return schedule_from_betas(betas)


def schedule_from_betas(betas: torch.Tensor) -> NoiseSchedule:
    """Derive every quantity from beta_t (float64 math, float32 storage)."""
    b = betas.to(torch.float64)
    alphas = 1 - b
    abar = torch.cumprod(alphas, dim=0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    values = dict(
        betas=b,
        alphas=alphas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=abar.sqrt(),
        sqrt_one_minus_alphas_cumprod=(1 - abar).sqrt(),
        posterior_variance=b * (1 - abar_prev) / (1 - abar),  # beta-tilde_0 = 0: the last step adds no noise
        posterior_mean_coef1=abar_prev.sqrt() * b / (1 - abar),
        posterior_mean_coef2=alphas.sqrt() * (1 - abar_prev) / (1 - abar),
        snr=abar / (1 - abar),
        sigmas=((1 - abar) / abar).sqrt(),  # inf at a zero-terminal-SNR end, its true value
    )
    return NoiseSchedule(**{k: v.to(torch.float32) for k, v in values.items()})


def alphas_cumprod_float64(schedule: NoiseSchedule) -> torch.Tensor:
    """abar_t recomputed in float64 from the stored betas, as the schedule was derived (on the CPU):
    for tables where 1 - abar_t near t = 0 (about 1e-5) must keep its digits."""
    return torch.cumprod(1 - schedule.betas.double().cpu(), dim=0)


def summary_rows(schedule: NoiseSchedule, points: int = 6) -> list[dict[str, float]]:
    """Rows (t, beta, alpha_bar, sigma, snr) at `points` evenly spread timesteps, ends included."""
    T = schedule.num_timesteps
    ts = sorted({round(i * (T - 1) / max(points - 1, 1)) for i in range(points)})
    return [
        {
            "t": t,
            "beta": float(schedule.betas[t]),
            "alpha_bar": float(schedule.alphas_cumprod[t]),
            "sigma": float(schedule.sigmas[t]),
            "snr": float(schedule.snr[t]),
        }
        for t in ts
    ]
