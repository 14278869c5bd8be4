"""The variational bound on the negative log-likelihood (Ho et al. 2020, Eq. 5), in bits per dimension.

With the timesteps 0-indexed (t = 0 is the first noising step, as everywhere in this package):

    L = L_prior + sum over t >= 1 of L_t + L_decoder
    L_prior   = KL(q(x_T | x_0) || N(0, I))                     (no parameter: the schedule's end)
    L_t       = KL(q(x_(t-1) | x_t, x_0) || p_theta(x_(t-1) | x_t))   (the true posterior, Eq. 7,
                against the model's step: both Gaussian, so in closed form)
    L_decoder = -log p_theta(x_0 | x_1), a Gaussian discretized to the 256 grey levels on [-1, 1]
                (Sec. 3.3), at the step from timestep t = 0

Each term is in nats summed over the image's pixels; `bits_per_dim` divides by D log 2 (D = 784).
The formulas are those of improved-diffusion (`losses.py`: `normal_kl`,
`discretized_gaussian_log_likelihood`), but for the normal CDF, which is exact here
(`torch.special.log_ndtr`, accurate in the tails) where improved-diffusion uses a tanh
approximation and floors a bin's mass at 1e-12. Everything is float64: the KL terms are
differences of numbers near 1 at small t. The hybrid loss (`diffusion.training_losses`) trains a
learned variance on the same terms; `bound.py` sums them over a model's timesteps.
"""

from __future__ import annotations

import math

import torch

from ddpm_mnist.maths.schedule import NoiseSchedule, alphas_cumprod_float64

BIN = 1 / 255  # half a grey level on [-1, 1]: 256 levels 2/255 apart


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
              ) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats (broadcasting):
    (logvar2 - logvar1 + (e^logvar1 + (mean1 - mean2)^2) / e^logvar2 - 1) / 2."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
                                        ) -> torch.Tensor:
    """log P(x) per pixel, in nats, of a Gaussian (mean, e^log_scale) discretized to the 256 grey
    levels x in {-1, -1 + 2/255, ..., 1} (Ho et al., Eq. 13): the probability of the bin
    [x - 1/255, x + 1/255], with the edge bins reaching to -inf (x = -1) and +inf (x = 1)."""
    inv_std = torch.exp(-log_scale)
    upper, lower = inv_std * (x - mean + BIN), inv_std * (x - mean - BIN)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X <= x + 1/255): the bottom bin
    log_survival_lower = torch.special.log_ndtr(-lower)  # log P(X > x - 1/255): the top bin
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_survival_lower,
                                                              log_normal_mass(lower, upper)))


def log_normal_mass(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for lower < upper, accurate in both tails: computed on the side
    where both CDFs are small (Phi(u) - Phi(l) = Phi(-l) - Phi(-u)), as log Phi(a) + log(1 - Phi(b) /
    Phi(a)). improved-diffusion floors the difference at 1e-12 instead, which understates the cost
    of a pixel the model puts far in a tail."""
    mirror = lower > 0
    a, b = torch.where(mirror, -lower, upper), torch.where(mirror, -upper, lower)  # Phi(a) > Phi(b), both lower-tail
    log_a, log_b = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    return log_a + torch.log(-torch.expm1(log_b - log_a))


def posterior_mean_log_variance(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """q(x_(t-1) | x_t, x_0) (Eq. 7): its mean, and the log of beta-tilde_t, float64 ((B, 1, 1, 1)
    for the variance). At t = 0, where beta-tilde is 0, the log takes t = 1's value, as
    improved-diffusion clips it (the decoder term replaces the KL there)."""
    coef1 = schedule.posterior_mean_coef1.double()[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    coef2 = schedule.posterior_mean_coef2.double()[t].view(-1, 1, 1, 1)
    return coef1 * x0 + coef2 * x_t, log_posterior_variance(schedule)[t].view(-1, 1, 1, 1)


def log_posterior_variance(schedule: NoiseSchedule) -> torch.Tensor:
    """log beta-tilde_t, (T,) float64, with t = 0 given t = 1's value (beta-tilde_0 = 0)."""
    b = schedule.betas.double()
    abar = alphas_cumprod_float64(schedule).to(b.device)  # 1 - abar_t near t = 0 needs float64's digits
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64, device=b.device), abar[:-1]])
    variance = b * (1 - abar_prev) / (1 - abar)
    if len(variance) > 1:
        variance[0] = variance[1]
    return variance.log()


def log_betas(schedule: NoiseSchedule) -> torch.Tensor:
    """log beta_t, (T,) float64: the upper end of a learned_range variance."""
    return schedule.betas.double().log()


def fixed_log_variance(schedule: NoiseSchedule, variance_type: str) -> torch.Tensor:
    """The log variance of a model step with a fixed variance, (T,) float64: beta-tilde_t (fixed_small,
    t = 0 taking t = 1's value) or beta_t (fixed_large, t = 0 taking beta-tilde_1, as improved-diffusion
    sets it, so that the decoder is not wider than the data's bins need)."""
    if variance_type.startswith("fixed_small"):
        return log_posterior_variance(schedule)
    log_beta = log_betas(schedule)
    if len(log_beta) > 1:
        log_beta[0] = log_posterior_variance(schedule)[1]
    return log_beta


def prior_nats(schedule: NoiseSchedule, x0: torch.Tensor) -> torch.Tensor:
    """L_prior = KL(q(x_T | x_0) || N(0, I)) summed over pixels, (B,) float64 nats."""
    abar_T = schedule.alphas_cumprod.double()[-1]
    mean, logvar = abar_T.sqrt() * x0.double(), torch.log1p(-abar_T) * torch.ones_like(x0, dtype=torch.float64)
    return normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(mean)).flatten(1).sum(1)


def step_nats(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
              model_mean: torch.Tensor, model_log_variance: torch.Tensor) -> torch.Tensor:
    """L_t for t >= 1 (the posterior's KL to the model's step) and L_decoder for t = 0, summed over
    pixels: (B,) float64 nats. model_mean: (B, 1, 28, 28); model_log_variance broadcasting to it."""
    x0, x_t, model_mean = x0.double(), x_t.double(), model_mean.double()
    true_mean, true_log_variance = posterior_mean_log_variance(schedule, x0, x_t, t)
    kl = normal_kl(true_mean, true_log_variance, model_mean, model_log_variance).flatten(1).sum(1)
    decoder = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance).flatten(1).sum(1)
    return torch.where(t == 0, decoder, kl)


def bits_per_dim(nats: torch.Tensor, dims: int) -> torch.Tensor:
    """Nats per image as bits per dimension."""
    return nats / (dims * math.log(2))
