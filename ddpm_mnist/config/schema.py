"""The config's schema: one dataclass per YAML section, each field with its default, meaning and range.

Every field carries its default, a one-line meaning and its allowed range in `param(...)`, so
that loading, error messages and the README's config reference all read from one place.
Loading and validation are in `loading.py` and `rules.py`; this package knows nothing about torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddpm_mnist.config.sampler_names import SAMPLER_NAMES, max_steps


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
FIXED_VARIANCE_TYPES = ("fixed_small", "fixed_large", "fixed_small_log", "fixed_large_log")  # diffusers' fixed ones
LEARNED_VARIANCE_TYPES = ("learned_range", "learned")  # a model that outputs its step's variance too
VARIANCE_TYPES = FIXED_VARIANCE_TYPES + LEARNED_VARIANCE_TYPES
SIGMA_SCHEDULES = ("spaced", "karras")
GUIDANCE_DEFAULT = 2.0  # chosen by the guidance sweep in docs/results.md
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
    threads: int = param(
        0, "CPU threads: 0 = auto (training: every core, one count for the whole run and its --resume, so that "
        "a resume is bit-exact; sampling: one fewer per core other processes keep busy, re-checked as it goes; "
        "OMP_NUM_THREADS, if set, decides); N: exactly N (at most the cores there are)",
        ge=0, le=4096,
    )


@dataclass
class DataConfig:
    """Where MNIST lives and how much of it to use."""

    root: str = param("data", "folder holding MNIST/raw/ (torchvision's layout)")
    download: bool = param(True, "try torchvision's download when the files are missing")
    limit: int = param(0, "use only the first N training images (0 = all 60000)", ge=0)


@dataclass
class ScheduleConfig:
    """The forward-noising beta schedule (defaults as in diffusers' DDPMScheduler; its names, but cosine:
    diffusers' squaredcos_cap_v2)."""

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

    base_channels: int = param(32, "channels of the first level", ge=1, le=1024)
    channel_mult: list[int] = param([1, 2, 2], "channel multiplier per level (28, 14, 7; 14, 7 with patch_size 2)")
    num_res_blocks: int = param(2, "residual blocks per level", ge=1, le=8)
    attention_resolutions: list[int] = param([7], "resolutions (28, 14 or 7) with self-attention")
    num_heads: int = param(1, "attention heads", ge=1, le=64)
    dropout: float = param(0.1, "dropout inside residual blocks", ge=0, lt=1)
    num_groups: int = param(8, "GroupNorm groups (must divide every channel count)", ge=1, le=1024)
    patch_size: int = param(
        1, "1: the U-Net starts at 28x28; 2: each 2x2 patch of pixels becomes 4 channels at 14x14 (pixel "
        "unshuffle), and the output is shuffled back to 28x28 (one level, and most of the cost, fewer)", ge=1, le=2,
    )
    time_conditioning: str = param(
        "add", "how a residual block takes the time embedding: add (before its second GroupNorm, Ho et al.) | "
        "scale_shift (that norm's output times 1 + scale, plus shift: improved-diffusion's use_scale_shift_norm)",
        choices=("add", "scale_shift"),
    )
    prediction_type: str = param(
        "epsilon", "what the network predicts: epsilon | v | x0", choices=PREDICTION_TYPES
    )
    learn_variance: bool = param(
        False, "a second output channel v in [-1, 1] sets each step's variance (Nichol & Dhariwal 2021): "
        "trained with train.loss: hybrid, sampled with sample.variance_type: learned_range",
    )
    num_classes: int = param(
        0, "0: unconditional; 10: conditioned on the digit (a learned embedding added to the time embedding, "
        "with one more 'no class' row for classifier-free guidance)", ge=0, le=10,
    )

    def resolutions(self) -> list[int]:
        """The side of each level's feature maps: 28, 14, 7 (patch_size 1) or 14, 7 (patch_size 2)."""
        return [IMAGE_SIZE // self.patch_size // 2**level for level in range(len(self.channel_mult))]


@dataclass
class TrainConfig:
    """The training loop, optimiser, EMA, logging and checkpoints."""

    batch_size: int = param(128, "images per optimiser step", ge=1, le=65536)
    steps: int = param(10000, "optimiser steps to train (0: train by epochs instead)", ge=0, le=10**9)
    epochs: int = param(0, "epochs to train; needs steps: 0 (0: train by steps)", ge=0, le=10**6)
    time_budget: str = param(
        "", "train for this long instead (90s, 20m, 1.5h; needs steps: 0 and epochs: 0): the steps are fixed "
        "from the step rate measured over the first steps, and corrected once halfway from the rate since then",
        expected="a duration from 1s to 1000h such as 90s, 20m or 1.5h",
    )
    lr: float = param(2e-4, "peak learning rate of AdamW", gt=0, le=1)
    weight_decay: float = param(0.0, "AdamW weight decay", ge=0, le=1)
    adam_beta2: float = param(0.999, "AdamW's beta2: the decay of its squared-gradient average", gt=0, lt=1)
    warmup_steps: int = param(200, "linear learning-rate warmup, in steps", ge=0, le=10**9)
    lr_schedule: str = param("constant", "after warmup: constant | cosine", choices=("constant", "cosine"))
    min_lr_ratio: float = param(0.1, "cosine decay ends at lr * min_lr_ratio", ge=0, le=1)
    grad_clip: float = param(1.0, "max global gradient norm (0: no clipping)", ge=0)
    class_dropout: float = param(
        0.1, "conditional models: share of labels replaced by 'no class' (p_uncond of classifier-free guidance)",
        ge=0, lt=1,
    )
    timestep_sampling: str = param(
        "uniform", "each image's t: uniform (Algorithm 1) | stratified (one t in each of batch_size equal "
        "strata of 0..T-1 from one uniform offset, Kingma et al. 2021: the same loss in expectation, less variance)",
        choices=("uniform", "stratified"),
    )
    loss: str = param(
        "mse", "mse | l1 | huber, on the prediction target | hybrid: mse plus vlb_weight times the variational "
        "bound's term (needs model.learn_variance; Nichol & Dhariwal 2021)", choices=("mse", "l1", "huber", "hybrid"),
    )
    vlb_weight: float = param(
        0.001, "hybrid loss: lambda of L_simple + lambda L_vlb, with L_vlb = T times the drawn step's term in "
        "bits/dim, the mean seen through a stop-gradient (improved-diffusion's mse + vb at T = 1000)", ge=0, le=1e6,
    )
    min_snr_gamma: float = param(
        0.0, "weight each image's loss by Min-SNR-gamma (Hang et al. 2023; 5 in the paper; 0: unweighted)", ge=0,
        le=1e6,
    )
    ema_decay: float = param(0.9999, "EMA decay of the weights used for sampling", ge=0, lt=1)
    ema_warmup: bool = param(True, "EMA decay min(ema_decay, (1+n)/(10+n)) so early samples are not blank")
    compile: bool = param(False, "torch.compile the model for training")
    channels_last: bool | str = param(
        "auto", "memory layout of the training step: true (channels_last), false (contiguous), or auto: both "
        "timed for a few steps at start, channels_last taken only if over 5% faster (contiguous under "
        "runtime.deterministic); config.yaml records the choice and --resume keeps it", choices=("auto",),
    )
    nan_policy: str = param(
        "stop", "on a non-finite loss or gradient: stop | skip (the step)", choices=("stop", "skip")
    )
    log_every: int = param(50, "steps between scalar logs and progress-bar updates", ge=1)
    sample_every: int = param(1000, "steps between preview grids (0: only at the end)", ge=0)
    preview_n: int = param(64, "images in each preview grid", ge=1, le=1024)
    preview_sampler: str = param(
        "ancestral", "sampler of preview grids and training metrics: any of sample.sampler's (ddim at eta 0, "
        "spaced sigmas)", choices=SAMPLER_NAMES,
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
        "ancestral", "ancestral (Ho et al.) | ddim (Song et al.) | dpmpp_2m (DPM-Solver++ 2M, Lu et al.) | euler | "
        "euler_ancestral | heun (2 model calls a step) | lms (linear multistep, order 4): the last four in the "
        "sigma view, from x_T = init_noise_sigma * z, as diffusers' Euler, EulerAncestral, Heun and LMS schedulers",
        choices=SAMPLER_NAMES,
    )
    timestep_spacing: str = param(
        "leading", "timesteps of a run of fewer than T steps: leading | trailing | linspace (diffusers' names)",
        choices=TIMESTEP_SPACINGS,
    )
    sigma_schedule: str = param(
        "spaced", "the noise levels of dpmpp_2m and the sigma samplers: spaced (those of the spaced timesteps) | "
        "karras (Karras et al. 2022, rho = 7, between the same ends; diffusers' use_karras_sigmas)",
        choices=SIGMA_SCHEDULES,
    )
    eta: float = param(0.0, "DDIM eta: 0 deterministic, 1 ancestral-like", ge=0, le=1)
    variance_type: str = param(
        "fixed_small", "the ancestral loop's sigma_t^2: fixed_small (beta-tilde) | fixed_large (beta) | "
        "fixed_small_log | fixed_large_log (the same, computed as exp(log(var) / 2), diffusers' names) | "
        "learned_range (models with learn_variance: log sigma_t^2 = v' log beta + (1 - v') log beta-tilde, "
        "v' = (v + 1) / 2) | learned (diffusers' name: the second channel is sigma_t^2 itself; sampling only)",
        choices=VARIANCE_TYPES,
    )
    clip_sample: bool = param(True, "clip the predicted x0 to [-clip_sample_range, clip_sample_range]")
    clip_sample_range: float = param(1.0, "clip bound for the predicted x0 (images lie in [-1, 1])", gt=0, le=1000)
    thresholding: bool = param(
        False, "dynamic thresholding of the predicted x0 (Saharia et al. 2022), in place of clip_sample: "
        "s = the dynamic_thresholding_ratio quantile of |x0| per image, clamped to [1, sample_max_value]; "
        "x0 = clamp(x0, -s, s) / s",
    )
    dynamic_thresholding_ratio: float = param(0.995, "the quantile of |x0| that thresholding takes as s", gt=0,
                                              le=1)
    sample_max_value: float = param(1.0, "the largest s thresholding uses (1: it is clipping to [-1, 1])", ge=1,
                                    le=1000)
    batch_size: int = param(
        0, "images per forward pass (does not change the images); 0: of 16, 32, 64, 128 and 256 (at most n), "
        "the smallest within 5% of the fastest, timed on this machine at start", ge=0, le=65536,
    )
    use_ema: bool = param(True, "sample with the EMA weights")
    compile: bool | str = param(
        "auto", "torch.compile the model for sampling: true, false, or auto: on a CPU in float32, a job whose "
        "eager time at the rate timed for its batch is 6 minutes or more (not under bf16 autocast, where it "
        "gained nothing; not on CUDA, which replays CUDA graphs); inductor caches a compile for the next process",
        choices=("auto",),
    )
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


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain Python types (safe for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(cfg)
