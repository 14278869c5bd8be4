"""The reverse process, one class per sampler: from x_T to an image, step by step.

    Ancestral       Ho et al. 2020, Algorithm 2 (the default, and the 1000-step reference loop)
    DDIM            Song et al. 2021, Eq. (12), with eta
    DPMSolverPP2M   Lu et al. 2022, DPM-Solver++(2M), Algorithm 2
  in the sigma view (`SigmaSampler`), as diffusers' sigma-space schedulers and k-diffusion:
    Euler           Karras et al. 2022, Eq. (4) stepped by Euler's method (EulerDiscreteScheduler)
    EulerAncestral  Euler to sigma_down, plus sigma_up z (EulerAncestralDiscreteScheduler)
    Heun            Karras et al. 2022, Algorithm 1 (HeunDiscreteScheduler): 2 model calls a step
    LMS             linear multistep of order 4 (LMSDiscreteScheduler)

Every sampler makes the same three moves, which the one loop (`sample.generate`) runs: x_T =
init_noise_sigma * z (`init_noise_sigma`, 1 on x_t itself), the model's input at step i
(`model_input`: x itself, or x / sqrt(sigma^2 + 1) in the sigma view), and `step`. Step i (0 = the
noisiest) is one model call at timestep `timesteps[i]`, and i is the only index: a sampler keeps
the alpha-bar (on x_t) or the sigma (in the sigma view) of each step in step order, with the clean
image's after the last, and `step` computes its coefficients from those of steps i and i + 1, one
formula a line, in float64, then applies them in float32. Only an index read changes from one
step to the next, so a CUDA graph replays a step with only i and z changing; a multistep sampler's
state is a fixed buffer that `start` resets in place. Adding a sampler is one class here and one
line in `SAMPLERS`.

For the loops that start mid-way or jump back (`maths/editing.py`), a sampler also gives x at step
i from a clean image in closed form (`noised`, diffusers' `add_noise`) and one forward step from
step i + 1 back to step i (`renoise`); `multistep` says whether its steps need the ones before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ddpm_mnist.config import LEARNED_VARIANCE_TYPES, SIGMA_SCHEDULES, VARIANCE_TYPES, Config
from ddpm_mnist.config.sampler_names import KARRAS_SAMPLERS, SIGMA_SAMPLERS, max_steps, min_steps
from ddpm_mnist.maths.diffusion import (
    at,
    dpm_solver_timesteps,
    learned_range_log_variance,
    predict_eps,
    predict_x0,
    predict_x0_from_sigma,
    spaced_timesteps,
    split_output,
)
from ddpm_mnist.maths.schedule import NoiseSchedule, alphas_cumprod_float64, make_schedule
from ddpm_mnist.rng import SAMPLE_NOISE, derive_seed

Step = int | torch.Tensor  # a step index, or a 1-element int64 tensor on the device (CUDA-graph replay)
StepFn = Callable[[int, torch.Tensor, torch.Tensor | None], torch.Tensor]  # a loop's step(i, x, z) -> x at i + 1


def dynamic_threshold(x0_hat: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, Sec. 2.3), as diffusers' `_threshold_sample`: s is the
    `ratio` quantile of |x0_hat| over each image, clamped to [1, max_value]; x0_hat is clamped to
    [-s, s] and divided by s, so saturated pixels are pulled in rather than cut. (B, C, H, W)."""
    s = torch.quantile(x0_hat.flatten(1).abs(), ratio, dim=1).clamp(min=1, max=max_value).view(-1, 1, 1, 1)
    return torch.minimum(torch.maximum(x0_hat, -s), s) / s


@dataclass(frozen=True)
class X0Bound:
    """What keeps x0_hat in the image range: nothing, clipping to [-clip_range, clip_range], or
    dynamic thresholding (which replaces clipping, as in diffusers)."""

    clip_range: float | None = None
    threshold_ratio: float | None = None  # dynamic thresholding's quantile, None: off
    max_value: float = 1.0

    def __call__(self, x0_hat: torch.Tensor) -> torch.Tensor:
        if self.threshold_ratio is not None:
            return dynamic_threshold(x0_hat, self.threshold_ratio, self.max_value)
        return x0_hat if self.clip_range is None else x0_hat.clamp(-self.clip_range, self.clip_range)


