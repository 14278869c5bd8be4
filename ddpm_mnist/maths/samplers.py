"""The reverse process, one class per sampler: from x_T ~ N(0, I) to an image, step by step.

    Ancestral      Ho et al. 2020, Algorithm 2 (the default, and the 1000-step reference loop)
    DDIM           Song et al. 2021, Eq. (12), with eta
    DPMSolverPP2M  Lu et al. 2022, DPM-Solver++(2M), Algorithm 2

Step i of a run (0 = the noisiest) is timestep `timesteps[i]`. A run of fewer than T steps uses
the schedule respaced to its timesteps (`schedule.respace`), whose index k = num_steps - 1 - i
names the same buffers (posterior_mean_coef1, ...) the full loop reads. Each sampler computes its
tables once, in step order and on the device, so that a CUDA graph can replay a step with only i
and z changing; its state, if any, is a fixed buffer that `start` resets in place. Adding a sampler
is one class here and one line in `SAMPLERS`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ddpm_mnist.config import Config
from ddpm_mnist.config.sampler_names import max_steps
from ddpm_mnist.maths.diffusion import at, dpm_solver_timesteps, predict_eps, predict_x0, spaced_timesteps
from ddpm_mnist.maths.schedule import NoiseSchedule, alphas_cumprod_float64, make_schedule, respace
from ddpm_mnist.rng import SAMPLE_NOISE, derive_seed

Step = int | torch.Tensor  # a step index, or a 1-element int64 tensor on the device (CUDA-graph replay)


class Sampler:
    """What every sampler shares: its timesteps, the respaced schedule, x0_hat and its clipping."""

    def __init__(self, schedule: NoiseSchedule, timesteps: list[int], prediction_type: str,
                 clip_range: float | None, device: torch.device | str) -> None:
        self.timesteps = torch.tensor(timesteps, dtype=torch.long, device=device)  # step i -> t, descending
        self.schedule = respace(schedule, timesteps[::-1]).to(device)  # index k -> timesteps[num_steps - 1 - k]
        self.prediction_type, self.clip_range = prediction_type, clip_range
        self.needs_noise = [False] * len(timesteps)  # whether step i adds sigma z, read once on the host

    @property
    def num_steps(self) -> int:
        """Number of reverse steps."""
        return len(self.timesteps)

    def predict_x0(self, i: Step, model_output: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """x0_hat at step i from whatever the model predicts, clipped if asked: (B, C, H, W)."""
        x0_hat = predict_x0(self.schedule, self.num_steps - 1 - i, x_t, model_output, self.prediction_type)
        return x0_hat if self.clip_range is None else x0_hat.clamp(-self.clip_range, self.clip_range)

    def start(self, x_T: torch.Tensor) -> None:
        """Reset the state of a run from x_T (none, but for a multistep sampler)."""

    def step(self, i: Step, model_output: torch.Tensor, x_t: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """x at step i + 1 from x_t at step i; z ~ N(0, I) where `needs_noise[i]` (else None or zeros)."""
        raise NotImplementedError


class Ancestral(Sampler):
    """Ho et al. 2020, Algorithm 2: x_{t-1} = mu_tilde_t(x_t, x0_hat) + sigma_t z.

    The tutorials write it with eps_theta:
        x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps_theta) / sqrt(alpha_t) + sigma_t z,
    which is the same step when x0_hat is not clipped (a test checks it). The code goes through
    x0_hat and the posterior mean, Eq. (7), because clipping x0_hat to [-1, 1] needs it, and
    because v and x0 predictions give x0_hat directly. sigma_t^2 is beta-tilde_t (fixed_small) or
    beta_t (fixed_large), Sec. 3.2; the last step adds no noise.
    """

    def __init__(self, schedule: NoiseSchedule, timesteps: list[int], prediction_type: str,
                 clip_range: float | None, device: torch.device | str, variance_type: str = "fixed_small") -> None:
        super().__init__(schedule, timesteps, prediction_type, clip_range, device)
        variance = self.schedule.posterior_variance if variance_type == "fixed_small" else self.schedule.betas
        sigmas = variance.double().sqrt()
        sigmas[0] = 0.0  # k = 0: the step to x_0
        self.sigmas = sigmas.float()
        self.needs_noise = (self.sigmas > 0).tolist()[::-1]

    def step(self, i: Step, model_output: torch.Tensor, x_t: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        s, k = self.schedule, self.num_steps - 1 - i
        # 1. predicted x_0 from the model output (Eq. 15 for epsilon), 2. clipped
        x0_hat = self.predict_x0(i, model_output, x_t)
        # 3. the posterior mean mu_tilde_t(x_t, x0_hat), Eq. (7)
        x_prev = at(s.posterior_mean_coef1, k) * x0_hat + at(s.posterior_mean_coef2, k) * x_t
        # 4. add noise: + sigma_t z, Algorithm 2 line 4
        return x_prev if z is None else x_prev + at(self.sigmas, k) * z


class DDIM(Sampler):
    """Song et al. 2021, Eq. (12): x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - sigma_t^2) eps_hat
    + sigma_t z, with sigma_t(eta) of Eq. (16): eta = 0 is deterministic, eta = 1 ancestral-like.

    eps_hat comes from the unclipped output, as diffusers' DDIMScheduler does. The tables come
    from float64 alpha-bars: near t = 0, 1 - abar_{t-1} is about 1e-5, and from a float32
    alpha-bar it would keep two digits (at eta = 1, the direction's square root none).
    """

    def __init__(self, schedule: NoiseSchedule, timesteps: list[int], prediction_type: str,
                 clip_range: float | None, device: torch.device | str, eta: float = 0.0) -> None:
        super().__init__(schedule, timesteps, prediction_type, clip_range, device)
        abar = alphas_cumprod_float64(schedule)[torch.tensor(timesteps[::-1])]
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        # Eq. (16): sigma_t(eta) = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1})
        sigmas = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).clamp(min=0).sqrt()
        # Eq. (12): the coefficient of eps_hat, the "direction pointing to x_t"
        self.direction = (1 - abar_prev - sigmas**2).clamp(min=0).sqrt().float().to(device)
        sigmas[0] = 0.0  # k = 0: the step to x_0
        self.sigmas = sigmas.float().to(device)
        self.needs_noise = (self.sigmas > 0).tolist()[::-1]

    def step(self, i: Step, model_output: torch.Tensor, x_t: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        s, k = self.schedule, self.num_steps - 1 - i
        # 1. predicted x_0, 2. clipped
        x0_hat = self.predict_x0(i, model_output, x_t)
        # 3. the noise the output implies, unclipped
        eps_hat = predict_eps(s, k, x_t, model_output, self.prediction_type)
        # 4. Eq. (12): the x_0 part plus the direction pointing to x_t
        x_prev = at(s.alphas_cumprod_prev, k).sqrt() * x0_hat + at(self.direction, k) * eps_hat
        # 5. add noise: + sigma_t z (eta > 0)
        return x_prev if z is None else x_prev + at(self.sigmas, k) * z


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2, as diffusers' DPMSolverMultistepScheduler
    (algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True).

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma) and h = lambda_t -
    lambda_s for the step from s = t_i to t = t_(i+1) (to sigma = 0, the clean image, at the last):
        x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^-h) D,  D = x0_hat + (x0_hat - x0_hat_prev) / (2 r),
    r = h_prev / h. The first and last steps are first order (D = x0_hat). Deterministic; its state,
    the previous step's x0_hat, is a fixed buffer.
    """

    def __init__(self, schedule: NoiseSchedule, timesteps: list[int], prediction_type: str,
                 clip_range: float | None, device: torch.device | str) -> None:
        super().__init__(schedule, timesteps, prediction_type, clip_range, device)
        abar_s = alphas_cumprod_float64(schedule)[torch.tensor(timesteps)]
        abar_t = torch.cat([abar_s[1:], torch.ones(1, dtype=torch.float64)])  # sigma = 0 after the last step
        alpha_s, sigma_s, alpha_t, sigma_t = abar_s.sqrt(), (1 - abar_s).sqrt(), abar_t.sqrt(), (1 - abar_t).sqrt()
        h = (alpha_t.log() - sigma_t.log()) - (alpha_s.log() - sigma_s.log())  # inf at the last step: e^-h = 0
        r = torch.cat([torch.full((1,), torch.inf, dtype=torch.float64), h[:-1]]) / h
        second_order = torch.ones_like(h, dtype=torch.bool)
        second_order[0] = second_order[-1] = False
        self.sigma_ratio = (sigma_t / sigma_s).float().to(device)  # sigma_t / sigma_s, 0 at the last step
        self.data_coef = (alpha_t * -torch.expm1(-h)).float().to(device)  # alpha_t (1 - e^-h)
        difference = torch.where(second_order, 0.5 * alpha_t * -torch.expm1(-h) / r, torch.zeros_like(h))
        self.difference_coef = difference.nan_to_num(nan=0.0).float().to(device)  # alpha_t (1 - e^-h) / (2 r)
        self.previous: torch.Tensor | None = None  # x0_hat of the step before

    def start(self, x_T: torch.Tensor) -> None:
        """Zero the previous x0_hat, in place when its buffer fits (a captured graph keeps its address)."""
        if self.previous is not None and self.previous.shape == x_T.shape and self.previous.device == x_T.device:
            self.previous.zero_()
        else:
            self.previous = torch.zeros_like(x_T)

    def step(self, i: Step, model_output: torch.Tensor, x_t: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        # 1. predicted x_0, 2. clipped
        x0_hat = self.predict_x0(i, model_output, x_t)
        # 3. the data prediction, corrected by its change since the last step (0 at first order)
        x_prev = (at(self.sigma_ratio, i) * x_t + at(self.data_coef, i) * x0_hat
                  + at(self.difference_coef, i) * (x0_hat - self.previous))
        # 4. keep this step's x0_hat for the next
        self.previous.copy_(x0_hat)
        return x_prev


SAMPLERS = {"ancestral": Ancestral, "ddim": DDIM, "dpmpp_2m": DPMSolverPP2M}  # one per sampler_names.SAMPLER_NAMES


def make_sampler(name: str, schedule: NoiseSchedule, num_steps: int, *, prediction_type: str = "epsilon",
                 variance_type: str = "fixed_small", clip_sample: bool = True, clip_sample_range: float = 1.0,
                 eta: float = 0.0, timestep_spacing: str = "leading", device: torch.device | str = "cpu") -> Sampler:
    """The sampler `name` over `num_steps` timesteps of `schedule` (picked by `timestep_spacing`)."""
    T = schedule.num_timesteps
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}")
    if not 1 <= num_steps <= max_steps(name, T):
        raise ValueError(f"{name} takes 1 to {max_steps(name, T)} steps, got {num_steps}")
    if variance_type not in ("fixed_small", "fixed_large"):
        raise ValueError(f"unknown variance type {variance_type!r}")
    pick = dpm_solver_timesteps if name == "dpmpp_2m" else spaced_timesteps
    common = (schedule, pick(T, num_steps, timestep_spacing), prediction_type,
              clip_sample_range if clip_sample else None, device)
    if name == "ancestral":
        return Ancestral(*common, variance_type=variance_type)
    return DDIM(*common, eta=eta) if name == "ddim" else DPMSolverPP2M(*common)


def sampler_for(cfg: Config, device: torch.device | str) -> Sampler:
    """The sampler a config's `sample` section describes, for its schedule and prediction type."""
    s = cfg.sample
    return make_sampler(s.sampler, make_schedule(cfg.schedule).to(device), cfg.reverse_steps,
                        prediction_type=cfg.model.prediction_type, variance_type=s.variance_type,
                        clip_sample=s.clip_sample, clip_sample_range=s.clip_sample_range, eta=s.eta,
                        timestep_spacing=s.timestep_spacing, device=device)


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
