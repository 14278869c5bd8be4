"""Training state in one place: what a run is built from, what it carries from step to step, and how.

`setup_training` builds a run's fixed parts (its data and noise schedule) and its `TrainState`:
the model, its EMA, the optimiser, the lr schedule, this process's noise generator and the step.
`checkpoint.py` saves and restores the state whole; `loop.py` steps it. The time budget lives here
whole: the clock that fixes a run's length from its measured step rate (`StepBudget`), the config
of a run whose length is fixed (`with_fixed_length`), and the length a resumed run keeps
(`length_from_checkpoint`); the loop reads them (`loop.read_budget`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.optim.swa_utils import AveragedModel

from ddpm_mnist.config import Config, TrainConfig, duration_seconds
from ddpm_mnist.data import EpochBatches, load_mnist
from ddpm_mnist.errors import RunError, note
from ddpm_mnist.maths.schedule import NoiseSchedule, make_schedule
from ddpm_mnist.maths.unet import UNet, parameter_groups
from ddpm_mnist.rng import MODEL_INIT, TRAIN_NOISE, derive_seed

if TYPE_CHECKING:
    from ddpm_mnist.checkpoint import Checkpoint
    from ddpm_mnist.device import Runtime


@dataclasses.dataclass
class TrainState:
    """Everything a training run changes as it goes (one per process under torchrun)."""

    model: UNet
    ema: AveragedModel  # ema.module samples; ema.n_averaged counts its updates
    optimizer: torch.optim.Optimizer
    lr_scheduler: LRScheduler
    generator: torch.Generator  # this process's timesteps and noise, step after step
    step: int = 0  # optimiser steps taken (the next step to run)
    skipped: int = 0  # steps skipped for a non-finite loss or gradient (train.nan_policy: skip)
    time_budget: str = ""  # the train.time_budget that fixes this run's length ("": trained by steps or epochs)

    def rng_state(self) -> dict[str, Any]:
        """This process's random streams, for its checkpoint: torch's global generator (dropout),
        CUDA's, and the training noise."""
        device = self.generator.device
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "train": self.generator.get_state().cpu(),
        }


def setup_training(
    cfg: Config, runtime: Runtime, rank: int = 0, world_size: int = 1
) -> tuple[EpochBatches, NoiseSchedule, int, TrainState]:
    """A run's data (this process's shard, on the device as uint8), its noise schedule, its length
    in steps, and a fresh state."""
    images, labels = load_mnist(cfg.data.root, train=True, download=cfg.data.download)
    if cfg.data.limit:
        images, labels = images[: cfg.data.limit], labels[: cfg.data.limit]
    labels = labels.long().to(runtime.device) if cfg.model.num_classes else None  # beside the images
    batches = EpochBatches(images.to(runtime.device), cfg.train.batch_size, cfg.seed, rank, world_size, labels)
    # under a time budget the length is fixed later (StepBudget); until then, a length no run reaches
    total_steps = cfg.train.steps or cfg.train.epochs * batches.steps_per_epoch or UNFIXED_STEPS
    schedule = make_schedule(cfg.schedule).to(runtime.device)
    return batches, schedule, total_steps, build_train_state(cfg, runtime, rank, total_steps)


UNFIXED_STEPS = 10**9  # a time-budgeted run's length until StepBudget fixes it


