"""The samplers in the sigma view (euler, euler_ancestral, heun, lms), Karras sigmas, the log variance
types and dynamic thresholding: whole runs against diffusers' schedulers and a float64 reference.

Every run starts from the same x_T and uses a model whose output depends on x and t. Tolerance:
1e-4 times max(1, max |x|) on the final images, for diffusers and the float64 reference alike.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import SMOKE, run_cli
from helpers import one_line_error, step_at

from ddpm_mnist.config import ModelConfig, ScheduleConfig, load_config
from ddpm_mnist.config.sampler_names import SAMPLER_NAMES, SIGMA_SAMPLERS, max_steps, min_steps, model_calls
from ddpm_mnist.device import Runtime
from ddpm_mnist.maths.diffusion import spaced_timesteps
from ddpm_mnist.maths.samplers import (
    SAMPLERS,
    NoiseSource,
    dynamic_threshold,
    karras_sigmas,
    lms_coefficients,
    make_sampler,
    sigma_to_timestep,
)
from ddpm_mnist.maths.schedule import make_betas, make_schedule
from ddpm_mnist.maths.unet import UNet
from ddpm_mnist.sample import generate

try:
    import diffusers
except ImportError:  # the dev extra installs it: without it the parity tests skip, and the rest still run
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="compares with diffusers: pip install -e '.[dev]'")

SCHEDULES = {  # ours: (diffusers' name, beta_start, beta_end)
    "linear": ("linear", 1e-4, 0.02),
    "scaled_linear": ("scaled_linear", 0.00085, 0.012),
    "cosine": ("squaredcos_cap_v2", 1e-4, 0.02),
}
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction"}
SPACINGS = ("leading", "trailing", "linspace")
DIFFUSERS_CLASS = {"euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
                   "heun": "HeunDiscreteScheduler", "lms": "LMSDiscreteScheduler"}


def toy_model(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """An output that depends on x and t, in any float dtype: a stand-in for the U-Net."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *[1] * (x.dim() - 1))
    return torch.tanh(x) * (0.8 + 0.15 * torch.cos(t / 170)) + 0.05 * torch.sin(t / 90)


def x_T(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64).to(dtype)


