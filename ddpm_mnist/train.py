"""The training loop (Algorithm 1 of Ho et al.), EMA, optimiser, logging and checkpoints.

`train(cfg)` reads top to bottom: the run folder, data, model, optimiser, then the loop. Each step
draws its batch from the step number, its timesteps and noise from a seeded generator whose
state is checkpointed, so that `--resume` continues exactly where an uninterrupted run would be.
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.optim.swa_utils import AveragedModel
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams
from tqdm import tqdm

import ddpm_mnist
from ddpm_mnist import checkpoint as ckpt
from ddpm_mnist.config import Config, dump_yaml, to_dict
from ddpm_mnist.data import EpochBatches, load_mnist, to_model_range, to_uint8
from ddpm_mnist.device import autocast_dtype, pick_device
from ddpm_mnist.diffusion import ReverseSampler, training_losses
from ddpm_mnist.distributed import (
    Dist,
    any_true,
    close,
    device_for,
    gather,
    init_distributed,
    parameters_digest,
    share_error,
)
from ddpm_mnist.errors import CheckpointError, RunError, UserError
from ddpm_mnist.rng import DROPOUT, EVAL_NOISE, MODEL_INIT, PREVIEW_NOISE, TRAIN_NOISE, derive_seed
from ddpm_mnist.sample import NoiseSource, generate, save_grid
from ddpm_mnist.schedule import make_schedule
from ddpm_mnist.unet import UNet, count_parameters

# What --resume refuses to change: the model's identity, and what decides the data order.
FROZEN_ON_RESUME = ("schedule", "model", "seed", "data.limit")


def ema_avg_fn(max_decay: float, warmup: bool):
    """EMA update for `AveragedModel(multi_avg_fn=...)`: ema <- lerp(ema, param, 1 - decay).

    decay = min(max_decay, (1 + n) / (10 + n)) after n updates with warmup, so that early
    samples are not those of the initial weights; computed on the device (no host sync).
    """

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        decay = torch.as_tensor(max_decay, dtype=torch.float32, device=num_averaged.device)
        if warmup:
            n = num_averaged.float()
            decay = torch.minimum(decay, (1 + n) / (10 + n))
        torch._foreach_lerp_(ema_params, params, 1 - decay)

    return update


def ema_decay_at(updates: int, max_decay: float, warmup: bool) -> float:
    """The decay `ema_avg_fn` uses after `updates` updates (for logging)."""
    return min(max_decay, (1 + updates) / (10 + updates)) if warmup else max_decay


def lr_factor(step: int, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """The learning rate of optimiser step `step` (0-based) as a fraction of train.lr.

    Linear warmup over `warmup` steps (1/warmup, 2/warmup, ..., 1), then constant, or a cosine
    from 1 down to `min_ratio` at the last step.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min((step - warmup) / max(total - 1 - warmup, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int) -> LRScheduler:
    """torch's LambdaLR over `lr_factor`. Its state is only the step count, so a run resumed with a
    longer train.steps follows the config's schedule rather than the old one."""
    t = cfg.train
    factor = functools.partial(
        lr_factor, warmup=t.warmup_steps, total=total_steps, kind=t.lr_schedule, min_ratio=t.min_lr_ratio
    )
    return LambdaLR(optimizer, factor)


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


def prepare_run_dir(cfg: Config, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Check the run folder against --resume / --overwrite; return the checkpoint to resume from."""
    run_dir = cfg.run_dir
    latest = run_dir / "checkpoints" / ckpt.LATEST
    holds_run = (run_dir / "config.yaml").exists() or latest.exists()
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: pick one")
    if holds_run and not (resume or overwrite):
        raise RunError(
            f"{run_dir} already holds a run: add --resume to continue it, --overwrite to replace it, "
            "or pick another name with --set name=NEW"
        )
    if resume and latest.exists():
        state = ckpt.load_checkpoint(latest)
        saved = ckpt.checkpoint_config(state, latest)
        saved_values, values = to_dict(saved), to_dict(cfg)
        for key in FROZEN_ON_RESUME:
            section, _, name = key.partition(".")
            before, now = saved_values[section], values[section]
            if name:
                before, now = before[name], now[name]
            if before != now:
                raise RunError(
                    f"--resume: the config's {key} differs from the run's in {run_dir} "
                    f"(see {run_dir / 'config.yaml'}); resume with the same {key}, or start a new run"
                )
        return state
    try:
        if overwrite and run_dir.exists():
            for name in ("checkpoints", "samples", "tensorboard", "config.yaml"):
                target = run_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunError(f"cannot write the run folder {run_dir}: {exc.strerror or exc}") from None
    return None


class StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to save and stop at the end of the current step;
    a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """One training run: data, model, EMA, optimiser, lr schedule, noise generator, logging.

    Under torchrun every process holds one; rank 0 alone writes files.
    """

    def __init__(
        self, cfg: Config, ddp: Dist, device: torch.device, run_dir: Path, state: dict[str, Any] | None
    ) -> None:
        t = self.t = cfg.train
        self.cfg, self.ddp, self.device, self.run_dir = cfg, ddp, device, run_dir
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolutions once
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls and convolutions (Ampere and later)
            torch.backends.cudnn.allow_tf32 = True
        self.amp_dtype, self.amp_note = autocast_dtype(device, t.mixed_precision)

        images, _ = load_mnist(cfg.data.root, train=True, download=cfg.data.download)
        if cfg.data.limit:
            images = images[: cfg.data.limit]
        self.num_images = len(images)
        self.batches = EpochBatches(images.to(device), t.batch_size, cfg.seed, ddp.rank, ddp.world_size)
        self.total_steps = t.steps or t.epochs * self.batches.steps_per_epoch
        self.schedule = make_schedule(cfg.schedule).to(device)

        torch.manual_seed(derive_seed(cfg.seed, MODEL_INIT))  # the same initial weights on every rank
        self.model = UNet(cfg.model).to(device)
        if t.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_avg_fn(t.ema_decay, t.ema_warmup), use_buffers=True)
        # fused: one kernel for all parameters (on this project's 2-core CPU, 4 ms a step against 17 ms)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=(0.9, 0.999),
                                           weight_decay=t.weight_decay, fused=device.type in ("cuda", "cpu"))
        self.lr_scheduler = make_lr_scheduler(self.optimizer, cfg, self.total_steps)
        self.generator = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, TRAIN_NOISE, ddp.rank))
        torch.manual_seed(derive_seed(cfg.seed, DROPOUT, ddp.rank))
        self.start_step = self.restore(state) if state is not None else 0

        forward: nn.Module = self.model
        if ddp.enabled:
            forward = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.forward = torch.compile(forward) if t.compile else forward
        self.preview_sampler = ReverseSampler(
            self.schedule, t.preview_steps, sampler="ddim", prediction_type=cfg.model.prediction_type, device=device
        )
        self.writer: SummaryWriter | None = None
        self.skipped = 0
        self.eval_reference: tuple[nn.Module, torch.Tensor] | None = None  # classifier, test-set features

    def describe(self) -> str:
        """The run in one line: sizes, length, device, precision, batch and lr across processes."""
        t, ddp = self.t, self.ddp
        batch = (f"batch {t.batch_size}" if not ddp.enabled else
                 f"effective batch {t.batch_size * ddp.world_size} ({t.batch_size} x {ddp.world_size} processes)")
        return (f"run {self.run_dir}: {count_parameters(self.model):,} parameters, {self.num_images:,} images, "
                f"{batch}, lr {t.lr:g}, {self.total_steps:,} steps "
                f"({self.total_steps / self.batches.steps_per_epoch:.1f} epochs), {self.device}, {self.amp_note}"
                + (f", resuming at step {self.start_step:,}" if self.start_step else ""))

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Algorithm 1 of Ho et al. for step `step`: returns per-image losses, timesteps, the
        gradient norm and whether both were finite (all on the device, no host sync)."""
        t = self.t
        x0 = self.batches.batch(step)  # (B, 1, 28, 28) in [-1, 1]
        if t.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        # lines 3-4: t ~ Uniform({0, ..., T-1}), eps ~ N(0, I)
        timesteps = torch.randint(0, self.schedule.num_timesteps, (t.batch_size,), device=self.device,
                                  generator=self.generator)
        noise = torch.randn(x0.shape, device=self.device, generator=self.generator)
        # line 5: a gradient step on the loss of the prediction
        ctx = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with ctx:
            losses = training_losses(self.forward, self.schedule, x0, timesteps, noise,
                                     self.cfg.model.prediction_type, t.loss)  # (B,)
        loss = losses.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        # the gradients are all-reduced, so grad_norm, and with it the verdict, is the same on every rank
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        if t.nan_policy == "skip" and not bool(finite):  # one host sync per step, only with skip
            self.skipped += 1
        else:
            self.optimizer.step()
            self.ema.update_parameters(self.model)
        self.lr_scheduler.step()
        return losses.detach(), timesteps, grad_norm.detach(), finite

    def run(self) -> Path:
        """The loop: steps, logs, previews and checkpoints until train.steps; returns the run folder."""
        t, cfg = self.t, self.cfg
        if self.start_step >= self.total_steps:
            if self.ddp.is_main:
                print(f"{self.run_dir} is already at step {self.start_step:,} of {self.total_steps:,}: "
                      "nothing to train (raise train.steps)")
            return self.run_dir
        if self.ddp.is_main:
            try:
                (self.run_dir / "config.yaml").write_text(dump_yaml(cfg))
            except OSError as exc:
                raise RunError(f"cannot write the run folder {self.run_dir}: {exc.strerror or exc}") from None
            # purge_step: events a killed run logged after its last checkpoint are dropped on resume
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.start_step)
            print(self.describe())
            if self.start_step == 0:
                log_run_start(self.writer, cfg, self.schedule, count_parameters(self.model))
        interval = Interval(self.device, self.start_step)
        last_loss = math.nan
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.start_step, unit="step", dynamic_ncols=True, desc=cfg.name,
                   disable=not self.ddp.is_main)
        with StopFlag() as stop, bar:
            step = self.start_step
            while step < self.total_steps:
                interval.add(*self.train_step(step), self.schedule.num_timesteps)
                step += 1
                stop_now = any_true(self.ddp, stop.requested)
                if step % t.log_every == 0 or step == self.total_steps:
                    last_loss = self.log(bar, interval, step)
                    interval = Interval(self.device, step)
                if t.sample_every and step % t.sample_every == 0 and step != self.total_steps:
                    self.preview(step)
                    interval.started = time.perf_counter()
                if t.eval_every and (step % t.eval_every == 0 or step == self.total_steps):
                    self.evaluate(step)
                    interval.started = time.perf_counter()
                if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == self.total_steps or stop_now:
                    self.save(step, interval)
                    interval.started = time.perf_counter()
                if stop_now:
                    bar.close()
                    if self.ddp.is_main:
                        print(f"stopped at step {step:,}: saved {self.run_dir / 'checkpoints' / ckpt.LATEST}; "
                              "continue with --resume")
                    raise Interrupted(step)
        self.preview(self.total_steps)
        self.check_replicas()
        if self.writer is not None:
            log_hparams(self.writer, cfg, last_loss, self.total_steps)
            self.writer.close()
            print(f"done: {self.total_steps:,} steps, last loss {last_loss:.4f}; "
                  f"checkpoint {self.run_dir / 'checkpoints' / ckpt.LATEST}")
        return self.run_dir

    def log(self, bar: tqdm, interval: Interval, step: int) -> float:
        """Check for divergence (every rank) and write the interval's scalars (rank 0)."""
        if self.t.nan_policy == "stop":
            check_finite(interval, step, self.run_dir)
        if self.writer is None:
            return math.nan
        return log_interval(self.writer, bar, interval, step, self.optimizer, self.t, self.skipped)

    def ema_samples(self, stream: int, n: int) -> torch.Tensor:
        """n EMA samples from fixed noise (the same every call): DDIM with train.preview_steps, in [-1, 1]."""
        self.ema.module.eval()
        noise = NoiseSource(derive_seed(self.cfg.seed, stream), stream, range(n), self.device)
        return generate(self.ema.module, self.preview_sampler, noise, autocast=self.amp_dtype,
                        static=self.device.type == "cuda")

    def preview(self, step: int) -> None:
        """A grid of EMA samples from fixed noise (DDIM, train.preview_steps), to a PNG and TensorBoard."""
        if not self.ddp.is_main:
            return
        images = self.ema_samples(PREVIEW_NOISE, self.t.preview_n)
        grid = save_grid(images, self.run_dir / "samples" / f"step_{step:09d}.png")
        self.writer.add_image("samples/ema", grid, step)

    def evaluate(self, step: int) -> None:
        """Classifier metrics (evaluate.py) of train.eval_n EMA samples from fixed noise, to TensorBoard."""
        if not self.ddp.is_main:
            return
        from ddpm_mnist.classifier import classify, load_classifier
        from ddpm_mnist.evaluate import classifier_metrics

        if self.eval_reference is None:
            classifier = load_classifier(device=self.device)
            test_images, _ = load_mnist(self.cfg.data.root, train=False, download=self.cfg.data.download)
            self.eval_reference = classifier, classify(classifier, to_model_range(test_images))[0]
        classifier, reference = self.eval_reference
        images = self.ema_samples(EVAL_NOISE, self.t.eval_n)
        metrics = classifier_metrics(classifier, to_uint8(images.cpu()), reference)
        for key in ("fid_mnist", "inception_score", "confidence", "class_kl"):
            self.writer.add_scalar(f"eval/{key}", metrics[key], step)

    def save(self, step: int, interval: Interval) -> None:
        """A checkpoint (rank 0 writes it; every rank's RNG states go in), unless training diverged."""
        if self.t.nan_policy == "stop":
            check_finite(interval, step, self.run_dir)
        rng = gather(self.ddp, {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "train": self.generator.get_state().cpu(),
        })
        error = None
        if self.ddp.is_main:
            try:
                ckpt.save_checkpoint(self.training_state(step, rng), self.run_dir / "checkpoints",
                                     self.t.keep_checkpoints)
            except CheckpointError as exc:
                error = exc
        share_error(self.ddp, error)

    def training_state(self, step: int, rng: list[dict[str, Any]]) -> dict[str, Any]:
        """Everything a checkpoint holds (plain types only, for weights_only loading)."""
        return {
            "format": ckpt.FORMAT,
            "format_version": ckpt.FORMAT_VERSION,
            "config": to_dict(self.cfg),
            "step": step,
            "epoch": step // self.batches.steps_per_epoch,
            "world_size": self.ddp.world_size,
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict(),
            "ema_num_averaged": int(self.ema.n_averaged),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "rng": rng,  # one dict per rank
            "versions": {"ddpm_mnist": ddpm_mnist.__version__, "torch": str(torch.__version__)},
        }

    def restore(self, state: dict[str, Any]) -> int:
        """Load a checkpoint's training state into the live objects; return its step."""
        path = self.run_dir / "checkpoints" / ckpt.LATEST
        ckpt.load_weights(self.model, state["model"], path, "model")
        ckpt.load_weights(self.ema.module, state["ema"], path, "EMA")
        try:
            self.ema.n_averaged.fill_(state["ema_num_averaged"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            rngs = state["rng"]
            if not isinstance(rngs, list) or not all(isinstance(r, dict) for r in rngs):
                raise TypeError("'rng' is not a list of one state per process")
            if len(rngs) == self.ddp.world_size:
                mine = rngs[self.ddp.rank]
                torch.set_rng_state(mine["torch"])
                if mine["cuda"] is not None and self.device.type == "cuda":
                    torch.cuda.set_rng_state(mine["cuda"], self.device)
                self.generator.set_state(mine["train"])
            elif self.ddp.is_main:
                print(f"note: the run was saved by {len(rngs)} process(es) and resumes on {self.ddp.world_size}: "
                      "same data order, fresh noise streams (an exact continuation needs the same count)")
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as exc:
            raise CheckpointError(f"{path}: training state cannot be restored ({exc})") from None
        return int(state["step"])

    def check_replicas(self) -> None:
        """Under torchrun, check that every rank ended with the same weights (they must)."""
        if not self.ddp.enabled:
            return
        digests = gather(self.ddp, parameters_digest(self.model))
        if len(set(digests)) != 1:
            raise RunError(f"the {self.ddp.world_size} processes ended with different weights: a bug, please report")
        if self.ddp.is_main:
            print(f"checked: all {self.ddp.world_size} processes hold identical weights")


class Interrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint at `step`."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped at step {step}")
        self.step = step


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False, device_name: str | None = None) -> Path:
    """Train the config's model on MNIST; return the run folder `out_dir/name`.

    Writes there: config.yaml, checkpoints/ (latest.pt and numbered ones), tensorboard/ and samples/.
    Under torchrun, trains with DistributedDataParallel (rank 0 writes). Raises `Interrupted`
    after saving when stopped by Ctrl-C or SIGTERM.
    """
    ddp = init_distributed(device_name or cfg.train.device)
    try:
        device = device_for(ddp, pick_device(device_name or cfg.train.device))
        error, state = None, None
        if ddp.is_main:
            try:
                state = prepare_run_dir(cfg, resume, overwrite)
            except UserError as exc:
                error = exc
        share_error(ddp, error)
        if not ddp.is_main and resume and (cfg.run_dir / "checkpoints" / ckpt.LATEST).exists():
            state = ckpt.load_checkpoint(cfg.run_dir / "checkpoints" / ckpt.LATEST)
        return Trainer(cfg, ddp, device, cfg.run_dir, state).run()
    finally:
        close(ddp)


