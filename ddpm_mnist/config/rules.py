"""Checks that involve more than one config key (each key's own type and range is checked on loading)."""

from __future__ import annotations

import re

from ddpm_mnist.config.sampler_names import KARRAS_SAMPLERS, SIGMA_SAMPLERS, max_steps, min_steps
from ddpm_mnist.config.schema import IMAGE_SIZE, LEARNED_VARIANCE_TYPES, Config, ModelConfig
from ddpm_mnist.config.yaml_io import describe_value
from ddpm_mnist.errors import ConfigError


def validate(cfg: Config, source: str) -> None:
    """Checks that involve more than one field."""
    _validate_schedule(cfg, source)
    _validate_model(cfg.model, source)
    _validate_lengths(cfg, source)
    _validate_digits(cfg, source)
    _validate_sampler(cfg, source)
    _validate_variance(cfg, source)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg.name):
        raise ConfigError(
            f"{source}: name: must be a folder name of letters, digits, '.', '_' or '-', got {describe_value(cfg.name)}"
        )
    if not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", cfg.runtime.device):
        raise ConfigError(
            f"{source}: runtime.device: must be auto, cpu, cuda, cuda:N or mps, "
            f"got {describe_value(cfg.runtime.device)}"
        )


def _validate_schedule(cfg: Config, source: str) -> None:
    schedule = cfg.schedule
    if schedule.beta_schedule != "cosine" and schedule.beta_start > schedule.beta_end:
        raise ConfigError(
            f"{source}: schedule.beta_start: must be <= schedule.beta_end ({schedule.beta_end:g}), "
            f"got {schedule.beta_start:g}"
        )
    if schedule.rescale_zero_terminal_snr and schedule.num_timesteps < 2:
        raise ConfigError(
            f"{source}: schedule.rescale_zero_terminal_snr: needs schedule.num_timesteps >= 2 (the rescaling "
            "pins the first and the last alpha-bar; at T = 1 they are one and the same)"
        )
    if schedule.rescale_zero_terminal_snr and cfg.model.prediction_type == "epsilon":
        raise ConfigError(
            f"{source}: schedule.rescale_zero_terminal_snr: needs model.prediction_type v or x0 "
            "(at zero terminal SNR an epsilon prediction carries no information about x0)"
        )


