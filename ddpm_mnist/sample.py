"""The reverse loop and its noise: from a checkpoint to images, batch by batch.

Reproducibility: image k of a run draws x_T and every z from its own generator, seeded from
(seed, stream, k). So its noise does not depend on the batch size, on how many images are asked
for, or on the other images in its batch; its pixels do not either, up to float rounding (a CPU
kernel may sum in another order for another batch shape).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ddpm_mnist import checkpoint as ckpt
from ddpm_mnist.config import SAMPLE_TIME_KEYS, Config, ModelConfig, SampleRequest, apply_overrides, with_sample_options
from ddpm_mnist.data import to_uint8
from ddpm_mnist.device import Runtime, autocast, available_memory_bytes, setup_runtime
from ddpm_mnist.errors import UserError, note
from ddpm_mnist.maths.samplers import IMAGE_SHAPE, NOISE_CHUNK, NoiseSource, Sampler, Step, StepFn, sampler_for

StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
Loop = Callable[[Sampler, NoiseSource, StepFn], torch.Tensor]  # a loop over steps: `reverse_loop`, or an edit's


def reverse_step(model: nn.Module, sampler: Sampler, i: Step, x: torch.Tensor, z: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the reverse process, the body of every loop: the model's output at its input
    (x_t; x / sqrt(sigma^2 + 1) in the sigma view) and t_i, then the sampler's x at step i + 1.
    Returns (x_next, model_output)."""
    t = sampler.timesteps[i].expand(x.shape[0])  # (B,): i may be a device tensor (graph replay)
    output = sampler.model_output(model(sampler.model_input(i, x), t).float(), x)
    return sampler.step(i, output, x, z), output  # float32: autocast leaves elementwise ops alone


def reverse_loop(sampler: Sampler, noise: NoiseSource, step: StepFn) -> torch.Tensor:
    """Algorithm 2 of Ho et al. for any sampler: x_T = init_noise_sigma * z, then for each step i the
    noise z it adds (if any) and `step(i, x, z)`, which calls the model and the sampler's step
    (`reverse_step`, wrapped by `generate`). Returns x after the last step, unclamped."""
    x = noise.initial()  # z ~ N(0, I)
    if sampler.init_noise_sigma != 1:
        x = x * sampler.init_noise_sigma  # x_T in the sigma view
    sampler.start(x)
    for i in range(sampler.num_steps):
        z = noise.next() if sampler.needs_noise[i] else None
        x = step(i, x, z)
    return x


