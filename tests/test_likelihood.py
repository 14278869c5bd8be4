"""The terms of the variational bound against direct float64 computations."""

from __future__ import annotations

import math

import pytest
import torch

from ddpm_mnist.config import ScheduleConfig
from ddpm_mnist.maths.bound import bound, strata
from ddpm_mnist.maths.likelihood import (
    discretized_gaussian_log_likelihood,
    fixed_log_variance,
    normal_kl,
    posterior_mean_log_variance,
    prior_nats,
    step_nats,
)
from ddpm_mnist.maths.schedule import make_schedule


@pytest.mark.parametrize(("m1", "v1", "m2", "v2"), [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 2.0),
                                                    (1.0, 1e-4, 0.99, 2e-4), (-2.0, 3.0, 1.0, 0.1)])
def test_normal_kl_against_quadrature(m1: float, v1: float, m2: float, v2: float) -> None:
    """KL = E_p[log p - log q], by the trapezoid rule over +-12 standard deviations of p (float64):
    within 1e-7 relative of the closed form (worst case here about 1e-9)."""
    s1 = math.sqrt(v1)
    x = torch.linspace(m1 - 12 * s1, m1 + 12 * s1, 400_001, dtype=torch.float64)
    log_p = -0.5 * math.log(2 * math.pi * v1) - (x - m1) ** 2 / (2 * v1)
    log_q = -0.5 * math.log(2 * math.pi * v2) - (x - m2) ** 2 / (2 * v2)
    direct = float(torch.trapezoid(log_p.exp() * (log_p - log_q), x))
    closed = float(normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m1, math.log(v1), m2, math.log(v2)))))
    assert closed == pytest.approx(direct, rel=1e-7, abs=1e-12)


def phi(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2))  # erfc: accurate in the lower tail


def bin_mass(lower: float, upper: float) -> float:
    """Phi(upper) - Phi(lower), on the side where both are small (so accurate in either tail)."""
    return phi(upper) - phi(lower) if upper <= 0 else phi(-lower) - phi(-upper)


@pytest.mark.parametrize("scale", [0.5, 0.05, 0.003])
def test_the_discretized_gaussian_is_the_mass_of_its_bin(scale: float) -> None:
    """log P(bin of x) against math.erfc in float64 (within 1e-9 relative), for the edge bins (to
    -inf and +inf) and middle ones, far into the tails; the 256 bins' masses add up to 1."""
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the grey levels on [-1, 1]
    mean, log_scale = torch.tensor(0.37, dtype=torch.float64), torch.tensor(math.log(scale), dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(levels, mean, log_scale)
    assert bool(torch.isfinite(logp).all())
    checked = 0
    for k in (0, 1, 100, 170, 173, 174, 175, 176, 180, 254, 255):
        x = float(levels[k])
        lower = -math.inf if k == 0 else (x - 1 / 255 - 0.37) / scale
        upper = math.inf if k == 255 else (x + 1 / 255 - 0.37) / scale
        mass = bin_mass(lower, upper)
        if mass > 1e-300:  # below, float64 cannot hold the reference; the value must still be finite (above)
            assert float(logp[k]) == pytest.approx(math.log(mass), rel=1e-9), k
            checked += 1
    assert checked >= 4
    assert float(torch.logsumexp(logp, 0)) == pytest.approx(0.0, abs=1e-12)


def test_the_prior_term_is_the_kl_of_q_x_T_to_a_standard_normal() -> None:
    schedule = make_schedule(ScheduleConfig())
    x0 = torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.float64).view(1, 1, 1, 3)
    abar = float(schedule.alphas_cumprod.double()[-1])
    expected = sum(0.5 * (-1 - math.log(1 - abar) + (1 - abar) + abar * v * v) for v in (-1.0, 0.0, 1.0))
    assert float(prior_nats(schedule, x0)) == pytest.approx(expected, rel=1e-9)


def test_a_model_step_equal_to_the_posterior_costs_nothing_but_the_decoder() -> None:
    """With the model's mean the true posterior mean and variance beta-tilde, L_t = 0 for t >= 1; at
    t = 0 the decoder is -log of the bin's mass under N(x0, beta-tilde_1)."""
    schedule = make_schedule(ScheduleConfig())
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (3, 1, 28, 28), generator=g).double() / 127.5 - 1)
    x_t = torch.randn(3, 1, 28, 28, generator=g, dtype=torch.float64)
    log_variance = fixed_log_variance(schedule, "fixed_small")
    t = torch.tensor([5, 500, 999])
    mean, _ = posterior_mean_log_variance(schedule, x0, x_t, t)
    assert torch.allclose(step_nats(schedule, x0, x_t, t, mean, log_variance[t].view(-1, 1, 1, 1)),
                          torch.zeros(3, dtype=torch.float64), atol=1e-9)
    t0 = torch.zeros(1, dtype=torch.long)
    mean0, _ = posterior_mean_log_variance(schedule, x0[:1], x_t[:1], t0)
    assert torch.allclose(mean0, x0[:1], atol=1e-12)  # at t = 0 the posterior mean is x0 itself
    s = math.exp(0.5 * float(log_variance[0]))
    middle, edge = -math.log(phi(1 / 255 / s) - phi(-1 / 255 / s)), -math.log(phi(1 / 255 / s))
    edges = int(((x0[:1] < -0.999) | (x0[:1] > 0.999)).sum())
    expected = edges * edge + (784 - edges) * middle
    assert float(step_nats(schedule, x0[:1], x_t[:1], t0, mean0, log_variance[0])) == pytest.approx(expected, rel=1e-9)


