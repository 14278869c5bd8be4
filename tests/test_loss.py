"""Min-SNR-gamma loss weighting (Hang et al. 2023): its weights, what they mean, and training's use of them."""

from __future__ import annotations

import pytest
import torch
from helpers import smoke_run
from torch import nn

import ddpm_mnist.loop as loop
from ddpm_mnist.config import Config, ScheduleConfig
from ddpm_mnist.maths.diffusion import min_snr_weights, predict_x0, training_losses
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
