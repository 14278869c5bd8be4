"""Figures: the schedule plot (beta, alpha-bar and sigma against t), for files and TensorBoard."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen needed

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ddpm_mnist.schedule import NoiseSchedule  # noqa: E402


def schedule_figure(schedules: dict[str, NoiseSchedule]) -> Figure:
    """Three panels, beta_t, alpha-bar_t and sigma_t against t, one line per labelled schedule."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    panels = [
        ("betas", r"$\beta_t$", "log"),
        ("alphas_cumprod", r"$\bar\alpha_t$", "linear"),
        ("sigmas", r"$\sigma_t=\sqrt{(1-\bar\alpha_t)/\bar\alpha_t}$", "log"),
    ]
    for ax, (attr, title, yscale) in zip(axes, panels, strict=True):
        for label, schedule in schedules.items():
            ax.plot(getattr(schedule, attr).numpy(), label=label, linewidth=1.6)
        ax.set_title(title)
        ax.set_xlabel("t (0-indexed)")
        ax.set_yscale(yscale)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def write_schedule_plot(schedules: dict[str, NoiseSchedule], path: str | Path) -> None:
    """Save `schedule_figure` as a PNG."""
    fig = schedule_figure(schedules)
    fig.savefig(path, dpi=110)
    plt.close(fig)