def noises(count: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The z of each step, as diffusers' `step(..., generator)` draws them: one randn per step."""
    g = torch.Generator().manual_seed(5)
    return [torch.randn(3, 1, 8, 8, generator=g).to(dtype) for _ in range(count)]


def run_ours(sampler, zs: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The loop's three moves, as `sample.generate` makes them, on the toy model."""
    x = x_T() * sampler.init_noise_sigma
    sampler.start(x)
    for i in range(sampler.num_steps):
        output = toy_model(sampler.model_input(i, x), sampler.timesteps[i])
        x = sampler.step(i, output, x, zs[i] if zs is not None and sampler.needs_noise[i] else None)
    return x


def run_theirs(name: str, steps: int, schedule: str, prediction: str, spacing: str, karras: bool,
               **extra) -> torch.Tensor:
    beta_schedule, start, end = SCHEDULES[schedule]
    scheduler = getattr(diffusers, DIFFUSERS_CLASS[name])(
        num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=start, beta_end=end,
        prediction_type=PREDICTIONS[prediction], timestep_spacing=spacing,
        **({"use_karras_sigmas": True} if karras else {}), **extra)
    scheduler.set_timesteps(steps)
    x = x_T() * scheduler.init_noise_sigma
    zs = iter(noises(len(scheduler.timesteps)))
    for t in scheduler.timesteps:
        output = toy_model(scheduler.scale_model_input(x, t), t)
        if name == "euler_ancestral":  # its z: the next of the same draws run_ours gets
            z = next(zs)
            x = scheduler.step(output, t, x, generator=FixedDraw(z)).prev_sample
        else:
            x = scheduler.step(output, t, x).prev_sample
    return x


class FixedDraw:
    """Handed to diffusers as the generator: its next draw is `z` (diffusers draws through
    `randn_tensor(..., generator)`, which the fixture below answers from it)."""

    def __init__(self, z: torch.Tensor) -> None:
        self.z = z


@pytest.fixture(autouse=True)
def _fixed_draws(monkeypatch):
    if diffusers is None:
        return
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as module

    original = module.randn_tensor

    def randn_tensor(shape, generator=None, **kwargs):
        return generator.z.clone() if isinstance(generator, FixedDraw) else original(shape, generator=generator,
                                                                                    **kwargs)
    monkeypatch.setattr(module, "randn_tensor", randn_tensor)


def ours(name: str, steps: int, schedule: str, prediction: str, spacing: str, karras: bool, **options):
    _, start, end = SCHEDULES[schedule]
    cfg = ScheduleConfig(beta_schedule=schedule, beta_start=start, beta_end=end)
    return make_sampler(name, make_schedule(cfg), steps, prediction_type=prediction, clip_sample=False,
                        timestep_spacing=spacing, sigma_schedule="karras" if karras else "spaced", **options)


def assert_agree(a: torch.Tensor, b: torch.Tensor, context: object) -> float:
    gap = float((a.double() - b.double()).abs().max())
    assert gap <= 1e-4 * max(1.0, float(a.abs().max())), (context, gap)
    return gap


DIFFUSERS_CASES = [  # diffusers' EulerAncestralDiscreteScheduler has no use_karras_sigmas: float64 checks those
    case for case in itertools.product(["euler", "euler_ancestral", "heun"], PREDICTIONS, SCHEDULES, SPACINGS, [10, 25],
                                       [False, True])
    if not (case[0] == "euler_ancestral" and case[-1])
]


@needs_diffusers
@pytest.mark.parametrize("name, prediction, schedule, spacing, steps, karras", DIFFUSERS_CASES)
def test_sigma_samplers_agree_with_diffusers(name, prediction, schedule, spacing, steps, karras) -> None:
    check_against_diffusers(name, prediction, schedule, spacing, steps, karras)


@needs_diffusers
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("prediction", list(PREDICTIONS))
def test_lms_agrees_with_diffusers(prediction, schedule, spacing, karras) -> None:
    pytest.importorskip("scipy")  # diffusers' LMSDiscreteScheduler integrates with scipy; ours does not need it
    for steps in (10, 25):
        check_against_diffusers("lms", prediction, schedule, spacing, steps, karras)


def check_against_diffusers(name: str, prediction: str, schedule: str, spacing: str, steps: int, karras: bool) -> None:
    sampler = ours(name, steps, schedule, prediction, spacing, karras)
    a = run_theirs(name, steps, schedule, prediction, spacing, karras)
    b = run_ours(sampler, noises(sampler.num_steps))
    assert sampler.num_steps == model_calls(name, steps)
    if starts_at_cosines_end(prediction, schedule, spacing, karras):
        reference = reference_run(name, prediction, schedule, spacing, steps, karras)
        theirs, mine = (float((r.double() - reference).abs().max()) for r in (a, b))
        assert mine <= 1.5 * theirs + 1e-4, (mine, theirs)
    else:
        assert_agree(a, b, (name, prediction, schedule, spacing, steps))


def starts_at_cosines_end(prediction: str, schedule: str, spacing: str, karras: bool) -> bool:
    """The one case where float32 itself keeps fewer digits than 1e-4: v prediction from the cosine schedule's
    t = T-1 (trailing, linspace), where sigma_T is 2e4 and the first step subtracts numbers of that size.
    There diffusers' own run is 2e-4 to 3e-2 from float64, and ours must be no farther than 1.5x that."""
    return prediction == "v" and schedule == "cosine" and spacing != "leading" and not karras


@needs_diffusers
def test_heun_with_clipping_agrees_with_diffusers() -> None:
    """HeunDiscreteScheduler is the one of the four that clips x0_hat (clip_sample); ours can clip every sampler."""
    for prediction in PREDICTIONS:
        a = run_theirs("heun", 10, "linear", prediction, "leading", False, clip_sample=True, clip_sample_range=0.5)
        sampler = make_sampler("heun", make_schedule(ScheduleConfig()), 10, prediction_type=prediction,
                               clip_sample=True, clip_sample_range=0.5)
        assert_agree(a, run_ours(sampler), prediction)
        unclipped = run_ours(ours("heun", 10, "linear", prediction, "leading", False))
        assert float((unclipped - a).abs().max()) > 1e-3  # the clipping mattered


# -- the float64 reference: k-diffusion's loops written out, on sigmas computed here -------------------------------


def reference_sigmas(schedule: str, steps: int, spacing: str, karras: bool) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas with 0 appended) in float64, as diffusers' set_timesteps defines them."""
    _, start, end = SCHEDULES[schedule]
    if schedule == "cosine":
        f = np.cos((np.arange(1001) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    elif schedule == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, 1000) ** 2
    else:
        betas = np.linspace(start, end, 1000)
    abar = np.cumprod(1 - betas)
    all_sigmas = np.sqrt((1 - abar) / abar)
    if spacing == "leading":
        t = (np.arange(steps) * (1000 // steps))[::-1].astype(np.float64)
    elif spacing == "trailing":
        t = np.round(np.arange(1000, 0, -1000 / steps)) - 1
    else:
        t = np.linspace(0, 999, steps)[::-1]
    sigmas = np.interp(t, np.arange(1000), all_sigmas)
    if karras:
        ramp = np.linspace(0, 1, steps)
        sigmas = (sigmas[0] ** (1 / 7) + ramp * (sigmas[-1] ** (1 / 7) - sigmas[0] ** (1 / 7))) ** 7
        t = np.interp(np.log(sigmas), np.log(all_sigmas), np.arange(1000))
    return t, np.append(sigmas, 0.0)


def reference_run(name: str, prediction: str, schedule: str, spacing: str, steps: int, karras: bool) -> torch.Tensor:
    t, s = reference_sigmas(schedule, steps, spacing, karras)
    x = x_T(torch.float64) * (s[0] if spacing != "leading" else math.sqrt(s[0] ** 2 + 1))
    zs = iter(noises(model_calls(name, steps), torch.float64))

    def denoise(x: torch.Tensor, sigma: float, timestep: float) -> torch.Tensor:
        out = toy_model(x / math.sqrt(sigma**2 + 1), timestep)
        if prediction == "epsilon":
            return x - sigma * out
        return out * (-sigma / math.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)

    slopes: list[torch.Tensor] = []
    for i in range(steps):
        d = (x - denoise(x, s[i], t[i])) / s[i]
        if name == "euler":
            x = x + d * (s[i + 1] - s[i])
        elif name == "euler_ancestral":
            up = math.sqrt(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2)
            x = x + d * (math.sqrt(s[i + 1] ** 2 - up**2) - s[i]) + next(zs) * up
        elif name == "heun" and s[i + 1] > 0:
            x_euler = x + d * (s[i + 1] - s[i])
            d2 = (x_euler - denoise(x_euler, s[i + 1], t[i + 1])) / s[i + 1]
            x = x + (d + d2) / 2 * (s[i + 1] - s[i])
        elif name == "heun":
            x = x + d * (s[i + 1] - s[i])
        else:  # lms: the Lagrange polynomial through the last four slopes, integrated by its antiderivative
            slopes.insert(0, d)
            step = x
            for j in range(min(i + 1, 4)):
                others = [s[i - k] for k in range(min(i + 1, 4)) if k != j]
                poly = (np.polynomial.Polynomial.fromroots(others) if others else np.polynomial.Polynomial([1.0])) \
                    / np.prod([s[i - j] - r for r in others])
                antiderivative = poly.integ()
                step = step + float(antiderivative(s[i + 1]) - antiderivative(s[i])) * slopes[j]
            x = step
    return x


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", list(SIGMA_SAMPLERS))
def test_sigma_samplers_agree_with_a_float64_reference(name, schedule, spacing, karras) -> None:
    for prediction, steps in (("epsilon", 10), ("v", 25)):
        if starts_at_cosines_end(prediction, schedule, spacing, karras):
            continue  # float32 itself cannot: test_sigma_samplers_agree_with_diffusers bounds it by diffusers' own gap
        sampler = ours(name, steps, schedule, prediction, spacing, karras)
        expected = reference_run(name, prediction, schedule, spacing, steps, karras)
        assert_agree(expected, run_ours(sampler, noises(sampler.num_steps)), (prediction, steps))


# -- karras sigmas, DPM-Solver++ on them -------------------------------------------------------------------------


@needs_diffusers
def test_karras_sigmas_and_their_timesteps_are_diffusers() -> None:
    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, use_karras_sigmas=True)
    scheduler.set_timesteps(12)
    sampler = ours("euler", 12, "linear", "epsilon", "linspace", True)
    # diffusers' sigmas come from a float32 alpha-bar: 1 - abar near t = 0 keeps 3 to 4 digits
    torch.testing.assert_close(sampler.noise_levels.float(), scheduler.sigmas[:-1], rtol=2e-4, atol=0)
    # ... and its timesteps from those float32 log sigmas: a hundredth of a step apart at most
    torch.testing.assert_close(sampler.timesteps, scheduler.timesteps, rtol=0, atol=1e-2)
    sigmas = karras_sigmas(0.03, 80.0, 5)
    assert float(sigmas[0]) == pytest.approx(80.0) and float(sigmas[-1]) == pytest.approx(0.03)
    assert (sigmas[:-1] > sigmas[1:]).all()  # descending, densest near sigma_min:
    assert float(sigmas[-2] - sigmas[-1]) < float(sigmas[0] - sigmas[1])
    schedule = make_schedule(ScheduleConfig()).sigmas.double()
    exact = sigma_to_timestep(schedule[[0, 400, 999]], schedule)
    assert exact.tolist() == pytest.approx([0.0, 400.0, 999.0], abs=1e-9)  # a schedule's own sigmas: its own t


@needs_diffusers
@pytest.mark.parametrize("prediction", list(PREDICTIONS))
@pytest.mark.parametrize("steps", [10, 25])
def test_dpm_solver_on_karras_sigmas_agrees_with_diffusers(prediction: str, steps: int) -> None:
    """diffusers truncates the timesteps of Karras sigmas to integers; ours keep them between integers,
    as the U-Net's embedding takes them. So both loops call the model at ours, and the solver's
    steps on the same sigmas are compared."""
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=PREDICTIONS[prediction],
        algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)
    scheduler.set_timesteps(steps)
    scheduler.set_begin_index(0)  # its first timesteps repeat (998 four times): else it starts at the second
    sampler = make_sampler("dpmpp_2m", make_schedule(ScheduleConfig(beta_schedule="cosine")), steps,
                           prediction_type=prediction, clip_sample=False, sigma_schedule="karras")
    assert ((sampler.timesteps - scheduler.timesteps.float()).abs() <= 1).all()
    # diffusers' float32 alpha-bar: 1 - abar_0 = 4e-5 for the cosine schedule, a relative 3e-4 in its sigma_min
    torch.testing.assert_close(sampler.noise_levels.float(), scheduler.sigmas[:-1], rtol=5e-4, atol=0)
    x = x_T()
    for t_ours, t in zip(sampler.timesteps, scheduler.timesteps, strict=True):
        x = scheduler.step(toy_model(x, t_ours), t, x).prev_sample
    assert_agree(x, run_ours(sampler), (prediction, steps))


# -- the rest of DDPMScheduler.step: log variances, thresholding ---------------------------------------------------


@needs_diffusers
@pytest.mark.parametrize("prediction", list(PREDICTIONS))
@pytest.mark.parametrize("steps", [10, 25, 1000])
def test_fixed_small_log_agrees_with_diffusers_and_fixed_large_log_with_float64(prediction, steps) -> None:
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=PREDICTIONS[prediction],
                                        variance_type="fixed_small_log", clip_sample=False)
    scheduler.set_timesteps(steps)
    x = x_T()
    g = torch.Generator().manual_seed(5)
    for t in scheduler.timesteps:
        x = scheduler.step(toy_model(x, t), t, x, generator=g).prev_sample
    sampler = make_sampler("ancestral", make_schedule(ScheduleConfig()), steps, prediction_type=prediction,
                           variance_type="fixed_small_log", clip_sample=False)
    assert_agree(x, run_ours(sampler, noises(steps)), steps)
    # fixed_large_log: sigma_t = exp(log(beta_t) / 2) of the respaced schedule, the last step noiseless
    large_log = make_sampler("ancestral", make_schedule(ScheduleConfig()), steps, prediction_type=prediction,
                             variance_type="fixed_large_log", clip_sample=False)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[large_log.timesteps.flip(0)]
    betas = 1 - abar / torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    expected = betas.log().mul(0.5).exp().flip(0)  # in step order
    every = large_log.alphas_cumprod.cpu()
    torch.testing.assert_close(large_log.sigma(large_log.betas.cpu(), every[:-1], every[1:]).double(), expected,
                               rtol=1e-6, atol=0)
    assert large_log.needs_noise == [True] * (steps - 1) + [False]  # the step to x_0 adds no noise


@needs_diffusers
def toy_learned(x: torch.Tensor, t: torch.Tensor | float, variance_type: str) -> torch.Tensor:
    """A stand-in for a U-Net that learns its variance: toy_model's prediction, then a second channel
    varying by pixel and t: v in [-1, 1] (learned_range), or a variance in (0, 0.02] (learned)."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *[1] * (x.dim() - 1))
    v = torch.sin(3 * x + t / 100)
    return torch.cat([toy_model(x, t), v if variance_type == "learned_range" else 0.01 * (1.001 + v)], dim=1)


def learned_reference(timesteps: list[int], prediction: str, variance_type: str, zs: list[torch.Tensor]
                      ) -> torch.Tensor:
    """The ancestral loop with a learned variance, written out in float64 from the papers: x0_hat
    clipped, the posterior mean (Ho et al., Eq. 7) of the respaced step, and log sigma^2 = v' log beta
    + (1 - v') log beta-tilde with v' = (v + 1) / 2 (Nichol & Dhariwal, Eq. 15), or v itself (learned)."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    x = x_T(torch.float64)
    for i, t in enumerate(timesteps):
        abar_t = float(abar[t])
        abar_prev = float(abar[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        beta = 1 - abar_t / abar_prev
        output, v = toy_learned(x, t, variance_type).chunk(2, dim=1)
        x0_hat = (x - math.sqrt(1 - abar_t) * output) / math.sqrt(abar_t) if prediction == "epsilon" else \
            math.sqrt(abar_t) * x - math.sqrt(1 - abar_t) * output
        mean = math.sqrt(abar_prev) * beta / (1 - abar_t) * x0_hat.clamp(-1, 1) + \
            math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar_t) * x
        if i + 1 == len(timesteps):
            return mean
        tilde = beta * (1 - abar_prev) / (1 - abar_t)
        frac = (v + 1) / 2
        log_var = frac * math.log(beta) + (1 - frac) * math.log(tilde) if variance_type == "learned_range" else v.log()
        x = mean + (0.5 * log_var).exp() * zs[i].double()
    return x


@needs_diffusers
@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
@pytest.mark.parametrize("prediction", list(PREDICTIONS))
@pytest.mark.parametrize("steps", [10, 25, 1000])
def test_learned_variances_agree_with_diffusers_and_with_float64(variance_type, prediction, steps) -> None:
    """DDPMScheduler.step with variance_type learned_range (and learned) splits the output in two and
    steps with the variance it gives, on the respaced schedule for fewer steps: ours agrees within
    1e-4 with diffusers and with `learned_reference`."""
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type=PREDICTIONS[prediction],
                                        variance_type=variance_type, clip_sample=True)
    scheduler.set_timesteps(steps)
    x = x_T()
    g = torch.Generator().manual_seed(5)
    for t in scheduler.timesteps:
        x = scheduler.step(toy_learned(x, t, variance_type), t, x, generator=g).prev_sample
    sampler = make_sampler("ancestral", make_schedule(ScheduleConfig()), steps, prediction_type=prediction,
                           variance_type=variance_type)
    assert sampler.reads_variance and sampler.needs_noise == [True] * (steps - 1) + [False]
    ours, zs = x_T(), noises(steps)
    for i in range(steps):
        output = sampler.model_output(toy_learned(ours, sampler.timesteps[i], variance_type), ours)
        ours = sampler.step(i, output, ours, zs[i] if sampler.needs_noise[i] else None)
    assert_agree(x, ours, "diffusers")
    assert_agree(learned_reference(sampler.timesteps.tolist(), prediction, variance_type, zs), ours, "float64")


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "euler", "heun"])
def test_samplers_that_do_not_read_a_learned_variance_step_on_the_prediction_alone(name: str) -> None:
    sampler = make_sampler(name, make_schedule(ScheduleConfig()), 10)
    x = x_T()
    both = toy_learned(x, 500.0, "learned_range")
    assert not sampler.reads_variance and torch.equal(sampler.model_output(both, x), both[:, :1])


