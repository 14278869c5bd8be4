"""Figures: the schedule plot (beta, alpha-bar and sigma against t), the sampler and guidance sweeps,
and the trajectory strip."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen needed

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ddpm_mnist.maths.schedule import NoiseSchedule  # noqa: E402
from ddpm_mnist.paths import atomic_file  # noqa: E402


def schedule_figure(schedules: dict[str, NoiseSchedule],
                    visits: dict[str, tuple[list[tuple[float, float]], float]] | None = None) -> Figure:
    """Three panels, beta_t, alpha-bar_t and sigma_t against t, one line per labelled schedule. The
    sigma panel marks init_noise_sigma (max sigma_t); `visits` adds, per label, the (t, sigma) of each
    model call of its sampler and the scale x_T starts at."""
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
    for label, schedule in schedules.items():
        top = schedule.init_noise_sigma
        axes[2].axhline(top, color="gray", linestyle=":", linewidth=1)
        axes[2].annotate(f"init_noise_sigma {top:.4g}", (0, top), fontsize=7, va="bottom")
        if visits and label in visits:
            pairs, start = visits[label]
            axes[2].plot([t for t, _ in pairs], [sigma for _, sigma in pairs], "o", markersize=3,
                         label=f"{label}: {len(pairs)} model calls, x_T = {start:.4g} z")
    axes[0].legend(fontsize=8)
    if visits:
        axes[2].legend(fontsize=7)
    return fig


def sweep_figure(rows: list[dict], floor: float, n: int) -> Figure:
    """fid_mnist against model evaluations (log scale; fid_mnist too, so that one poor setting does
    not flatten the rest), a line per sampler, with the floor and the full ancestral loop marked;
    rows as `ddpm eval --sweep` writes them."""
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    for sampler in dict.fromkeys(row["sampler"] for row in rows):
        mine = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["model_evaluations"])
        ax.plot([r["model_evaluations"] for r in mine], [r["fid_mnist"] for r in mine], "o-", label=sampler)
    full = [r for r in rows if r["sampler"] == "ancestral" and r["full_loop"]]
    if full:
        ax.axhline(full[0]["fid_mnist"], color="gray", linestyle="--", linewidth=1, label="ancestral, full loop")
    ax.axhline(floor, color="black", linestyle=":", linewidth=1, label=f"real digits (floor), n = {n}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model evaluations")
    ax.set_ylabel("fid_mnist (lower is better)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def guidance_figure(rows: list[dict], floor: float, n: int) -> Figure:
    """fid_mnist and class_accuracy against the guidance weight W: the fidelity/diversity trade-off."""
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    rows = sorted(rows, key=lambda r: r["guidance"])
    weights = [r["guidance"] for r in rows]
    ax.plot(weights, [r["fid_mnist"] for r in rows], "o-", color="tab:blue", label="fid_mnist")
    ax.axhline(floor, color="black", linestyle=":", linewidth=1, label=f"real digits (floor), n = {n}")
    ax.set_xlabel("guidance weight W (1: plain conditional)")
    ax.set_ylabel("fid_mnist (lower is better)")
    ax.grid(True, alpha=0.3)
    right = ax.twinx()
    right.plot(weights, [r["class_accuracy"] for r in rows], "s--", color="tab:orange", label="class_accuracy")
    right.set_ylabel("class_accuracy")
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8)
    return fig


def save_figure(fig: Figure, path: Path, dpi: int = 110) -> None:
    """Write a figure as a PNG (atomically) and free its memory."""
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def trajectory_figure(
    timesteps: list[int], x_t: list[torch.Tensor], x0_hat: list[torch.Tensor], rows: int
) -> Figure:
    """The picture that explains diffusion: for `rows` samples, x_t and the model's x0_hat at
    each of `timesteps` (columns, noisiest first). x_t[j], x0_hat[j]: (B, 1, 28, 28) in [-1, 1]."""
    cols = len(timesteps)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(1.15 * cols, 1.25 * 2 * rows), squeeze=False)
    for r in range(rows):
        for j, t in enumerate(timesteps):
            for k, (images, label) in enumerate(((x_t, r"$x_t$"), (x0_hat, r"$\hat{x}_0$"))):
                ax = axes[2 * r + k, j]
                ax.imshow(images[j][r, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(label, rotation=0, labelpad=14, fontsize=10)
                if r == 0 and k == 0:
                    ax.set_title(f"t = {t}", fontsize=9)
    fig.tight_layout(pad=0.3)
    return fig
