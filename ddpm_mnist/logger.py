"""What a training run shows as it goes: TensorBoard scalars, images and hparams, and the progress bar.

The event file lives in the run folder itself, so `tensorboard --logdir runs` lists each run by
its name. Between two log points the losses are summed on the device (`Interval`) and read back
once per log point: no host sync per step. Only rank 0 writes; on other ranks every method is a no-op.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm import tqdm

from ddpm_mnist.config import Config, dump_yaml, to_dict
from ddpm_mnist.errors import RunError
from ddpm_mnist.maths.schedule import NoiseSchedule
from ddpm_mnist.maths.unet import count_parameters
from ddpm_mnist.paths import record_written

if TYPE_CHECKING:  # an annotation only: loop.py hands the logger its budget
    from ddpm_mnist.trainstate import StepBudget


class Interval:
    """Device-side sums between two log points, read back only when logging (no per-step sync).

    Non-finite steps are counted, not summed, so a skipped step does not turn the logged loss to nan.
    """

    QUARTERS = 4

    def __init__(self, device: torch.device, first_step: int) -> None:
        self.first_step = first_step  # the interval covers steps first_step + 1 .. the log step
        self.loss_sum = torch.zeros((), device=device)
        self.finite_steps = torch.zeros((), device=device)
        self.nonfinite = torch.zeros((), dtype=torch.long, device=device)
        self.quarter_sum = torch.zeros(self.QUARTERS, device=device)
        self.quarter_count = torch.zeros(self.QUARTERS, device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, losses: torch.Tensor, timesteps: torch.Tensor, grad_norm: torch.Tensor, finite: torch.Tensor,
            num_timesteps: int) -> None:
        """Add one step: per-image losses (B,), its timesteps (B,), the gradient norm, whether finite."""
        weight = finite.float()
        self.loss_sum += torch.where(finite, losses.mean(), 0.0)
        self.finite_steps += weight
        self.nonfinite += (~finite).long()
        quarter = (timesteps * self.QUARTERS) // num_timesteps  # (B,) in 0..3
        self.quarter_sum.index_add_(0, quarter, torch.where(finite, losses, 0.0))
        self.quarter_count.index_add_(0, quarter, weight.expand_as(losses))
        self.grad_norm_sum += torch.where(finite, grad_norm, 0.0)
        self.steps += 1

    def check_finite(self, nan_policy: str, step: int, run_dir: Path) -> None:
        """With train.nan_policy: stop, end the run when a loss or gradient since the last log point
        was not finite (a host sync), saying that the last checkpoint is untouched."""
        if nan_policy != "stop" or int(self.nonfinite) == 0:
            return
        latest = run_dir / "checkpoints" / "latest.pt"
        kept = f"the last good checkpoint {latest} is untouched" if latest.exists() else "no checkpoint was written"
        raise RunError(
            f"training diverged: non-finite loss or gradient between steps {self.first_step + 1} and {step}; "
            f"stopped, {kept}. Try a lower train.lr, runtime.mixed_precision: fp32, or train.nan_policy: skip"
        )


EVENTS = "events.out.tfevents.*"


class TrainLogger:
    """Rank 0's event file and progress bar for one run (a context manager closes both)."""

    def __init__(
        self, run_dir: Path, name: str, start_step: int, total_steps: int | None, images_per_step: int, enabled: bool
    ) -> None:
        self.images_per_step = images_per_step  # this process's batch, for images/s
        self.start_step = start_step  # 0 for a new run
        self.writer: SummaryWriter | None = None
        if enabled:
            before = set(run_dir.glob(EVENTS))
            try:  # purge_step: events a killed run logged after its last checkpoint are dropped on resume
                self.writer = SummaryWriter(str(run_dir), purge_step=start_step)
                for events in set(run_dir.glob(EVENTS)) - before:  # the writer names its file itself
                    record_written(events)
            except OSError as exc:
                raise RunError(f"cannot write TensorBoard events in {run_dir}: {exc.strerror or exc}") from None
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, desc=name,
                        disable=not enabled)
        self.last_loss = math.nan
        self.budget: StepBudget | None = None  # train.time_budget's clock, shown beside the bar

    def __enter__(self) -> TrainLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def describe(self, cfg: Config, model: torch.nn.Module, images: int, world_size: int, steps_per_epoch: int,
                 total: int, start: int, device: torch.device, precision: str) -> None:
        """Print the run in one line: sizes, length, device, precision, batch and lr across processes."""
        if self.writer is None:
            return
        training = cfg.train
        batch = (f"batch {training.batch_size}" if world_size == 1 else f"effective batch "
                 f"{training.batch_size * world_size} ({training.batch_size} x {world_size} processes)")
        print(f"run {cfg.run_dir}: {count_parameters(model):,} parameters, {images:,} images, {batch}, "
              f"lr {training.lr:g}, {length(cfg, total, steps_per_epoch)}, {device}, {precision}"
              + (f", resuming at step {start:,}" if start else ""))

    def run_start(self, cfg: Config, schedule: NoiseSchedule, model: torch.nn.Module) -> None:
        """The config as text, the parameter count, and the schedule plot: once, when the run starts
        at step 0 (a resumed run has them already)."""
        if self.writer is None or self.start_step:
            return
        n_params = count_parameters(model)
        from ddpm_mnist.plots import schedule_figure

        yaml_text = "\n".join("    " + line for line in dump_yaml(cfg).splitlines())
        self.writer.add_text("config", yaml_text, 0)
        self.writer.add_text("model", f"U-Net with {n_params:,} parameters", 0)  # a text: one value, not a curve
        figure = schedule_figure({cfg.schedule.beta_schedule: schedule.to("cpu")})
        self.writer.add_figure("train_setup/schedule", figure, 0)  # a group name after "train": see loop.PREVIEW_TAG

    def interval(self, interval: Interval, step: int, lr: float, ema_decay: float, skipped: int | None) -> None:
        """Read the interval back (the one host sync of a log point), write scalars, update the bar."""
        if self.writer is None:
            return
        elapsed = time.perf_counter() - interval.started
        n = max(float(interval.finite_steps), 1.0)
        loss = self.last_loss = float(interval.loss_sum) / n
        images_per_s = interval.steps * self.images_per_step / max(elapsed, 1e-9)
        scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": float(interval.grad_norm_sum) / n,
                   "train/images_per_s": images_per_s, "train/ema_decay": ema_decay}
        quarter_loss = (interval.quarter_sum / interval.quarter_count.clamp(min=1)).tolist()
        for q, value in enumerate(quarter_loss):
            if interval.quarter_count[q] > 0:
                scalars[f"train/loss_t_quarter{q + 1}"] = value
        if skipped is not None:
            scalars["train/skipped_steps"] = skipped
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        postfix = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "img_s": f"{images_per_s:.0f}"}
        if self.budget is not None:
            postfix["budget"] = f"{clock(self.budget.elapsed())}/{clock(self.budget.seconds)}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(step - self.bar.n)

    def length_fixed(self, steps: int, step: int, budget: str, fixed_before: int) -> None:
        """A time budget's length is fixed (or corrected): the bar's total becomes it (and its ETA the budget's)."""
        self.bar.total = steps
        self.bar.refresh()
        if self.writer is not None and self.budget is not None:
            what = "corrected to " if fixed_before else ""
            tqdm.write(f"time budget {budget}: {what}{steps:,} steps (measured {self.budget.rate:.1f} steps/s over "
                       f"steps {self.budget.mark_step:,} to {step:,})")

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        """A (3, H, W) uint8 image, such as a preview grid."""
        if self.writer is not None:
            self.writer.add_image(tag, grid, step)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        """Several scalars under one prefix, such as eval/fid_mnist."""
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def stopped(self) -> None:
        """Close the bar (Ctrl-C or SIGTERM; the CLI says where the run stopped)."""
        self.bar.close()

    def run_end(self, cfg: Config, step: int, latest: Path) -> None:
        """The config and the final loss in TensorBoard's HParams tab, in the run's own event file
        (`SummaryWriter.add_hparams` would open a second one), and the closing line."""
        self.bar.close()
        if self.writer is None:
            return
        spent = ""
        if self.budget is not None:
            elapsed, budget = self.budget.elapsed(), self.budget.seconds
            spent = f" in {clock(elapsed)} of a {clock(budget)} budget ({100 * (elapsed / budget - 1):+.1f}%)"
        print(f"done: {step:,} steps{spent}, last loss {self.last_loss:.4f}; checkpoint {latest}")
        # the HParams tab's metric is the loss curve itself (its last value): no one-point scalar card
        # of its own, which TensorBoard's Time Series would sort above the training curves
        experiment, start, end = hparams(hparams_of(cfg), {"train/loss": self.last_loss})
        file_writer = self.writer._get_file_writer()  # the documented add_hparams does this on a new writer
        for summary in (experiment, start, end):
            file_writer.add_summary(summary)


def length(cfg: Config, total: int, steps_per_epoch: int) -> str:
    """A run's length in words: steps and epochs, or its time budget while the steps are not fixed."""
    if cfg.train.time_budget:
        return (f"a time budget of {cfg.train.time_budget} (the steps are fixed from the measured step rate, "
                "and corrected halfway)")
    return f"{total:,} steps ({total / steps_per_epoch:.1f} epochs)"


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss or m:ss."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def hparams_of(cfg: Config) -> dict[str, Any]:
    """The config flattened to scalars for TensorBoard's HParams tab."""
    flat: dict[str, Any] = {}
    for section, values in to_dict(cfg).items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = str(value) if isinstance(value, list) else value
        else:
            flat[section] = values
    return flat
