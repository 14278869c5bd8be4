"""Plot a run's TensorBoard scalars (loss, loss by timestep quarter, lr, images/s) to one PNG.

    python scripts/plot_run.py runs/cpu [--out runs/cpu/training.png]

The same curves TensorBoard shows (tensorboard --logdir runs), as a file for reports and READMEs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder (holding tensorboard/)")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN/training.png)")
    args = parser.parse_args()
    events = EventAccumulator(str(args.run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()

    def series(tag: str) -> tuple[list[int], list[float]]:
        points = events.Scalars(tag)
        return [p.step for p in points], [p.value for p in points]

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), layout="constrained")
    axes[0].plot(*series("train/loss"), label="all t", color="black")
    for q in range(1, 5):
        axes[0].plot(*series(f"train/loss_t_quarter{q}"), label=f"t in quarter {q}", linewidth=1)
    axes[0].set_yscale("log")
    axes[0].set_title("epsilon MSE")
    axes[0].legend(fontsize=8)
    axes[1].plot(*series("train/lr"))
    axes[1].set_title("learning rate")
    axes[2].plot(*series("train/images_per_s"))
    axes[2].set_title("images / s")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    out = args.out or args.run / "training.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