@pytest.mark.parametrize("ratio, max_value", [(0.995, 1.0), (0.9, 1.5), (0.5, 3.0)])
def test_dynamic_thresholding_is_diffusers(ratio: float, max_value: float) -> None:
    scheduler = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio,
                                        sample_max_value=max_value)
    x0_hat = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 1.6
    torch.testing.assert_close(dynamic_threshold(x0_hat, ratio, max_value), scheduler._threshold_sample(x0_hat))
    assert not torch.equal(dynamic_threshold(x0_hat, 0.9, 1.5), x0_hat.clamp(-1, 1))  # it is not clipping


@needs_diffusers
@pytest.mark.parametrize("name", ["ancestral", "ddim", "dpmpp_2m"])
def test_thresholded_runs_agree_with_diffusers(name: str) -> None:
    kind = {"ancestral": "DDPMScheduler", "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}[name]
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "leading"} \
        if name == "dpmpp_2m" else {}
    scheduler = getattr(diffusers, kind)(num_train_timesteps=1000, thresholding=True, dynamic_thresholding_ratio=0.9,
                                         sample_max_value=1.3, **extra)
    scheduler.set_timesteps(20)
    x, g = x_T() * 2, torch.Generator().manual_seed(5)
    for t in scheduler.timesteps:
        output = toy_model(x, t) * 3  # a model whose x0_hat leaves [-1, 1]: thresholding acts
        kwargs = {"generator": g} if name == "ancestral" else {}
        x = scheduler.step(output, t, x, **kwargs).prev_sample
    sampler = make_sampler(name, make_schedule(ScheduleConfig()), 20, clip_sample=False, thresholding=True,
                           dynamic_thresholding_ratio=0.9, sample_max_value=1.3)
    y = x_T() * 2
    sampler.start(y)
    zs = noises(20)
    for i in range(20):
        y = sampler.step(i, toy_model(y, sampler.timesteps[i]) * 3, y, zs[i] if sampler.needs_noise[i] else None)
    assert_agree(x, y, name)