def check_finite(interval: Interval, step: int, run_dir: Path) -> None:
    """Stop the run when a loss or gradient was not finite since the last log point."""
    if int(interval.nonfinite) == 0:
        return
    latest = run_dir / "checkpoints" / ckpt.LATEST
    kept = f"the last good checkpoint {latest} is untouched" if latest.exists() else "no checkpoint was written"
    raise RunError(
        f"training diverged: non-finite loss or gradient between steps {interval.first_step + 1} and {step}; "
        f"stopped, {kept}. Try a lower train.lr, train.mixed_precision: fp32, or train.nan_policy: skip"
    )


def log_interval(
    writer: SummaryWriter, bar: tqdm, interval: Interval, step: int, optimizer: torch.optim.Optimizer,
    t: Any, skipped: int,
) -> float:
    """Read the interval back (the one host sync of a log point), write scalars, update the bar."""
    elapsed = time.perf_counter() - interval.started
    n = max(float(interval.finite_steps), 1.0)
    loss = float(interval.loss_sum) / n
    lr = optimizer.param_groups[0]["lr"]
    images_per_s = interval.steps * t.batch_size / max(elapsed, 1e-9)
    writer.add_scalar("train/loss", loss, step)
    quarter_loss = (interval.quarter_sum / interval.quarter_count.clamp(min=1)).tolist()
    for q, value in enumerate(quarter_loss):
        if interval.quarter_count[q] > 0:
            writer.add_scalar(f"train/loss_t_quarter{q + 1}", value, step)
    writer.add_scalar("train/lr", lr, step)
    writer.add_scalar("train/grad_norm", float(interval.grad_norm_sum) / n, step)
    writer.add_scalar("train/images_per_s", images_per_s, step)
    writer.add_scalar("train/ema_decay", ema_decay_at(step, t.ema_decay, t.ema_warmup), step)
    if t.nan_policy == "skip":
        writer.add_scalar("train/skipped_steps", skipped, step)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}", refresh=False)
    bar.update(step - bar.n)
    return loss


