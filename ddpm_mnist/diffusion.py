"""Forward noising q(x_t | x_0), the prediction-type conversions, the training loss, and the reverse step.

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

from ddpm_mnist.schedule import NoiseSchedule, respace


def _at(values: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """values[t] shaped to broadcast over images: (B, 1, 1, 1) for t of shape (B,) or (1,); 0-d for an int."""
    if isinstance(t, int):
        return values[t]
    return values.index_select(0, t.reshape(-1)).view(-1, 1, 1, 1)  # (B, 1, 1, 1)


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


def predict_x0(
    schedule: NoiseSchedule, t: int | torch.Tensor, x_t: torch.Tensor, output: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """x0_hat from the network's output at (x_t, t), unclipped."""
    if prediction_type == "epsilon":
        # Eq. (15): (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), the difference first: written as
        # a x_t + b eps, with a and b near +-2e4 at the cosine schedule's last step, it cancels
        return (x_t - _at(schedule.sqrt_one_minus_alphas_cumprod, t) * output) / _at(schedule.sqrt_alphas_cumprod, t)
    if prediction_type == "v":
        return _at(schedule.sqrt_alphas_cumprod, t) * x_t - _at(schedule.sqrt_one_minus_alphas_cumprod, t) * output
    if prediction_type == "x0":
        return output
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def predict_eps(
    schedule: NoiseSchedule, t: int | torch.Tensor, x_t: torch.Tensor, output: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """eps_hat from the network's output at (x_t, t): the noise that x_t carries, by Eq. (4)."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v":
        return _at(schedule.sqrt_alphas_cumprod, t) * output + _at(schedule.sqrt_one_minus_alphas_cumprod, t) * x_t
    if prediction_type == "x0":
        return (x_t - _at(schedule.sqrt_alphas_cumprod, t) * output) / _at(schedule.sqrt_one_minus_alphas_cumprod, t)
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


def spaced_timesteps(num_timesteps: int, num_steps: int, spacing: str = "leading") -> list[int]:
    """The timesteps a reverse run visits, descending, as diffusers' `timestep_spacing` picks them
    (Lin et al. 2023, Table 2); every timestep, T-1 down to 0, for the full loop whatever the spacing.

    - leading: (0, k, 2k, ...) with k = T // num_steps; never starts at T-1 (50 steps start at 980).
    - trailing: T - 1 down by T / num_steps (rounded): starts at T-1, ends near T / num_steps.
    - linspace: num_steps points from 0 to T-1, rounded: starts at T-1, ends at 0.
    """
    T = num_timesteps
    if spacing == "leading":
        timesteps = np.arange(num_steps) * (T // num_steps)
    elif spacing == "trailing":
        timesteps = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64)[::-1] - 1
    elif spacing == "linspace":
        timesteps = np.linspace(0, T - 1, num_steps).round().astype(np.int64)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}")
    return [int(t) for t in timesteps[::-1]]


def dpm_solver_timesteps(num_timesteps: int, num_steps: int, spacing: str = "leading") -> list[int]:
    """The timesteps DPM-Solver evaluates the model at, descending, as diffusers'
    DPMSolverMultistepScheduler picks them: leading and linspace spread num_steps + 1 points and
    drop the last (the solver's final step goes to sigma = 0, the clean image); trailing is as above."""
    T = num_timesteps
    if spacing == "leading":
        timesteps = np.arange(num_steps + 1) * (T // (num_steps + 1))
    elif spacing == "linspace":
        timesteps = np.linspace(0, T - 1, num_steps + 1).round().astype(np.int64)
    elif spacing == "trailing":
        return spaced_timesteps(T, num_steps, spacing)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}")
    return [int(t) for t in timesteps[::-1][:-1]]


class ReverseSampler:
    """One reverse run over `num_steps` timesteps, built on the schedule respaced to them.

    `ancestral` is Algorithm 2 of Ho et al. (on a subsequence of timesteps when num_steps < T, as
    diffusers' DDPMScheduler does); `ddim` is Song et al. 2021, Eq. (12), with eta. Which timesteps
    a shorter run visits is `timestep_spacing` (see `spaced_timesteps`). Step i of the
    loop (0 = the noisiest) is timestep `timesteps[i]` and index k = num_steps - 1 - i of the
    respaced schedule `self.schedule`, whose named buffers (posterior_mean_coef1, ...) each step reads.
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
        timestep_spacing: str = "leading",
        device: torch.device | str = "cpu",
    ) -> None:
        T = schedule.num_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"num_steps must be in 1..{T}, got {num_steps}")
        if sampler not in ("ancestral", "ddim", "dpmpp_2m"):
            raise ValueError(f"unknown sampler {sampler!r}")
        if sampler == "dpmpp_2m" and num_steps >= T:
            raise ValueError(f"dpmpp_2m takes fewer than T = {T} steps, got {num_steps}")
        if variance_type not in ("fixed_small", "fixed_large"):
            raise ValueError(f"unknown variance type {variance_type!r}")
        self.kind, self.prediction_type = sampler, prediction_type
        self.clip_range = clip_sample_range if clip_sample else None
        pick = dpm_solver_timesteps if sampler == "dpmpp_2m" else spaced_timesteps
        timesteps = pick(T, num_steps, timestep_spacing)
        self.timesteps = torch.tensor(timesteps, dtype=torch.long, device=device)  # step i -> t, descending
        self._index = {t: i for i, t in enumerate(timesteps)}
        self.schedule = respace(schedule, timesteps[::-1]).to(device)  # index k -> timesteps[num_steps - 1 - k]

        s = self.schedule
        self.multistep = sampler == "dpmpp_2m"
        if self.multistep:
            self._dpm_solver_coefficients(schedule, timesteps)
            self.needs_noise = [False] * num_steps
            return
        if sampler == "ancestral":  # sigma_t^2 = beta-tilde_t (fixed_small) or beta_t (fixed_large), Sec. 3.2
            variance = s.posterior_variance if variance_type == "fixed_small" else s.betas
            self.sigmas = variance.double().sqrt()
        else:
            self._ddim_coefficients(schedule, timesteps, eta)
        self.sigmas[0] = 0.0  # the last step (k = 0, t -> x_0) adds no noise
        self.sigmas = self.sigmas.float()
        self.needs_noise = (self.sigmas > 0).tolist()[::-1]  # in step order, read back once

    def _ddim_coefficients(self, schedule: NoiseSchedule, timesteps: list[int], eta: float) -> None:
        """DDIM's sigma and direction tables (index k, ascending), from float64 alpha-bars.

        Near t = 0, 1 - abar_{t-1} is about 1e-5: taken from a float32 alpha-bar it would keep two
        digits, and sqrt(1 - abar_{t-1} - sigma_t^2) at eta = 1, a difference of two such numbers, none.
        """
        abar = torch.cumprod(1 - schedule.betas.double().cpu(), dim=0)[torch.tensor(timesteps[::-1])]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        # Eq. (16): sigma_t(eta) = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1})
        self.sigmas = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).clamp(min=0).sqrt()
        # Eq. (12): the coefficient of eps_hat, the "direction pointing to x_t"
        direction = (1 - abar_prev - self.sigmas**2).clamp(min=0).sqrt()
        self.direction = direction.float().to(self.timesteps.device)
        self.sigmas = self.sigmas.to(self.timesteps.device)

    def _dpm_solver_coefficients(self, schedule: NoiseSchedule, timesteps: list[int]) -> None:
        """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2, as float32 tables in step order, from float64.

        With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma) and h = lambda_t -
        lambda_s for the step from s = t_i to t = t_(i+1) (to sigma = 0, the clean image, at the last):
            x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^-h) D,  D = x0_hat + (x0_hat - x0_hat_prev) / (2 r),
        r = h_prev / h. The first step, and the last (diffusers' lower_order_final), are first order (D = x0_hat).
        """
        abar = torch.cumprod(1 - schedule.betas.double().cpu(), dim=0)
        abar_s = abar[torch.tensor(timesteps)]
        abar_t = torch.cat([abar_s[1:], torch.ones(1, dtype=torch.float64)])  # sigma = 0 after the last step
        alpha_s, sigma_s, alpha_t, sigma_t = abar_s.sqrt(), (1 - abar_s).sqrt(), abar_t.sqrt(), (1 - abar_t).sqrt()
        lambda_s, lambda_t = alpha_s.log() - sigma_s.log(), alpha_t.log() - sigma_t.log()  # -inf at zero SNR
        h = lambda_t - lambda_s  # inf at the last step: e^-h = 0, x_t = x0_hat
        r = torch.cat([torch.full((1,), torch.inf, dtype=torch.float64), h[:-1]]) / h
        second_order = torch.ones_like(h, dtype=torch.bool)
        second_order[0] = second_order[-1] = False
        device = self.timesteps.device
        self.dpm_sigma_ratio = (sigma_t / sigma_s).float().to(device)  # sigma_t / sigma_s, 0 at the last step
        self.dpm_data_coef = (alpha_t * -torch.expm1(-h)).float().to(device)  # alpha_t (1 - e^-h)
        difference = torch.where(second_order, 0.5 * alpha_t * -torch.expm1(-h) / r, torch.zeros_like(h))
        self.dpm_difference_coef = difference.nan_to_num(nan=0.0).float().to(device)  # alpha_t (1 - e^-h) / (2 r)

    @property
    def num_steps(self) -> int:
        """Number of reverse steps."""
        return len(self.timesteps)

    def predict_x0(self, i: int | torch.Tensor, model_output: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """x0_hat at step i, clipped if asked: (B, C, H, W)."""
        x0_hat = predict_x0(self.schedule, self.num_steps - 1 - i, x_t, model_output, self.prediction_type)
        if self.clip_range is not None:
            x0_hat = x0_hat.clamp(-self.clip_range, self.clip_range)
        return x0_hat

    def step_index(
        self, i: int | torch.Tensor, model_output: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor | None,
        previous: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_{t_prev} from x_t at step i (0 = the first, noisiest step).

        `i` may be a 1-element int64 tensor on the device (for CUDA-graph replay); `noise` may be
        None where this step adds none. A multistep sampler (dpmpp_2m) reads the previous step's
        x0_hat from `previous`, a fixed buffer shaped like x_t, and writes this step's into it.
        """
        s, k = self.schedule, self.num_steps - 1 - i
        # 1. predicted x_0 from the model output (Eq. 15 for epsilon), 2. clipped
        x0_hat = self.predict_x0(i, model_output, x_t)
        if self.multistep:
            # 3. DPM-Solver++(2M): the data prediction, corrected by its change since the last step
            x_prev = (_at(self.dpm_sigma_ratio, i) * x_t + _at(self.dpm_data_coef, i) * x0_hat
                      + _at(self.dpm_difference_coef, i) * (x0_hat - previous))
            previous.copy_(x0_hat)
            return x_prev
        if self.kind == "ancestral":
            # 3. the posterior mean mu-tilde_t(x_t, x0_hat), Eq. (7)
            x_prev = _at(s.posterior_mean_coef1, k) * x0_hat + _at(s.posterior_mean_coef2, k) * x_t
        else:
            # 3. Eq. (12): sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - sigma_t^2) eps_hat, with eps_hat
            # from the unclipped output, as diffusers' DDIMScheduler does
            eps_hat = predict_eps(s, k, x_t, model_output, self.prediction_type)
            x_prev = _at(s.alphas_cumprod_prev, k).sqrt() * x0_hat + _at(self.direction, k) * eps_hat
        if noise is not None:
            # 4. add noise: + sigma_t z, Algorithm 2 line 4
            x_prev = x_prev + _at(self.sigmas, k) * noise
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
        if self.multistep and (i == 0 or self._previous is None):  # like diffusers' scheduler, step() keeps state
            self._previous = torch.zeros_like(x_t)
        return self.step_index(i, model_output, x_t, noise if self.needs_noise[i] else None, self._previous)

    _previous: torch.Tensor | None = None  # the x0_hat of step() before, for a multistep sampler
