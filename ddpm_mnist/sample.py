"""The reverse loop, its noise, and image files.

Reproducibility: image k of a run draws x_T and every z from its own generator, seeded with
(seed, k). So an image does not depend on the batch size, on how many images are asked for, or
on the other images in its batch.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ddpm_mnist import checkpoint as ckpt
from ddpm_mnist.config import Config, apply_overrides
from ddpm_mnist.data import to_model_range, to_uint8
from ddpm_mnist.device import autocast_dtype, pick_device
from ddpm_mnist.diffusion import ReverseSampler
from ddpm_mnist.errors import UserError
from ddpm_mnist.paths import ensure_writable
from ddpm_mnist.rng import SAMPLE_NOISE, derive_seed
from ddpm_mnist.schedule import make_schedule
from ddpm_mnist.unet import UNet

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


StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def generate(
    model: nn.Module,
    sampler: ReverseSampler,
    noise: NoiseSource,
    *,
    autocast: torch.dtype | None = None,
    on_step: StepCallback | None = None,
    progress: Callable[[int], None] | None = None,
    static: bool = False,
) -> torch.Tensor:
    """Run the reverse process from x_T to x_0 for one batch: float32 (B, 1, 28, 28) in [-1, 1].

    `on_step(i, t, x_t, model_output)` is called before each step (for trajectories);
    `progress(1)` after each step (a tqdm bar's update). `static=True` runs every step on fixed
    buffers through `StaticStep`, which on CUDA replays one captured CUDA graph per step; the
    images are the same as without it, up to float rounding.
    """
    x = noise.initial()
    if static and on_step is None:
        return StaticStep(model, sampler, x, autocast).run(noise, progress)
    batch = x.shape[0]
    # one autocast context for the whole loop: the weights are cast to bf16 once, not every step
    with _autocast(x.device, autocast):
        for i in range(sampler.num_steps):
            t = sampler.timesteps[i].expand(batch)  # (B,)
            output = model(x, t).float()
            if on_step is not None:
                on_step(i, sampler.timesteps[i], x, output)
            z = noise.next() if sampler.needs_noise[i] else None
            x = sampler.step_index(i, output, x, z)  # float32 math: autocast leaves elementwise ops alone
            if progress is not None:
                progress(1)
    return x.clamp(-1, 1)


def _autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


class StaticStep:
    """One reverse step on fixed buffers (x, z and the step index i), so that on CUDA it is captured
    once as a CUDA graph and replayed for every step.

    The reverse loop of a small U-Net is launch-bound on a GPU: about a hundred small kernels per
    step, a thousand steps. Replaying a graph launches them all at once. Only the inputs change
    between steps, and they are copied into the buffers: i (which picks t and the coefficients on
    the device), and z, drawn outside the graph by the per-image generators, so seeded runs stay
    reproducible. Elsewhere the same `_step` runs eagerly (this is what the CPU tests exercise).
    """

    def __init__(self, model: nn.Module, sampler: ReverseSampler, x_T: torch.Tensor, autocast: torch.dtype | None):
        self.model, self.sampler, self.autocast = model, sampler, autocast
        self.x = x_T.clone()
        self.z = torch.zeros_like(x_T)
        self.i = torch.zeros(1, dtype=torch.long, device=x_T.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if x_T.device.type == "cuda":
            self._capture()

    def _step(self) -> None:
        t = self.sampler.timesteps[self.i].expand(self.x.shape[0])  # (B,), picked on the device
        with _autocast(self.x.device, self.autocast, cache=False):  # no autocast cache inside a graph
            output = self.model(self.x, t).float()
        # sigma_i * z with z = 0 where the step adds no noise: x + 0 is exact
        self.x.copy_(self.sampler.step_index(self.i, output, self.x, self.z))

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

    def run(self, noise: NoiseSource, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """All steps from x_T: (B, 1, 28, 28) in [-1, 1]."""
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
        return self.x.clamp(-1, 1)


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> torch.Tensor:
    """Write images (B, 1, 28, 28) in [-1, 1] as one PNG grid; return the grid (3, H, W) uint8.

    Written to a temporary name and renamed, so a reader never sees half a file.
    """
    from torchvision.utils import make_grid, save_image

    nrow = nrow or max(1, math.isqrt(len(images) - 1) + 1)
    grid = make_grid(to_uint8(images.cpu()), nrow=nrow, padding=2, pad_value=255)  # (3, H, W) uint8
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_image(grid.float() / 255, tmp, format="png")  # exact: save_image rounds x * 255 back
    os.replace(tmp, path)
    return grid


TRAJECTORY_IMAGES = 8  # samples shown in a trajectory
TRAJECTORY_FRAMES = 40  # GIF frames, evenly spread over the steps
STRIP_TIMESTEPS = 8  # columns of the snapshot strip


@dataclass
class Sampling:
    """A checkpoint made ready to sample: its config (with overrides), model and reverse sampler."""

    cfg: Config
    step: int
    model: nn.Module
    reverse: ReverseSampler
    device: torch.device
    autocast: torch.dtype | None
    static: bool  # run the steps on fixed buffers (CUDA graphs on CUDA)
    note: str  # one line: what is sampled, how, where

    def images(self, n: int, seed: int, batch_size: int, *, recorder: TrajectoryRecorder | None = None,
               desc: str = "sample") -> torch.Tensor:
        """n images, uint8 (n, 1, 28, 28); image k depends only on (seed, k), not on batch_size."""
        chunks = []
        batches = math.ceil(n / batch_size)
        with tqdm(total=self.reverse.num_steps * batches, unit="step", dynamic_ncols=True, desc=desc) as bar:
            for first in range(0, n, batch_size):
                noise = NoiseSource(seed, SAMPLE_NOISE, range(first, min(first + batch_size, n)), self.device)
                on_step = recorder.on_step if recorder is not None and first == 0 else None
                x = generate(self.model, self.reverse, noise, autocast=self.autocast, on_step=on_step,
                             progress=bar.update, static=self.static)
                chunks.append(to_uint8(x.cpu()))
        return torch.cat(chunks)


def prepare_sampling(ckpt_path: Path, overrides: list[str], device_name: str | None = None) -> Sampling:
    """Load a checkpoint (safely), apply `section.key=value` overrides to its config, build the
    model (EMA or raw weights per `sample.use_ema`) and the reverse sampler per the `sample` section."""
    state = ckpt.load_checkpoint(ckpt_path)
    cfg = apply_overrides(ckpt.checkpoint_config(state, ckpt_path), overrides, f"{ckpt_path} (its stored config)")
    s = cfg.sample
    device = pick_device(device_name or cfg.train.device)
    amp_dtype, amp_note = autocast_dtype(device, cfg.train.mixed_precision)
    model = UNet(cfg.model)
    which = "EMA" if s.use_ema else "raw"
    ckpt.load_weights(model, state["ema"] if s.use_ema else state["model"], ckpt_path, which)
    reverse = ReverseSampler(
        make_schedule(cfg.schedule).to(device), s.steps, sampler=s.sampler, prediction_type=cfg.model.prediction_type,
        variance_type=s.variance_type, clip_sample=s.clip_sample, clip_sample_range=s.clip_sample_range, eta=s.eta,
        device=device,
    )
    static = s.cuda_graph and device.type == "cuda"
    note = (f"{s.sampler}, {s.steps} steps, seed {cfg.seed}, {which} weights of step {state['step']:,}, "
            f"{device}, {amp_note}" + (", CUDA graph" if static else "") + (", compiled" if s.compile else ""))
    model = model.to(device).eval()
    if s.compile:
        model = torch.compile(model)
    return Sampling(cfg, int(state["step"]), model, reverse, device, amp_dtype, static, note)


def sample_flags(**flags: Any) -> list[str]:
    """Command-line flags as `--set` overrides (None means: keep the checkpoint's value)."""
    names = {"n": "sample.n", "steps": "sample.steps", "batch_size": "sample.batch_size", "sampler": "sample.sampler",
             "eta": "sample.eta", "use_ema": "sample.use_ema", "seed": "seed"}
    return [f"{names[key]}={value}" for key, value in flags.items() if value is not None]


def sample_from_checkpoint(
    ckpt_path: Path,
    *,
    n: int | None = None,
    steps: int | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    sampler: str | None = None,
    eta: float | None = None,
    use_ema: bool | None = None,
    device_name: str | None = None,
    out: Path | None = None,
    images_dir: Path | None = None,
    tensor_path: Path | None = None,
    trajectory: Path | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """Sample images from a checkpoint and write them; return the grid's path.

    Every argument left None takes its value from the checkpoint's config (`sample` section,
    top-level `seed`), after `overrides` (`section.key=value`). Same checkpoint, seed and options
    give the same images, byte for byte, on the same machine, whatever the batch size.
    """
    if tensor_path is not None and tensor_path.suffix not in (".pt", ".npz"):
        raise UserError(f"--tensor {tensor_path}: the file name must end in .pt or .npz")
    flags = sample_flags(n=n, steps=steps, seed=seed, batch_size=batch_size, sampler=sampler, eta=eta, use_ema=use_ema)
    run = prepare_sampling(ckpt_path, [*(overrides or []), *flags], device_name)
    s = run.cfg.sample
    out = ensure_writable(out or default_grid_path(ckpt_path, run.cfg))
    for extra in (tensor_path, trajectory):
        if extra is not None:
            ensure_writable(extra)
    if images_dir is not None:
        ensure_writable(images_dir, folder=True)
    recorder = TrajectoryRecorder(run.reverse, min(TRAJECTORY_IMAGES, s.n)) if trajectory else None
    print(f"sampling {s.n} images: {run.note}")
    started = time.perf_counter()
    images = run.images(s.n, run.cfg.seed, s.batch_size, recorder=recorder)
    elapsed = time.perf_counter() - started

    write_output(out, save_grid, to_model_range(images))
    written = [out]
    if images_dir is not None:
        written.append(write_output(images_dir, save_each, images))
    if tensor_path is not None:
        written.append(write_output(tensor_path, save_tensor, images))
    if recorder is not None:
        written += write_output(trajectory, recorder.save, images[: recorder.count])
    print(f"sampled {s.n} images in {elapsed:.1f} s ({s.n * s.steps / elapsed:.0f} image-steps/s): "
          + ", ".join(str(p) for p in written))
    return out


def default_grid_path(ckpt_path: Path, cfg: Config) -> Path:
    """`<run>/samples/<sampler><steps>_seed<seed>_n<n>.png` for a checkpoint inside a run folder,
    else next to the checkpoint."""
    s = cfg.sample
    name = f"{s.sampler}{s.steps}_seed{cfg.seed}_n{s.n}{'' if s.use_ema else '_raw'}.png"
    if ckpt_path.parent.name == "checkpoints":
        return ckpt_path.parent.parent / "samples" / name
    return ckpt_path.with_name(f"{ckpt_path.stem}_{name}")


def write_output(path: Path, writer: Callable[..., Any], *args: Any) -> Any:
    """Call a writer, turning a refused write (no space, no permission) into one UserError line."""
    try:
        return writer(*args, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def save_each(images: torch.Tensor, folder: Path) -> Path:
    """Each uint8 image (1, 28, 28) as `folder/000000.png`, `000001.png`, ..."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{k:06d}.png")
    return folder


def save_tensor(images: torch.Tensor, path: Path) -> Path:
    """All images as one file: `.pt` (a uint8 tensor (N, 1, 28, 28)) or `.npz` (array `images`, same)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".npz":
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=images.numpy())
    else:
        torch.save(images.clone(), tmp)
    os.replace(tmp, path)
    return path


def load_samples(path: Path) -> torch.Tensor:
    """Read a `.pt` or `.npz` file written by `save_tensor`: uint8 (N, 1, 28, 28)."""
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                images = torch.from_numpy(data["images"])
        else:
            images = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such samples file") from None
    except Exception as exc:  # any unreadable file reads the same to the user
        raise UserError(f"{path}: not a samples file written by ddpm sample ({type(exc).__name__})") from None
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.shape[1:] != (1, 28, 28):
        raise UserError(f"{path}: expected uint8 images of shape (N, 1, 28, 28)")
    return images


class TrajectoryRecorder:
    """Keeps x_t and x0_hat of the first `count` images at the steps shown in the GIF and strip."""

    def __init__(self, reverse: ReverseSampler, count: int) -> None:
        self.reverse = reverse
        self.count = count
        last = reverse.num_steps - 1
        self.frame_steps = sorted({round(i * last / (TRAJECTORY_FRAMES - 1)) for i in range(TRAJECTORY_FRAMES)})
        self.strip_steps = sorted({round(i * last / (STRIP_TIMESTEPS - 1)) for i in range(STRIP_TIMESTEPS)})
        self.x_t: dict[int, torch.Tensor] = {}
        self.x0_hat: dict[int, torch.Tensor] = {}

    def on_step(self, i: int, t: torch.Tensor, x_t: torch.Tensor, output: torch.Tensor) -> None:
        """Record step i (a `generate` callback)."""
        if i in self.frame_steps or i in self.strip_steps:
            x, out = x_t[: self.count], output[: self.count]
            self.x_t[i] = x.cpu()
            self.x0_hat[i] = self.reverse.predict_x0(i, out, x).cpu()

    def save(self, final: torch.Tensor, path: Path) -> list[Path]:
        """Write the GIF at `path` and the strip next to it (`<stem>_strip.png`).

        final: uint8 (count, 1, 28, 28), the finished samples (the GIF's last frame).
        """
        from PIL import Image
        from torchvision.utils import make_grid

        path.parent.mkdir(parents=True, exist_ok=True)
        frames = []
        for i in self.frame_steps:
            pair = torch.cat([to_uint8(self.x_t[i].clamp(-1, 1)), to_uint8(self.x0_hat[i])])  # x_t row, x0_hat row
            grid = make_grid(pair, nrow=self.count, padding=2, pad_value=255)[0]
            image = Image.fromarray(grid.numpy(), mode="L")
            frames.append(image.resize((image.width * 2, image.height * 2), Image.NEAREST))
        done = make_grid(torch.cat([final, final]), nrow=self.count, padding=2, pad_value=255)[0]
        frames += [Image.fromarray(done.numpy(), mode="L").resize(frames[0].size, Image.NEAREST)] * 15
        tmp = path.with_name(f".{path.name}.tmp")
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
        os.replace(tmp, path)
        strip = path.with_name(f"{path.stem}_strip.png")
        self._save_strip(strip)
        return [path, strip]

    def _save_strip(self, path: Path) -> None:
        from ddpm_mnist.plots import close, trajectory_figure

        timesteps = [int(self.reverse.timesteps[i]) for i in self.strip_steps]
        x_t = [self.x_t[i] for i in self.strip_steps]
        x0_hat = [self.x0_hat[i] for i in self.strip_steps]
        fig = trajectory_figure(timesteps, x_t, x0_hat, rows=min(self.count, 4))
        fig.savefig(path, dpi=100)
        close(fig)