# -- the loop, the command line, and bad combinations -------------------------------------------------------------


def test_lms_weights_integrate_polynomials_exactly() -> None:
    """Row i of the weights integrates any polynomial of degree < 4 through the last slopes exactly."""
    sigmas = torch.tensor([14.6, 9.0, 5.5, 3.1, 1.2, 0.4, 0.0], dtype=torch.float64)
    table = lms_coefficients(sigmas)
    cubic = np.polynomial.Polynomial([0.3, -1.1, 0.7, 0.05])
    for i in range(3, len(sigmas) - 1):
        estimate = sum(float(table[i, j]) * cubic(float(sigmas[i - j])) for j in range(4))
        exact = cubic.integ()(float(sigmas[i + 1])) - cubic.integ()(float(sigmas[i]))
        assert estimate == pytest.approx(exact, rel=1e-12)
    assert float(table[0, 0]) == pytest.approx(float(sigmas[1] - sigmas[0]))  # the first step is Euler's


@pytest.mark.parametrize("name", list(SIGMA_SAMPLERS))
def test_the_loop_runs_the_three_moves_and_images_do_not_depend_on_the_batch(name: str) -> None:
    """`sample.generate` (x_T = init_noise_sigma z, the scaled model input, the step) on a real U-Net:
    the same images from batches of 5 and of 2 + 3, every step's noise drawn per image."""
    torch.manual_seed(0)
    model = UNet(ModelConfig(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, num_groups=4)).eval()
    sampler = make_sampler(name, make_schedule(ScheduleConfig()), 6, timestep_spacing="trailing")
    runtime = Runtime(torch.device("cpu"), None, "float32")
    cpu = torch.device("cpu")
    whole = generate(model, sampler, NoiseSource(4, range(5), cpu), runtime)
    parts = torch.cat([generate(model, sampler, NoiseSource(4, indices, cpu), runtime)
                       for indices in (range(2), range(2, 5))])
    torch.testing.assert_close(parts, whole, rtol=0, atol=1e-5)
    seen = []
    generate(model, sampler, NoiseSource(4, range(5), cpu), runtime,
             on_step=lambda i, t, x, out: seen.append((i, float(t), float(x.abs().max()))))
    assert [i for i, _, _ in seen] == list(range(model_calls(name, 6)))
    assert seen[0][2] > 5  # the first step sees x_T = init_noise_sigma z: about 14.6 z at t = 999
    assert sampler.init_noise_sigma == pytest.approx(float(make_schedule(ScheduleConfig()).sigmas[-1]), rel=1e-6)


