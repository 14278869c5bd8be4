"""Image files: grids, one PNG per image, tensors of samples, and the denoising trajectory.

Every writer goes through `paths.atomic_file`, so a killed process or a full disk never leaves a
partial file under a final name. Images arrive as uint8 (B, 1, 28, 28) in [0, 255], or as float
in [-1, 1] where a writer says so (the ranges of `data.py`).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm_mnist.checkpoint_checks import check_tensor
from ddpm_mnist.data import to_uint8
from ddpm_mnist.errors import UserError
from ddpm_mnist.paths import atomic_file, check_input_file

TRAJECTORY_IMAGES = 8  # samples shown in a trajectory
TRAJECTORY_FRAMES = 40  # GIF frames, evenly spread over the steps
STRIP_TIMESTEPS = 8  # columns of the snapshot strip


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> torch.Tensor:
    """Write images (B, 1, 28, 28), uint8 or float in [-1, 1], as one PNG grid; return the grid (3, H, W) uint8."""
    from torchvision.utils import make_grid, save_image

    nrow = nrow or max(1, math.isqrt(len(images) - 1) + 1)
    pixels = images.cpu() if images.dtype == torch.uint8 else to_uint8(images.cpu())
    grid = make_grid(pixels, nrow=nrow, padding=2, pad_value=255)  # (3, H, W) uint8
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_image(grid.float() / 255, tmp, format="png")  # exact: save_image rounds x * 255 back
    return grid


def save_each(images: torch.Tensor, folder: Path, first: int = 0) -> Path:
    """Each uint8 image (1, 28, 28) as `folder/NNNNNN.png`, numbered from `first`."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images, start=first):
        with atomic_file(folder / f"{k:06d}.png") as tmp:
            Image.fromarray(image[0].numpy(), mode="L").save(tmp, format="PNG")
    return folder


def save_tensor(images: torch.Tensor, path: Path, labels: torch.Tensor | None = None) -> Path:
    """All images as one file: `.pt` (a uint8 tensor (N, 1, 28, 28)) or `.npz` (array `images`, same).

    With `labels` (the digits a conditional model was asked for, (N,) int64), the `.pt` file holds
    {"images": ..., "labels": ...} and the `.npz` file an array `labels` beside `images`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # in memory first: torch.save onto a full disk fails as a RuntimeError, not an OSError
    if path.suffix == ".npz":
        arrays = {"images": images.numpy()} | ({} if labels is None else {"labels": labels.numpy()})
        np.savez_compressed(buffer, **arrays)
    else:
        torch.save(images.clone() if labels is None else {"images": images.clone(), "labels": labels.clone()}, buffer)
    with atomic_file(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    return path


def load_samples(path: Path) -> torch.Tensor:
    """Read a `.pt` or `.npz` file written by `save_tensor`: uint8 (N, 1, 28, 28)."""
    return load_samples_and_labels(path)[0]


def load_samples_and_labels(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read a `.pt` or `.npz` file written by `save_tensor`: uint8 (N, 1, 28, 28), and the asked
    digits (N,) int64 where the file holds them."""
    check_input_file(path, "samples")
    labels = None
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                images = torch.from_numpy(data["images"])
                labels = torch.from_numpy(data["labels"]) if "labels" in data.files else None
        else:
            images = torch.load(path, weights_only=True)
            if isinstance(images, dict) and set(images) == {"images", "labels"}:
                images, labels = images["images"], images["labels"]
    except FileNotFoundError:
        raise UserError(f"{path}: no such samples file") from None
    except Exception as exc:  # any unreadable file reads the same to the user
        raise UserError(f"{path}: not a samples file written by ddpm sample ({type(exc).__name__})") from None
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.shape[1:] != (1, 28, 28):
        raise UserError(f"{path}: expected uint8 images of shape (N, 1, 28, 28)")
    if labels is not None and not isinstance(labels, torch.Tensor):
        raise UserError(f"{path}: its labels must be a tensor of {len(images)} digits 0 to 9 (int64), "
                        f"not a {type(labels).__name__}")
    try:  # a stranger's file: dense tensors of their own elements, as save_tensor writes them
        check_tensor(images, "images", torch.uint8)
        if labels is not None:
            check_tensor(labels, "labels", labels.dtype)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != (len(images),)
                               or labels.dtype != torch.int64 or bool(((labels < 0) | (labels > 9)).any())):
        raise UserError(f"{path}: its labels must be {len(images)} digits 0 to 9 (int64)")
    return images, labels


def strip_path(trajectory: Path) -> Path:
    """Where the snapshot strip of a trajectory GIF goes: `<stem>_strip.png` beside it."""
    return trajectory.with_name(f"{trajectory.stem}_strip.png")


class TrajectoryRecorder:
    """Keeps x_t and x0_hat of the first `count` images at the steps shown in the GIF and strip.

    `sampler` is the `samplers.Sampler` being run (its `timesteps`, `model_input` and `predict_x0`).
    x_t is what the model sees, so a sampler in the sigma view shows x / sqrt(sigma^2 + 1): image range.
    """

    def __init__(self, sampler: Any, count: int) -> None:
        self.sampler = sampler
        self.count = count
        last = sampler.num_steps - 1
        self.frame_steps = sorted({round(i * last / (TRAJECTORY_FRAMES - 1)) for i in range(TRAJECTORY_FRAMES)})
        self.strip_steps = sorted({round(i * last / (STRIP_TIMESTEPS - 1)) for i in range(STRIP_TIMESTEPS)})
        self.x_t: dict[int, torch.Tensor] = {}
        self.x0_hat: dict[int, torch.Tensor] = {}

    def on_step(self, i: int, t: torch.Tensor, x: torch.Tensor, output: torch.Tensor) -> None:
        """Record step i (a `generate` callback; x is the sampler's variable)."""
        if i in self.frame_steps or i in self.strip_steps:
            x, out = x[: self.count], output[: self.count]
            self.x_t[i] = self.sampler.model_input(i, x).cpu()
            self.x0_hat[i] = self.sampler.predict_x0(i, out, x).cpu()

    def save(self, final: torch.Tensor, path: Path) -> list[Path]:
        """Write the GIF at `path` and the strip beside it; final: uint8 (count, 1, 28, 28), the last frame."""
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
        with atomic_file(path) as tmp:
            frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
        strip = strip_path(path)
        self._save_strip(strip)
        return [path, strip]

    def _save_strip(self, path: Path) -> None:
        from ddpm_mnist.plots import save_figure, trajectory_figure

        timesteps = [round(float(self.sampler.timesteps[i])) for i in self.strip_steps]
        x_t = [self.x_t[i] for i in self.strip_steps]
        x0_hat = [self.x0_hat[i] for i in self.strip_steps]
        save_figure(trajectory_figure(timesteps, x_t, x0_hat, rows=min(self.count, 4)), path, dpi=100)


def shaded(images: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """Inputs with their hole shown: uint8 (N, 1, 28, 28), the hole a mid grey."""
    return torch.where(hole, torch.tensor(96, dtype=torch.uint8), images)


def save_gif(frames: torch.Tensor, path: Path, *, scale: int = 4, duration_ms: int = 120) -> Path:
    """Frames uint8 (K, 1, 28, 28) as a looping GIF, each frame scaled up `scale` times (nearest)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pictures = [Image.fromarray(frame[0].numpy(), mode="L").resize((28 * scale, 28 * scale), Image.NEAREST)
                for frame in frames]
    pictures += pictures[-2:0:-1]  # back again, so the loop has no jump
    with atomic_file(path) as tmp:
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=duration_ms, loop=0)
    return path
