"""The reverse loop and its noise: from a checkpoint to images, batch by batch.

Reproducibility: image k of a run draws x_T and every z from its own generator, seeded with
(seed, k). So an image does not depend on the batch size, on how many images are asked for, or
on the other images in its batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ddpm_mnist import checkpoint as ckpt
from ddpm_mnist.config import SAMPLE_TIME_KEYS, Config, ModelConfig, apply_overrides, with_sample_options
from ddpm_mnist.data import to_uint8
from ddpm_mnist.device import Runtime, autocast, available_memory_bytes, setup_runtime
from ddpm_mnist.diffusion import ReverseSampler
from ddpm_mnist.errors import UserError
from ddpm_mnist.rng import SAMPLE_NOISE, derive_seed
from ddpm_mnist.schedule import make_schedule

StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]

IMAGE_SHAPE = (1, 28, 28)
NOISE_CHUNK = 50  # steps of noise drawn at once per image; fixed, so the streams never change


class NoiseSource:
    """Per-image Gaussian noise: x_T, then one z per noisy step, for images `indices`."""

    def __init__(self, seed: int, stream: int, indices: Sequence[int], device: torch.device) -> None:
        self.device = device
        self.generators = [
            torch.Generator(device=device).manual_seed(derive_seed(seed, stream, k)) for k in indices
        ]
        self._chunk: torch.Tensor | None = None
        self._used = NOISE_CHUNK

    def _draw(self, count: int) -> torch.Tensor:
        shape = (count, *IMAGE_SHAPE)
        draws = [torch.randn(shape, generator=g, device=self.device) for g in self.generators]
        return torch.stack(draws, dim=1)  # (count, B, 1, 28, 28)

    def initial(self) -> torch.Tensor:
        """x_T ~ N(0, I): (B, 1, 28, 28). Call once, first."""
        return self._draw(1)[0]

    def next(self) -> torch.Tensor:
        """The next step's z ~ N(0, I): (B, 1, 28, 28)."""
        if self._used == NOISE_CHUNK:
            self._chunk, self._used = self._draw(NOISE_CHUNK), 0
        z = self._chunk[self._used]
        self._used += 1
        return z


@torch.no_grad()
def generate(
    model: nn.Module,
    sampler: ReverseSampler,
    noise: NoiseSource,
    runtime: Runtime,
    *,
    on_step: StepCallback | None = None,
    progress: Callable[[int], None] | None = None,
    static: bool = False,
) -> torch.Tensor:
    """Run the reverse process from x_T to x_0 for one batch: float32 (B, 1, 28, 28) in [-1, 1].

    `on_step(i, t, x_t, model_output)` is called before each step (for trajectories);
    `progress(1)` after each step (a tqdm bar's update). `static=True` runs every step on fixed
    buffers through `StaticStep`, which on CUDA replays one captured CUDA graph per step; the
    images are the same as without it, up to float rounding. Raises UserError when the result is
    not finite (a model with overflowing outputs), rather than returning black images.
    """
    x = noise.initial()
    if static and on_step is None:
        x = StaticStep(model, sampler, x, runtime).run(noise, progress)
    else:
        batch = x.shape[0]
        previous = torch.zeros_like(x) if sampler.multistep else None  # a multistep sampler's last x0_hat
        # one autocast context for the whole loop: the weights are cast to bf16 once, not every step
        with autocast(runtime):
            for i in range(sampler.num_steps):
                t = sampler.timesteps[i].expand(batch)  # (B,)
                output = model(x, t).float()
                if on_step is not None:
                    on_step(i, sampler.timesteps[i], x, output)
                z = noise.next() if sampler.needs_noise[i] else None
                x = sampler.step_index(i, output, x, z, previous)  # float32: autocast leaves elementwise ops alone
                if progress is not None:
                    progress(1)
    if not bool(torch.isfinite(x).all()):
        raise UserError(
            f"sampling produced NaN or infinite values in {int((~torch.isfinite(x)).flatten(1).any(1).sum())} of "
            f"{len(x)} images: the model's output overflowed (try runtime.mixed_precision: fp32)"
        )
    return x.clamp(-1, 1)


