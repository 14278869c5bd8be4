"""Beta schedules: formulas, derived quantities, the timestep convention, q(x_t | x_0)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from conftest import run_cli

from ddpm_mnist.config import ScheduleConfig
from ddpm_mnist.maths.diffusion import add_noise
from ddpm_mnist.maths.schedule import make_betas, make_schedule, rescale_zero_terminal_snr
from ddpm_mnist.schedule_report import CSV_COLUMNS

DIFFUSERS_NAMES = {
    "linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2", "sigmoid": "sigmoid"
}
# (beta_start, beta_end) used per schedule: the SD range for scaled_linear, DDPM's for the rest
RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "cosine": (1e-4, 0.02), "sigmoid": (1e-4, 0.02)}


def cosine_alpha_bar(u: float) -> float:
    """f(u) of Nichol & Dhariwal, Eq. (17), with s = 0.008."""
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def reference_betas(name: str, T: int, start: float, end: float) -> list[float]:
    """The formulas written out again in plain Python floats, one timestep at a time."""
    out = []
    for i in range(T):
        if name == "linear":
            out.append(start + (end - start) * i / (T - 1))
        elif name == "scaled_linear":
            out.append((math.sqrt(start) + (math.sqrt(end) - math.sqrt(start)) * i / (T - 1)) ** 2)
        elif name == "cosine":
            out.append(min(1 - cosine_alpha_bar((i + 1) / T) / cosine_alpha_bar(i / T), 0.999))
        else:
            x = -6 + 12 * i / (T - 1)
            out.append(1 / (1 + math.exp(-x)) * (end - start) + start)
    return out


@pytest.mark.parametrize("name", list(RANGES))
def test_betas_match_the_formulas(name: str) -> None:
    start, end = RANGES[name]
    ours = make_betas(name, 1000, start, end)
    assert ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), reference_betas(name, 1000, start, end), rtol=1e-12, atol=1e-15)


def test_known_published_values() -> None:
    linear = make_schedule(ScheduleConfig())
    # DDPM's linear schedule leaves alpha-bar_T ~ 4.04e-5 (signal std 0.0064) at T = 1000
    assert linear.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)
    sd = make_schedule(ScheduleConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    assert sd.init_noise_sigma == pytest.approx(14.6146, abs=1e-4)  # diffusers' init_noise_sigma
    cosine = make_schedule(ScheduleConfig(beta_schedule="cosine"))
    assert cosine.betas.max().item() == pytest.approx(0.999)  # the cap is reached at the end


@pytest.mark.parametrize("name", list(RANGES))
@pytest.mark.parametrize("zero_snr", [False, True])
def test_agrees_with_diffusers(name: str, zero_snr: bool) -> None:
    diffusers = pytest.importorskip("diffusers")
    start, end = RANGES[name]
    theirs = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=DIFFUSERS_NAMES[name], beta_start=start, beta_end=end,
        rescale_betas_zero_snr=zero_snr,
    )
    ours = make_schedule(
        ScheduleConfig(beta_schedule=name, beta_start=start, beta_end=end, rescale_zero_terminal_snr=zero_snr)
    )
    # diffusers computes in float32, so its running product drifts by up to ~1e-5 relative
    torch.testing.assert_close(ours.betas, theirs.betas, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=1e-4, atol=1e-7)


def test_derived_quantities_are_consistent() -> None:
    s = make_schedule(ScheduleConfig(beta_schedule="cosine"))
    assert all(getattr(s, f).dtype == torch.float32 for f in ("betas", "alphas_cumprod", "sigmas", "snr"))
    b = make_betas("cosine", 1000)  # float64: 1 - abar near t = 0 needs it
    abar = torch.cumprod(1 - b, 0)
    torch.testing.assert_close(s.alphas_cumprod.double(), abar, rtol=1e-6, atol=0)
    torch.testing.assert_close(s.sigmas.double(), ((1 - abar) / abar).sqrt(), rtol=1e-6, atol=0)
    torch.testing.assert_close(s.snr.double(), abar / (1 - abar), rtol=1e-6, atol=0)
    torch.testing.assert_close(s.sqrt_alphas_cumprod**2 + s.sqrt_one_minus_alphas_cumprod**2, torch.ones(1000))
    # Eq. (7): beta-tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t), and the posterior mean weights
    t = 500
    beta, abar_t, abar_prev = b[t].item(), abar[t].item(), abar[t - 1].item()
    assert s.posterior_variance[t].item() == pytest.approx(beta * (1 - abar_prev) / (1 - abar_t), rel=1e-5)
    assert s.posterior_mean_coef1[t].item() == pytest.approx(abar_prev**0.5 * beta / (1 - abar_t), rel=1e-5)
    coef2 = (1 - beta) ** 0.5 * (1 - abar_prev) / (1 - abar_t)
    assert s.posterior_mean_coef2[t].item() == pytest.approx(coef2, rel=1e-5)


def test_timesteps_are_zero_indexed() -> None:
    s = make_schedule(ScheduleConfig())
    # t = 0 is the first noising step: abar_0 = alpha_0 = 1 - beta_start, and abar_{-1} = 1
    assert s.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4)
    assert s.alphas_cumprod_prev[0].item() == 1.0
    assert s.posterior_variance[0].item() == 0.0
    assert s.num_timesteps == len(s.betas) == 1000
    x0 = torch.ones(1, 1, 2, 2)
    x_t = add_noise(s, x0, torch.ones_like(x0), torch.tensor([0]))
    assert x_t.flatten()[0].item() == pytest.approx(math.sqrt(1 - 1e-4) + math.sqrt(1e-4))


def test_zero_terminal_snr_rescaling() -> None:
    betas = make_betas("linear", 1000)
    rescaled = rescale_zero_terminal_snr(betas)
    abar, abar_new = torch.cumprod(1 - betas, 0), torch.cumprod(1 - rescaled, 0)
    assert abar_new[-1].item() == 0.0
    assert abar_new[0].item() == pytest.approx(abar[0].item(), rel=1e-12)
    assert make_schedule(ScheduleConfig(rescale_zero_terminal_snr=False)).alphas_cumprod[-1] > 0  # off by default


@pytest.mark.parametrize("t", [0, 9, 249, 999])
def test_closed_form_matches_the_one_step_chain(t: int) -> None:
    """x_t from Eq. (4) and from t+1 steps of x_s = sqrt(1 - beta_s) x_{s-1} + sqrt(beta_s) eps."""
    s = make_schedule(ScheduleConfig())
    n = 200_000
    g = torch.Generator().manual_seed(t)
    x0 = torch.full((n, 1, 1, 1), 0.7)
    chain = x0.clone()
    for step in range(t + 1):
        eps = torch.randn(chain.shape, generator=g)
        chain = (1 - s.betas[step]).sqrt() * chain + s.betas[step].sqrt() * eps
    closed = add_noise(s, x0, torch.randn(x0.shape, generator=g), torch.full((n,), t))
    mean, var = 0.7 * s.sqrt_alphas_cumprod[t].item(), 1 - s.alphas_cumprod[t].item()
    for x in (chain, closed):
        # 6 standard errors: the mean's is sqrt(var / n), the variance's about var * sqrt(2 / n)
        assert abs(x.mean().item() - mean) < 6 * math.sqrt(var / n)
        assert abs(x.var().item() - var) < 6 * var * math.sqrt(2 / n)


def test_add_noise_takes_a_timestep_per_image() -> None:
    s = make_schedule(ScheduleConfig())
    x0, noise = torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28)
    t = torch.tensor([0, 500, 999])
    x_t = add_noise(s, x0, noise, t)
    for i in range(3):
        expected = s.sqrt_alphas_cumprod[t[i]] * x0[i] + s.sqrt_one_minus_alphas_cumprod[t[i]] * noise[i]
        torch.testing.assert_close(x_t[i], expected)


def test_schedule_command_writes_csv_and_plot(tmp_path, capsys) -> None:
    out_csv, out_png = tmp_path / "s.csv", tmp_path / "s.png"
    code, out, err = run_cli(
        capsys, "schedule", "--set", "schedule.beta_schedule=cosine", "--csv", out_csv, "--plot", out_png
    )
    assert code == 0, err
    assert "cosine schedule, T = 1000" in out and "init_noise_sigma" in out
    with open(out_csv) as f:
        rows = list(csv.reader(f))
    assert rows[0][:4] == ["t", "beta", "alpha_bar", "sigma"] and rows[0] == list(CSV_COLUMNS)
    assert len(rows) == 1001 and [int(r[0]) for r in rows[1:]] == list(range(1000))
    s = make_schedule(ScheduleConfig(beta_schedule="cosine"))
    # full float32 precision: every number reads back to the exact stored float32
    for r in rows[1:]:
        t = int(r[0])
        assert np.float32(r[1]) == s.betas[t].numpy() and np.float32(r[2]) == s.alphas_cumprod[t].numpy()
        assert np.float32(r[3]) == s.sigmas[t].numpy()
    assert float(rows[-1][2]) < 1e-8  # alpha-bar ~2.4e-9 at the end is not rounded to 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_schedule_command_compares_several_in_one_plot(tmp_path, capsys) -> None:
    code, out, _ = run_cli(capsys, "schedule", "-s", "linear", "-s", "cosine", "--plot", tmp_path / "p.png")
    assert code == 0 and "linear schedule" in out and "cosine schedule" in out
    code, _, err = run_cli(capsys, "schedule", "-s", "linear", "-s", "cosine", "--csv", tmp_path / "x.csv")
    assert code == 2 and "--csv writes one schedule" in err


def test_schedule_command_reports_an_unwritable_path(tmp_path, capsys) -> None:
    code, _, _ = run_cli(capsys, "schedule", "--csv", tmp_path / "new" / "folder" / "s.csv")
    assert code == 0 and (tmp_path / "new" / "folder" / "s.csv").exists()  # folders are made
    (tmp_path / "file").write_text("")
    code, _, err = run_cli(capsys, "schedule", "--csv", tmp_path / "file" / "s.csv")
    assert code == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1