def test_every_sampler_samples_from_a_checkpoint_with_a_trajectory(trained_run, tmp_path, capsys) -> None:
    ckpt = trained_run / "checkpoints" / "latest.pt"
    for name in SIGMA_SAMPLERS:
        code, out, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--sampler", name, "--steps", "4", "--n", "3",
                                 "--out", tmp_path / f"{name}.png", "--trajectory", tmp_path / f"{name}.gif",
                                 "--set", "sample.sigma_schedule=karras")
        assert code == 0, err
        assert f"{name}, 4 steps (leading), Karras sigmas, from " in out
        assert ("7 model calls" in out) == (name == "heun")
        assert (tmp_path / f"{name}.png").stat().st_size and (tmp_path / f"{name}_strip.png").stat().st_size


@pytest.mark.parametrize("args, says", [
    (["--sampler", "euler_ancestral", "--steps", "5", "--eta", "0.5"], "eta is DDIM's"),
    (["--steps", "5", "--set", "sample.sigma_schedule=karras"], "sample.sigma_schedule: karras"),
    (["--sampler", "ddim", "--steps", "5", "--set", "sample.sigma_schedule=karras"], "sample.sigma_schedule"),
    (["--steps", "5", "--set", "sample.thresholding=true"], "sample.thresholding: replaces clip_sample"),
    (["--sampler", "heun", "--steps", "1"], "heun takes at least 2 steps"),
    (["--sampler", "lms", "--steps", "5", "--set", "sample.variance_type=fixed_medium"], "sample.variance_type"),
])
def test_bad_combinations_are_one_line_before_any_work(trained_run, tmp_path, capsys, args, says) -> None:
    code, _, err = run_cli(capsys, "sample", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "2",
                           "--out", tmp_path / "x.png", *args)
    one_line_error(code, err, says)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("sets", [["sample.sampler=euler"], ["sample.sampler=dpmpp_2m", "sample.sigma_schedule=karras"],
                                  ["train.preview_sampler=heun"]])
