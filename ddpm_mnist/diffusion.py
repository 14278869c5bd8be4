"""Forward noising q(x_t | x_0), the training target and loss, and the reverse step.

Names follow diffusers (`add_noise`, `step`, `timesteps`) so that its users feel at home.
Timesteps are 0-indexed as stated in `schedule.py`. Shapes: x0, x_t, noise are (B, C, H, W) and
t is (B,) int64, on the schedule's device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddpm_mnist.schedule import NoiseSchedule


def _at(values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, 1) to broadcast over images."""
    return values.index_select(0, t).view(-1, 1, 1, 1)  # (B, 1, 1, 1)


def add_noise(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Sample q(x_t | x_0) in closed form: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, Eq. (4)."""
    return _at(schedule.sqrt_alphas_cumprod, t) * x0 + _at(schedule.sqrt_one_minus_alphas_cumprod, t) * noise


def training_target(
    schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the network learns to output: eps, x0, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "x0":
        return x0
    if prediction_type == "v":  # Salimans & Ho 2022, Sec. 4
        return _at(schedule.sqrt_alphas_cumprod, t) * noise - _at(schedule.sqrt_one_minus_alphas_cumprod, t) * x0
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def training_losses(
    model: nn.Module,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    prediction_type: str = "epsilon",
    loss_type: str = "mse",
) -> torch.Tensor:
    """Algorithm 1 of Ho et al. for one batch: the loss of each image, (B,) float32.

    x_t = q(x_t | x0, eps) (line 5), the network's output against the target (eps for the paper's
    simplified objective, Eq. 14), averaged over pixels. Mixed precision is the caller's choice.
    """
    x_t = add_noise(schedule, x0, noise, t)
    output = model(x_t, t).float()
    target = training_target(schedule, x0, noise, t, prediction_type)
    if loss_type == "mse":
        per_pixel = (output - target) ** 2
    elif loss_type == "l1":
        per_pixel = (output - target).abs()
    elif loss_type == "huber":
        per_pixel = F.huber_loss(output, target, reduction="none", delta=1.0)
    else:
        raise ValueError(f"unknown loss {loss_type!r}")
    return per_pixel.mean(dim=(1, 2, 3))


def spaced_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """The timesteps a reverse run visits, descending: every one for the full loop, else diffusers'
    "leading" spacing, (0, k, 2k, ...) reversed with k = T // num_steps."""
    ratio = num_timesteps // num_steps
    return [i * ratio for i in range(num_steps)][::-1]


