"""Forward noising q(x_t | x_0), the prediction-type conversions, the training loss, and the timesteps
a reverse run visits (the samplers themselves are in `samplers.py`).

Names follow diffusers (`add_noise`, `step`, `timesteps`) so that its users feel at home.
Timesteps are 0-indexed as stated in `schedule.py`. Shapes: x0, x_t, noise are (B, C, H, W) and
t is (B,) int64, on the schedule's device. What the network outputs (epsilon, v or x0) is turned
into x0_hat and eps_hat by `predict_x0` and `predict_eps`, the only two places that know; a model
that learns its variance outputs v second (`split_output`), which `model_log_variance` reads.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddpm_mnist.maths.likelihood import (
    bits_per_dim,
    fixed_log_variance,
    log_betas,
    log_posterior_variance,
    step_nats,
)
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


def split_output(output: torch.Tensor, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the prediction, v) of a network's output (B, C, H, W): a model that learns its variance
    outputs 2 x `channels` channels, the prediction first; else v is None."""
    if output.shape[1] == 2 * channels:
        prediction, v = output.chunk(2, dim=1)
        return prediction, v
    return output, None


def learned_range_log_variance(v: torch.Tensor, log_beta: torch.Tensor, log_beta_tilde: torch.Tensor
                               ) -> torch.Tensor:
    """Eq. (15) of Nichol & Dhariwal 2021: log Sigma = v' log beta_t + (1 - v') log beta-tilde_t with
    v' = (v + 1) / 2, so v in [-1, 1] spans beta-tilde_t to beta_t (as improved-diffusion and diffusers'
    learned_range map the network's output; v is not clamped)."""
    frac = (v + 1) / 2  # v'
    return frac * log_beta + (1 - frac) * log_beta_tilde


def model_log_variance(schedule: NoiseSchedule, t: torch.Tensor, variance_type: str, v: torch.Tensor | None
                       ) -> torch.Tensor:
    """log sigma_t^2 of the model's step at timesteps t (B,), float64: a fixed one (`fixed_log_variance`,
    (B, 1, 1, 1)), or per pixel from v, the output's second channel: learned_range (Eq. 15, with
    beta-tilde_0 taken as beta-tilde_1, as improved-diffusion clips it) or learned (v is the variance
    itself, diffusers' meaning, floored at 1e-20)."""
    if variance_type == "learned_range":
        return learned_range_log_variance(v.double(), at(log_betas(schedule), t),
                                          at(log_posterior_variance(schedule), t))
    if variance_type == "learned":
        return v.double().clamp(min=1e-20).log()
    return at(fixed_log_variance(schedule, variance_type), t)


def vlb_bits(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, x0_hat: torch.Tensor,
             v: torch.Tensor) -> torch.Tensor:
    """L_t of the hybrid loss, in bits per dimension, (B,) float32 (improved-diffusion's `_vb_terms_bpd`):
    the posterior's KL to the model's step (t >= 1) or the decoder's -log p (t = 0), with the step's
    mean from x0_hat through a stop-gradient, so that this term trains only the variance (Sec. 3.1)."""
    mean = at(schedule.posterior_mean_coef1, t) * x0_hat.detach() + at(schedule.posterior_mean_coef2, t) * x_t
    log_variance = model_log_variance(schedule, t, "learned_range", v)
    return bits_per_dim(step_nats(schedule, x0, x_t, t, mean, log_variance), x0[0].numel()).float()


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
    vlb_weight: float = 0.0,
) -> torch.Tensor:
    """Algorithm 1 of Ho et al. for one batch: the loss of each image, (B,) float32.

    x_t = q(x_t | x0, eps) (line 5), the network's output against the target (eps for the paper's
    simplified objective, Eq. 14), averaged over pixels. Mixed precision is the caller's choice.
    `class_labels` (B,): the digits a conditional model is given ("no class" included).
    `snr_gamma` > 0 weights each image's loss by Min-SNR-gamma (`min_snr_weights`); 0 leaves it as is.
    `loss_type` hybrid (Nichol & Dhariwal 2021, Sec. 3.1): mse, plus `vlb_weight` times L_vlb = T L_t
    (`vlb_bits`), which trains the learned variance of a model that outputs one.
    """
    x_t = add_noise(schedule, x0, noise, t)
    output, v = split_output((model(x_t, t) if class_labels is None else model(x_t, t, class_labels)).float(),
                             x0.shape[1])
    target = training_target(schedule, x0, noise, t, prediction_type)
    losses = pixel_losses(output, target, "mse" if loss_type == "hybrid" else loss_type).mean(dim=(1, 2, 3))
    if snr_gamma > 0:
        losses = losses * min_snr_weights(schedule, t, prediction_type, snr_gamma)
    if loss_type != "hybrid":
        return losses
    if v is None:
        raise ValueError("the hybrid loss needs a model that learns its variance")
    x0_hat = predict_x0(at(schedule.sqrt_alphas_cumprod, t), at(schedule.sqrt_one_minus_alphas_cumprod, t), x_t,
                        output, prediction_type)
    return losses + vlb_weight * schedule.num_timesteps * vlb_bits(schedule, x0, x_t, t, x0_hat, v)


def pixel_losses(output: torch.Tensor, target: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The loss of each pixel: mse, l1 or huber (delta 1), (B, C, H, W) float32."""
    if loss_type == "mse":
        return (output - target) ** 2
    if loss_type == "l1":
        return (output - target).abs()
    if loss_type == "huber":
        return F.huber_loss(output, target, reduction="none", delta=1.0)
    raise ValueError(f"unknown loss {loss_type!r}")


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
