"""The training loss: Min-SNR-gamma weighting (Hang et al. 2023), its weights, what they mean and training's
use of them; and the hybrid loss of a model that learns its variance (Nichol & Dhariwal 2021)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import smoke_run
from torch import nn

import ddpm_mnist.loop as loop
from ddpm_mnist.config import Config, ScheduleConfig
from ddpm_mnist.maths.diffusion import min_snr_weights, predict_x0, training_losses, vlb_bits
from ddpm_mnist.maths.schedule import make_schedule

PREDICTIONS = ("epsilon", "v", "x0")


class Fixed(nn.Module):
    """A stand-in network that outputs a given tensor whatever it is asked."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.output


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_weights_match_the_paper_written_per_timestep(prediction: str) -> None:
    schedule = make_schedule(ScheduleConfig(beta_schedule="cosine"))
    t = torch.tensor([0, 10, 100, 400, 700, 999])
    got = min_snr_weights(schedule, t, prediction, gamma=5.0)
    for i, step in enumerate(t.tolist()):
        abar = float(schedule.alphas_cumprod[step])
        snr = abar / (1 - abar)
        expected = {"epsilon": min(snr, 5.0) / snr, "v": min(snr, 5.0) / (snr + 1), "x0": min(snr, 5.0)}[prediction]
        assert got[i].item() == pytest.approx(expected, rel=1e-5)
    if prediction == "epsilon":  # high-noise steps (SNR below gamma) keep weight 1, low-noise ones are capped
        assert got[-1].item() == 1.0 and got[0].item() < 0.01


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_every_prediction_type_gets_the_same_x0_weighted_loss(prediction: str) -> None:
    """The paper's definition: min(SNR, gamma) * ||x0_hat - x0||^2, whatever the network predicts."""
    torch.manual_seed(0)
    schedule = make_schedule(ScheduleConfig())
    x0, noise, output = (torch.randn(6, 1, 8, 8) for _ in range(3))
    t = torch.tensor([3, 50, 200, 500, 800, 999])
    weighted = training_losses(Fixed(output), schedule, x0, t, noise, prediction, snr_gamma=5.0)
    x_t = schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * x0 + \
        schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1) * noise
    sqrt_abar, sqrt_one_minus_abar = (values[t].view(-1, 1, 1, 1) for values in (
        schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod))
    x0_hat = predict_x0(sqrt_abar, sqrt_one_minus_abar, x_t, output, prediction)
    x0_error = ((x0_hat - x0) ** 2).mean(dim=(1, 2, 3))
    abar = schedule.alphas_cumprod[t]
    torch.testing.assert_close(weighted, (abar / (1 - abar)).clamp(max=5.0) * x0_error, rtol=1e-4, atol=1e-6)


def test_gamma_zero_leaves_the_loss_unweighted() -> None:
    torch.manual_seed(1)
    schedule = make_schedule(ScheduleConfig())
    x0, noise, output = (torch.randn(4, 1, 8, 8) for _ in range(3))
    t = torch.tensor([0, 1, 500, 999])
    plain = training_losses(Fixed(output), schedule, x0, t, noise)
    assert torch.equal(training_losses(Fixed(output), schedule, x0, t, noise, snr_gamma=0.0), plain)
    assert not torch.allclose(training_losses(Fixed(output), schedule, x0, t, noise, snr_gamma=5.0), plain)


