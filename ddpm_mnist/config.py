"""Typed config: one dataclass per YAML section, strict loading, `--set` overrides, YAML dump.

Every field carries its default, a one-line meaning and its allowed range in `param(...)`, so
that loading, error messages and the README's config reference all read from one place.
This module knows nothing about torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import stat
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ddpm_mnist.errors import ConfigError
from ddpm_mnist.sampler_names import SAMPLER_NAMES, max_steps


def param(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    expected: str | None = None,
) -> Any:
    """A dataclass field with its meaning and allowed values (read by `load_config`). A string
    field may be empty only where its default is (empty: off); `expected` names its form in errors."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "empty_ok": default == "",
            "expected": expected}
    if isinstance(default, list):
        return field(default_factory=default.copy, metadata=meta)
    return field(default=default, metadata=meta)


SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")
PREDICTION_TYPES = ("epsilon", "v", "x0")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")  # Lin et al. 2023, Table 2; diffusers' timestep_spacing
GUIDANCE_DEFAULT = 2.0  # chosen by the guidance sweep in the README
IMAGE_SIZE = 28  # MNIST is 1 x 28 x 28; the U-Net halves it at most twice (28 -> 14 -> 7)


@dataclass
class RuntimeConfig:
    """Where and in what precision every command (train, sample, eval, bench) runs."""

    device: str = param("auto", "auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps")
    mixed_precision: str = param(
        "auto", "auto (bf16 autocast on CUDA and on CPUs with native bf16) | bf16 | fp32",
        choices=("auto", "bf16", "fp32"),
    )
    deterministic: bool = param(
        False, "CUDA: deterministic kernels, so that a run and its resumed copy match bit for bit (slower); "
        "CPU runs always do",
    )


@dataclass
class DataConfig:
    """Where MNIST lives and how much of it to use."""

    root: str = param("data", "folder holding MNIST/raw/ (torchvision's layout)")
    download: bool = param(True, "try torchvision's download when the files are missing")
    limit: int = param(0, "use only the first N training images (0 = all 60000)", ge=0)


@dataclass
class ScheduleConfig:
    """The forward-noising beta schedule (names and defaults as in diffusers' DDPMScheduler)."""

    beta_schedule: str = param(
        "linear", "linear | scaled_linear | cosine | sigmoid", choices=SCHEDULES
    )
    num_timesteps: int = param(1000, "T, the number of diffusion steps", ge=1, le=100_000)
    beta_start: float = param(1e-4, "beta at t = 0 (linear, scaled_linear, sigmoid)", gt=0, lt=1)
    beta_end: float = param(0.02, "beta at t = T-1 (linear, scaled_linear, sigmoid)", gt=0, lt=1)
    cosine_s: float = param(0.008, "offset s of the cosine schedule (Nichol & Dhariwal)", ge=0, le=1)
    max_beta: float = param(0.999, "cap on beta for the cosine schedule", gt=0, lt=1)
    rescale_zero_terminal_snr: bool = param(
        False, "rescale so that alpha-bar at T-1 is 0 (Lin et al. 2023; needs model.prediction_type v or x0)"
    )


@dataclass
class ModelConfig:
    """The U-Net's sizes and what it predicts."""

    base_channels: int = param(32, "channels at 28x28", ge=1, le=1024)
    channel_mult: list[int] = param([1, 2, 2], "channel multiplier per level (28, 14, 7)")
    num_res_blocks: int = param(2, "residual blocks per level", ge=1, le=8)
    attention_resolutions: list[int] = param([7], "resolutions (28, 14 or 7) with self-attention")
    num_heads: int = param(1, "attention heads", ge=1, le=64)
    dropout: float = param(0.1, "dropout inside residual blocks", ge=0, lt=1)
    num_groups: int = param(8, "GroupNorm groups (must divide every channel count)", ge=1, le=1024)
    prediction_type: str = param(
        "epsilon", "what the network predicts: epsilon | v | x0", choices=PREDICTION_TYPES
    )
    num_classes: int = param(
        0, "0: unconditional; 10: conditioned on the digit (a learned embedding added to the time embedding, "
        "with one more 'no class' row for classifier-free guidance)", ge=0, le=10,
    )