class StepBudget:
    """train.time_budget: measure the step rate, fix the run's length, then correct it once.

    The budget counts from the first step of the loop. The first WARMUP_STEPS steps are not timed
    (allocations, cuDNN's autotuning, compilation); the rate is then read at 20, 40, 80, ... steps
    later (the same steps on every process), and the first reading at least MEASURE_SECONDS (or
    MEASURE_SHARE of the budget, if longer) after timing began fixes the length: the steps already
    taken, plus the rest of the budget at that rate, less the time previews and metrics will take
    (a preview of n images and k steps costs about n * k / (3 * batch) training steps: a training
    step is a forward and a backward). Halfway from there to the end, a second reading over every
    step since the first fix (previews, metrics and checkpoints included, and whatever else slowed
    the machine; since timing began where that window is shorter than the first) fixes the length
    once more, and the lr schedule is laid out again over it: an early rate alone misses whatever
    changes later, and a machine busy for a moment at the start no longer shortens the run. The
    closing line says how close the run came.
    """

    WARMUP_STEPS = 5
    MEASURE_SECONDS = 10.0
    MEASURE_SHARE = 0.05

    def __init__(self, training: TrainConfig, first_step: int) -> None:
        self.budget = training.time_budget  # as the user wrote it, for the log
        self.seconds = duration_seconds(training.time_budget)
        self.started = time.perf_counter()
        self.mark_step = first_step + self.WARMUP_STEPS
        self.mark_time = math.nan
        self.rate = math.nan  # steps per second at the latest reading
        self.fix_step, self.fix_time = 0, math.nan  # where the first fix was read
        self.next_reading = self.mark_step
        self.fixes = 0  # lengths fixed so far: 0, 1 (the first reading), 2 (the correction; no more readings)
        per_step = 0.0  # previews and metrics, in training steps per training step
        if training.sample_every:
            per_step += training.preview_n * training.preview_steps / (3 * training.batch_size) / training.sample_every
        if training.eval_every:
            per_step += training.eval_n * training.preview_steps / (3 * training.batch_size) / training.eval_every
        self.overhead = per_step

    def due(self, step: int) -> bool:
        """Whether `step` is a reading (every process calls `reading` then, together)."""
        return step == self.next_reading

    def fixed(self, step: int, steps: int) -> None:
        """The length is now `steps` (on every process, from rank 0's reading): after the first fix,
        one more reading halfway to the end; after that one, none."""
        self.fixes += 1
        halfway = step + (steps - step) // 2
        self.next_reading = halfway if self.fixes == 1 and halfway > step else -1

    def reading(self, step: int, device: torch.device) -> int | None:
        """At a due step: the number of steps to fix, or None while still measuring."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the steps queued so far have run
        now = time.perf_counter()
        if step == self.mark_step:
            self.mark_time, self.next_reading = now, step + 20
            return None
        if self.fixes == 0:
            self.next_reading = self.mark_step + 2 * (step - self.mark_step)
            if now - self.mark_time < max(self.MEASURE_SECONDS, self.MEASURE_SHARE * self.seconds):
                return None
        since_mark = now - self.mark_time
        if self.fixes == 0:
            self.fix_step, self.fix_time = step, now
        if self.fixes == 1 and now - self.fix_time >= min(since_mark / 2, self.fix_time - self.mark_time):
            self.rate = (step - self.fix_step) / (now - self.fix_time)  # the recent rate, not the start's
        else:
            self.rate = (step - self.mark_step) / since_mark  # steps per second, as measured
        remaining = self.seconds - (now - self.started)
        overhead = self.overhead if self.fixes == 0 else 0.0  # the second rate has them in already
        return step + max(0, int(remaining * self.rate / (1 + overhead)))

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def with_fixed_length(cfg: Config, steps: int) -> Config:
    """The config of a budgeted run once its length is fixed: train.steps set, the budget spent."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, time_budget=""))


def length_from_checkpoint(cfg: Config, resume_from: Checkpoint | None, say: bool) -> Config:
    """A budgeted run resumed after its length was fixed keeps that length (from its checkpoint's
    config); a budget other than the one that fixed it is said not to apply (when `say`). A run
    trained by steps or epochs cannot take a budget on resume."""
    if not cfg.train.time_budget or resume_from is None:
        return cfg
    stored = resume_from.config
    if not stored.train.steps:
        return cfg  # stopped before its budget fixed the length: the budget measures anew
    fixed_by = resume_from.time_budget  # None: a checkpoint from before budgets were recorded
    if fixed_by == "":
        raise RunError(
            f"--resume: this run trains by steps (train.steps: {stored.train.steps:,}), and a time budget "
            f"({cfg.train.time_budget}) only applies to a run that starts with one: resume with "
            "--set train.time_budget='' (and --set train.steps=N to train longer)"
        )
    if say and fixed_by is not None and fixed_by != cfg.train.time_budget:
        note(f"--resume: this run's length was fixed at {stored.train.steps:,} steps by its time budget "
              f"{fixed_by}; the budget {cfg.train.time_budget} given now does not apply "
              "(to train longer, resume with --set train.steps=N)")
    return with_fixed_length(cfg, stored.train.steps)