class Guided(nn.Module):
    """A class-conditional model asked for given digits, with classifier-free guidance (Ho & Salimans
    2022): out = out_uncond + W * (out_cond - out_uncond), on whatever the model predicts (eps, v or
    x0), the diffusers/Imagen convention. W = 1 runs the conditional half alone (plain conditional
    sampling), W = 0 the unconditional half alone; otherwise both come from one forward pass of 2B
    images. The labels are fixed for the batch, so a captured CUDA graph replays them."""

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
        return uncond + self.guidance * (cond - uncond)


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


class StaticStep:
    """One reverse step on fixed buffers (x, z and the step index i), so that on CUDA it is captured
    once as a CUDA graph and replayed for every step.

    The reverse loop of a small U-Net is launch-bound on a GPU: about a hundred small kernels per
    step, a thousand steps. Replaying a graph launches them all at once. Only the inputs change
    between steps, and they are copied into the buffers: i (which picks t and the coefficients on
    the device), and z, drawn outside the graph by the per-image generators, so seeded runs stay
    reproducible. Elsewhere the same `_step` runs eagerly (this is what the CPU tests exercise).
    """

    def __init__(self, model: nn.Module, sampler: ReverseSampler, x_T: torch.Tensor, runtime: Runtime):
        self.model, self.sampler, self.runtime = model, sampler, runtime
        self.x = x_T.clone()
        self.z = torch.zeros_like(x_T)
        self.previous = torch.zeros_like(x_T)  # a multistep sampler's last x0_hat, updated in place
        self.i = torch.zeros(1, dtype=torch.long, device=x_T.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if x_T.device.type == "cuda":
            self._capture()

    def _step(self) -> None:
        t = self.sampler.timesteps[self.i].expand(self.x.shape[0])  # (B,), picked on the device
        with autocast(self.runtime, cache_enabled=False):  # no autocast cache inside a graph
            output = self.model(self.x, t).float()
        # sigma_i * z with z = 0 where the step adds no noise: x + 0 is exact
        previous = self.previous if self.sampler.multistep else None
        self.x.copy_(self.sampler.step_index(self.i, output, self.x, self.z, previous))

    def _capture(self) -> None:
        x_T = self.x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (allocator, cuDNN choices) outside the graph
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self.x.copy_(x_T)  # the warm-up and capture ran steps: start again from x_T
        self.previous.zero_()

    def run(self, noise: NoiseSource, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """All steps from x_T: (B, 1, 28, 28), unclamped."""
        for i in range(self.sampler.num_steps):
            self.i.fill_(i)
            if self.sampler.needs_noise[i]:
                self.z.copy_(noise.next())
            else:
                self.z.zero_()
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            if progress is not None:
                progress(1)
        return self.x.clone()


@dataclass
class Sampling:
    """A checkpoint made ready to sample: its config (with sample-time options), model and reverse sampler."""

    cfg: Config
    step: int
    model: nn.Module
    reverse: ReverseSampler
    runtime: Runtime
    static: bool  # run the steps on fixed buffers (CUDA graphs on CUDA)
    note: str  # one line: what is sampled, how, where

    def batches(self, n: int, seed: int, batch_size: int, *, on_step: StepCallback | None = None,
                desc: str = "sample") -> Iterator[tuple[int, torch.Tensor]]:
        """(index of the first image, uint8 (b, 1, 28, 28)) batch by batch; image k depends only on (seed, k).

        `on_step` sees every step of the first batch (for a trajectory)."""
        batches = math.ceil(n / batch_size)
        with tqdm(total=self.reverse.num_steps * batches, unit="step", dynamic_ncols=True, desc=desc) as bar:
            for first in range(0, n, batch_size):
                indices = range(first, min(first + batch_size, n))
                noise = NoiseSource(seed, SAMPLE_NOISE, indices, self.runtime.device)
                model = for_images(self.model, self.cfg, indices, self.runtime.device)
                x = generate(model, self.reverse, noise, self.runtime, on_step=on_step if first == 0 else None,
                             progress=bar.update, static=self.static)
                yield first, to_uint8(x.cpu())

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
    for level, mult in enumerate(model_cfg.channel_mult):
        side = 28 // 2**level
        floats += model_cfg.base_channels * mult * side * side * (3 * model_cfg.num_res_blocks + 4)  # feature maps
        if side in model_cfg.attention_resolutions:
            floats += model_cfg.num_heads * (side * side) ** 2  # attention scores
    per_image = 2 * 4 * floats + 4 * 28 * 28 * NOISE_CHUNK  # float32 activations (x2 for temporaries), noise
    return batch_size * per_image + 2 * images_kept * 28 * 28


def prepare_sampling(ckpt_path: Path, cfg_options: dict[str, Any], overrides: list[str] | None = None,
                     device_name: str | None = None, *, contents: dict[str, Any] | None = None) -> Sampling:
    """Load a checkpoint (safely; `contents` when the caller has loaded it), apply the sample-time
    options and `--set` overrides to its config (`sampling_config`), and build the model (EMA or
    raw weights per `sample.use_ema`) and the reverse sampler per the `sample` section."""
    state = contents if contents is not None else ckpt.load_checkpoint(ckpt_path)
    cfg = sampling_config(state, ckpt_path, cfg_options, overrides)
    s = cfg.sample
    runtime = setup_runtime(cfg.runtime, device_name)
    model = ckpt.load_model(state, cfg, ckpt_path, s.use_ema)
    reverse = reverse_sampler(cfg, runtime.device)
    static = s.cuda_graph and runtime.device.type == "cuda"
    which = "EMA" if s.use_ema else "raw"
    spacing = f" ({s.timestep_spacing})" if cfg.reverse_steps < cfg.schedule.num_timesteps else ""
    weights = state.get("source") or f"{which} weights of step {state['step']:,}"
    note = (f"{s.sampler}, {cfg.reverse_steps} steps{spacing}, seed {cfg.seed}, {weights}, "
            f"{runtime.device}, {runtime.precision_note}" + (", CUDA graph" if static else "")
            + (", compiled" if s.compile else "") + conditioning(cfg))
    model = model.to(runtime.device)
    if s.compile:
        model = torch.compile(model)
    return Sampling(cfg, int(state["step"]), model, reverse, runtime, static, note)




def sampling_config(state: dict[str, Any], ckpt_path: Path, cfg_options: dict[str, Any],
                    overrides: list[str] | None) -> Config:
    """The checkpoint's config with the typed sample-time options (flags) and `--set` overrides
    (sample.*, runtime.* and seed only), checked; a setting that would be ignored is refused."""
    stored = ckpt.checkpoint_config(state, ckpt_path)
    given = {key: f"--{key.replace('_', '-')}" for key, value in cfg_options.items() if value is not None}
    given["digits"] = "--digit/--digits" if "digits" in given else None
    for item in overrides or []:
        key = item.partition("=")[0].strip()
        given[key.removeprefix("sample.")] = f"--set {key}"
    for key in ("digits", "guidance"):
        if given.get(key) and not stored.model.num_classes:
            raise UserError(f"{given[key]}: {ckpt_path} holds an unconditional model (model.num_classes: 0); "
                            "digits and guidance need one trained with model.num_classes: 10")
    cfg = apply_overrides(stored, overrides or [], f"{ckpt_path} (its stored config)", allowed=SAMPLE_TIME_KEYS)
    cfg = with_sample_options(cfg, **cfg_options)
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


def reverse_sampler(cfg: Config, device: torch.device) -> ReverseSampler:
    """The reverse sampler the config's `sample` section describes, for its schedule and prediction type."""
    s = cfg.sample
    return ReverseSampler(
        make_schedule(cfg.schedule).to(device), cfg.reverse_steps, sampler=s.sampler,
        prediction_type=cfg.model.prediction_type, variance_type=s.variance_type, clip_sample=s.clip_sample,
        clip_sample_range=s.clip_sample_range, eta=s.eta, timestep_spacing=s.timestep_spacing, device=device,
    )