@dataclass
class TrainConfig:
    """The training loop, optimiser, EMA, logging and checkpoints."""

    batch_size: int = param(128, "images per optimiser step", ge=1, le=65536)
    steps: int = param(10000, "optimiser steps to train (0: train by epochs instead)", ge=0, le=10**9)
    epochs: int = param(0, "epochs to train; needs steps: 0 (0: train by steps)", ge=0, le=10**6)
    time_budget: str = param(
        "", "train for this long instead (90s, 20m, 1.5h; needs steps: 0 and epochs: 0): the steps are fixed "
        "once from the step rate measured over the first steps",
        expected="a duration from 1s to 1000h such as 90s, 20m or 1.5h",
    )
    lr: float = param(2e-4, "peak learning rate of AdamW", gt=0, le=1)
    weight_decay: float = param(0.0, "AdamW weight decay", ge=0, le=1)
    warmup_steps: int = param(200, "linear learning-rate warmup, in steps", ge=0, le=10**9)
    lr_schedule: str = param("constant", "after warmup: constant | cosine", choices=("constant", "cosine"))
    min_lr_ratio: float = param(0.1, "cosine decay ends at lr * min_lr_ratio", ge=0, le=1)
    grad_clip: float = param(1.0, "max global gradient norm (0: no clipping)", ge=0)
    class_dropout: float = param(
        0.1, "conditional models: share of labels replaced by 'no class' (p_uncond of classifier-free guidance)",
        ge=0, lt=1,
    )
    loss: str = param("mse", "mse | l1 | huber, on the prediction target", choices=("mse", "l1", "huber"))
    min_snr_gamma: float = param(
        0.0, "weight each image's loss by Min-SNR-gamma (Hang et al. 2023; 5 in the paper; 0: unweighted)", ge=0,
        le=1e6,
    )
    ema_decay: float = param(0.9999, "EMA decay of the weights used for sampling", ge=0, lt=1)
    ema_warmup: bool = param(True, "EMA decay min(ema_decay, (1+n)/(10+n)) so early samples are not blank")
    compile: bool = param(False, "torch.compile the model for training")
    channels_last: bool = param(False, "channels_last memory format")
    nan_policy: str = param(
        "stop", "on a non-finite loss or gradient: stop | skip (the step)", choices=("stop", "skip")
    )
    log_every: int = param(50, "steps between scalar logs and progress-bar updates", ge=1)
    sample_every: int = param(1000, "steps between preview grids (0: only at the end)", ge=0)
    preview_n: int = param(64, "images in each preview grid", ge=1, le=1024)
    preview_sampler: str = param(
        "ancestral", "sampler of preview grids and training metrics: ancestral | dpmpp_2m (DPM-Solver++) | "
        "ddim (eta 0)", choices=SAMPLER_NAMES,
    )
    preview_steps: int = param(
        50, "reverse steps of preview grids and training metrics (at most T, or T - 1 for dpmpp_2m)", ge=1
    )
    eval_every: int = param(0, "steps between classifier metrics of EMA samples in TensorBoard (0: off)", ge=0)
    eval_n: int = param(256, "samples for those metrics (train.preview_sampler at train.preview_steps)", ge=2,
                        le=10000)
    checkpoint_every: int = param(1000, "steps between checkpoints (0: only at the end)", ge=0)
    keep_checkpoints: int = param(3, "numbered checkpoints kept besides latest.pt", ge=1, le=10**6)