def test_what_starts_from_sigma_T_is_refused_at_zero_terminal_snr(capsys, sets) -> None:
    args = [item for key in ["schedule.rescale_zero_terminal_snr=true", "model.prediction_type=v", *sets]
            for item in ("--set", key)]
    code, _, err = run_cli(capsys, "config", "--config", str(SMOKE), *args)
    one_line_error(code, err, "is infinite")


def test_schedule_shows_the_sigmas_a_sampler_visits(tmp_path, capsys) -> None:
    code, out, err = run_cli(capsys, "schedule", "-s", "scaled_linear", "--steps", "10", "--set",
                             "schedule.beta_start=0.00085", "--set", "schedule.beta_end=0.012", "--set",
                             "sample.sampler=euler", "--set", "sample.sigma_schedule=karras", "--set",
                             "sample.timestep_spacing=linspace", "--plot", tmp_path / "s.png")
    assert code == 0, err
    assert "sigma max (init_noise_sigma): 14.6146" in out
    assert "euler, 10 steps (linspace, Karras sigmas), from x_T = 14.6146 z" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and len(line.split()) == 3]
    sigmas = [float(row[2]) for row in rows]
    assert len(sigmas) == 10 and sigmas[0] == pytest.approx(14.6146, rel=1e-5)
    expected = karras_sigmas(sigmas[-1], sigmas[0], 10)
    assert sigmas == pytest.approx(expected.tolist(), rel=1e-5)
    assert (tmp_path / "s.png").stat().st_size > 0
    code, out, _ = run_cli(capsys, "schedule", "--steps", "4", "--set", "sample.sampler=heun")
    assert code == 0 and "7 model calls" in out


def test_a_config_takes_every_sampler_name() -> None:
    cfg = load_config(SMOKE, ["sample.sampler=lms", "sample.steps=7"])
    assert cfg.sample.sampler == "lms"


# -- the step of the samplers on x_t against the paper, and the loop's fixed buffers ----------------------------


ALL_PREDICTIONS = ["epsilon", "v", "x0"]
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}


def inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 1, 28, 28, generator=g, dtype=torch.float64) for _ in range(3))  # type: ignore[return-value]


