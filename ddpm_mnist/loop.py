"""The training loop (Algorithm 1 of Ho et al.), read top to bottom.

`run_steps` builds the data and the `TrainState`, then for each step gets the batch, computes the
loss, steps the optimiser, updates the EMA, and logs, previews, evaluates, checkpoints or stops
when due (`train.py` sets up the run folder, the processes and the device around it). A step's
batch follows from the step number and its timesteps and noise from a checkpointed generator,
so `--resume` continues exactly where an uninterrupted run would be. Previews and metrics are
`Hooks` built by the caller (`previews.py` for the CLI): this module knows nothing of sampling
or evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddpm_mnist.device import Runtime, autocast, choose_channels_last
from ddpm_mnist.distributed import (
    Dist,
    StopFlag,
    check_replicas,
    check_resume_world_size,
    gather,
    on_main,
)
from ddpm_mnist.errors import Stopped, note
from ddpm_mnist.logger import Interval, TrainLogger
from ddpm_mnist.maths.diffusion import training_losses, training_timesteps
from ddpm_mnist.trainstate import (
    UNFIXED_STEPS,
    StepBudget,
    TrainState,
    apply_optimizer_settings,
    build_train_state,
    ema_decay_at,
    layout_from_checkpoint,
    length_from_checkpoint,
    relay_lr_schedule,
    setup_training,
    with_fixed_length,
)

if TYPE_CHECKING:  # names in annotations only: the config, train_step's arguments, the run folder
    from ddpm_mnist.checkpoint import Checkpoint
    from ddpm_mnist.config import Config, TrainConfig
    from ddpm_mnist.data import EpochBatches
    from ddpm_mnist.maths.schedule import NoiseSchedule
    from ddpm_mnist.runfolder import RunFolder


# TensorBoard's Time Series lists tag groups by name and opens the first ones: the training curves
# ("train/...") come first, the preview grids after them
PREVIEW_TAG = "train_samples/ema"


@dataclass
class Hooks:
    """What the loop calls when due, with the EMA model (in eval mode) and the runtime. Built by the
    caller, so that training does not depend on sampling or evaluation."""

    preview: Callable[[nn.Module, Runtime, int], torch.Tensor] | None = None  # step -> a grid (3, H, W) uint8
    metrics: Callable[[nn.Module, Runtime], dict[str, float]] | None = None  # logged as eval/<name>


def run_steps(cfg: Config, ddp: Dist, runtime: Runtime, folder: RunFolder,
              resume_from: Checkpoint | None, hooks: Hooks, change_world_size: bool) -> Path:
    """Set up, then step until train.steps: the loop of Algorithm 1 with its logs, previews and checkpoints."""
    cfg, runtime, batches, schedule, total, state = setup_state(cfg, ddp, runtime, resume_from, change_world_size)
    if state.step >= total:
        return say_nothing_to_train(folder, state.step, total, ddp)
    training, forward = cfg.train, wrap_for_training(state.model, ddp, runtime, cfg.train.compile)
    on_main(ddp, functools.partial(folder.write_config, cfg))
    with TrainLogger(folder.path, cfg.name, state.step, None if training.time_budget else total, training.batch_size,
                     ddp.is_main) as log, StopFlag(ddp) as stop:
        log.describe(cfg, state.model, len(batches.images), ddp.world_size, batches.steps_per_epoch, total,
                     state.step, runtime.device, runtime.describe())
        log.run_start(cfg, schedule, state.model)  # once, at step 0: not again on resume
        interval = Interval(runtime.device, state.step)
        log.budget = budget = StepBudget(training, state.step) if training.time_budget else None
        while state.step < total:
            interval.add(*train_step(state, forward, schedule, batches, cfg, runtime), schedule.num_timesteps)
            runtime.share_cpu()
            step, stop_now = state.step, stop.agreed()
            if budget is not None and budget.due(step):
                cfg, total = read_budget(budget, cfg, total, state, folder, ddp, log, runtime)
            if due(step, training.log_every, total):
                interval = log_interval(log, interval, state, training, folder, runtime)
            if training.sample_every and step % training.sample_every == 0 and step != total:
                preview(hooks, state, runtime, ddp, log, step)
                interval.started = time.perf_counter()
            if training.eval_every and due(step, training.eval_every, total):
                measure(hooks, state, runtime, ddp, log, step)
                interval.started = time.perf_counter()
            if due(step, training.checkpoint_every, total) or stop_now:
                interval.check_finite(training.nan_policy, step, folder.path)
                save(state, cfg, ddp, folder, batches.steps_per_epoch)
                interval.started = time.perf_counter()
            if stop_now:
                log.stopped()
                raise Stopped(f"saved {folder.latest} at step {step:,}; continue with --resume", stop.terminated)
        preview(hooks, state, runtime, ddp, log, total)
        check_replicas(ddp, state.model)
        log.run_end(cfg, total, folder.latest)
    return folder.path


def say_nothing_to_train(folder: RunFolder, step: int, total: int, ddp: Dist) -> Path:
    """A resumed run already at its length: say so (rank 0) and return its folder."""
    if ddp.is_main:
        print(f"{folder.path} is already at step {step:,} of {total:,}: nothing to train (raise train.steps)")
    return folder.path


def setup_state(cfg: Config, ddp: Dist, runtime: Runtime, resume_from: Checkpoint | None, change_world_size: bool
                ) -> tuple[Config, Runtime, EpochBatches, NoiseSchedule, int, TrainState]:
    """The run's config (its length and memory layout from the checkpoint on resume, train.channels_last:
    auto resolved), runtime, data, schedule, length and state, restored from the checkpoint when resuming."""
    cfg = layout_from_checkpoint(length_from_checkpoint(cfg, resume_from, ddp.is_main), resume_from)
    batches, schedule, total, state = setup_training(cfg, runtime, ddp.rank, ddp.world_size)
    if cfg.train.channels_last == "auto":
        cfg, runtime = with_layout(cfg, state, batches, schedule, runtime, ddp)
    if resume_from is not None:
        check_resume_world_size(resume_from.world_size, ddp, cfg.train.batch_size, len(batches.images),
                                change_world_size)
        resume_from.restore(state, ddp.rank, ddp.world_size)
        changed = apply_optimizer_settings(state, cfg.train, resume_from.config.train)
        if changed and ddp.is_main:
            note(f"--resume applies {', '.join(changed)}")
    return cfg, runtime, batches, schedule, total, state


LAYOUT_STEPS = 8  # training steps each memory layout is timed for, per round


def with_layout(cfg: Config, state: TrainState, batches: EpochBatches, schedule: NoiseSchedule, runtime: Runtime,
                ddp: Dist) -> tuple[Config, Runtime]:
    """train.channels_last: auto, resolved for a new run: contiguous under runtime.deterministic (a rerun
    computes the same bits), else the layout `choose_channels_last` times as faster here. Rank 0's
    choice holds on every rank; the config (so config.yaml and the checkpoints) records it, and the
    opening line says it and why."""
    if cfg.runtime.deterministic:
        chosen, said = False, "contiguous memory (train.channels_last: auto; not timed under runtime.deterministic)"
    else:
        states = {layout: build_train_state(with_channels_last(cfg, layout), runtime, ddp.rank, UNFIXED_STEPS)
                  for layout in (False, True)}  # each as a run in that layout starts, with generators of its own
        timed = functools.partial(layout_seconds, states, schedule, batches, cfg, runtime)
        chosen, said = choose_channels_last(timed, LAYOUT_STEPS * cfg.train.batch_size)
    chosen, said = gather(ddp, (chosen, said))[0]
    if chosen:  # as if built so (the optimiser holds the same parameters, in their new layout)
        state.model.to(memory_format=torch.channels_last)
        state.ema.to(memory_format=torch.channels_last)
    return with_channels_last(cfg, chosen), dataclasses.replace(runtime, layout_note=said)


def with_channels_last(cfg: Config, channels_last: bool) -> Config:
    """The config with train.channels_last set."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, channels_last=channels_last))