@torch.inference_mode()  # no autograd bookkeeping at all: the loop only ever reads the model
def generate(
    model: nn.Module,
    sampler: Sampler,
    noise: NoiseSource,
    runtime: Runtime,
    *,
    on_step: StepCallback | None = None,
    progress: Callable[[int], None] | None = None,
    static: bool = False,
    loop: Loop = reverse_loop,
) -> torch.Tensor:
    """Run the reverse process from x_T to x_0 for one batch: float32 (B, 1, 28, 28) in [-1, 1].

    `loop` (`reverse_loop`, or one of `maths.editing`'s), with what wraps each step around it:
    `on_step(i, t, x, model_output)` sees each step (for trajectories); `progress(1)` follows each
    (a tqdm bar's update); the CPU threads follow what else keeps the machine busy
    (`Runtime.share_cpu`). `static=True` runs the steps on fixed buffers (`FixedBuffers`), which on
    CUDA replays one captured CUDA graph per step; the images are the same as without it, up to
    float rounding. A result that is not finite is a UserError (`finite`)."""
    fixed = FixedBuffers(model, sampler, runtime) if static and on_step is None else None

    def step(i: int, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        if fixed is not None:
            x_next = fixed.step(i, x, z)
        else:
            x_next, output = reverse_step(model, sampler, i, x, z)
            if on_step is not None:
                on_step(i, sampler.timesteps[i], x, output)
        if progress is not None:
            progress(1)
        runtime.share_cpu()
        return x_next

    # eager: one autocast context for the whole loop, so the weights are cast to bf16 once
    with autocast(runtime) if fixed is None else contextlib.nullcontext():
        x = loop(sampler, noise, step)
    return finite(x).clamp(-1, 1)


def finite(x: torch.Tensor) -> torch.Tensor:
    """x, if every value is finite; else a UserError (a model with overflowing outputs), not black images."""
    if not bool(torch.isfinite(x).all()):
        raise UserError(
            f"sampling produced NaN or infinite values in {int((~torch.isfinite(x)).flatten(1).any(1).sum())} of "
            f"{len(x)} images: the model's output overflowed (try runtime.mixed_precision: fp32)"
        )
    return x


class Guided(nn.Module):
    """A class-conditional model asked for given digits, with classifier-free guidance (Ho & Salimans
    2022): out = out_uncond + W * (out_cond - out_uncond), on whatever the model predicts (eps, v or
    x0), the diffusers/Imagen convention; a learned variance is the conditional half's. W = 1 runs
    the conditional half alone (plain conditional sampling), W = 0 the unconditional half alone;
    otherwise both come from one forward pass of 2B images. The labels are fixed for the batch, so a
    captured CUDA graph replays them."""

    def __init__(self, model: nn.Module, labels: torch.Tensor, guidance: float, num_classes: int) -> None:
        super().__init__()
        self.model, self.guidance = model, guidance
        self.labels = labels  # (B,) digits
        self.no_class = torch.full_like(labels, num_classes)  # (B,) the "no class" row
        self.both = torch.cat([labels, self.no_class])  # (2B,)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.guidance == 1:
            return self.model(x, t, self.labels)
        if self.guidance == 0:
            return self.model(x, t, self.no_class)
        cond, uncond = self.model(torch.cat([x, x]), torch.cat([t, t]), self.both).float().chunk(2)
        guided = uncond + self.guidance * (cond - uncond)
        channels = x.shape[1]
        if guided.shape[1] == 2 * channels:  # a learned variance: guide the prediction, keep cond's v (as GLIDE)
            guided = torch.cat([guided[:, :channels], cond[:, channels:]], dim=1)
        return guided


def digit_labels(digits: Sequence[int], indices: Sequence[int], device: torch.device) -> torch.Tensor:
    """Image k's digit: digits[k mod len(digits)], so it follows from k alone (like its noise). (B,) int64."""
    return torch.tensor([digits[k % len(digits)] for k in indices], dtype=torch.long, device=device)


def asked_digits(cfg: Config) -> list[int] | None:
    """The digits a conditional model is asked for (sample.digits, or 0 to 9 in turn); None if unconditional."""
    return (list(cfg.sample.digits) or list(range(10))) if cfg.model.num_classes else None


def for_images(model: nn.Module, cfg: Config, indices: Sequence[int], device: torch.device) -> nn.Module:
    """The model that draws images `indices`: a conditional one guided towards their digits."""
    digits = asked_digits(cfg)
    if digits is None:
        return model
    return Guided(model, digit_labels(digits, indices, device), cfg.sample.guidance, cfg.model.num_classes)


class FixedBuffers:
    """`reverse_step` on fixed buffers (x, z and the step index i), so that on CUDA it is captured
    once as a CUDA graph and replayed for every step.

    The reverse loop of a small U-Net is launch-bound on a GPU: about a hundred small kernels per
    step, a thousand steps. Replaying a graph launches them all at once. Only the inputs change
    between steps, and they are copied into the buffers: i (which picks t and the per-step values
    on the device), x (which a loop may change between steps: an inpainting loop puts the known
    pixels back), and z, drawn outside the graph by the per-image generators, so seeded runs stay
    reproducible; a multistep sampler's state is its own fixed buffer. Elsewhere the same body runs
    eagerly (this is what the CPU tests exercise). The buffers are made at the first step run.
    """

    def __init__(self, model: nn.Module, sampler: Sampler, runtime: Runtime):
        self.model, self.sampler, self.runtime = model, sampler, runtime
        self.x: torch.Tensor | None = None
        self.z: torch.Tensor | None = None
        self.i: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def _body(self) -> None:
        with autocast(self.runtime, cache_enabled=False):  # no autocast cache inside a graph
            # sigma_i * z with z = 0 where the step adds no noise: x + 0 is exact
            x_next, _ = reverse_step(self.model, self.sampler, self.i, self.x, self.z)
        self.x.copy_(x_next)

    def _start(self, x_T: torch.Tensor) -> None:
        """The buffers, from the first x (x_T, or where an edit starts; the sampler has started from
        it); on CUDA, the captured graph."""
        self.x, self.z = x_T.clone(), torch.zeros_like(x_T)
        self.i = torch.zeros(1, dtype=torch.long, device=x_T.device)
        if x_T.device.type != "cuda":
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (allocator, cuDNN choices) outside the graph
            for _ in range(3):
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._body()
        self.x.copy_(x_T)  # the warm-up and capture ran steps: start again from x_T
        self.sampler.start(self.x)  # in place: the graph keeps the state's address

    def step(self, i: int, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Run step i from x with z, its noise or None; returns a copy of x after it."""
        if self.x is None:
            self._start(x)
        else:
            self.x.copy_(x)
        self.i.fill_(i)
        if z is not None:
            self.z.copy_(z)
        else:
            self.z.zero_()
        if self.graph is not None:
            self.graph.replay()
        else:
            self._body()
        return self.x.clone()


@dataclass
class SamplingJob:
    """A checkpoint made ready to sample: its config (with sample-time options), model and sampler."""

    cfg: Config
    step: int
    model: nn.Module
    sampler: Sampler
    runtime: Runtime
    static: bool  # run the steps on fixed buffers (CUDA graphs on CUDA)
    note: str  # one line: what is sampled, how, where
    eager: nn.Module | None = None  # under sample.compile: auto, the model to keep if compiling fails
    compiled: bool = False  # one shape for every batch: the last one is filled up with images past n

    def batches(self, n: int, seed: int, batch_size: int, *, on_step: StepCallback | None = None,
                desc: str = "sample") -> Iterator[tuple[int, torch.Tensor]]:
        """(index of the first image, uint8 (b, 1, 28, 28)) batch by batch; image k's noise depends only on (seed, k).

        `on_step` sees every step of the first batch (for a trajectory)."""
        batch_size = min(batch_size, n)  # a batch larger than n: one batch of n (compiled for n, filled to n)
        self.compile_now(batch_size)
        batches = math.ceil(n / batch_size)
        with tqdm(total=self.sampler.num_steps * batches, unit="step", dynamic_ncols=True, desc=desc) as bar:
            for first in range(0, n, batch_size):
                last = min(first + batch_size, n)
                indices = range(first, first + batch_size if self.compiled else last)  # images past n: dropped
                noise = NoiseSource(seed, indices, self.runtime.device)
                model = for_images(self.model, self.cfg, indices, self.runtime.device)
                x = generate(model, self.sampler, noise, self.runtime, on_step=on_step if first == 0 else None,
                             progress=bar.update, static=self.static)
                yield first, to_uint8(x[: last - first].cpu())

    def compile_now(self, batch_size: int) -> None:
        """Under sample.compile: auto, compile on a batch of zeros (after the callers' memory checks,
        before the progress bar); keep the eager model, and say why, if the compiler fails: a
        speed-up no one asked for must not stop the job."""
        if self.eager is None:
            return
        try:
            forward_on_zeros(self.model, self.cfg, batch_size, self.runtime)
        except Exception as exc:  # any failure of the compiler (no C++ compiler, say)
            note(f"sample.compile: auto: not compiled ({type(exc).__name__}: {str(exc).strip()[:80]})")
            self.model, self.compiled = self.eager, False
        self.eager = None

    def labels(self, n: int) -> torch.Tensor | None:
        """The digits images 0 .. n-1 were asked to be, (n,) int64 on the CPU; None if unconditional."""
        digits = asked_digits(self.cfg)
        return None if digits is None else digit_labels(digits, range(n), torch.device("cpu"))

    def images(self, n: int, seed: int, batch_size: int, *, desc: str = "sample") -> torch.Tensor:
        """All n images at once, uint8 (n, 1, 28, 28)."""
        self.check_memory(n, batch_size, images_kept=n)
        return torch.cat([batch for _, batch in self.batches(n, seed, batch_size, desc=desc)])

    def check_memory(self, n: int, batch_size: int, images_kept: int) -> None:
        """Refuse up front an n or batch size whose memory cannot fit where sampling runs."""
        batch = min(batch_size, n)
        guided = asked_digits(self.cfg) is not None and self.cfg.sample.guidance not in (0, 1)
        needed = sampling_memory_bytes(self.cfg.model, batch * (2 if guided else 1), images_kept)  # 2B forwards
        available = available_memory_bytes(self.runtime.device)
        if available is not None and needed > available:
            raise UserError(
                f"sampling {n:,} images in batches of {batch:,} needs about {needed / 2**30:.1f} GiB, and "
                f"{available / 2**30:.1f} GiB is free on {self.runtime.device}: lower --batch-size"
                + (" or --n (a --tensor file holds every image in memory)" if images_kept > 10_000 else "")
            )


def sampling_memory_bytes(model_cfg: ModelConfig, batch_size: int, images_kept: int) -> int:
    """A generous estimate of the memory sampling needs: one batch's activations and noise, plus the
    uint8 images kept in memory (twice: the pieces and their concatenation)."""
    floats = 0
    for side, mult in zip(model_cfg.resolutions(), model_cfg.channel_mult, strict=True):
        floats += model_cfg.base_channels * mult * side * side * (3 * model_cfg.num_res_blocks + 4)  # feature maps
        if side in model_cfg.attention_resolutions:
            floats += model_cfg.num_heads * (side * side) ** 2  # attention scores
    per_image = 2 * 4 * floats + 4 * 28 * 28 * NOISE_CHUNK  # float32 activations (x2 for temporaries), noise
    return batch_size * per_image + 2 * images_kept * 28 * 28


def prepare_sampling(ckpt_path: Path, request: SampleRequest, overrides: list[str] | None = None,
                     device_name: str | None = None, *, checkpoint: ckpt.Checkpoint | None = None) -> SamplingJob:
    """Load a checkpoint (`checkpoint.load`, unless the caller has), apply the request and the
    `--set` overrides to its config (`sampling_config`), and build the model (EMA or raw weights
    per `sample.use_ema`) and the sampler per the `sample` section."""
    checkpoint = checkpoint or ckpt.load(ckpt_path)
    cfg = sampling_config(checkpoint, request, overrides)
    s = cfg.sample
    runtime = setup_runtime(cfg.runtime, device_name)
    model = checkpoint.build_model(s.use_ema).to(runtime.device)
    sampler = sampler_for(cfg, runtime.device)
    static = s.cuda_graph and runtime.device.type == "cuda"
    how = f" ({s.timestep_spacing})" if cfg.reverse_steps < cfg.schedule.num_timesteps else ""
    how += ", Karras sigmas" if s.sigma_schedule == "karras" else ""
    how += f", from {sampler.init_noise_sigma:.4g} z" if sampler.init_noise_sigma != 1 else ""
    cfg, batch, rate = with_batch_size(model, cfg, runtime)
    model, eager, compiled = compiled_for(model, cfg, runtime, rate)
    calls = f" ({sampler.num_steps} model calls)" if sampler.num_steps != cfg.reverse_steps else ""
    note = (f"{s.sampler}, {cfg.reverse_steps} steps{how}{calls}, seed {cfg.seed}, {checkpoint.describe(s.use_ema)}, "
            f"{runtime.device}, {runtime.precision_note}, {batch}" + (", CUDA graph" if static else "") + compiled
            + conditioning(cfg))
    return SamplingJob(cfg, checkpoint.step, model, sampler, runtime, static, note, eager, bool(compiled))


@torch.inference_mode()
def forward_on_zeros(model: nn.Module, cfg: Config, size: int, runtime: Runtime) -> torch.Tensor:
    """One forward of the model that draws images 0 .. size-1 on zeros at t = T/2: to compile for
    its shape."""
    x = torch.zeros(size, *IMAGE_SHAPE, device=runtime.device)
    t = torch.full((size,), cfg.schedule.num_timesteps // 2, device=runtime.device)
    with autocast(runtime):
        return for_images(model, cfg, range(size), runtime.device)(x, t)


BATCH_SIZES = (16, 32, 64, 128, 256)  # what sample.batch_size: 0 chooses from
PROBE_STEPS = 3  # reverse steps each candidate batch is timed for
PROBE_TOLERANCE = 0.05  # the smallest batch within this share of the fastest is chosen
PROBE_ROUNDS_FROM = 100_000  # image-steps from which the candidates take turns for two timed rounds, not one


def with_batch_size(model: nn.Module, cfg: Config, runtime: Runtime) -> tuple[Config, str, float | None]:
    """The config with sample.batch_size resolved, what the note line says of it, and the rate timed
    for it (image-steps/s; None when not timed). 0 times the candidates (at most n, and within memory)
    on the job's own loop (`probe_rates`) and picks the smallest within PROBE_TOLERANCE of the fastest
    (`pick_batch`): the fastest batch differs from one CPU to the next, and the images do not depend on it."""
    s = cfg.sample
    if s.batch_size:
        return cfg, f"batch {min(s.batch_size, s.n)}", None
    available = available_memory_bytes(runtime.device) or 2**62
    sizes = [size for size in BATCH_SIZES if size <= s.n and 4 * sampling_memory_bytes(cfg.model, size, 0) < available]
    if not sizes:
        size = min(s.n, BATCH_SIZES[0])
        return dataclasses.replace(cfg, sample=dataclasses.replace(s, batch_size=size)), f"batch {size}", None
    rounds = 2 if s.n * cfg.reverse_steps >= PROBE_ROUNDS_FROM else 1
    rates = probe_rates(model, cfg, runtime, sizes, rounds) if len(sizes) > 1 else {sizes[0]: math.nan}
    chosen = pick_batch(rates)
    measured = ", ".join(f"{size} {rate:,.0f}" for size, rate in rates.items())
    note = (f"batch {chosen} (the smallest within {PROBE_TOLERANCE:.0%} of the fastest of {measured} image-steps/s "
            "timed here)" if len(rates) > 1 else f"batch {chosen}")
    rate = rates[chosen] if len(rates) > 1 else None
    return dataclasses.replace(cfg, sample=dataclasses.replace(s, batch_size=chosen)), note, rate


def pick_batch(rates: dict[int, float]) -> int:
    """The smallest batch whose rate is within PROBE_TOLERANCE of the fastest: a larger one gains at
    most that, and costs memory and (compiled) the images past n in its last batch."""
    best = max(rates.values())
    return min(size for size, rate in rates.items() if not rate < (1 - PROBE_TOLERANCE) * best)


def probe_rates(model: nn.Module, cfg: Config, runtime: Runtime, sizes: list[int], rounds: int) -> dict[int, float]:
    """Image-steps/s of the job's own loop (its sampler, guidance and noise streams) at each batch
    size, over PROBE_STEPS steps: an untimed round (allocations, the kernels' first choices), then
    `rounds` in which the sizes take turns, each keeping its best (a busy moment slows one round)."""
    probe = dataclasses.replace(cfg, sample=dataclasses.replace(cfg.sample, steps=PROBE_STEPS))
    sampler, device = sampler_for(probe, runtime.device), runtime.device
    rates: dict[int, float] = {}
    for round_ in range(rounds + 1):
        for size in sizes:
            started = time.perf_counter()
            x = generate(for_images(model, cfg, range(size), device), sampler, NoiseSource(cfg.seed, range(size),
                                                                                          device), runtime)
            x.sum().item()  # the queued work is done (CUDA)
            rate = size * sampler.num_steps / (time.perf_counter() - started)
            if round_:
                rates[size] = max(rates.get(size, 0.0), rate)
    return rates


# sample.compile: auto compiles a job on the CPU in float32 whose eager time, at the rate timed for its
# batch, is at least this long: enough to repay a first compile, which inductor then caches
# (docs/performance.md has the measurements behind it)
COMPILE_AUTO_SECONDS = 6 * 60


def compiled_for(model: nn.Module, cfg: Config, runtime: Runtime, rate: float | None = None
                 ) -> tuple[nn.Module, nn.Module | None, str]:
    """(the model to sample with under sample.compile, the eager one to fall back to if an auto
    compile fails (see `SamplingJob.compile_now`), and what the note line says). true compiles; auto
    compiles a CPU job in float32 predicted to take at least COMPILE_AUTO_SECONDS eagerly at `rate`
    (image-steps/s of its batch; timed here when None). Not under bf16 autocast, where compiling
    gained nothing and moved the images; not on CUDA, which replays CUDA graphs instead."""
    s = cfg.sample
    if s.compile is False:
        return model, None, ""
    if s.compile is True:
        return torch.compile(model, dynamic=False), None, ", compiled"
    if runtime.device.type != "cpu" or runtime.autocast_dtype is not None:
        return model, None, ""
    if rate is None:  # a batch given by hand: time it, if it fits (else the job is refused before it starts)
        batch = min(s.batch_size, s.n)
        if 4 * sampling_memory_bytes(cfg.model, batch, 0) >= (available_memory_bytes(runtime.device) or 2**62):
            return model, None, ""
        rate = probe_rates(model, cfg, runtime, [batch], 1)[batch]
    eager_seconds = s.n * cfg.reverse_steps / rate
    if eager_seconds < COMPILE_AUTO_SECONDS:
        return model, None, ""
    why = f"about {eager_seconds / 60:.0f} minutes eager at {rate:,.0f} image-steps/s"
    return torch.compile(model, dynamic=False), model, f", compiled (sample.compile: auto: {why})"


def sampling_configs(ckpt_path: Path, requests: list[SampleRequest], overrides: list[str] | None
                     ) -> tuple[ckpt.Checkpoint, list[Config]]:
    """Read the checkpoint once and check every request against it, before any sampling (a sweep's
    settings): (the checkpoint, for `prepare_sampling`, and one config per request)."""
    checkpoint = ckpt.load(ckpt_path)
    return checkpoint, [sampling_config(checkpoint, request, overrides) for request in requests]


def sampling_config(checkpoint: ckpt.Checkpoint, request: SampleRequest, overrides: list[str] | None) -> Config:
    """The checkpoint's config with the request (flags) and `--set` overrides (sample.*, runtime.*
    and seed only), checked; a setting that would be ignored is refused."""
    stored, where = checkpoint.config, checkpoint.path
    given = {key: f"--{key.replace('_', '-')}" for key in request.given()}
    given["digits"] = "--digit/--digits" if "digits" in given else None
    for item in overrides or []:
        key = item.partition("=")[0].strip()
        given[key.removeprefix("sample.")] = f"--set {key}"
    for key in ("digits", "guidance"):
        if given.get(key) and not stored.model.num_classes:
            raise UserError(f"{given[key]}: {where} holds an unconditional model (model.num_classes: 0); "
                            "digits and guidance need one trained with model.num_classes: 10")
    cfg = apply_overrides(stored, overrides or [], f"{where} (its stored config)", allowed=SAMPLE_TIME_KEYS,
                          check=False)  # --sampler euler --set sample.sigma_schedule=karras: checked together
    cfg = with_sample_options(cfg, request)
    if given.get("eta") and cfg.sample.sampler != "ddim":
        raise UserError(f"{given['eta']}: eta is DDIM's; the {cfg.sample.sampler} sampler has none "
                        "(give --sampler ddim, or leave eta out)")
    return cfg


def conditioning(cfg: Config) -> str:
    """What a conditional model is asked for, for the note line ('' if unconditional)."""
    digits = asked_digits(cfg)
    if digits is None:
        return ""
    which = "digits 0-9 in turn" if not cfg.sample.digits else "digit" + ("s " if len(digits) > 1 else " ") + \
        ",".join(map(str, digits))
    return f", {which}, guidance {cfg.sample.guidance:g}"