@pytest.mark.parametrize("prediction", ALL_PREDICTIONS)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("t", [999, 500, 1])
def test_ancestral_step_matches_hand_computed_values(prediction: str, variance: str, t: int) -> None:
    b = make_betas("linear", 1000)  # float64
    abar = torch.cumprod(1 - b, 0)
    x_t, output, z = inputs(t)
    # Eq. (15) and its v and x0 counterparts, then Eq. (7), written out in float64
    if prediction == "epsilon":
        x0 = (x_t - (1 - abar[t]).sqrt() * output) / abar[t].sqrt()
    elif prediction == "v":
        x0 = abar[t].sqrt() * x_t - (1 - abar[t]).sqrt() * output
    else:
        x0 = output
    x0 = x0.clamp(-1, 1)
    mean = abar[t - 1].sqrt() * b[t] / (1 - abar[t]) * x0 + (1 - b[t]).sqrt() * (1 - abar[t - 1]) / (1 - abar[t]) * x_t
    var = b[t] * (1 - abar[t - 1]) / (1 - abar[t]) if variance == "fixed_small" else b[t]
    expected = mean + var.sqrt() * z
    sampler = make_sampler("ancestral", make_schedule(ScheduleConfig()), 1000, prediction_type=prediction,
                           variance_type=variance)
    got = step_at(sampler, output.float(), t, x_t.float(), z.float())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_unclipped_epsilon_step_is_algorithm_2_line_4() -> None:
    """x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps) + sigma_t z."""
    b = make_betas("linear", 1000)
    abar = torch.cumprod(1 - b, 0)
    sampler = make_sampler("ancestral", make_schedule(ScheduleConfig()), 1000, clip_sample=False)
    for t in (999, 300, 1):
        x_t, eps, z = inputs(t)
        sigma = (b[t] * (1 - abar[t - 1]) / (1 - abar[t])).sqrt()
        expected = (x_t - b[t] / (1 - abar[t]).sqrt() * eps) / (1 - b[t]).sqrt() + sigma * z
        torch.testing.assert_close(step_at(sampler, eps.float(), t, x_t.float(), z.float()).double(), expected,
                                   rtol=1e-5, atol=1e-4)


def test_last_step_adds_no_noise_and_others_need_it() -> None:
    sampler = make_sampler("ancestral", make_schedule(ScheduleConfig()), 1000)
    assert sampler.timesteps[0] == 999 and sampler.timesteps[-1] == 0  # 0-indexed, T-1 down to 0
    assert sampler.needs_noise == [True] * 999 + [False]
    x_t, out, z = (v.float() for v in inputs(0))
    assert torch.equal(sampler.step(999, out, x_t, z), sampler.step(999, out, x_t, None))  # z is not used
    assert not torch.equal(sampler.step(994, out, x_t, z), sampler.step(994, out, x_t, None))


def test_ddim_with_eta_1_on_every_step_is_the_ancestral_step() -> None:
    """Song et al.: eta = 1 over all T steps gives DDPM's posterior with beta-tilde (no clipping)."""
    schedule = make_schedule(ScheduleConfig())
    ddpm = make_sampler("ancestral", schedule, 1000, clip_sample=False)
    ddim = make_sampler("ddim", schedule, 1000, eta=1.0, clip_sample=False)
    for t in (999, 400, 3):
        x_t, out, z = (v.float() for v in inputs(t))
        torch.testing.assert_close(step_at(ddim, out, t, x_t, z), step_at(ddpm, out, t, x_t, z), rtol=1e-4, atol=1e-4)


def test_ddim_eta_0_is_deterministic_and_respaced() -> None:
    sampler = make_sampler("ddim", make_schedule(ScheduleConfig()), 50)
    assert sampler.timesteps.tolist() == spaced_timesteps(1000, 50) == list(range(980, -1, -20))
    assert not any(sampler.needs_noise)