@dataclass
class SampleConfig:
    """Defaults for `ddpm sample` (each has a command-line flag too)."""

    n: int = param(64, "number of images", ge=1, le=10**7)
    steps: int = param(0, "reverse steps (0: the full loop, T = schedule.num_timesteps steps)", ge=0)
    sampler: str = param(
        "ancestral", "ancestral (Ho et al.) | ddim (Song et al.) | dpmpp_2m (DPM-Solver++ 2M, Lu et al.)",
        choices=SAMPLER_NAMES,
    )
    timestep_spacing: str = param(
        "leading", "timesteps of a run of fewer than T steps: leading | trailing | linspace (diffusers' names)",
        choices=TIMESTEP_SPACINGS,
    )
    eta: float = param(0.0, "DDIM eta: 0 deterministic, 1 ancestral-like", ge=0, le=1)
    variance_type: str = param(
        "fixed_small", "fixed_small (beta-tilde) | fixed_large (beta)",
        choices=("fixed_small", "fixed_large"),
    )
    clip_sample: bool = param(True, "clip the predicted x0 to [-clip_sample_range, clip_sample_range]")
    clip_sample_range: float = param(1.0, "clip bound for the predicted x0 (images lie in [-1, 1])", gt=0, le=1000)
    batch_size: int = param(256, "images per forward pass (does not change the images)", ge=1, le=65536)
    use_ema: bool = param(True, "sample with the EMA weights")
    compile: bool = param(False, "torch.compile the model for sampling")
    cuda_graph: bool = param(True, "on CUDA, replay each reverse step from one captured CUDA graph")
    digits: list[int] = param(
        [], "conditional models: the digits drawn, image k is digits[k mod len] (empty: 0 to 9 in turn)"
    )
    guidance: float = param(
        GUIDANCE_DEFAULT, "conditional models: classifier-free guidance weight W, eps = eps_uncond + W * "
        "(eps_cond - eps_uncond); 1: plain conditional, 0: unconditional", ge=0, le=100,
    )


@dataclass
class Config:
    """A whole run: top-level name, output folder and seed, plus one section each."""

    name: str = param("mnist", "run name: outputs go to out_dir/name/")
    out_dir: str = param("runs", "folder holding run folders")
    seed: int = param(0, "seed for weights, data order, timesteps and noise", ge=0, le=2**63 - 1)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    @property
    def run_dir(self) -> Path:
        """The run folder, `<out_dir>/<name>`."""
        return Path(self.out_dir) / self.name

    @property
    def reverse_steps(self) -> int:
        """The reverse steps `ddpm sample` runs: sample.steps, or the full loop of T when it is 0."""
        return self.sample.steps or self.schedule.num_timesteps

    @property
    def preview_steps(self) -> int:
        """The reverse steps of preview grids: train.preview_steps, at most T (T - 1 for dpmpp_2m,
        whose steps skip timesteps by construction)."""
        T = self.schedule.num_timesteps
        return min(self.train.preview_steps, max(1, max_steps(self.train.preview_sampler, T)))

    @property
    def preview_sampler(self) -> str:
        """The sampler of preview grids: train.preview_sampler, or DDIM where T = 1 leaves DPM-Solver++ no step."""
        return self.train.preview_sampler if self.schedule.num_timesteps > 1 else "ddim"


SECTIONS: dict[str, type] = {
    "runtime": RuntimeConfig,
    "data": DataConfig,
    "schedule": ScheduleConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
}


# Keys that moved to another section: a config file that still uses the old place is told the new one.
MOVED_KEYS = {"train.device": "runtime.device", "train.mixed_precision": "runtime.mixed_precision"}
# What `ddpm sample` and `ddpm eval` may override: how to sample and where to run, never the trained model.
SAMPLE_TIME_KEYS = ("sample.", "runtime.", "seed")
MAX_CONFIG_BYTES = 1 << 20  # a whole config is about 2 KB
MAX_DEPTH = 8  # a config is sections of keys holding at most a list: anything deeper is not a config


class _Loader(yaml.SafeLoader):
    """SafeLoader for configs: `1e-4` is a float, dates stay strings, and aliases, duplicate keys
    and deep nesting are refused (a config needs none of them; an alias bomb needs all three)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*{event.anchor}) are not allowed in a config", event.start_mark
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_describe(key)} (lines {seen[key]} and {line})", key_node.start_mark
                )
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads 2001-12-01 as a date: configs have no dates, and a run named like one is a string
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text with the config loader; any failure becomes one ConfigError line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    except (ValueError, OverflowError) as exc:  # `!!float abc`, an integer of 5000 digits
        raise ConfigError(f"{source}: not a value a config can hold: {_first_line(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deep to be a config") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return _describe_text(text.splitlines()[0] if text else type(exc).__name__)


_SHORT = reprlib.Repr()  # keyword arguments need Python 3.12
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxlong, _SHORT.maxother = 2, 4, 4, 50, 40, 50


def _describe(value: Any) -> str:
    """A short repr for error messages: bounded in length and depth, whatever the value."""
    return _SHORT.repr(value)


def _describe_text(text: str) -> str:
    """Text for an error message: unprintable characters escaped, at most 120 characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:200])
    return text if len(text) <= 120 else text[:117] + "..."