@pytest.mark.slow
def test_training_weights_each_images_loss(smoke_cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs from one seed see the same images, timesteps and noise at step 0; with
    train.min_snr_gamma their per-image losses are the plain ones times the weights."""
    real, seen = loop.training_losses, []

    def recording(model, schedule, x0, t, noise, *args: object) -> torch.Tensor:
        out = real(model, schedule, x0, t, noise, *args)
        seen.append((t.clone(), out.detach().clone(), schedule))
        return out

    monkeypatch.setattr(loop, "training_losses", recording)
    smoke_run(smoke_cfg, "train.steps=1", "name=plain")
    smoke_run(smoke_cfg, "train.steps=1", "name=weighted", "train.min_snr_gamma=5")
    (t_plain, plain, schedule), (t_weighted, weighted, _) = seen
    assert torch.equal(t_plain, t_weighted)
    expected = plain * min_snr_weights(schedule, t_plain, smoke_cfg.model.prediction_type, 5.0)
    torch.testing.assert_close(weighted, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(weighted, plain)


def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def vlb_by_hand(schedule, x0: torch.Tensor, x_t: torch.Tensor, t: int, x0_hat: torch.Tensor, v: torch.Tensor) -> float:
    """L_t in bits per dimension of one image, written out in float64 from the papers' formulas: the
    posterior (Ho et al., Eq. 7) against N(mu(x_t, x0_hat), Sigma) with Sigma from Eq. (15) of Nichol
    & Dhariwal; at t = 0 the decoder's -log of the mass of each pixel's bin (Ho et al., Eq. 13)."""
    betas = schedule.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    abar_t, abar_prev, beta = float(abar[t]), (float(abar[t - 1]) if t > 0 else 1.0), float(betas[t])
    coef_x0, coef_xt = math.sqrt(abar_prev) * beta / (1 - abar_t), math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar_t)
    s = max(t, 1)  # beta-tilde_0 = 0: improved-diffusion takes t = 1's
    log_tilde = math.log(float(betas[s]) * (1 - float(abar[s - 1])) / (1 - float(abar[s])))
    total = 0.0
    for x, xt, xh, vv in zip(x0.double().flatten().tolist(), x_t.double().flatten().tolist(),
                             x0_hat.double().flatten().tolist(), v.double().flatten().tolist(), strict=True):
        frac = (vv + 1) / 2
        log_var = frac * math.log(beta) + (1 - frac) * log_tilde
        mean, true_mean = coef_x0 * xh + coef_xt * xt, coef_x0 * x + coef_xt * xt
        if t > 0:
            total += 0.5 * (log_var - log_tilde + math.exp(log_tilde - log_var) + (true_mean - mean) ** 2
                            / math.exp(log_var) - 1)
        else:
            std = math.exp(0.5 * log_var)
            upper = 1.0 if x > 0.999 else normal_cdf((x + 1 / 255 - mean) / std)
            lower = 0.0 if x < -0.999 else normal_cdf((x - 1 / 255 - mean) / std)
            total -= math.log(upper - lower)
    return total / (x0.numel() * math.log(2))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_the_hybrid_loss_is_mse_plus_lambda_T_times_the_bound_term(prediction: str) -> None:
    """L_hybrid = L_simple + lambda T L_t (bits/dim), against `vlb_by_hand` in float64: within 1e-4
    relative (float32 inputs; the worst case here is about 1e-6)."""
    torch.manual_seed(2)
    schedule = make_schedule(ScheduleConfig())
    x0 = torch.randint(0, 256, (5, 1, 6, 6)).float() / 127.5 - 1
    noise, prediction_out = torch.randn(5, 1, 6, 6), 0.3 * torch.randn(5, 1, 6, 6)
    if prediction == "x0":  # near x0, as the other predictions' x0_hat is at t = 0: each bin's mass stays above
        prediction_out = x0 + 0.01 * prediction_out  # float64's smallest number, which the written-out CDF needs
    v = torch.rand(5, 1, 6, 6) * 2 - 1
    t = torch.tensor([0, 1, 40, 500, 999])
    output = torch.cat([prediction_out, v], dim=1)
    hybrid = training_losses(Fixed(output), schedule, x0, t, noise, prediction, "hybrid", vlb_weight=0.002)
    plain = training_losses(Fixed(prediction_out), schedule, x0, t, noise, prediction)
    x_t = schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * x0 + \
        schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1) * noise
    x0_hat = predict_x0(schedule.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1),
                        schedule.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1), x_t, prediction_out, prediction)
    for i, step in enumerate(t.tolist()):
        expected = float(plain[i]) + 0.002 * 1000 * vlb_by_hand(schedule, x0[i], x_t[i], step, x0_hat[i], v[i])
        assert float(hybrid[i]) == pytest.approx(expected, rel=1e-4), step


def test_the_bound_term_trains_the_variance_and_not_the_mean() -> None:
    """The stop-gradient of Sec. 3.1: L_t's gradient reaches v and never the prediction."""
    torch.manual_seed(3)
    schedule = make_schedule(ScheduleConfig())
    x0, x_t = torch.rand(3, 1, 6, 6) * 2 - 1, torch.randn(3, 1, 6, 6)
    x0_hat = (torch.rand(3, 1, 6, 6) * 2 - 1).requires_grad_()
    v = torch.zeros(3, 1, 6, 6, requires_grad=True)
    vlb_bits(schedule, x0, x_t, torch.tensor([0, 7, 300]), x0_hat, v).sum().backward()
    assert x0_hat.grad is None and float(v.grad.abs().min()) > 0


def test_the_hybrid_loss_needs_a_learned_variance() -> None:
    schedule = make_schedule(ScheduleConfig())
    x0 = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="learns its variance"):
        training_losses(Fixed(torch.zeros(2, 1, 4, 4)), schedule, x0, torch.tensor([1, 2]), x0, loss_type="hybrid")


def test_min_snr_weights_the_simple_term_of_the_hybrid_loss_only() -> None:
    torch.manual_seed(4)
    schedule = make_schedule(ScheduleConfig())
    x0, noise = torch.rand(4, 1, 6, 6) * 2 - 1, torch.randn(4, 1, 6, 6)
    output, t = torch.randn(4, 2, 6, 6).clamp(-1, 1), torch.tensor([2, 90, 400, 900])
    plain = training_losses(Fixed(output[:, :1]), schedule, x0, t, noise)
    vlb = training_losses(Fixed(output), schedule, x0, t, noise, loss_type="hybrid", vlb_weight=0.001) - plain
    weighted = training_losses(Fixed(output), schedule, x0, t, noise, loss_type="hybrid", vlb_weight=0.001,
                               snr_gamma=5.0)
    torch.testing.assert_close(weighted, plain * min_snr_weights(schedule, t, "epsilon", 5.0) + vlb, rtol=1e-5,
                               atol=1e-6)