@needs_diffusers
@pytest.mark.parametrize("prediction", ALL_PREDICTIONS)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("steps", [1000, 50])
def test_ancestral_step_agrees_with_diffusers(prediction: str, variance: str, clip: bool, steps: int) -> None:
    theirs = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=DIFFUSERS_PREDICTION[prediction],
        variance_type=variance, clip_sample=clip,
    )
    theirs.set_timesteps(steps)
    ours = make_sampler("ancestral", make_schedule(ScheduleConfig(beta_schedule="cosine")), steps,
                        prediction_type=prediction, variance_type=variance, clip_sample=clip)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    for t in (int(ours.timesteps[0]), int(ours.timesteps[len(ours.timesteps) // 2]), int(ours.timesteps[-1])):
        x_t, out, _ = (v.float() for v in inputs(t))
        expected = theirs.step(out, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(7))  # the noise diffusers drew
        torch.testing.assert_close(step_at(ours, out, t, x_t, z), expected, rtol=1e-4, atol=1e-4)


@needs_diffusers
@pytest.mark.parametrize("prediction", ALL_PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_agrees_with_diffusers(prediction: str, eta: float) -> None:
    theirs = diffusers.DDIMScheduler(num_train_timesteps=1000, prediction_type=DIFFUSERS_PREDICTION[prediction])
    theirs.set_timesteps(20)
    ours = make_sampler("ddim", make_schedule(ScheduleConfig()), 20, prediction_type=prediction, eta=eta)
    for t in (int(ours.timesteps[0]), int(ours.timesteps[-1])):
        x_t, out, _ = (v.float() for v in inputs(t))
        expected = theirs.step(out, t, x_t, eta=eta, generator=torch.Generator().manual_seed(3)).prev_sample
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(step_at(ours, out, t, x_t, z if eta else None), expected, rtol=1e-4, atol=1e-4)


def static_vs_eager(device: torch.device, sampler_kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = UNet(ModelConfig(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[14],
                             num_groups=4, dropout=0.0)).to(device).eval()
    for p in model.parameters():  # give the zero-initialised layers weights: a model that does something
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    sampler = make_sampler(sampler_kind, make_schedule(ScheduleConfig()).to(device), 25, device=device,
                           eta=0.5 if sampler_kind == "ddim" else 0.0)
    runtime = Runtime(device, None, "float32")
    runs = [generate(model, sampler, NoiseSource(3, range(5), device), runtime, static=static)
            for static in (False, True)]
    return runs[0], runs[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", SAMPLER_NAMES)
def test_static_buffer_step_gives_the_eager_images(kind: str) -> None:
    """On CPU the CUDA-graph path runs its step eagerly on the fixed buffers: same images."""
    eager, static = static_vs_eager(torch.device("cpu"), kind)
    torch.testing.assert_close(static, eager, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the CUDA-graph capture itself")
@pytest.mark.parametrize("kind", SAMPLER_NAMES)
def test_cuda_graph_replay_gives_the_eager_images(kind: str) -> None:
    eager, graphed = static_vs_eager(torch.device("cuda"), kind)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-4)


@pytest.mark.parametrize("prediction", ALL_PREDICTIONS)
def test_x0_hat_at_the_cosine_schedules_last_step_does_not_cancel(prediction: str) -> None:
    """abar is about 2.4e-9 at t = 999 of the cosine schedule: x0_hat = a x_t + b eps with a and b
    near +-2e4 lost up to 7.6e-3 to cancellation. Against float64 from the same float32 inputs.

    What remains (1.2e-4) is float32's own limit, as in diffusers: sqrt(1 - abar) = 1 - 1.2e-9 is
    1.0 in float32, and 1.2e-9 |eps| / sqrt(abar) is about 1e-4."""
    schedule = make_schedule(ScheduleConfig(beta_schedule="cosine"))
    sampler = make_sampler("ancestral", schedule, 1000, prediction_type=prediction, clip_sample=False)
    abar = torch.cumprod(1 - make_betas("cosine", 1000), 0)[999]  # float64
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(64, 1, 28, 28, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_t = (abar.sqrt() * x0 + (1 - abar).sqrt() * eps).float()  # a consistent x_t: the hard case
    target = {"epsilon": eps, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0, "x0": x0}[prediction]
    output = (target + 1e-6 * torch.randn(x0.shape, generator=g, dtype=torch.float64)).float()
    x, out = x_t.double(), output.double()
    exact = {"epsilon": (x - (1 - abar).sqrt() * out) / abar.sqrt(),
             "v": abar.sqrt() * x - (1 - abar).sqrt() * out, "x0": out}[prediction]
    got = sampler.predict_x0(0, output, x_t).double()
    assert (got - exact).abs().max() < 2.5e-4


def test_a_respaced_run_keeps_the_originals_noise_levels() -> None:
    """Respacing keeps each visited timestep's alpha-bar: step i of 37 is the original's timestep t_i."""
    schedule = make_schedule(ScheduleConfig(beta_schedule="cosine"))
    sampler = make_sampler("ancestral", schedule, 37)
    kept = sampler.timesteps.tolist()
    torch.testing.assert_close(sampler.alphas_cumprod[:-1].float(), schedule.alphas_cumprod[kept], rtol=1e-5, atol=0)
    assert sampler.alphas_cumprod[-1] == 1  # after the last step: the clean image
    whole = make_sampler("ancestral", schedule, 1000)  # recomputed from the float32 betas: equal up to rounding
    torch.testing.assert_close(whole.alphas_cumprod[:-1].float(), schedule.alphas_cumprod.flip(0), rtol=1e-4, atol=0)


def test_one_sampler_class_per_name_and_the_step_limits_in_one_place() -> None:

    assert tuple(SAMPLERS) == SAMPLER_NAMES
    schedule = make_schedule(ScheduleConfig(num_timesteps=10))
    for name in SAMPLER_NAMES:
        assert make_sampler(name, schedule, max_steps(name, 10)).num_steps == model_calls(name, max_steps(name, 10))
        with pytest.raises(ValueError, match=f"{name} takes {min_steps(name)} to {max_steps(name, 10)} steps"):
            make_sampler(name, schedule, max_steps(name, 10) + 1)