def log_run_start(writer: SummaryWriter, cfg: Config, schedule: Any, n_params: int) -> None:
    """The config as text, the parameter count, and the schedule plot."""
    from ddpm_mnist.plots import close as close_figure
    from ddpm_mnist.plots import schedule_figure

    yaml_text = "\n".join("    " + line for line in dump_yaml(cfg).splitlines())
    writer.add_text("config", yaml_text, 0)
    writer.add_text("model", f"U-Net with {n_params:,} parameters", 0)
    writer.add_scalar("model/parameters", n_params, 0)
    fig = schedule_figure({cfg.schedule.beta_schedule: schedule.to("cpu")})
    writer.add_figure("schedule", fig, 0)
    close_figure(fig)


def log_hparams(writer: SummaryWriter, cfg: Config, final_loss: float, step: int) -> None:
    """The config and the final loss in TensorBoard's HParams tab, in the run's own event file
    (`SummaryWriter.add_hparams` would open a second one)."""
    experiment, start, end = hparams(hparams_of(cfg), {"hparam/final_loss": final_loss})
    file_writer = writer._get_file_writer()  # the documented add_hparams does this on a new writer
    for summary in (experiment, start, end):
        file_writer.add_summary(summary)
    writer.add_scalar("hparam/final_loss", final_loss, step)


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
