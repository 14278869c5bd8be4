"""Forward noising q(x_t | x_0), the prediction-type conversions, the training loss, and the timesteps
a reverse run visits (the samplers themselves are in `samplers.py`).

Names follow diffusers (`add_noise`, `step`, `timesteps`) so that its users feel at home.
Timesteps are 0-indexed as stated in `schedule.py`. Shapes: x0, x_t, noise are (B, C, H, W) and
t is (B,) int64, on the schedule's device. What the network outputs (epsilon, v or x0) is turned
into x0_hat and eps_hat by `predict_x0` and `predict_eps`, the only two places that know.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpm_mnist.maths.schedule import NoiseSchedule


def at(values: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """values[t] shaped to broadcast over images: (B, 1, 1, 1) for t of shape (B,) or (1,); 0-d for an int."""
    if isinstance(t, int):
        return values[t]
    return values.index_select(0, t.reshape(-1)).view(-1, 1, 1, 1)  # (B, 1, 1, 1)


def training_timesteps(num_timesteps: int, batch_size: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Each image's t for one training step: (batch_size,) int64 in {0, ..., T-1}, on the generator's device.

    uniform: independent draws (Algorithm 1, line 3). stratified: one offset u ~ U[0, 1) for the
    batch and t_i = floor(T * ((u + i / B) mod 1)), the low-discrepancy sampler of Kingma et al. 2021
    (VDM, Appendix I.1): each t_i is still uniform, so the loss is the same in expectation, and the
    batch covers the T steps evenly (one t in each of B equal strata).
    """
    device = generator.device
    if kind == "uniform":
        return torch.randint(0, num_timesteps, (batch_size,), device=device, generator=generator)
    u = torch.rand((), dtype=torch.float64, device=device, generator=generator)
    points = (u + torch.arange(batch_size, dtype=torch.float64, device=device) / batch_size) % 1  # (B,) in [0, 1)
    return (points * num_timesteps).long().clamp_(max=num_timesteps - 1)


def add_noise(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0) in closed form: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, Eq. (4)."""
    return at(schedule.sqrt_alphas_cumprod, t) * x0 + at(schedule.sqrt_one_minus_alphas_cumprod, t) * noise


def training_target(
    schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the network learns to output: eps, x0, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "x0":
        return x0
    if prediction_type == "v":  # Salimans & Ho 2022, Sec. 4
        return at(schedule.sqrt_alphas_cumprod, t) * noise - at(schedule.sqrt_one_minus_alphas_cumprod, t) * x0
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def predict_x0(sqrt_abar: torch.Tensor, sqrt_one_minus_abar: torch.Tensor, x_t: torch.Tensor, output: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """x0_hat from the network's output at x_t, whose timestep has sqrt(abar_t) = `sqrt_abar` and
    sqrt(1 - abar_t) = `sqrt_one_minus_abar` (float32, each broadcasting over the images); unclipped."""
    if prediction_type == "epsilon":
        # Eq. (15): (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), the difference first: written as
        # a x_t + b eps, with a and b near +-2e4 at the cosine schedule's last step, it cancels
        return (x_t - sqrt_one_minus_abar * output) / sqrt_abar
    if prediction_type == "v":
        return sqrt_abar * x_t - sqrt_one_minus_abar * output
    if prediction_type == "x0":
        return output
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def predict_x0_from_sigma(sigma: torch.Tensor, x: torch.Tensor, output: torch.Tensor, prediction_type: str
                          ) -> torch.Tensor:
    """x0_hat in the sigma view, from x = x_t / sqrt(abar_t) = x0 + sigma eps (so sqrt(abar_t) =
    1 / sqrt(sigma^2 + 1)): `predict_x0` with x_t = x / sqrt(sigma^2 + 1), as diffusers' Euler,
    Heun and LMS schedulers write it."""
    if prediction_type == "epsilon":
        return x - sigma * output
    if prediction_type == "v":
        return output * (-sigma / (sigma**2 + 1).sqrt()) + x / (sigma**2 + 1)
    if prediction_type == "x0":
        return output
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def predict_eps(sqrt_abar: torch.Tensor, sqrt_one_minus_abar: torch.Tensor, x_t: torch.Tensor, output: torch.Tensor,
                prediction_type: str) -> torch.Tensor:
    """eps_hat from the network's output at x_t (arguments as `predict_x0`): the noise that x_t
    carries, by Eq. (4)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v":
        return sqrt_abar * output + sqrt_one_minus_abar * x_t
    if prediction_type == "x0":
        return (x_t - sqrt_abar * output) / sqrt_one_minus_abar
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def training_losses(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    prediction_type: str = "epsilon",
    loss_type: str = "mse",
    class_labels: torch.Tensor | None = None,
    snr_gamma: float = 0.0,
) -> torch.Tensor:
    """Algorithm 1 of Ho et al. for one batch: the loss of each image, (B,) float32.

    x_t = q(x_t | x0, eps) (line 5), the network's output against the target (eps for the paper's
    simplified objective, Eq. 14), averaged over pixels. Mixed precision is the caller's choice.
    `class_labels` (B,): the digits a conditional model is given ("no class" included).
    `snr_gamma` > 0 weights each image's loss by Min-SNR-gamma (`min_snr_weights`); 0 leaves it as is.
    """
    x_t = add_noise(schedule, x0, noise, t)
    output = (model(x_t, t) if class_labels is None else model(x_t, t, class_labels)).float()
    target = training_target(schedule, x0, noise, t, prediction_type)
    if loss_type == "mse":
        per_pixel = (output - target) ** 2
    elif loss_type == "l1":
        per_pixel = (output - target).abs()
    elif loss_type == "huber":
        per_pixel = F.huber_loss(output, target, reduction="none", delta=1.0)
    else:
        raise ValueError(f"unknown loss {loss_type!r}")
    losses = per_pixel.mean(dim=(1, 2, 3))
    return losses * min_snr_weights(schedule, t, prediction_type, snr_gamma) if snr_gamma > 0 else losses


