"""The schedule report: what `ddpm schedule` prints, and its CSV and plot."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ddpm_mnist.config import Config
from ddpm_mnist.errors import UserError
from ddpm_mnist.maths.schedule import NoiseSchedule, make_schedule, summary_rows
from ddpm_mnist.paths import atomic_file, check_paths, check_suffix, ensure_writable


def describe_schedule(label: str, cfg: Config, schedule: NoiseSchedule) -> str:
    """A short summary and a table at a few timesteps."""
    s = cfg.schedule
    betas = schedule.betas
    lines = [
        f"{label}: {s.beta_schedule} schedule, T = {schedule.num_timesteps}"
        + (", rescaled to zero terminal SNR" if s.rescale_zero_terminal_snr else ""),
        f"  beta from {float(betas[0]):.6g} to {float(betas[-1]):.6g} (max {float(betas.max()):.6g})",
        f"  alpha_bar at t = T-1: {float(schedule.alphas_cumprod[-1]):.6g}",
        f"  sigma max (init_noise_sigma): {schedule.init_noise_sigma:.6g}",
        f"  {'t':>6} {'beta':>12} {'alpha_bar':>12} {'sigma':>12} {'snr':>12}",
    ]
    for row in summary_rows(schedule):
        lines.append(
            f"  {row['t']:>6} {row['beta']:>12.6g} {row['alpha_bar']:>12.6g} "
            f"{row['sigma']:>12.6g} {row['snr']:>12.6g}"
        )
    return "\n".join(lines)


def visited_sigmas(cfg: Config) -> tuple[str, list[tuple[float, float]], float]:
    """What the config's sampler visits: (a heading, (timestep, sigma) of each model call, x_T's scale)."""
    from ddpm_mnist.maths.samplers import sampler_for

    s, sampler = cfg.sample, sampler_for(cfg, "cpu")
    how = ", Karras sigmas" if s.sigma_schedule == "karras" else ""
    calls = f", {sampler.num_steps} model calls" if sampler.num_steps != cfg.reverse_steps else ""
    start = (f"x_T = {sampler.init_noise_sigma:.6g} z (init_noise_sigma: the sigma view, x = x_t / sqrt(abar_t))"
             if sampler.init_noise_sigma != 1 else "x_T = z (on x_t itself; sigma is that of its alpha-bar)")
    heading = f"  {s.sampler}, {cfg.reverse_steps} steps ({s.timestep_spacing}{how}{calls}), from {start}"
    pairs = [(float(t), float(sigma)) for t, sigma in zip(sampler.timesteps.tolist(), sampler.noise_levels.tolist(),
                                                          strict=True)]
    return heading, pairs, sampler.init_noise_sigma


def describe_visits(cfg: Config) -> str:
    """The sigmas the config's sampler visits at its sample.steps, a line per model call."""
    heading, pairs, _ = visited_sigmas(cfg)
    lines = [heading, f"  {'call':>6} {'t':>10} {'sigma':>12}"]
    lines += [f"  {i:>6} {t:>10.6g} {sigma:>12.6g}" for i, (t, sigma) in enumerate(pairs)]
    return "\n".join(lines)


def report_schedules(configs: dict[str, Config], csv: Path | None = None, plot: Path | None = None,
                     inputs: list[Path] | None = None, visits: bool = False) -> str:
    """Summaries of each config's schedule (`visits`: and the sigmas its sampler visits); writes the
    CSV (one config) and the plot if asked (neither may be one of the config files `inputs`)."""
    if csv is not None:
        ensure_writable(check_suffix(csv, "--csv", (".csv",)))
    if plot is not None:
        ensure_writable(check_suffix(plot, "--plot", (".png",)))
    check_paths({"--csv": csv, "--plot": plot}, inputs={f"--config {path}": path for path in inputs or []})
    schedules = {label: make_schedule(cfg.schedule) for label, cfg in configs.items()}
    text = [describe_schedule(label, configs[label], sch) + ("\n" + describe_visits(configs[label]) if visits else "")
            for label, sch in schedules.items()]
    if csv is not None:
        (schedule,) = schedules.values()
        try:
            write_csv(schedule, csv)
        except OSError as exc:
            raise UserError(f"cannot write {csv}: {exc.strerror or exc}") from None
        text.append(f"wrote {csv} ({schedule.num_timesteps} rows)")
    if plot is not None:
        from ddpm_mnist.plots import save_figure, schedule_figure

        try:
            marks = {label: visited_sigmas(cfg)[1:] for label, cfg in configs.items()} if visits else {}
            save_figure(schedule_figure(schedules, marks), plot)
        except OSError as exc:
            raise UserError(f"cannot write {plot}: {exc.strerror or exc}") from None
        text.append(f"wrote {plot}")
    return "\n".join(text)


# Columns of `ddpm schedule --csv`: the first four are fixed, the rest may grow.
CSV_COLUMNS = {
    "t": None,
    "beta": "betas",
    "alpha_bar": "alphas_cumprod",
    "sigma": "sigmas",
    "alpha": "alphas",
    "sqrt_alpha_bar": "sqrt_alphas_cumprod",
    "sqrt_one_minus_alpha_bar": "sqrt_one_minus_alphas_cumprod",
    "posterior_variance": "posterior_variance",
    "snr": "snr",
    "posterior_mean_coef1": "posterior_mean_coef1",
    "posterior_mean_coef2": "posterior_mean_coef2",
}


def write_csv(schedule: NoiseSchedule, path: Path) -> None:
    """One row per timestep, numbers at full float32 precision (shortest round-tripping form)."""
    columns = [getattr(schedule, attr).numpy() for attr in CSV_COLUMNS.values() if attr]
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for t in range(schedule.num_timesteps):
            writer.writerow([t, *(np.format_float_positional(c[t], unique=True, trim="-") for c in columns)])