def _check_range(value: float, key: str, meta: dict, source: str, shown: Any = None) -> None:
    """Check value against the field's bounds; the message shows `shown` (the value as written) if given."""
    bounds = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
    for name, sign in bounds:
        bound = meta[name]
        if bound is None:
            continue
        ok = {"ge": value >= bound, "gt": value > bound, "le": value <= bound, "lt": value < bound}
        if not ok[name]:
            written = value if shown is None else shown
            raise ConfigError(f"{source}: {key}: must be {sign} {bound:g}, got {_describe(written)}")


def _coerce_number(value: Any, kind: type, key: str, meta: dict, source: str) -> Any:
    """An int field, or a float field (which also takes an int), range-checked."""
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: must be an integer, got {_describe(value)}")
        _check_range(value, key, meta, source)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{source}: {key}: must be a number, got {_describe(value)}")
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{source}: {key}: must be a finite number, got {_describe(value)}")
    _check_range(number, key, meta, source, shown=value)
    return number


def _coerce_string(value: Any, key: str, meta: dict, source: str) -> str:
    if isinstance(value, bool):
        raise ConfigError(
            f"{source}: {key}: must be a string, got {_describe(value)} "
            "(YAML reads unquoted yes/no/on/off as booleans; quote the value)"
        )
    if not isinstance(value, str) or not (value or meta.get("empty_ok")):
        raise ConfigError(f"{source}: {key}: must be {meta.get('expected') or 'a non-empty string'}, "
                          f"got {_describe(value)}")
    if "\x00" in value:
        raise ConfigError(f"{source}: {key}: must not contain a NUL character, got {_describe(value)}")
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{source}: {key}: must be one of {', '.join(meta['choices'])}; got {_describe(value)}")
    return value


def _coerce(value: Any, kind: Any, key: str, meta: dict, source: str) -> Any:
    """Check one value against its field type and range; return it (never silently changed)."""
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: must be true or false, got {_describe(value)}")
        return value
    if kind in (int, float):
        return _coerce_number(value, kind, key, meta, source)
    if kind is str:
        return _coerce_string(value, key, meta, source)
    if typing.get_origin(kind) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: must be a list of integers, got {_describe(value)}")
        return [_coerce(item, int, f"{key}[{i}]", meta, source) for i, item in enumerate(value)]
    raise TypeError(f"unsupported config field type {kind!r}")  # a bug in this module, not input


def _unknown_key(key: str, allowed: list[str], prefix: str, source: str) -> ConfigError:
    moved = MOVED_KEYS.get(f"{prefix}{key}")
    if moved:
        return ConfigError(
            f"{source}: {prefix}{key}: moved to {moved} (it applies to every command, not only training); "
            f"rename it"
        )
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"did you mean {prefix}{close[0]}? " if close else ""
    return ConfigError(f"{source}: {prefix}{_describe_text(key)}: unknown key; {hint}allowed: {', '.join(allowed)}")