def _validate_model(model: ModelConfig, source: str) -> None:
    if model.num_classes not in (0, 10):
        raise ConfigError(
            f"{source}: model.num_classes: must be 0 (unconditional) or 10 (conditioned on the digit), "
            f"got {model.num_classes}"
        )
    sides = [IMAGE_SIZE // model.patch_size]  # each level halves the one above, while it is even
    while sides[-1] % 2 == 0:
        sides.append(sides[-1] // 2)
    if not 1 <= len(model.channel_mult) <= len(sides):
        raise ConfigError(
            f"{source}: model.channel_mult: must list 1 to {len(sides)} levels ({', '.join(map(str, sides))}"
            f"{' with model.patch_size 2' if model.patch_size == 2 else ''}), got {model.channel_mult}"
        )
    if any(not 1 <= c <= 64 for c in model.channel_mult):
        raise ConfigError(f"{source}: model.channel_mult: each must be in 1..64, got {model.channel_mult}")
    resolutions = model.resolutions()
    for r in model.attention_resolutions:
        if r not in resolutions:
            raise ConfigError(
                f"{source}: model.attention_resolutions: {r} is not a level of this U-Net; "
                f"allowed: {', '.join(map(str, resolutions))}"
            )
    for c in {model.base_channels * k for k in model.channel_mult}:
        if c % model.num_groups:
            raise ConfigError(
                f"{source}: model.num_groups: {model.num_groups} must divide every channel count "
                f"(base_channels * channel_mult gives {c})"
            )
        if model.attention_resolutions and c % model.num_heads:
            raise ConfigError(
                f"{source}: model.num_heads: {model.num_heads} must divide every channel count, got {c} channels"
            )


SHORTEST_BUDGET, LONGEST_BUDGET = 1.0, 1000 * 3600.0  # seconds: a budget must measure a step rate, and end


def duration_seconds(text: str) -> float:
    """'90s', '20m' or '1.5h' in seconds; ValueError for anything else, or outside 1s .. 1000h."""
    match = re.fullmatch(r"\s*([0-9]{1,12}(?:\.[0-9]{1,12})?)\s*([smh])\s*", text)
    if match is None:
        raise ValueError(text)
    seconds = float(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]]
    if not SHORTEST_BUDGET <= seconds <= LONGEST_BUDGET:
        raise ValueError(text)
    return seconds


def _validate_digits(cfg: Config, source: str) -> None:
    bad = [d for d in cfg.sample.digits if not 0 <= d <= 9]
    if bad:
        raise ConfigError(f"{source}: sample.digits: each must be a digit 0 to 9, got {bad[0]}")
    if cfg.sample.digits and not cfg.model.num_classes:
        raise ConfigError(
            f"{source}: sample.digits: this model is unconditional (model.num_classes: 0); drawing chosen digits "
            "needs a model trained with model.num_classes: 10"
        )


def _validate_sampler(cfg: Config, source: str) -> None:
    """Settings of the `sample` section that another one rules out."""
    s = cfg.sample
    if cfg.schedule.rescale_zero_terminal_snr:
        _validate_zero_terminal_snr(cfg, source)
    if s.sigma_schedule == "karras" and s.sampler not in KARRAS_SAMPLERS:
        raise ConfigError(
            f"{source}: sample.sigma_schedule: karras steps between noise levels that are not the model's "
            f"timesteps; {s.sampler} needs those (use {', '.join(KARRAS_SAMPLERS)}, or sigma_schedule: spaced)"
        )
    if s.thresholding and s.clip_sample:
        raise ConfigError(
            f"{source}: sample.thresholding: replaces clip_sample (diffusers ignores clip_sample when it "
            "thresholds); set sample.clip_sample: false too"
        )
    preview = cfg.train.preview_sampler
    if cfg.preview_steps < min_steps(preview):
        raise ConfigError(f"{source}: train.preview_steps: {preview} takes at least {min_steps(preview)} steps, "
                          f"got {cfg.preview_steps}")
    if cfg.reverse_steps < min_steps(s.sampler):
        raise ConfigError(
            f"{source}: sample.steps: {s.sampler} takes at least {min_steps(s.sampler)} steps (at 1 step it is "
            f"Euler's), got {cfg.reverse_steps}"
        )


def _validate_variance(cfg: Config, source: str) -> None:
    """A learned variance is sampled as learned, a fixed one as fixed, and only a learned one is
    trained by the hybrid loss."""
    variance, learns = cfg.sample.variance_type, cfg.model.learn_variance
    if variance in LEARNED_VARIANCE_TYPES and not learns:
        raise ConfigError(f"{source}: sample.variance_type: {variance} reads a variance this model does not output "
                          "(model.learn_variance: false); use a fixed one such as fixed_small")
    if learns and variance not in LEARNED_VARIANCE_TYPES:
        raise ConfigError(f"{source}: sample.variance_type: {variance} would ignore the variance this model learns "
                          "(model.learn_variance: true); use learned_range")
    if cfg.train.loss == "hybrid" and not learns:
        raise ConfigError(f"{source}: train.loss: hybrid trains a learned variance; with model.learn_variance: false "
                          "its bound term has nothing to learn (set learn_variance: true, or use mse)")
    if cfg.train.loss == "hybrid" and variance == "learned":
        raise ConfigError(f"{source}: train.loss: hybrid trains learned_range's v (Eq. 15); sample.variance_type: "
                          "learned reads the output as the variance itself, diffusers' meaning: use learned_range")


def check_trainable(cfg: Config, source: str) -> None:
    """What training needs beyond a valid config: a learned variance needs the loss that trains it
    (a model read from diffusers may learn one without saying how it was trained)."""
    if cfg.model.learn_variance and cfg.train.loss != "hybrid":
        raise ConfigError(f"{source}: model.learn_variance: true needs train.loss: hybrid, the loss that trains "
                          f"the variance (got {cfg.train.loss})")


def _validate_zero_terminal_snr(cfg: Config, source: str) -> None:
    """At zero terminal SNR, sigma_T is infinite: nothing may start from it or space noise levels up to it."""
    s, preview = cfg.sample, cfg.train.preview_sampler
    if s.sampler in SIGMA_SAMPLERS:
        raise ConfigError(
            f"{source}: sample.sampler: {s.sampler} starts from x_T = init_noise_sigma * z, and at zero terminal "
            "SNR (schedule.rescale_zero_terminal_snr) sigma_T is infinite; use ancestral, ddim or dpmpp_2m"
        )
    if s.sigma_schedule == "karras":
        raise ConfigError(
            f"{source}: sample.sigma_schedule: karras spaces the noise levels up to sigma_T, which is infinite at "
            "zero terminal SNR (schedule.rescale_zero_terminal_snr); use sigma_schedule: spaced"
        )
    if preview in SIGMA_SAMPLERS:
        raise ConfigError(f"{source}: train.preview_sampler: {preview} cannot start at zero terminal SNR "
                          "(sigma_T is infinite); use ancestral, ddim or dpmpp_2m")


def _validate_lengths(cfg: Config, source: str) -> None:
    """train.steps, train.epochs or train.time_budget, and step counts that fit the schedule's T."""
    training, T = cfg.train, cfg.schedule.num_timesteps
    if training.time_budget:
        try:
            duration_seconds(training.time_budget)
        except ValueError:
            raise ConfigError(
                f"{source}: train.time_budget: must be a duration from 1s to 1000h such as 90s, 20m or 1.5h, "
                f"got {describe_value(training.time_budget)}"
            ) from None
        if training.steps or training.epochs:
            raise ConfigError(
                f"{source}: train.time_budget: a budget replaces train.steps and train.epochs: give one length "
                f"(got steps={training.steps}, epochs={training.epochs}, time_budget={training.time_budget}; "
                "--set train.time_budget='' turns the budget off)"
            )
    elif (training.steps > 0) == (training.epochs > 0):
        raise ConfigError(
            f"{source}: train.epochs: exactly one of train.steps and train.epochs must be positive, "
            f"got steps={training.steps}, epochs={training.epochs} (to train by epochs, set steps: 0; "
            "for a time budget, train.time_budget)"
        )
    if cfg.reverse_steps > max_steps(cfg.sample.sampler, T) and cfg.sample.steps <= T:
        raise ConfigError(
            f"{source}: sample.steps: {cfg.sample.sampler} takes fewer than schedule.num_timesteps ({T}) steps, got "
            f"{cfg.reverse_steps}{' (0: the full loop)' if cfg.sample.steps == 0 else ''}; 20 is a good start"
        )
    if cfg.sample.steps > T:
        raise ConfigError(
            f"{source}: sample.steps: must be <= schedule.num_timesteps ({T}), got {cfg.sample.steps} "
            "(0 runs the full loop of T steps)"
        )
