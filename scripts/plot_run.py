"""Plot a run's TensorBoard scalars (loss, loss by timestep quarter, lr, images/s) to one PNG.

    python scripts/plot_run.py runs/cpu [--out runs/cpu/training.png]

The same curves TensorBoard shows (tensorboard --logdir runs), as a file for reports and READMEs.
It reads the event file in the run folder; a curve the run did not log is left out, and bad
input (no run folder, no events, an --out that cannot be written) is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ddpm_mnist.errors import UserError
from ddpm_mnist.paths import check_suffix, ensure_writable
from ddpm_mnist.plots import plt, save_figure

QUARTERS = [f"train/loss_t_quarter{q}" for q in range(1, 5)]


def read_scalars(run: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar tag of the run's event file(s): tag -> (steps, values)."""
    if not run.is_dir():
        raise UserError(f"{run}: not a run folder")
    if not any(run.glob("events.out.tfevents.*")):
        raise UserError(f"{run}: holds no TensorBoard event file (is it a run folder of ddpm train?)")
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: ([p.step for p in events.Scalars(tag)], [p.value for p in events.Scalars(tag)])
            for tag in events.Tags()["scalars"]}


def figure(scalars: dict[str, tuple[list[int], list[float]]]):
    """Three panels: the loss (overall and per timestep quarter), the learning rate, images/s."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), layout="constrained")
    if "train/loss" in scalars:
        axes[0].plot(*scalars["train/loss"], label="all t", color="black")
    for q, tag in enumerate(QUARTERS, start=1):
        if tag in scalars:
            axes[0].plot(*scalars[tag], label=f"t in quarter {q}", linewidth=1)
    axes[0].set_yscale("log")
    axes[0].set_title("loss")
    if axes[0].lines:
        axes[0].legend(fontsize=8)
    for ax, tag, title in ((axes[1], "train/lr", "learning rate"), (axes[2], "train/images_per_s", "images / s")):
        if tag in scalars:
            ax.plot(*scalars[tag])
        ax.set_title(title)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    return fig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (out_dir/name, holding its event file)")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN/training.png)")
    args = parser.parse_args()
    out = args.out or args.run / "training.png"
    try:
        check_suffix(out, "--out", (".png",))
        scalars = read_scalars(args.run)  # before ensure_writable creates a folder for --out
        ensure_writable(out)
        if "train/loss" not in scalars:
            raise UserError(f"{args.run}: its event file holds no train/loss curve yet")
        save_figure(figure(scalars), out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