def min_snr_weights(schedule: NoiseSchedule, t: torch.Tensor, prediction_type: str, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, Eq. 6 and Sec. 3.4), (B,) float32.

    The x0 loss weighted by min(SNR_t, gamma), written for the target the network learns: that is
    min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v and min(SNR, gamma) for x0.
    SNR_t = abar_t / (1 - abar_t). Low-noise steps, whose large SNR dominates the x0 loss, are capped.
    """
    abar = schedule.alphas_cumprod.index_select(0, t.reshape(-1)).float()
    snr = abar / (1 - abar)
    if prediction_type == "epsilon":
        return (gamma / snr).clamp(max=1.0)  # min(SNR, gamma) / SNR, and 1 at SNR = 0
    capped = snr.clamp(max=gamma)
    if prediction_type == "v":
        return capped / (snr + 1)
    if prediction_type == "x0":
        return capped
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def spaced_timesteps(num_timesteps: int, num_steps: int, spacing: str = "leading", *,
                     fractional: bool = False) -> list[int] | list[float]:
    """The timesteps a reverse run visits, descending, as diffusers' `timestep_spacing` picks them
    (Lin et al. 2023, Table 2); every timestep, T-1 down to 0, for the full loop whatever the spacing.

    - leading: (0, k, 2k, ...) with k = T // num_steps; never starts at T-1 (50 steps start at 980).
    - trailing: T - 1 down by T / num_steps (rounded): starts at T-1, ends near T / num_steps.
    - linspace: num_steps points from 0 to T-1, rounded: starts at T-1, ends at 0. `fractional`
      keeps them unrounded, as diffusers' sigma-space schedulers do (Euler, Heun, LMS).
    """
    T = num_timesteps
    if spacing == "leading":
        timesteps = np.arange(num_steps) * (T // num_steps)
    elif spacing == "trailing":
        timesteps = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64)[::-1] - 1
    elif spacing == "linspace" and fractional:
        return [float(t) for t in np.linspace(0, T - 1, num_steps)[::-1]]
    elif spacing == "linspace":
        timesteps = np.linspace(0, T - 1, num_steps).round().astype(np.int64)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}")
    return [int(t) for t in timesteps[::-1]]


def dpm_solver_timesteps(num_timesteps: int, num_steps: int, spacing: str = "leading") -> list[int]:
    """The timesteps DPM-Solver evaluates the model at, descending, as diffusers'
    DPMSolverMultistepScheduler picks them: for leading and linspace, those of num_steps + 1 spaced
    steps less the last, t = 0 (the solver's final step goes to sigma = 0, the clean image);
    trailing as `spaced_timesteps`."""
    if spacing == "trailing":
        return spaced_timesteps(num_timesteps, num_steps, spacing)
    return spaced_timesteps(num_timesteps, num_steps + 1, spacing)[:-1]