class ReverseSampler:
    """One reverse run: its timesteps and the per-step coefficients, computed once.

    `ancestral` is Algorithm 2 of Ho et al. (on a subsequence of timesteps when num_steps < T,
    as diffusers' DDPMScheduler does); `ddim` is Song et al. 2021, Eq. (12), with eta.
    Every step is the same few multiply-adds on per-step scalars:

        x0_hat = clip(x0_from_xt[i] * x_t + x0_from_out[i] * model_output)
        x_prev = mean_x0[i] * x0_hat + mean_xt[i] * x_t + mean_out[i] * model_output + sigma[i] * z

    The tables are float32 tensors of shape (num_steps,) on `device`, computed in float64.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_steps: int,
        *,
        sampler: str = "ancestral",
        prediction_type: str = "epsilon",
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        eta: float = 0.0,
        device: torch.device | str = "cpu",
    ) -> None:
        T = schedule.num_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be in 1..{T}, got {num_steps}")
        self.kind = sampler
        self.prediction_type = prediction_type
        self.clip_range = clip_sample_range if clip_sample else None
        self.timesteps = torch.tensor(spaced_timesteps(T, num_steps), dtype=torch.long, device=device)
        self._index = {t: i for i, t in enumerate(self.timesteps.tolist())}

        abar_all = torch.cumprod(1 - schedule.betas.double().cpu(), dim=0)
        t = self.timesteps.cpu()
        prev = torch.cat([t[1:], torch.tensor([-1])])
        abar = abar_all[t]
        abar_prev = torch.where(prev >= 0, abar_all[prev.clamp(min=0)], torch.ones_like(abar))
        beta = 1 - abar / abar_prev  # beta_t of this (possibly respaced) step
        alpha = 1 - beta

        # (1) x0_hat from the model output (Eq. 15 for epsilon)
        if prediction_type == "epsilon":
            x0_from_xt, x0_from_out = abar.rsqrt(), -(1 / abar - 1).sqrt()
        elif prediction_type == "v":
            x0_from_xt, x0_from_out = abar.sqrt(), -(1 - abar).sqrt()
        elif prediction_type == "x0":
            x0_from_xt, x0_from_out = torch.zeros_like(abar), torch.ones_like(abar)
        else:
            raise ValueError(f"unknown prediction type {prediction_type!r}")

        zero = torch.zeros_like(abar)
        if sampler == "ancestral":
            # (2) posterior mean mu-tilde(x_t, x0_hat), Eq. (7)
            mean_x0 = abar_prev.sqrt() * beta / (1 - abar)
            mean_xt = alpha.sqrt() * (1 - abar_prev) / (1 - abar)
            mean_out = zero
            # (3) sigma_t: beta-tilde_t (fixed_small) or beta_t (fixed_large), none at the last step
            if variance_type == "fixed_small":
                variance = (beta * (1 - abar_prev) / (1 - abar)).clamp(min=1e-20)
            elif variance_type == "fixed_large":
                variance = beta
            else:
                raise ValueError(f"unknown variance type {variance_type!r}")
            sigma = torch.where(prev >= 0, variance.sqrt(), zero)
        elif sampler == "ddim":
            # eps_hat from the (unclipped) model output, as diffusers does
            if prediction_type == "epsilon":
                eps_from_xt, eps_from_out = zero, torch.ones_like(abar)
            elif prediction_type == "v":
                eps_from_xt, eps_from_out = (1 - abar).sqrt(), abar.sqrt()
            else:
                eps_from_xt, eps_from_out = (1 - abar).rsqrt(), -(abar / (1 - abar)).sqrt()
            # (2) Eq. (12): x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z
            sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()  # Eq. (16)
            direction = (1 - abar_prev - sigma**2).clamp(min=0).sqrt()
            mean_x0 = abar_prev.sqrt()
            mean_xt, mean_out = direction * eps_from_xt, direction * eps_from_out
        else:
            raise ValueError(f"unknown sampler {sampler!r}")

        def table(values: torch.Tensor) -> torch.Tensor:
            return values.to(device=device, dtype=torch.float32)

        self.x0_from_xt, self.x0_from_out = table(x0_from_xt), table(x0_from_out)
        self.mean_x0, self.mean_xt, self.mean_out = table(mean_x0), table(mean_xt), table(mean_out)
        self.sigma = table(sigma)
        self.needs_noise = [bool(s > 0) for s in sigma]

    @property
    def num_steps(self) -> int:
        """Number of reverse steps."""
        return len(self.timesteps)

    def predict_x0(self, i: int | torch.Tensor, model_output: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """x0_hat at step index i (clipped if asked), (B, C, H, W)."""
        x0 = self.x0_from_xt[i] * x_t + self.x0_from_out[i] * model_output
        if self.clip_range is not None:
            x0 = x0.clamp(-self.clip_range, self.clip_range)
        return x0

    def step_index(
        self, i: int | torch.Tensor, model_output: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor:
        """x_{t_prev} from x_t at step index i (0 = the first, noisiest step).

        `i` may be a 1-element int64 tensor on the device (for CUDA-graph replay); `noise` may be
        None where sigma[i] is 0.
        """
        x0 = self.predict_x0(i, model_output, x_t)  # (1) and clipping
        x_prev = self.mean_x0[i] * x0 + self.mean_xt[i] * x_t  # (2) the mean
        if self.kind == "ddim":
            x_prev = x_prev + self.mean_out[i] * model_output
        if noise is not None:
            x_prev = x_prev + self.sigma[i] * noise  # (3) Algorithm 2, line 4: + sigma_t z
        return x_prev

    def step(
        self, model_output: torch.Tensor, t: int, x_t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One reverse step from timestep t (as diffusers' `scheduler.step(model_output, t, sample)`).

        model_output: the network's output at (x_t, t); noise: z ~ N(0, I) shaped like x_t,
        needed unless this step adds none (the last step, or DDIM with eta = 0).
        """
        i = self._index.get(int(t))
        if i is None:
            raise ValueError(f"timestep {t} is not one of this sampler's timesteps")
        if noise is None and self.needs_noise[i]:
            raise ValueError(f"step at t = {t} adds noise: pass noise")
        return self.step_index(i, model_output, x_t, noise if self.needs_noise[i] else None)
