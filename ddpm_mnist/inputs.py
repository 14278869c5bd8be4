"""What a user gives the editing commands: a digit as a PNG (any size or mode, read the way MNIST's
digits were made), a mask (a name or a 28x28 PNG), or MNIST test digits by number."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm_mnist.data import load_mnist
from ddpm_mnist.errors import UserError
from ddpm_mnist.paths import check_input_file

MNIST_BOX = 20  # MNIST's digits were scaled to fit a 20x20 box, then centred by their mass in 28x28
INK = 0.2  # a pixel darker than this share of the brightest is background when finding the digit's box


def open_png(path: Path, what: str) -> Any:
    """A PIL image from a file, or one UserError line (missing, not a file, not an image)."""
    from PIL import Image, UnidentifiedImageError

    check_input_file(path, what)
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not an image file PIL can read ({type(exc).__name__})") from None
    return image


def read_digit(path: Path, invert: bool = False) -> tuple[torch.Tensor, str]:
    """A PNG (or any image PIL reads) of any size and mode as an MNIST digit: uint8 (1, 28, 28), a
    white digit on black; and one line saying how it was read. Grey levels as PIL converts them
    (transparency over black, or over white with `invert`, which then turns a dark pen on white
    paper into MNIST's white on black). A 28x28 image is taken as it is; another size as MNIST's
    digits were made: the ink's box scaled to fit 20x20 (aspect kept), centred by its mass in 28x28."""
    from PIL import Image

    image = open_png(path, "image")
    size, mode = image.size, image.mode
    if "A" in image.getbands() or mode == "P":
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if invert else (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    grey = np.asarray(image.convert("L"), dtype=np.float64) / 255  # (H, W) in [0, 1]
    if invert:
        grey = 1 - grey
    how = "a dark digit on light paper, inverted" if invert else "a light digit on dark ground"
    if grey.shape == (28, 28):
        digit = grey
        how += ", 28x28 as it is"
    else:
        digit = mnist_layout(grey)
        how += f", its ink's box scaled to fit {MNIST_BOX}x{MNIST_BOX} and centred by its mass in 28x28, as MNIST's"
    pixels = torch.from_numpy(np.round(digit * 255)).clamp(0, 255).to(torch.uint8)[None]
    return pixels, f"{path}: {size[0]}x{size[1]} {mode}, read as {how}"


def mnist_layout(grey: np.ndarray) -> np.ndarray:
    """A grey image (H, W) in [0, 1], white ink, as a 28x28 MNIST digit (LeCun et al.'s recipe)."""
    from PIL import Image

    if grey.max() <= 0:
        return np.zeros((28, 28))
    rows, cols = np.nonzero(grey > INK * grey.max())
    box = grey[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    scale = MNIST_BOX / max(box.shape)
    height, width = max(1, round(box.shape[0] * scale)), max(1, round(box.shape[1] * scale))
    small = np.asarray(Image.fromarray(box.astype(np.float32), mode="F").resize((width, height), Image.LANCZOS))
    small = np.clip(small, 0, 1)
    canvas = np.zeros((28, 28))
    top, left = (28 - height) // 2, (28 - width) // 2
    canvas[top: top + height, left: left + width] = small
    total = canvas.sum()
    if total <= 0:
        return canvas
    centre_row = (canvas.sum(1) * np.arange(28)).sum() / total
    centre_col = (canvas.sum(0) * np.arange(28)).sum() / total
    shift_row = int(np.clip(round(13.5 - centre_row), -top, 28 - height - top))
    shift_col = int(np.clip(round(13.5 - centre_col), -left, 28 - width - left))
    return np.roll(canvas, (shift_row, shift_col), axis=(0, 1))  # the shift stays inside: nothing wraps


MASKS = ("top", "bottom", "left", "right", "center")


def named_mask(name: str) -> torch.Tensor:
    """The hole a mask name makes, bool (1, 1, 28, 28), True where the model draws: a half of the
    image (top, bottom, left, right) or its central 14x14 square (center)."""
    hole = torch.zeros(1, 1, 28, 28, dtype=torch.bool)
    half = {"top": (slice(0, 14), slice(None)), "bottom": (slice(14, 28), slice(None)),
            "left": (slice(None), slice(0, 14)), "right": (slice(None), slice(14, 28)),
            "center": (slice(7, 21), slice(7, 21))}[name]
    hole[0, 0][half] = True
    return hole


def read_mask(path: Path) -> torch.Tensor:
    """A mask PNG: 28x28 (the digit's own grid), white (grey >= 128) where the model draws, black
    where the input is kept. bool (1, 1, 28, 28), True in the hole."""
    image = open_png(path, "mask")
    if image.size != (28, 28):
        raise UserError(f"--mask {path}: a mask PNG must be 28x28, the digit's grid (white where the model "
                        f"draws), got {image.size[0]}x{image.size[1]}")
    grey = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.uint8).copy())
    return (grey >= 128)[None, None]


def mask_from(text: str) -> torch.Tensor:
    """--mask: a name of MASKS or a PNG (`read_mask`); bool (1, 1, 28, 28), True in the hole. A mask
    with no hole is refused: there would be nothing to complete."""
    hole = named_mask(text) if text in MASKS else None
    if hole is None:
        if not text.lower().endswith(".png"):
            raise UserError(f"--mask {text}: give one of {', '.join(MASKS)}, or a 28x28 PNG (white where the "
                            "model draws)")
        hole = read_mask(Path(text))
    if not bool(hole.any()):
        raise UserError(f"--mask {text}: it hides no pixel (white is the hole), so there is nothing to complete")
    return hole


def indices_from(text: str, flag: str) -> list[int]:
    """'3,17,42' as [3, 17, 42]: non-negative integers, or one UserError line."""
    items = [item.strip() for item in text.split(",")]
    if not all(item.isascii() and item.isdigit() for item in items):
        raise UserError(f"{flag} {text}: give numbers 0, 1, 2, ... separated by commas")
    return [int(item) for item in items]


def test_digits(indices: list[int], root: str | Path, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST test digits by number: uint8 (N, 1, 28, 28) and their labels (N,) int64."""
    images, labels = load_mnist(root, train=False, download=download)
    outside = [i for i in indices if i >= len(images)]
    if outside:
        raise UserError(f"--test-digits: {outside[0]} is past the {len(images):,} MNIST test digits in {root} "
                        f"(0 to {len(images) - 1})")
    return images[indices], labels[indices]


def read_inputs(paths: list[Path], indices_text: str | None, invert: bool, root: str | Path, download: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """The inputs of an editing command: --image PNGs or --test-digits (exactly one of them):
    uint8 (N, 1, 28, 28), the test digits' labels (None for PNGs), and a line per PNG on how it was read."""
    if bool(paths) == (indices_text is not None):
        raise UserError("give the inputs as --image FILE.png (repeatable) or --test-digits I,J,...: one of them")
    if indices_text is not None:
        if invert:
            raise UserError("--invert is for --image PNGs; MNIST's test digits are white on black already")
        images, labels = test_digits(indices_from(indices_text, "--test-digits"), root, download)
        return images, labels, []
    read = [read_digit(path, invert) for path in paths]
    return torch.stack([image for image, _ in read]), None, [line for _, line in read]