def layout_seconds(states: dict[bool, TrainState], schedule: NoiseSchedule, batches: EpochBatches, cfg: Config,
                   runtime: Runtime, channels_last: bool) -> float:
    """Seconds of LAYOUT_STEPS whole training steps (`train_step`: the batch, forward, backward,
    clipping, AdamW, EMA) of a fresh state of the run's config in one memory layout (`states`); the
    run's own state and generators are not touched."""
    probe = states[channels_last]
    with torch.random.fork_rng(devices=[runtime.device] if runtime.device.type == "cuda" else []):
        started = time.perf_counter()
        for _ in range(LAYOUT_STEPS):
            losses = train_step(probe, probe.model, schedule, batches, with_channels_last(cfg, channels_last),
                                runtime)[0]
        losses.sum().item()  # the queued work is done (CUDA)
        return time.perf_counter() - started


def read_budget(budget: StepBudget, cfg: Config, total: int, state: TrainState, folder: RunFolder, ddp: Dist,
                log: TrainLogger, runtime: Runtime) -> tuple[Config, int]:
    """A due reading of a time budget; once it fixes the length, the config and length that follow from it."""
    fixed = gather(ddp, budget.reading(state.step, runtime.device))[0]  # rank 0's clock decides
    if fixed is None:
        return cfg, total
    log.length_fixed(fixed, state.step, budget.budget, budget.fixes)
    budget.fixed(state.step, fixed)
    return fix_length(cfg, state, fixed, folder, ddp), fixed