def _build_section(cls: type, values: Any, section: str, source: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {section}: must be a mapping of keys, got {_describe(values)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if not isinstance(key, str) or key not in fields:
            raise _unknown_key(_describe(key) if not isinstance(key, str) else key, list(fields), f"{section}.", source)
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", fields[key].metadata, source)
    return cls(**kwargs)


def config_from_dict(raw: Any, source: str, *, check: bool = True) -> Config:
    """Build a Config from a parsed YAML mapping; `source` names it in errors.

    Every key's type and range is always checked; `check=False` skips only the checks that
    involve several keys (for `load_config`, which runs them after the overrides).
    """
    if raw is None:
        raise ConfigError(f"{source}: file is empty; a config is a YAML mapping of sections")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: must be a YAML mapping of sections, got {_describe(raw)}")
    hints = typing.get_type_hints(Config)
    top = {f.name: f for f in dataclasses.fields(Config)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in top:
            raise _unknown_key(_describe(key) if not isinstance(key, str) else key, list(top), "", source)
        if key in SECTIONS:
            kwargs[key] = _build_section(SECTIONS[key], value, key, source)
        else:
            kwargs[key] = _coerce(value, hints[key], key, top[key].metadata, source)
    cfg = Config(**kwargs)
    if check:
        validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str) -> None:
    """Checks that involve more than one field."""
    _validate_schedule(cfg, source)
    _validate_model(cfg.model, source)
    _validate_lengths(cfg, source)
    _validate_digits(cfg, source)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", cfg.name):
        raise ConfigError(
            f"{source}: name: must be a folder name of letters, digits, '.', '_' or '-', got {_describe(cfg.name)}"
        )
    if not re.fullmatch(r"auto|cpu|mps|cuda(:[0-9]+)?", cfg.runtime.device):
        raise ConfigError(
            f"{source}: runtime.device: must be auto, cpu, cuda, cuda:N or mps, got {_describe(cfg.runtime.device)}"
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
    if not 1 <= len(model.channel_mult) <= 3:
        raise ConfigError(
            f"{source}: model.channel_mult: must list 1 to 3 levels (28, 14, 7), got {model.channel_mult}"
        )
    if any(not 1 <= c <= 64 for c in model.channel_mult):
        raise ConfigError(f"{source}: model.channel_mult: each must be in 1..64, got {model.channel_mult}")
    resolutions = [IMAGE_SIZE // 2**level for level in range(len(model.channel_mult))]
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


def _validate_lengths(cfg: Config, source: str) -> None:
    """train.steps, train.epochs or train.time_budget, and step counts that fit the schedule's T."""
    training, T = cfg.train, cfg.schedule.num_timesteps
    if training.time_budget:
        try:
            duration_seconds(training.time_budget)
        except ValueError:
            raise ConfigError(
                f"{source}: train.time_budget: must be a duration from 1s to 1000h such as 90s, 20m or 1.5h, "
                f"got {_describe(training.time_budget)}"
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


def load_config(path: str | Path, overrides: list[str] | None = None, notes: list[str] | None = None) -> Config:
    """Read a YAML config file, apply `section.key=value` overrides, validate everything (`notes`:
    see `apply_overrides`)."""
    path = Path(path)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"{path}: is a folder, not a config file")
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block, /dev/zero would never end
            raise ConfigError(f"{path}: not a regular file (a pipe, socket or device); give a config file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {info.st_size:,} bytes; a config is at most {MAX_CONFIG_BYTES:,}")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {_first_line(exc)}") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raise ConfigError(f"{path}: file is empty; a config is a YAML mapping of sections")
    cfg = config_from_dict(raw, str(path), check=False)
    if overrides:
        return apply_overrides(cfg, overrides, str(path), notes=notes)
    validate(cfg, str(path))
    return cfg


def _override_target(key: str, where: str) -> tuple[Any, dict, str, str | None]:
    """The type, the field's metadata, and (section, name) of a `--set` key."""
    parts = key.split(".")
    if not all(parts) or len(parts) > 2:
        raise ConfigError(f"{where}: expected key=value or section.key=value, e.g. train.lr=1e-4")
    if len(parts) == 1:
        top = {f.name: f for f in dataclasses.fields(Config) if f.name not in SECTIONS}
        if parts[0] not in top:
            raise _unknown_key(parts[0], list(top), "", where)
        return typing.get_type_hints(Config)[parts[0]], top[parts[0]].metadata, parts[0], None
    section, name = parts
    if section not in SECTIONS:
        raise _unknown_key(section, list(SECTIONS), "", where)
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
    if name not in fields:
        raise _unknown_key(name, list(fields), f"{section}.", where)
    return typing.get_type_hints(SECTIONS[section])[name], fields[name].metadata, name, section


def apply_overrides(
    cfg: Config, overrides: list[str], source: str = "config", *, allowed: tuple[str, ...] | None = None,
    notes: list[str] | None = None,
) -> Config:
    """Apply `--set key=value` strings (value parsed as YAML, checked like the file) and re-validate.

    Each override is checked on its own (so the error names it); checks that involve several
    keys run once all overrides are in, so `beta_start` and `beta_end` can be moved together.
    `allowed` limits the keys (prefixes such as "sample."): at sample time the trained model's
    keys are not the user's to change. A run length given here (train.steps, train.epochs or
    train.time_budget) replaces the one the file gives, and `notes` hears of it.
    """
    raw = to_dict(cfg)
    given = set()
    for item in overrides:
        where = f"--set {_describe_text(item)}"
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"{where}: expected key=value or section.key=value, e.g. train.lr=1e-4")
        hint, meta, name, section = _override_target(key, where)
        if allowed is not None and not any(key == p or (p.endswith(".") and key.startswith(p)) for p in allowed):
            raise ConfigError(
                f"{where}: {key} belongs to the trained model and cannot change at sample time; "
                f"only {', '.join(p + '*' if p.endswith('.') else p for p in allowed)} can"
            )
        target = raw if section is None else raw[section]
        target[name] = _coerce(parse_yaml(text, where), hint, key, meta, where)
        given.add(key)
    replaced = _replace_length(raw["train"], given)
    if replaced and notes is not None:
        notes.append(replaced)
    return config_from_dict(raw, f"{source} with --set")


LENGTH_KEYS = {"steps": 0, "epochs": 0, "time_budget": ""}  # a run's length, and each one's "off"


def _replace_length(train: dict[str, Any], given: set[str]) -> str:
    """Where `--set` gave a run length, turn off the lengths of the file it did not give; say which."""
    chosen = [key for key in LENGTH_KEYS if f"train.{key}" in given and train[key] != LENGTH_KEYS[key]]
    if not chosen:
        return ""
    dropped = [f"train.{key}: {train[key]}" for key in LENGTH_KEYS
               if f"train.{key}" not in given and train[key] != LENGTH_KEYS[key]]
    if not dropped:
        return ""
    for key in LENGTH_KEYS:
        if f"train.{key}" not in given:
            train[key] = LENGTH_KEYS[key]
    return f"--set train.{chosen[0]}={train[chosen[0]]} replaces the config's {', '.join(dropped)}"


@dataclass(frozen=True)
class SampleRequest:
    """Sample-time settings asked for on the command line (None keeps the checkpoint's value): typed,
    from the CLI to the sampler, `--sweep` settings included."""

    n: int | None = None
    steps: int | None = None
    seed: int | None = None
    batch_size: int | None = None
    sampler: str | None = None
    timestep_spacing: str | None = None
    eta: float | None = None
    use_ema: bool | None = None
    digits: tuple[int, ...] | None = None
    guidance: float | None = None

    def given(self) -> dict[str, Any]:
        """The settings asked for, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def merged(self, other: SampleRequest) -> SampleRequest:
        """This request with what `other` asks for on top (a sweep's setting over the command line's)."""
        return dataclasses.replace(self, **other.given())


def with_sample_options(cfg: Config, request: SampleRequest) -> Config:
    """The config with a request's sample-time settings (None: keep the config's value), validated."""
    raw = to_dict(cfg)
    fields = {f.name: f for f in dataclasses.fields(SampleConfig)}
    for key, value in request.given().items():
        if key == "seed":
            raw["seed"] = _coerce(value, int, "seed", {f.name: f for f in dataclasses.fields(Config)}["seed"].metadata,
                                  "--seed")
            continue
        value = list(value) if isinstance(value, tuple) else value
        raw["sample"][key] = _coerce(value, typing.get_type_hints(SampleConfig)[key], f"sample.{key}",
                                     fields[key].metadata, f"--{key.replace('_', '-')}")
    return config_from_dict(raw, "the sample options")


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain Python types (safe for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for short lists such as channel_mult: [1, 2, 2]."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


_Dumper.add_representer(list, _represent_list)


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML that `load_config` reads back to an equal Config."""
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def reference_rows() -> list[tuple[str, str, str]]:
    """(key, default, meaning) for every field, for the README and `ddpm config --help`."""
    rows = []
    for f in dataclasses.fields(Config):
        if f.name in SECTIONS:
            for g in dataclasses.fields(SECTIONS[f.name]):
                default = g.default_factory() if callable(g.default_factory) else g.default  # type: ignore[misc]
                rows.append((f"{f.name}.{g.name}", _yaml_scalar(default), g.metadata["help"]))
        else:
            rows.append((f.name, _yaml_scalar(f.default), f.metadata["help"]))
    return rows


def _yaml_scalar(value: Any) -> str:
    """A default as it is written in YAML: true, 0.0001, [1, 2, 2], linear."""
    return yaml.dump(value, Dumper=_Dumper, default_flow_style=True).removesuffix("\n...\n").strip()