def oracle(schedule, x0: torch.Tensor):
    """A model that knows x0: its eps_hat is the noise x_t carries (Eq. 4 solved for eps)."""
    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s0 = schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
        s1 = schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - s0 * x0) / s1
    return model


def test_the_bound_of_a_model_that_knows_x0_is_prior_plus_decoder_in_closed_form() -> None:
    """An oracle's step is the true posterior: every KL term vanishes (within float32's rounding of
    x0_hat), and the prior and decoder terms are their closed forms (within 1e-6 relative)."""
    cfg = ScheduleConfig(num_timesteps=100)
    schedule = make_schedule(cfg)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randint(0, 256, (2, 1, 28, 28), generator=g).float() / 127.5 - 1
    for timesteps in (None, 7):
        parts = bound(oracle(schedule, x0), cfg, x0, range(2), seed=0, prediction_type="epsilon",
                      variance_type="fixed_small", timesteps=timesteps)
        assert float(parts["steps"].abs().max()) < 1e-3  # nats over 784 pixels and 99 steps
        s = math.exp(0.5 * float(fixed_log_variance(schedule, "fixed_small")[0]))
        middle, edge = -math.log(phi(1 / 255 / s) - phi(-1 / 255 / s)), -math.log(phi(1 / 255 / s))
        edges = ((x0 < -0.999) | (x0 > 0.999)).flatten(1).sum(1).double()
        torch.testing.assert_close(parts["decoder"], edges * edge + (784 - edges) * middle, rtol=1e-6, atol=0)
        torch.testing.assert_close(parts["prior"], prior_nats(schedule, x0), rtol=0, atol=0)


def test_strata_cover_every_step_timestep_once() -> None:
    for T, count in ((1000, 999), (1000, 10), (1000, 7), (10, 9), (5, 1)):
        covered = [t for first, size in strata(T, count) for t in range(first, first + size)]
        assert covered == list(range(1, T)) and len(strata(T, count)) == count


def test_as_many_strata_as_timesteps_is_the_exact_sum() -> None:
    cfg = ScheduleConfig(num_timesteps=50)
    x0 = torch.rand(3, 1, 28, 28) * 2 - 1

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x_t

    exact = bound(model, cfg, x0, range(3), seed=4, prediction_type="epsilon", variance_type="fixed_large")
    every = bound(model, cfg, x0, range(3), seed=4, prediction_type="epsilon", variance_type="fixed_large",
                  timesteps=49)
    assert all(torch.equal(exact[key], every[key]) for key in exact)
    few = bound(model, cfg, x0, range(3), seed=4, prediction_type="epsilon", variance_type="fixed_large", timesteps=5)
    assert not torch.equal(few["steps"], exact["steps"]) and torch.equal(few["decoder"], exact["decoder"])


@pytest.mark.parametrize("v, fixed", [(-1.0, "fixed_small"), (1.0, "fixed_large")])
def test_a_learned_range_at_its_ends_is_the_fixed_variance_there(v: float, fixed: str) -> None:
    """v = -1 gives beta-tilde_t and v = 1 gives beta_t (Eq. 15): the bound of a model that outputs v
    beside its noise equals the fixed variance's, term by term; but the decoder for v = 1, where the
    fixed_large bound takes beta-tilde_1 and learned_range beta_0 (as improved-diffusion does)."""
    cfg = ScheduleConfig(num_timesteps=60)
    x0 = torch.randint(0, 256, (2, 1, 28, 28), generator=torch.Generator().manual_seed(2)).float() / 127.5 - 1

    def noise_only(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.7 * x_t

    def with_v(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([noise_only(x_t, t), torch.full_like(x_t, v)], dim=1)

    learned = bound(with_v, cfg, x0, range(2), seed=1, prediction_type="epsilon", variance_type="learned_range")
    fixed_parts = bound(noise_only, cfg, x0, range(2), seed=1, prediction_type="epsilon", variance_type=fixed)
    for key in ("prior", "steps") if v > 0 else ("prior", "steps", "decoder"):
        torch.testing.assert_close(learned[key], fixed_parts[key], rtol=1e-12, atol=1e-9)
    if v > 0:
        assert not torch.allclose(learned["decoder"], fixed_parts["decoder"])