def per_step(values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A float64 table a sampler reads at each step, where the step runs: a CUDA graph reads it by
    an index on the device. MPS has no float64, so there it stays on the CPU: an int index gives a
    0-d value, which broadcasts over tensors on any device."""
    device = torch.device(device)
    return values.to(torch.float64).to(device if device.type != "mps" else "cpu")


class Sampler:
    """What every sampler shares: its timesteps, x0_hat's bound, and the three moves of the loop."""

    init_noise_sigma = 1.0  # x_T = init_noise_sigma * z
    multistep = False  # whether a step reads state that earlier steps left (so a loop cannot start mid-way)
    reads_variance = False  # whether `step` reads a learned variance, the output's second channel
    noise_levels: torch.Tensor  # sigma = sqrt((1 - abar) / abar) at each model call, float64 (`ddpm schedule`)

    def __init__(self, timesteps: Sequence[float], prediction_type: str, bound: X0Bound,
                 device: torch.device | str, dtype: torch.dtype = torch.long) -> None:
        self.timesteps = torch.tensor(timesteps, dtype=dtype, device=device)  # step i -> the model's t, descending
        self.prediction_type, self.bound = prediction_type, bound
        self.needs_noise = [False] * len(timesteps)  # whether step i adds noise z, read once on the host

    @property
    def num_steps(self) -> int:
        """Number of loop steps, each one model call."""
        return len(self.timesteps)

    def start(self, x_T: torch.Tensor) -> None:
        """Reset the state of a run from x_T (none, but for a multistep sampler)."""

    def model_input(self, i: Step, x: torch.Tensor) -> torch.Tensor:
        """What the model sees at step i: x_t itself here."""
        return x

    def model_output(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What `step` takes of the model's output: the prediction alone, but where it reads the
        learned variance that a model with learn_variance outputs second."""
        return output if self.reads_variance else split_output(output, x.shape[1])[0]

    def predict_x0(self, i: Step, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x0_hat at step i from whatever the model predicts, bounded: (B, C, H, W)."""
        raise NotImplementedError

    def step(self, i: Step, model_output: torch.Tensor, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """x at step i + 1 from x at step i; z ~ N(0, I) where `needs_noise[i]` (else None or zeros)."""
        raise NotImplementedError


def state_buffer(buffer: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A multistep sampler's state, zeroed for a new run: in place when the buffer fits (a captured
    CUDA graph keeps its address), else a new one shaped like `like`."""
    if buffer is not None and buffer.shape == like.shape and buffer.device == like.device:
        return buffer.zero_()
    return torch.zeros_like(like)


class Respaced(Sampler):
    """A sampler on x_t itself, over the diffusion respaced to its steps, as improved-diffusion's
    `respace` builds it: step i (timestep t_i) has beta_i = 1 - abar(t_i) / abar(t_(i+1)), the jump
    to the next step's noise level (to abar = 1, the clean image, at the last), and the alpha-bars
    follow from those betas as `schedule.schedule_from_betas` derives them. So a run of 50 steps
    uses the paper's formulas as they are, with t -> step i and t - 1 -> step i + 1, and the full
    loop's values are the schedule's, up to float rounding. The alpha-bars are those of the
    timesteps, or of Karras et al.'s sigmas.

    `betas[i]` and `alphas_cumprod[i]` (float64; the latter 1 after the last step) are in step order;
    `step` computes its coefficients from them, then applies them in float32.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, timesteps: Sequence[float], prediction_type: str,
                 bound: X0Bound, device: torch.device | str, dtype: torch.dtype = torch.long) -> None:
        super().__init__(timesteps, prediction_type, bound, device, dtype)
        self.noise_levels = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()  # the sigma of each step, float64
        one = torch.ones(1, dtype=torch.float64)
        betas = 1 - alphas_cumprod / torch.cat([alphas_cumprod[1:], one])  # beta_i = 1 - abar_t / abar_(t-1)
        derived = torch.cumprod((1 - betas).flip(0), dim=0).flip(0)  # abar = prod (1 - beta), in t's order
        self.betas = per_step(betas, device)  # (num_steps,)
        self.alphas_cumprod = per_step(torch.cat([derived, one]), device)  # (num_steps + 1,)

    def noised(self, i: int, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x at step i from a clean image, in closed form (q(x_t | x_0), Eq. 4): sqrt(abar_i) x0 +
        sqrt(1 - abar_i) eps; x0 itself at i = num_steps (diffusers' `add_noise`)."""
        abar = at(self.alphas_cumprod, i)
        return abar.sqrt().float() * x0 + (1 - abar).sqrt().float() * eps

    def renoise(self, i: int, x_next: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x at step i from x at step i + 1, one forward step q(x_t | x_(t-1)) (Eq. 2):
        sqrt(1 - beta_i) x_next + sqrt(beta_i) z. RePaint's jump back."""
        beta = at(self.betas, i)
        return (1 - beta).sqrt().float() * x_next + beta.sqrt().float() * z

    def predict_x0(self, i: Step, model_output: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """x0_hat at step i from whatever the model predicts, bounded: (B, C, H, W)."""
        abar_t = at(self.alphas_cumprod, i)
        x0_hat = predict_x0(abar_t.sqrt().float(), (1 - abar_t).sqrt().float(), x_t, model_output,
                            self.prediction_type)
        return self.bound(x0_hat)


class Ancestral(Respaced):
    """Ho et al. 2020, Algorithm 2: x_{t-1} = mu_tilde_t(x_t, x0_hat) + sigma_t z.

    The tutorials write it with eps_theta:
        x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps_theta) / sqrt(alpha_t) + sigma_t z,
    which is the same step when x0_hat is not clipped (a test checks it). The code goes through
    x0_hat and the posterior mean, Eq. (7), because clipping x0_hat to [-1, 1] needs it, and
    because v and x0 predictions give x0_hat directly. sigma_t^2 is beta-tilde_t (fixed_small) or
    beta_t (fixed_large), Sec. 3.2; the last step adds no noise. fixed_small_log and fixed_large_log
    are diffusers' names for the same variances computed as exp(log(sigma_t^2) / 2), beta-tilde
    floored at 1e-20 first (diffusers' own fixed_large_log takes the square root of a log, a NaN).
    A model that learns its variance outputs v second: learned_range interpolates log sigma_t^2
    between log beta-tilde_t and log beta_t of the respaced step (Nichol & Dhariwal, Eq. 15, and their
    `respace`), learned takes v as sigma_t^2 itself, as diffusers' DDPMScheduler does.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, timesteps: list[int], prediction_type: str, bound: X0Bound,
                 device: torch.device | str, variance_type: str = "fixed_small") -> None:
        super().__init__(alphas_cumprod, timesteps, prediction_type, bound, device)
        self.variance_type = variance_type
        self.reads_variance = variance_type in LEARNED_VARIANCE_TYPES
        abar = self.alphas_cumprod.cpu()
        if self.reads_variance:
            self.needs_noise = [True] * len(timesteps)
        else:
            self.needs_noise = (self.sigma(self.betas.cpu(), abar[:-1], abar[1:]) > 0).tolist()
        self.needs_noise[-1] = False  # the step to x_0 adds none

    def sigma(self, beta_t: torch.Tensor, abar_t: torch.Tensor, abar_prev: torch.Tensor) -> torch.Tensor:
        """sigma_t, the scale of the step's noise, float32 (elementwise: one step, or all of them). The
        variance is rounded to float32 first, as the schedule stores it, so that the default loop's
        noise scale stays what it has always been, bit for bit."""
        if self.variance_type.startswith("fixed_small"):
            variance = beta_t * (1 - abar_prev) / (1 - abar_t)  # beta-tilde_t, Eq. (7)
        else:
            variance = beta_t
        variance = variance.float().double()
        if self.variance_type.endswith("_log"):  # diffusers' names: the same variance through its log (Glide's)
            return (0.5 * variance.clamp(min=1e-20).log()).exp().float()
        return variance.sqrt().float()

    def learned_sigma(self, v: torch.Tensor, beta_t: torch.Tensor, abar_t: torch.Tensor, abar_prev: torch.Tensor
                      ) -> torch.Tensor:
        """sigma_t per pixel from v, the output's second channel (B, 1, 28, 28), float32: learned_range's
        exp(log sigma_t^2 / 2), with beta-tilde_t floored at 1e-20 as diffusers does; learned's sqrt(v)."""
        if self.variance_type == "learned":
            return v.sqrt()
        beta_tilde = (beta_t * (1 - abar_prev) / (1 - abar_t)).clamp(min=1e-20)  # Eq. (7)
        return (0.5 * learned_range_log_variance(v, beta_t.log().float(), beta_tilde.log().float())).exp()

    def step(self, i: Step, model_output: torch.Tensor, x_t: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        # 1. beta_t, and alpha-bar at t and at t - 1 (the next step's); a learned variance's v
        beta_t, abar_t, abar_prev = at(self.betas, i), at(self.alphas_cumprod, i), at(self.alphas_cumprod, i + 1)
        model_output, v = split_output(model_output, x_t.shape[1])
        # 2. predicted x_0 from the model output (Eq. 15 for epsilon), bounded (clipped or thresholded)
        x0_hat = self.predict_x0(i, model_output, x_t)
        # 3. the posterior mean mu_tilde_t(x_t, x0_hat), Eq. (7)
        coef_x0 = abar_prev.sqrt() * beta_t / (1 - abar_t)
        coef_xt = (1 - beta_t).sqrt() * (1 - abar_prev) / (1 - abar_t)
        x_prev = coef_x0.float() * x0_hat + coef_xt.float() * x_t
        # 4. add noise: + sigma_t z, Algorithm 2 line 4 (sigma_t per pixel where the model learns it)
        if z is None:
            return x_prev
        sigma_t = self.sigma(beta_t, abar_t, abar_prev) if v is None else self.learned_sigma(v, beta_t, abar_t,
                                                                                               abar_prev)
        return x_prev + sigma_t * z


class DDIM(Respaced):
    """Song et al. 2021, Eq. (12): x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - sigma_t^2) eps_hat
    + sigma_t z, with sigma_t(eta) of Eq. (16): eta = 0 is deterministic, eta = 1 ancestral-like.

    eps_hat comes from the unclipped output, as diffusers' DDIMScheduler does. The coefficients come
    from float64 alpha-bars: near t = 0, 1 - abar_{t-1} is about 1e-5, and from a float32 alpha-bar
    it would keep two digits (at eta = 1, the direction's square root none).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, timesteps: list[int], prediction_type: str, bound: X0Bound,
                 device: torch.device | str, eta: float = 0.0) -> None:
        super().__init__(alphas_cumprod, timesteps, prediction_type, bound, device)
        self.eta = eta
        abar = self.alphas_cumprod.cpu()
        self.needs_noise = (self.sigma(abar[:-1], abar[1:]) > 0).tolist()
        self.needs_noise[-1] = False  # the step to x_0 adds none

    def sigma(self, abar_t: torch.Tensor, abar_prev: torch.Tensor) -> torch.Tensor:
        """Eq. (16): sigma_t(eta) = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}), float64."""
        return self.eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)).clamp(min=0).sqrt()

    def step(self, i: Step, model_output: torch.Tensor, x_t: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        # 1. alpha-bar at t and at t - 1 (the next step's), sigma_t(eta)
        abar_t, abar_prev = at(self.alphas_cumprod, i), at(self.alphas_cumprod, i + 1)
        sigma_t = self.sigma(abar_t, abar_prev)
        # 2. predicted x_0, bounded (clipped or thresholded)
        x0_hat = self.predict_x0(i, model_output, x_t)
        # 3. the noise the output implies, unclipped
        eps_hat = predict_eps(abar_t.sqrt().float(), (1 - abar_t).sqrt().float(), x_t, model_output,
                              self.prediction_type)
        # 4. Eq. (12): the x_0 part plus the direction pointing to x_t
        direction = (1 - abar_prev - sigma_t**2).clamp(min=0).sqrt()
        x_prev = abar_prev.float().sqrt() * x0_hat + direction.float() * eps_hat
        # 5. add noise: + sigma_t z (eta > 0)
        return x_prev if z is None else x_prev + sigma_t.float() * z


class DPMSolverPP2M(Respaced):
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2, as k-diffusion's `sample_dpmpp_2m` and diffusers'
    DPMSolverMultistepScheduler (algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True).

    With alpha = sqrt(abar), sigma = sqrt(1 - abar) and lambda = log(alpha / sigma), a step goes from
    s (step i) to t (step i + 1; sigma = 0, the clean image, after the last):
        h = lambda_t - lambda_s,  r = h_last / h,  D = x0_hat + (x0_hat - x0_hat_last) / (2 r),
        x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D.
    The first and last steps are first order (D = x0_hat). Deterministic; its state, the last
    step's x0_hat and h, is a fixed buffer.
    """

    multistep = True

    def __init__(self, alphas_cumprod: torch.Tensor, timesteps: Sequence[float], prediction_type: str,
                 bound: X0Bound, device: torch.device | str) -> None:
        dtype = torch.long if all(float(t).is_integer() for t in timesteps) else torch.float32
        super().__init__(alphas_cumprod, timesteps, prediction_type, bound, device, dtype)
        abar = self.alphas_cumprod.cpu()
        self.lambdas = per_step(abar.sqrt().log() - (1 - abar).sqrt().log(), device)  # +inf after the last step
        second_order = torch.ones(self.num_steps, dtype=torch.bool)
        second_order[0] = second_order[-1] = False  # D = x0_hat at the first step, and at the last (lower_order_final)
        self.second_order = second_order.to(self.lambdas.device)
        self.x0_hat_last: torch.Tensor | None = None
        self.h_last = torch.zeros((), dtype=torch.float64, device=self.lambdas.device)

    def start(self, x_T: torch.Tensor) -> None:
        """Zero the last x0_hat and h (in place: a captured graph keeps their address)."""
        self.x0_hat_last = state_buffer(self.x0_hat_last, x_T)
        self.h_last.zero_()

    def step(self, i: Step, model_output: torch.Tensor, x_s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        # 1. alpha and sigma at s (this step) and t (the next), h = lambda_t - lambda_s
        abar_s, abar_t = at(self.alphas_cumprod, i), at(self.alphas_cumprod, i + 1)
        sigma_s, alpha_t, sigma_t = (1 - abar_s).sqrt(), abar_t.sqrt(), (1 - abar_t).sqrt()
        h = at(self.lambdas, i + 1) - at(self.lambdas, i)
        # 2. predicted x_0 (the data prediction), bounded (clipped or thresholded)
        x0_hat = self.predict_x0(i, model_output, x_s)
        # 3. D = x0_hat + (x0_hat - x0_hat_last) / (2 r), r = h_last / h; at first order, D = x0_hat
        r = self.h_last / h
        data = alpha_t * -torch.expm1(-h)  # -alpha_t (e^-h - 1)
        difference = torch.where(at(self.second_order, i), 0.5 * data / r, 0.0)  # data / (2 r)
        # 4. x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D, with D multiplied out
        x_t = ((sigma_t / sigma_s).float() * x_s + data.float() * x0_hat
               + difference.float() * (x0_hat - self.x0_hat_last))
        # 5. keep x0_hat and h for the next step
        self.x0_hat_last.copy_(x0_hat)
        self.h_last.copy_(h.reshape(()))
        return x_t


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, Eq. (5): num_steps noise levels from sigma_max down to sigma_min, evenly
    spaced in sigma^(1/rho), so denser near sigma_min (rho = 7 in the paper): (num_steps,) float64."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (high + ramp * (low - high)) ** rho


def sigma_to_timestep(sigmas: torch.Tensor, schedule_sigmas: torch.Tensor) -> torch.Tensor:
    """The timestep each sigma belongs to, between integers: log sigma interpolated linearly between
    the schedule's timesteps and clamped to [0, T-1] (diffusers' `_sigma_to_t`). float64."""
    log_sigmas = schedule_sigmas.log().numpy()  # increasing in t
    log_sigma = np.log(np.maximum(sigmas.numpy(), 1e-10))
    return torch.from_numpy(np.interp(log_sigma, log_sigmas, np.arange(len(log_sigmas), dtype=np.float64)))


def sigma_steps(schedule: NoiseSchedule, num_steps: int, spacing: str, sigma_schedule: str
                ) -> tuple[list[float], torch.Tensor]:
    """A sigma sampler's run, as diffusers' Euler, Heun and LMS `set_timesteps`: (the model's timestep
    at each step, descending; sigma at each step and 0 after the last, (num_steps + 1,) float64).

    spaced: the spaced timesteps (linspace unrounded) and their sigmas, interpolated linearly in t.
    karras: Karras et al.'s sigmas between the same two ends, each at the timestep it belongs to."""
    all_sigmas = schedule.sigmas.double().cpu()
    timesteps = torch.tensor(spaced_timesteps(schedule.num_timesteps, num_steps, spacing, fractional=True),
                             dtype=torch.float64)
    sigmas = torch.from_numpy(np.interp(timesteps.numpy(), np.arange(len(all_sigmas)), all_sigmas.numpy()))
    if sigma_schedule == "karras":
        sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), num_steps)
        timesteps = sigma_to_timestep(sigmas, all_sigmas)
    return timesteps.tolist(), torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


class SigmaSampler(Sampler):
    """A sampler in the sigma view: on x = x_t / sqrt(abar_t) = x0 + sigma_t eps, sigma_t =
    sqrt((1 - abar_t) / abar_t) (`NoiseSchedule.sigmas`), the variable of Karras et al. 2022 and of
    diffusers' Euler, Heun and LMS schedulers. Its three moves:

    - x_T = init_noise_sigma * z. The ancestral loop starts at x_t = z, which is x = sqrt(sigma_T^2 + 1) z
      here: diffusers starts there when the timesteps are `leading`, and at sigma_max z (14.6146 z for
      scaled_linear, against 14.6488 z) for trailing and linspace, as k-diffusion does. So do we.
    - The model sees x / sqrt(sigma^2 + 1) = x_t, the input it was trained on (`scale_model_input`).
    - Each step follows the probability-flow ODE dx/dsigma = (x - x0_hat) / sigma (Karras et al.,
      Eq. 4 with sigma(t) = t) from sigma_i towards sigma_(i+1), the last to sigma = 0: x0_hat itself.

    `sigmas[i]` is the sigma of step i, float64, and 0 after the last; `call_sigma(i)` that of model
    call i (one per step, but for Heun's).
    """

    def __init__(self, timesteps: Sequence[float], sigmas: torch.Tensor, spacing: str, prediction_type: str,
                 bound: X0Bound, device: torch.device | str) -> None:
        super().__init__(timesteps, prediction_type, bound, device, dtype=torch.float32)
        top = float(sigmas.max())
        self.init_noise_sigma = top if spacing in ("linspace", "trailing") else math.sqrt(top**2 + 1)
        self.noise_levels = sigmas[:-1]  # the sigma of each model call, float64
        self.sigmas = per_step(sigmas, device)  # (num_steps + 1,)

    def call_sigma(self, i: Step) -> torch.Tensor:
        """The sigma of model call i, float64."""
        return at(self.sigmas, i)

    def noised(self, i: int, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x at step i from a clean image, in closed form: x0 + sigma_i eps (x0 itself at i = num_steps)."""
        return x0 + at(self.sigmas, i).float() * eps

    def renoise(self, i: int, x_next: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x at step i from x at step i + 1: x_next + sqrt(sigma_i^2 - sigma_(i+1)^2) z. RePaint's jump back."""
        return x_next + (at(self.sigmas, i) ** 2 - at(self.sigmas, i + 1) ** 2).sqrt().float() * z

    def model_input(self, i: Step, x: torch.Tensor) -> torch.Tensor:
        """x_t = x / sqrt(sigma^2 + 1): the model was trained on x_t."""
        return x * (self.call_sigma(i) ** 2 + 1).rsqrt().float()

    def predict_x0(self, i: Step, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x0_hat at call i from whatever the model predicts, bounded: (B, C, H, W)."""
        return self.bound(predict_x0_from_sigma(self.call_sigma(i).float(), x, model_output, self.prediction_type))

    def slope(self, i: Step, model_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The ODE's dx/dsigma = (x - x0_hat) / sigma at call i."""
        return (x - self.predict_x0(i, model_output, x)) / self.call_sigma(i).float()


class Euler(SigmaSampler):
    """Euler's method on the ODE, as k-diffusion's `sample_euler` and diffusers' EulerDiscreteScheduler:
        x_(i+1) = x_i + (sigma_(i+1) - sigma_i) (x_i - x0_hat) / sigma_i."""

    def step(self, i: Step, model_output: torch.Tensor, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        # 1. x0_hat (bounded) and the slope (x - x0_hat) / sigma, 2. a step of Euler's method
        dt = at(self.sigmas, i + 1) - at(self.sigmas, i)
        return x + self.slope(i, model_output, x) * dt.float()


class EulerAncestral(SigmaSampler):
    """Euler down to sigma_down, then fresh noise back up to sigma_(i+1), as k-diffusion's
    `sample_euler_ancestral` (eta 1) and diffusers' EulerAncestralDiscreteScheduler:
        sigma_up = sqrt(sigma_(i+1)^2 (sigma_i^2 - sigma_(i+1)^2) / sigma_i^2),
        sigma_down = sqrt(sigma_(i+1)^2 - sigma_up^2),
        x_(i+1) = x_i + (sigma_down - sigma_i) (x_i - x0_hat) / sigma_i + sigma_up z.
    The ancestral step of the sigma view: its noise is drawn per image, so images do not depend on the batch."""

    def __init__(self, timesteps: list[float], sigmas: torch.Tensor, spacing: str, prediction_type: str,
                 bound: X0Bound, device: torch.device | str) -> None:
        super().__init__(timesteps, sigmas, spacing, prediction_type, bound, device)
        self.needs_noise = (self.sigma_up(sigmas[:-1], sigmas[1:]) > 0).tolist()  # the last step, to 0, adds none

    @staticmethod
    def sigma_up(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """sigma_up, float64 (elementwise: one step, or all of them)."""
        return (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2).sqrt()

    def step(self, i: Step, model_output: torch.Tensor, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        sigma, sigma_next = at(self.sigmas, i), at(self.sigmas, i + 1)
        sigma_up = self.sigma_up(sigma, sigma_next)
        sigma_down = (sigma_next**2 - sigma_up**2).sqrt()
        # 1. Euler's step to sigma_down, 2. noise up to sigma_(i+1)
        x_next = x + self.slope(i, model_output, x) * (sigma_down - sigma).float()
        return x_next if z is None else x_next + z * sigma_up.float()


class Heun(SigmaSampler):
    """Heun's method, Karras et al. 2022, Algorithm 1 (no churn), as diffusers' HeunDiscreteScheduler:
    an Euler step from sigma_i to sigma_(i+1) (one model call), then the slope there (a second call)
    averaged with the first, and the step taken again from x_i with it. The last step, to sigma = 0,
    stays Euler's. So a run of n steps makes 2n - 1 model calls, and its loop has that many: call j
    belongs to step j // 2 and is at sigma_(ceil(j/2)), first order for even j. The saved x_i and
    slope are fixed buffers."""

    multistep = True

    def __init__(self, timesteps: list[float], sigmas: torch.Tensor, spacing: str, prediction_type: str,
                 bound: X0Bound, device: torch.device | str) -> None:
        calls = torch.arange(2 * len(timesteps) - 1)
        level = (calls + 1) // 2  # call j evaluates at sigma_(ceil(j/2))
        super().__init__([timesteps[k] for k in level.tolist()], sigmas, spacing, prediction_type, bound, device)
        self.noise_levels = sigmas[level]
        self.first = (calls % 2 == 0).to(device)  # a first-order (Euler) call; odd calls correct it
        self.saved_x: torch.Tensor | None = None
        self.saved_slope: torch.Tensor | None = None

    def call_sigma(self, i: Step) -> torch.Tensor:
        """The sigma of model call i: sigma_(ceil(i/2))."""
        return at(self.sigmas, (i + 1) // 2)

    def start(self, x_T: torch.Tensor) -> None:
        """Zero the saved x_i and slope (in place: a captured graph keeps their address)."""
        self.saved_x, self.saved_slope = state_buffer(self.saved_x, x_T), state_buffer(self.saved_slope, x_T)

    def step(self, i: Step, model_output: torch.Tensor, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        first, step = at(self.first, i), i // 2
        dt = (at(self.sigmas, step + 1) - at(self.sigmas, step)).float()
        slope = self.slope(i, model_output, x)
        # first order: Euler from x_i; second: from the saved x_i with the mean of both slopes
        x_next = torch.where(first, x + slope * dt, self.saved_x + (self.saved_slope + slope) / 2 * dt)
        self.saved_x.copy_(torch.where(first, x, self.saved_x))
        self.saved_slope.copy_(torch.where(first, slope, self.saved_slope))
        return x_next


LMS_ORDER = 4
GAUSS_LEGENDRE = np.polynomial.legendre.leggauss(LMS_ORDER)  # exact for polynomials of degree < 2 * LMS_ORDER


def lms_coefficients(sigmas: torch.Tensor, order: int = LMS_ORDER) -> torch.Tensor:
    """The linear multistep weights: (num_steps, order) float64, row i's entry j the weight of the
    slope of step i - j. It is the integral from sigma_i to sigma_(i+1) of the Lagrange polynomial
    through sigma_i, ..., sigma_(i-q+1) that is 1 at sigma_(i-j) (q = min(i + 1, order)), as
    diffusers' LMSDiscreteScheduler integrates it with scipy; the polynomial has degree < order, so
    Gauss-Legendre quadrature with `order` nodes is exact."""
    s = sigmas.tolist()
    nodes, weights = GAUSS_LEGENDRE
    table = torch.zeros(len(s) - 1, order, dtype=torch.float64)
    for i in range(len(s) - 1):
        q = min(i + 1, order)
        half = (s[i + 1] - s[i]) / 2
        taus = [half * node + (s[i] + s[i + 1]) / 2 for node in nodes]
        for j in range(q):
            others = [k for k in range(q) if k != j]
            values = [math.prod((tau - s[i - k]) / (s[i - j] - s[i - k]) for k in others) for tau in taus]
            table[i, j] = half * sum(w * v for w, v in zip(weights, values, strict=True))
    return table


class LMS(SigmaSampler):
    """Linear multistep of order 4 on the ODE, as diffusers' LMSDiscreteScheduler (k-diffusion's
    `sample_lms`): x_(i+1) = x_i + sum_j c_ij slope_(i-j) over the last four slopes (`lms_coefficients`;
    fewer at the first steps). The slopes are a fixed buffer, newest first."""

    multistep = True

    def __init__(self, timesteps: list[float], sigmas: torch.Tensor, spacing: str, prediction_type: str,
                 bound: X0Bound, device: torch.device | str) -> None:
        super().__init__(timesteps, sigmas, spacing, prediction_type, bound, device)
        # integrals over up to four sigmas (`lms_coefficients`), computed once on the host: no formula
        # of step i's own sigmas, so the step reads them from this table
        self.coefficients = lms_coefficients(sigmas).float().to(device)  # (num_steps, 4)
        self.slopes: torch.Tensor | None = None  # (4, B, C, H, W): slope_i, slope_(i-1), ...

    def start(self, x_T: torch.Tensor) -> None:
        """Zero the slopes (in place: a captured graph keeps their address)."""
        self.slopes = state_buffer(self.slopes, x_T.expand(LMS_ORDER, *x_T.shape))

    def step(self, i: Step, model_output: torch.Tensor, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        # 1. this step's slope, newest first among the last four
        self.slopes.copy_(torch.cat([self.slope(i, model_output, x)[None], self.slopes[:-1]]))
        # 2. their weighted sum: the integral of the polynomial through them
        weights = self.coefficients.index_select(0, torch.as_tensor(i, device=x.device).reshape(-1))
        return x + (weights.reshape(LMS_ORDER, 1, 1, 1, 1) * self.slopes).sum(0)


SAMPLERS = {  # one per sampler_names.SAMPLER_NAMES
    "ancestral": Ancestral, "ddim": DDIM, "dpmpp_2m": DPMSolverPP2M,
    "euler": Euler, "euler_ancestral": EulerAncestral, "heun": Heun, "lms": LMS,
}


def make_sampler(name: str, schedule: NoiseSchedule, num_steps: int, *, prediction_type: str = "epsilon",
                 variance_type: str = "fixed_small", clip_sample: bool = True, clip_sample_range: float = 1.0,
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 eta: float = 0.0, timestep_spacing: str = "leading", sigma_schedule: str = "spaced",
                 device: torch.device | str = "cpu") -> Sampler:
    """The sampler `name` over `num_steps` steps of `schedule` (timesteps picked by `timestep_spacing`,
    noise levels by `sigma_schedule`), with x0_hat clipped or thresholded as asked."""
    T = schedule.num_timesteps
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}")
    if not min_steps(name) <= num_steps <= max_steps(name, T):
        raise ValueError(f"{name} takes {min_steps(name)} to {max_steps(name, T)} steps, got {num_steps}")
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"unknown variance type {variance_type!r}")
    if sigma_schedule not in SIGMA_SCHEDULES or (sigma_schedule == "karras" and name not in KARRAS_SAMPLERS):
        raise ValueError(f"{name} cannot step in sigma_schedule {sigma_schedule!r}")
    bound = X0Bound(clip_range=clip_sample_range if clip_sample and not thresholding else None,
                    threshold_ratio=dynamic_thresholding_ratio if thresholding else None, max_value=sample_max_value)
    if name in SIGMA_SAMPLERS:
        timesteps, sigmas = sigma_steps(schedule, num_steps, timestep_spacing, sigma_schedule)
        return SAMPLERS[name](timesteps, sigmas, timestep_spacing, prediction_type, bound, device)
    timesteps, abar = respaced_steps(name, schedule, num_steps, timestep_spacing, sigma_schedule)
    if name == "ancestral":
        return Ancestral(abar, timesteps, prediction_type, bound, device, variance_type=variance_type)
    if name == "ddim":
        return DDIM(abar, timesteps, prediction_type, bound, device, eta=eta)
    return DPMSolverPP2M(abar, timesteps, prediction_type, bound, device)


def respaced_steps(name: str, schedule: NoiseSchedule, num_steps: int, spacing: str, sigma_schedule: str
                   ) -> tuple[list[float], torch.Tensor]:
    """(the model's timesteps, descending; the alpha-bar of each step, float64) of a sampler on x_t.
    dpmpp_2m with karras steps through Karras et al.'s sigmas over the schedule's whole range
    (abar = 1 / (sigma^2 + 1)) at the timesteps they belong to, between integers, as diffusers'
    DPMSolverMultistepScheduler with use_karras_sigmas (which rounds them, but for its cosine)."""
    T = schedule.num_timesteps
    if sigma_schedule == "karras":
        all_sigmas = schedule.sigmas.double().cpu()
        sigmas = karras_sigmas(float(all_sigmas[0]), float(all_sigmas[-1]), num_steps)
        return sigma_to_timestep(sigmas, all_sigmas).tolist(), 1 / (sigmas**2 + 1)
    timesteps = (dpm_solver_timesteps if name == "dpmpp_2m" else spaced_timesteps)(T, num_steps, spacing)
    return timesteps, alphas_cumprod_float64(schedule)[torch.tensor(timesteps)]


def sampler_for(cfg: Config, device: torch.device | str) -> Sampler:
    """The sampler a config's `sample` section describes, for its schedule and prediction type."""
    s = cfg.sample
    return make_sampler(s.sampler, make_schedule(cfg.schedule).to(device), cfg.reverse_steps,
                        prediction_type=cfg.model.prediction_type, variance_type=s.variance_type,
                        clip_sample=s.clip_sample, clip_sample_range=s.clip_sample_range,
                        thresholding=s.thresholding, dynamic_thresholding_ratio=s.dynamic_thresholding_ratio,
                        sample_max_value=s.sample_max_value, eta=s.eta, timestep_spacing=s.timestep_spacing,
                        sigma_schedule=s.sigma_schedule, device=device)


IMAGE_SHAPE = (1, 28, 28)
NOISE_CHUNK = 50  # steps of noise drawn at once per image; fixed, so the streams never change


class NoiseSource:
    """Per-image Gaussian noise: x_T, then one z per noisy step, for images `indices`. Image k's noise
    comes from its own generator, seeded from (seed, stream, k): it does not depend on the batch."""

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device, stream: int = SAMPLE_NOISE) -> None:
        self.device = device
        self.generators = [
            torch.Generator(device=device).manual_seed(derive_seed(seed, stream, k)) for k in indices
        ]
        self._chunk: torch.Tensor | None = None
        self._used = NOISE_CHUNK

    def _draw(self, count: int) -> torch.Tensor:
        shape = (count, *IMAGE_SHAPE)
        draws = [torch.randn(shape, generator=g, device=self.device) for g in self.generators]
        return torch.stack(draws, dim=1)  # (count, B, 1, 28, 28)

    def initial(self) -> torch.Tensor:
        """x_T ~ N(0, I): (B, 1, 28, 28). Call once, first."""
        return self._draw(1)[0]

    def next(self) -> torch.Tensor:
        """The next step's z ~ N(0, I): (B, 1, 28, 28)."""
        if self._used == NOISE_CHUNK:
            self._chunk, self._used = self._draw(NOISE_CHUNK), 0
        z = self._chunk[self._used]
        self._used += 1
        return z