def layout_from_checkpoint(cfg: Config, resume_from: Checkpoint | None) -> Config:
    """train.channels_last: auto on --resume: the layout the run chose at its start (its checkpoint's
    config records it; contiguous if it records none), so that it computes the same bits."""
    if cfg.train.channels_last != "auto" or resume_from is None:
        return cfg
    recorded = resume_from.config.train.channels_last is True
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, channels_last=recorded))


def build_train_state(cfg: Config, runtime: Runtime, rank: int, total_steps: int) -> TrainState:
    """A fresh state: the same initial weights on every process, this process's own noise stream."""
    training = cfg.train
    with torch.random.fork_rng(devices=[]):  # the weights come from their own seed, not the global stream
        torch.manual_seed(derive_seed(cfg.seed, MODEL_INIT))
        model = UNet(cfg.model).to(runtime.device)
    if training.channels_last is True:  # auto: decided after, by timing (loop.with_layout)
        model = model.to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=ema_avg_fn(training.ema_decay, training.ema_warmup), use_buffers=True)
    # fused: one kernel for all parameters, on CPU too (a fraction of the step time of the loop over them)
    optimizer = torch.optim.AdamW(parameter_groups(model, training.weight_decay), lr=training.lr,
                                  betas=(0.9, training.adam_beta2),
                                  fused=runtime.device.type in ("cuda", "cpu"))
    generator = torch.Generator(device=runtime.device).manual_seed(derive_seed(cfg.seed, TRAIN_NOISE, rank))
    return TrainState(model, ema, optimizer, make_lr_scheduler(optimizer, training, total_steps), generator,
                      time_budget=training.time_budget)


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


def make_lr_scheduler(optimizer: torch.optim.Optimizer, training: TrainConfig, total_steps: int) -> LRScheduler:
    """torch's LambdaLR over `lr_factor`. Its state is only the step count, so a run resumed with a
    longer train.steps follows the config's schedule rather than the old one."""
    return LambdaLR(optimizer, lr_factor_of(training, total_steps))


def lr_factor_of(training: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """`lr_factor` for this config and run length, as a function of the step."""
    return functools.partial(lr_factor, warmup=training.warmup_steps, total=total_steps,
                             kind=training.lr_schedule, min_ratio=training.min_lr_ratio)


def relay_lr_schedule(state: TrainState, training: TrainConfig, total_steps: int) -> None:
    """Lay the lr schedule out over `total_steps` from the current step on (a time budget's fixed length)."""
    scheduler = state.lr_scheduler
    factor = lr_factor_of(training, total_steps)
    scheduler.lr_lambdas = [factor] * len(state.optimizer.param_groups)
    for group, base_lr in zip(state.optimizer.param_groups, scheduler.base_lrs, strict=True):
        group["lr"] = base_lr * factor(scheduler.last_epoch)  # the next step's lr, as the new schedule has it


# The optimiser settings a checkpoint's optimiser state carries, which --resume takes from the config instead
RESUMABLE_OPTIMIZER_KEYS = ("lr", "adam_beta2", "weight_decay")


def apply_optimizer_settings(state: TrainState, training: TrainConfig, saved: TrainConfig) -> list[str]:
    """After a checkpoint's optimiser state is loaded (which brings the run's lr, betas and weight
    decay back with it), put the config's in their place; return what changed, for a note."""
    scheduler = state.lr_scheduler
    decay, no_decay = state.optimizer.param_groups
    for group in (decay, no_decay):
        group["betas"] = (0.9, training.adam_beta2)
        group["initial_lr"] = training.lr
    decay["weight_decay"] = training.weight_decay
    scheduler.base_lrs = [training.lr] * len(state.optimizer.param_groups)
    for group, factor in zip(state.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["lr"] = training.lr * factor(scheduler.last_epoch)  # the next step's lr, as the schedule has it
    return [f"train.{key} {getattr(training, key):g} (the run had {getattr(saved, key):g})"
            for key in RESUMABLE_OPTIMIZER_KEYS if getattr(training, key) != getattr(saved, key)]
