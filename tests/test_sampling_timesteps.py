"""Timestep spacings: which timesteps a run of fewer than T steps visits, against diffusers.

Random schedules (all four kinds, random beta ranges, T in {50, 100, 1000}), every prediction type,
step counts that do and do not divide T, with and without clipping: the timesteps, and whole loops
from fixed noise, agree with diffusers' schedulers to 1e-4 of the values' scale. Where diffusers'
DDIM takes a previous timestep that is not the next one visited (t - T // steps, which differs for
linspace, and for trailing when the steps do not divide T), the loop is checked against Eq. (12)
written out in float64 instead.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import FIXTURE_ROOT, SMOKE, run_cli
from helpers import step_at

from ddpm_mnist.config import ScheduleConfig, load_config
from ddpm_mnist.maths.diffusion import spaced_timesteps
from ddpm_mnist.maths.samplers import make_sampler
from ddpm_mnist.maths.schedule import make_betas, make_schedule

diffusers = pytest.importorskip("diffusers")

SPACINGS = ["leading", "trailing", "linspace"]
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}
KINDS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2", "sigmoid": "sigmoid"}


def random_schedule(rng: random.Random) -> tuple[ScheduleConfig, dict]:
    kind = rng.choice(list(KINDS))
    T = rng.choice([50, 100, 1000])
    start = 10 ** rng.uniform(-4.5, -3)
    end = rng.uniform(0.005, 0.03) * 1000 / T  # a shorter chain takes larger steps
    ours = ScheduleConfig(beta_schedule=kind, num_timesteps=T, beta_start=start, beta_end=min(end, 0.5))
    theirs = {"num_train_timesteps": T, "beta_schedule": KINDS[kind], "beta_start": start, "beta_end": min(end, 0.5)}
    return ours, theirs


def model(x: torch.Tensor, t: int, T: int) -> torch.Tensor:
    """A fixed stand-in for the network: an output of the right scale that depends on x and t."""
    return 0.6 * x + 0.4 * torch.sin(x * 3 + t / T * 6)


@pytest.mark.parametrize("T", [50, 100, 1000])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_are_diffusers(T: int, spacing: str) -> None:
    for steps in sorted({1, 2, 3, 7, 13, T // 3, T // 2, T - 1, T}):
        theirs = diffusers.DDPMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        theirs.set_timesteps(steps)
        assert spaced_timesteps(T, steps, spacing) == theirs.timesteps.tolist(), (T, steps)
    assert spaced_timesteps(T, T, spacing) == list(range(T - 1, -1, -1))  # the full loop, whatever the spacing


def test_leading_never_starts_at_the_last_timestep_and_the_others_do() -> None:
    assert spaced_timesteps(1000, 50, "leading")[0] == 980
    assert spaced_timesteps(1000, 50, "trailing")[0] == spaced_timesteps(1000, 50, "linspace")[0] == 999


def run_loop(step, timesteps: list[int], T: int, x_T: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = x_T.clone()
    for t in timesteps:
        x = step(model(x, t, T), t, x, g)
    return x


@pytest.mark.parametrize("case", range(24))
def test_ancestral_loops_agree_with_diffusers(case: int) -> None:
    rng = random.Random(case)
    ours_cfg, theirs_cfg = random_schedule(rng)
    T, spacing = ours_cfg.num_timesteps, SPACINGS[case % 3]
    steps = rng.choice([T, T // 4, 7, 13, max(2, T // 3 + 1)])
    prediction, clip = rng.choice(list(PREDICTIONS)), rng.random() < 0.5
    theirs = diffusers.DDPMScheduler(**theirs_cfg, prediction_type=PREDICTIONS[prediction], clip_sample=clip,
                                     timestep_spacing=spacing, variance_type="fixed_small")
    theirs.set_timesteps(steps)
    ours = make_sampler("ancestral", make_schedule(ours_cfg), steps, prediction_type=prediction, clip_sample=clip,
                          timestep_spacing=spacing)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(case))

    def their_step(out, t, x, g):
        return theirs.step(out, t, x, generator=g).prev_sample

    def our_step(out, t, x, g):  # the noise diffusers draws (at every t > 0; ours adds none at the last step)
        z = torch.randn(x.shape, generator=g) if t > 0 else None
        return step_at(ours, out, t, x, z)

    a = run_loop(their_step, ours.timesteps.tolist(), T, x_T, case)
    b = run_loop(our_step, ours.timesteps.tolist(), T, x_T, case)
    scale = max(1.0, float(a.abs().max()))
    assert float((a - b).abs().max()) <= 1e-4 * scale, (ours_cfg, steps, spacing, prediction, clip)


def ddim_reference(schedule_cfg: ScheduleConfig, timesteps: list[int], prediction: str, clip: bool, x: torch.Tensor,
                   T: int) -> torch.Tensor:
    """DDIM with eta = 0, Eq. (12), in float64 on the timesteps visited (the next one, or abar = 1 at the end)."""
    no_noise = [torch.zeros_like(x)] * len(timesteps)
    return ddim_eta_reference(schedule_cfg, timesteps, prediction, clip, 0.0, x, no_noise, T)


@pytest.mark.parametrize("case", range(24))
def test_ddim_loops_agree_with_diffusers_or_float64(case: int) -> None:
    rng = random.Random(100 + case)
    ours_cfg, theirs_cfg = random_schedule(rng)
    T, spacing = ours_cfg.num_timesteps, SPACINGS[case % 3]
    steps = rng.choice([T // 4, T // 10, 7, 13, max(2, T // 3 + 1)])
    prediction, clip = rng.choice(list(PREDICTIONS)), rng.random() < 0.5
    ours = make_sampler("ddim", make_schedule(ours_cfg), steps, prediction_type=prediction, clip_sample=clip,
                          timestep_spacing=spacing)
    timesteps = ours.timesteps.tolist()
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(case))
    b = run_loop(lambda out, t, x, g: step_at(ours, out, t, x), timesteps, T, x_T, case)
    uniform = all(a - c == T // steps for a, c in zip(timesteps, timesteps[1:], strict=False))
    uniform = uniform and timesteps[-1] < T // steps and ours_cfg.beta_schedule != "sigmoid"  # not in its DDIM
    if uniform:  # diffusers' previous timestep (t - T // steps) is the next one visited
        theirs = diffusers.DDIMScheduler(**theirs_cfg, prediction_type=PREDICTIONS[prediction], clip_sample=clip,
                                         timestep_spacing=spacing)
        theirs.set_timesteps(steps)
        assert timesteps == theirs.timesteps.tolist()
        a = run_loop(lambda out, t, x, g: theirs.step(out, t, x, eta=0.0).prev_sample, timesteps, T, x_T, case)
    else:
        a = ddim_reference(ours_cfg, timesteps, prediction, clip, x_T, T).float()
    scale = max(1.0, float(a.abs().max()))
    assert float((a - b).abs().max()) <= 1e-4 * scale, (ours_cfg, steps, spacing, prediction, clip, uniform)


@pytest.mark.slow
def test_changing_T_alone_works_for_every_command(tmp_path, capsys) -> None:
    for config in ("configs/cpu.yaml", "configs/mnist.yaml"):  # sample.steps: 0, the full loop
        for command in ("config", "schedule"):
            code, _, err = run_cli(capsys, command, "--config", config, "--set", "schedule.num_timesteps=10")
            assert code == 0, (config, command, err)
    code, _, err = run_cli(capsys, "config", "--config", SMOKE, "--set", "schedule.num_timesteps=10")
    assert code == 2 and "sample.steps: must be <= schedule.num_timesteps (10), got 20" in err  # pinned to 20
    sets = [f"data.root={FIXTURE_ROOT}", f"out_dir={tmp_path}", "schedule.num_timesteps=30", "sample.steps=0",
            "train.steps=4", "train.sample_every=0"]
    args = ["train", "--config", SMOKE, *[a for item in sets for a in ("--set", item)]]
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err  # train.preview_steps 10 of T = 30; sample.steps 0: the full loop
    cfg = load_config(SMOKE, sets)
    assert cfg.reverse_steps == 30 and cfg.preview_steps == 10
    assert load_config(SMOKE, [*sets, "schedule.num_timesteps=5"]).preview_steps == 5
    dpm = [*sets, "schedule.num_timesteps=5", "train.preview_sampler=dpmpp_2m"]
    assert load_config(SMOKE, dpm).preview_steps == 4  # dpmpp_2m: at most T - 1
    ckpt = tmp_path / "smoke" / "checkpoints" / "latest.pt"
    code, out, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--n", "2", "--out", tmp_path / "g.png")
    assert code == 0 and "ancestral, 30 steps" in out, err
    code, out, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--n", "2", "--steps", "7", "--out", tmp_path / "h.png",
                             "--set", "sample.timestep_spacing=trailing")
    assert code == 0 and "ancestral, 7 steps (trailing)" in out, err
    code, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--steps", "31")
    assert code == 2 and "sample.steps: must be <= schedule.num_timesteps (30), got 31" in err


# --- DPM-Solver++(2M) ----------------------------------------------------------------------------

DPM_KINDS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@pytest.mark.parametrize("T", [50, 100, 1000])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_dpm_solver_timesteps_are_diffusers(T: int, spacing: str) -> None:
    from ddpm_mnist.maths.diffusion import dpm_solver_timesteps

    for steps in sorted({1, 2, 3, 7, 13, T // 3, T // 2, T - 1}):
        theirs = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        theirs.set_timesteps(steps)
        assert dpm_solver_timesteps(T, steps, spacing) == theirs.timesteps.tolist(), (T, steps)


def dpm_solver_reference(abar: torch.Tensor, timesteps: list[int], prediction: str, clip: bool, x: torch.Tensor,
                         T: int) -> torch.Tensor:
    """DPM-Solver++(2M) in float64, Lu et al. 2022, Algorithm 2, written out step by step."""
    x, previous, h_previous = x.double(), None, None
    for i, s in enumerate(timesteps):
        last = i == len(timesteps) - 1
        a_s, a_t = abar[s], (torch.tensor(1.0, dtype=torch.float64) if last else abar[timesteps[i + 1]])
        alpha_s, sigma_s, alpha_t, sigma_t = a_s.sqrt(), (1 - a_s).sqrt(), a_t.sqrt(), (1 - a_t).sqrt()
        out = model(x.float(), s, T).double()
        x0 = {"epsilon": (x - sigma_s * out) / alpha_s, "v": alpha_s * x - sigma_s * out, "x0": out}[prediction]
        if clip:
            x0 = x0.clamp(-1, 1)
        h = torch.log(alpha_t / sigma_t) - torch.log(alpha_s / sigma_s)
        if previous is None or last:
            d = x0  # first order: the first step, and the last
        else:
            r = h_previous / h
            d = x0 + (x0 - previous) / (2 * r)
        x = (sigma_t / sigma_s) * x + alpha_t * (1 - torch.exp(-h)) * d
        previous, h_previous = x0, h
    return x


@pytest.mark.parametrize("case", range(24))
def test_dpm_solver_loops_agree_with_diffusers(case: int) -> None:
    rng = random.Random(200 + case)
    kind = rng.choice(list(DPM_KINDS))
    T = rng.choice([50, 100, 1000])
    start, end = 10 ** rng.uniform(-4.5, -3), min(0.5, rng.uniform(0.005, 0.03) * 1000 / T)
    spacing, prediction = SPACINGS[case % 3], rng.choice(list(PREDICTIONS))
    steps = rng.choice([5, 10, 20, 25, min(T - 1, 50), T // 3])
    theirs = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, beta_schedule=DPM_KINDS[kind], beta_start=start, beta_end=end,
        prediction_type=PREDICTIONS[prediction], timestep_spacing=spacing, algorithm_type="dpmsolver++",
        solver_order=2, lower_order_final=True)
    theirs.set_timesteps(steps)
    cfg = ScheduleConfig(beta_schedule=kind, num_timesteps=T, beta_start=start, beta_end=end)
    ours = make_sampler("dpmpp_2m", make_schedule(cfg), steps, prediction_type=prediction,
                          clip_sample=False, timestep_spacing=spacing)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(case))
    a = run_loop(lambda out, t, x, g: theirs.step(out, t, x).prev_sample, ours.timesteps.tolist(), T, x_T, case)
    b = run_loop(lambda out, t, x, g: step_at(ours, out, t, x), ours.timesteps.tolist(), T, x_T, case)
    scale = max(1.0, float(a.abs().max()))
    assert float((a - b).abs().max()) <= 1e-4 * scale, (cfg, steps, spacing, prediction)


@pytest.mark.parametrize("case", range(12))
def test_dpm_solver_with_clipping_and_zero_terminal_snr_against_float64(case: int) -> None:
    """Where diffusers has no counterpart (clip_sample; it moves abar_(T-1) = 0 to 2**-24), float64."""
    rng = random.Random(300 + case)
    zero_snr = case % 2 == 0
    kind, T = rng.choice(["linear", "cosine", "sigmoid", "scaled_linear"]), rng.choice([50, 100, 1000])
    prediction = rng.choice(["v", "x0"] if zero_snr else list(PREDICTIONS))
    cfg = ScheduleConfig(beta_schedule=kind, num_timesteps=T, rescale_zero_terminal_snr=zero_snr)
    steps, spacing = rng.choice([7, 20, 30]), rng.choice(SPACINGS)
    ours = make_sampler("dpmpp_2m", make_schedule(cfg), steps, prediction_type=prediction,
                          clip_sample=True, timestep_spacing=spacing)
    timesteps = ours.timesteps.tolist()
    assert not zero_snr or spacing == "leading" or timesteps[0] == T - 1  # starts at zero SNR: a first-order step
    abar = torch.cumprod(1 - make_schedule(cfg).betas.double(), 0)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(case))
    b = run_loop(lambda out, t, x, g: step_at(ours, out, t, x), timesteps, T, x_T, case)
    a = dpm_solver_reference(abar, timesteps, prediction, True, x_T, T)
    assert torch.isfinite(b).all()
    assert float((a - b.double()).abs().max()) <= 1e-4 * max(1.0, float(a.abs().max())), (cfg, steps, spacing)


def test_dpm_solver_refuses_the_full_loop(capsys) -> None:
    code, _, err = run_cli(capsys, "config", "--set", "sample.sampler=dpmpp_2m")
    assert code == 2 and "dpmpp_2m takes fewer than schedule.num_timesteps (1000) steps, got 1000 (0: the full loop)" \
        in err
    code, out, _ = run_cli(capsys, "config", "--set", "sample.sampler=dpmpp_2m", "--set", "sample.steps=20")
    assert code == 0 and "sampler: dpmpp_2m" in out



def ddim_eta_reference(schedule_cfg: ScheduleConfig, timesteps: list[int], prediction: str, clip: bool, eta: float,
                       x: torch.Tensor, noise: list[torch.Tensor], T: int) -> torch.Tensor:
    """DDIM with eta, Eq. (12) and (16), in float64 on the timesteps visited, adding sigma_t z."""
    b = make_betas(schedule_cfg.beta_schedule, T, schedule_cfg.beta_start, schedule_cfg.beta_end)
    abar = torch.cumprod(1 - b.float().double(), 0)  # from the float32 betas, as both tools store them
    x = x.double()
    for i, t in enumerate(timesteps):
        out = model(x.float(), t, T).double()
        last = i + 1 == len(timesteps)
        a, a_prev = abar[t], torch.tensor(1.0, dtype=x.dtype) if last else abar[timesteps[i + 1]]
        if prediction == "epsilon":
            x0, eps = (x - (1 - a).sqrt() * out) / a.sqrt(), out
        elif prediction == "v":
            x0, eps = a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x
        else:
            x0, eps = out, (x - a.sqrt() * out) / (1 - a).sqrt()
        if clip:
            x0 = x0.clamp(-1, 1)
        sigma = torch.tensor(0.0, dtype=x.dtype) if last else eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps + sigma * noise[i].double()
    return x


def test_ddim_with_eta_near_t_0_agrees_with_float64() -> None:
    """1 - abar_{t-1} near t = 0 is about 1e-5: DDIM's tables come from float64 alpha-bars, so that
    sqrt(1 - abar_{t-1} - sigma_t^2) keeps its digits (once 7e-3 off at eta = 1, x0 prediction)."""
    rng, worst = random.Random(7), []
    cases = [ScheduleConfig(beta_schedule="scaled_linear", num_timesteps=1000, beta_start=8.6e-6, beta_end=0.012)]
    for _ in range(150):
        kind, T = rng.choice(list(KINDS)), rng.choice([100, 1000])
        start, end = 10 ** rng.uniform(-5.5, -3), rng.uniform(0.005, 0.03) * 1000 / T
        cases.append(ScheduleConfig(beta_schedule=kind, num_timesteps=T, beta_start=start, beta_end=min(end, 0.5)))
    for case, schedule_cfg in enumerate(cases):
        T = schedule_cfg.num_timesteps
        steps = 997 if case == 0 else rng.choice([T - 3, T // 2, T // 10, 7, T])
        eta, clip = (1.0, False) if case == 0 else (rng.choice([0.0, 0.5, 1.0]), rng.random() < 0.5)
        prediction = "x0" if case == 0 else rng.choice(["x0", "x0", "v", "epsilon"])
        ours = make_sampler("ddim", make_schedule(schedule_cfg), steps, prediction_type=prediction,
                              clip_sample=clip, eta=eta)
        timesteps, g = ours.timesteps.tolist(), torch.Generator().manual_seed(case)
        x = torch.randn(2, 1, 6, 6, generator=g)
        noise = [torch.randn(2, 1, 6, 6, generator=g) for _ in timesteps]
        expected = ddim_eta_reference(schedule_cfg, timesteps, prediction, clip, eta, x, noise, T)
        for i, t in enumerate(timesteps):
            x = ours.step(i, model(x, t, T), x, noise[i] if ours.needs_noise[i] else None)
        worst.append((float((expected - x.double()).abs().max()) / max(1.0, float(expected.abs().max())),
                      schedule_cfg, steps, eta, prediction, clip))
    assert max(worst, key=lambda w: w[0])[0] <= 1e-4, max(worst, key=lambda w: w[0])