def log_interval(log: TrainLogger, interval: Interval, state: TrainState, training: TrainConfig, folder: RunFolder,
                 runtime: Runtime) -> Interval:
    """Check and log the interval that ends at this step; return the next one."""
    step = state.step
    interval.check_finite(training.nan_policy, step, folder.path)
    log.interval(interval, step, state.optimizer.param_groups[0]["lr"],
                 ema_decay_at(step, training.ema_decay, training.ema_warmup),
                 state.skipped if training.nan_policy == "skip" else None)
    return Interval(runtime.device, step)


def fix_length(cfg: Config, state: TrainState, steps: int, folder: RunFolder, ddp: Dist) -> Config:
    """Fix a time-budgeted run's length: the lr schedule is laid out over it, and config.yaml and
    every checkpoint from here on say train.steps: `steps`."""
    fixed = with_fixed_length(cfg, steps)
    relay_lr_schedule(state, fixed.train, steps)
    on_main(ddp, functools.partial(folder.write_config, fixed))
    return fixed


def train_step(state: TrainState, forward: nn.Module, schedule: NoiseSchedule, batches: EpochBatches, cfg: Config,
               runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Algorithm 1 of Ho et al. for step `state.step`, then the step count moves on. Returns per-image
    losses, timesteps, the gradient norm and whether both were finite (on the device, no host sync)."""
    training = cfg.train
    x0 = batches.batch(state.step)  # (B, 1, 28, 28) in [-1, 1]
    if training.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    # lines 3-4: t ~ Uniform({0, ..., T-1}) (or stratified over the batch), eps ~ N(0, I)
    timesteps = training_timesteps(schedule.num_timesteps, training.batch_size, training.timestep_sampling,
                                   state.generator)
    noise = torch.randn(x0.shape, device=runtime.device, generator=state.generator)
    labels = class_labels(state, batches, cfg, runtime) if cfg.model.num_classes else None
    # line 5: a gradient step on the loss of the prediction
    with autocast(runtime):
        losses = training_losses(forward, schedule, x0, timesteps, noise, cfg.model.prediction_type, training.loss,
                                 labels, training.min_snr_gamma, training.vlb_weight)
    loss = losses.mean()
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(state.model.parameters(),
                                         training.grad_clip if training.grad_clip > 0 else math.inf)
    # the gradients are all-reduced, so grad_norm, and with it the verdict, is the same on every rank
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    if training.nan_policy == "skip" and not bool(finite):  # one host sync per step, only with skip
        state.skipped += 1
    else:
        state.optimizer.step()
        state.ema.update_parameters(state.model)
    state.lr_scheduler.step()
    state.step += 1
    return losses.detach(), timesteps, grad_norm.detach(), finite


def class_labels(state: TrainState, batches: EpochBatches, cfg: Config, runtime: Runtime) -> torch.Tensor:
    """The batch's digits, each replaced by "no class" (num_classes) with probability
    train.class_dropout (classifier-free guidance's p_uncond), drawn from the checkpointed generator."""
    labels = batches.batch_labels(state.step)  # (B,)
    dropped = torch.rand(labels.shape, device=runtime.device, generator=state.generator) < cfg.train.class_dropout
    return torch.where(dropped, cfg.model.num_classes, labels)


def due(step: int, every: int, total: int) -> bool:
    """True at every `every`-th step (never when `every` is 0) and at the last step."""
    return step == total or (every > 0 and step % every == 0)


def wrap_for_training(model: nn.Module, ddp: Dist, runtime: Runtime, compile_model: bool) -> nn.Module:
    """The module each step calls: DDP under torchrun, compiled if asked."""
    forward: nn.Module = model
    if ddp.enabled:
        device = runtime.device
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(forward) if compile_model else forward


def save(state: TrainState, cfg: Config, ddp: Dist, folder: RunFolder, steps_per_epoch: int) -> None:
    """A checkpoint: every rank's RNG states go in, rank 0 writes it, every rank hears of a failure."""
    rngs = gather(ddp, state.rng_state())
    on_main(ddp, functools.partial(folder.save, state, cfg, steps_per_epoch, rngs))


def preview(hooks: Hooks, state: TrainState, runtime: Runtime, ddp: Dist, log: TrainLogger, step: int) -> None:
    """Rank 0 asks the preview hook for a grid of EMA samples and shows it in TensorBoard."""
    if hooks.preview is not None and ddp.is_main:
        log.image(PREVIEW_TAG, hooks.preview(state.ema.module.eval(), runtime, step), step)


def measure(hooks: Hooks, state: TrainState, runtime: Runtime, ddp: Dist, log: TrainLogger, step: int) -> None:
    """Rank 0 asks the metrics hook for numbers of the EMA model and logs them as eval/<name>."""
    if hooks.metrics is not None and ddp.is_main:
        log.scalars("eval", hooks.metrics(state.ema.module.eval(), runtime), step)
