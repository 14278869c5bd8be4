"""Reading what the editing commands are given: digits as PNGs of any size and mode, masks, and
MNIST test digits by number."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURE_ROOT
from PIL import Image

from ddpm_mnist.data import load_mnist
from ddpm_mnist.errors import UserError
from ddpm_mnist.inputs import indices_from, mask_from, named_mask, read_digit, read_inputs


def test_a_28x28_png_is_read_as_it_is(tmp_path: Path) -> None:
    digits, _ = load_mnist(FIXTURE_ROOT, train=False, download=False)
    Image.fromarray(digits[7, 0].numpy()).save(tmp_path / "seven.png")
    pixels, line = read_digit(tmp_path / "seven.png")
    assert torch.equal(pixels, digits[7])
    assert "28x28 as it is" in line
    inverted, _ = read_digit(tmp_path / "seven.png", invert=True)
    assert torch.equal(inverted, 255 - digits[7])


def centre_of_mass(image: torch.Tensor) -> tuple[float, float]:
    a = image[0].double()
    rows, cols = torch.arange(28, dtype=torch.float64), torch.arange(28, dtype=torch.float64)
    return float((a.sum(1) * rows).sum() / a.sum()), float((a.sum(0) * cols).sum() / a.sum())


def test_a_large_sketch_is_laid_out_as_mnist_s_digits(tmp_path: Path) -> None:
    """MNIST: the ink's box scaled to fit 20x20 (aspect kept), centred by its mass in 28x28."""
    paper = np.full((300, 400, 3), 255, dtype=np.uint8)
    paper[40:260, 60:110] = 0  # a thick vertical stroke, off centre, dark on white
    Image.fromarray(paper).save(tmp_path / "sketch.png")
    pixels, line = read_digit(tmp_path / "sketch.png", invert=True)
    assert pixels.shape == (1, 28, 28) and pixels.dtype == torch.uint8
    assert "400x300 RGB" in line and "20x20" in line
    rows, cols = torch.nonzero(pixels[0] > 50, as_tuple=True)
    assert int(rows.max() - rows.min() + 1) == 20  # the long side fills the 20-pixel box
    assert 3 <= int(cols.max() - cols.min() + 1) <= 6  # 50 / 220 of it, aspect kept
    row, col = centre_of_mass(pixels)
    assert abs(row - 13.5) <= 0.5 and abs(col - 13.5) <= 0.5


def test_transparency_is_over_black_or_white_paper(tmp_path: Path) -> None:
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[10:20, 12:16] = (255, 255, 255, 255)  # an opaque white stroke; the rest transparent
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "clear.png")
    pixels, _ = read_digit(tmp_path / "clear.png")
    assert int(pixels[0, 0, 0]) == 0 and int(pixels[0, 15, 13]) == 255
    rgba[10:20, 12:16] = (0, 0, 0, 255)  # a black pen on a transparent sheet
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "pen.png")
    pixels, _ = read_digit(tmp_path / "pen.png", invert=True)
    assert int(pixels[0, 0, 0]) == 0 and int(pixels[0, 15, 13]) == 255


def test_named_masks_hide_what_they_say() -> None:
    assert int(named_mask("top")[..., :14, :].sum()) == 14 * 28 and int(named_mask("top").sum()) == 14 * 28
    assert int(named_mask("left")[..., :, :14].sum()) == 14 * 28
    assert bool(named_mask("center")[0, 0, 14, 14]) and not bool(named_mask("center")[0, 0, 0, 0])
    assert int(named_mask("center").sum()) == 14 * 14


def test_a_mask_png_is_white_where_the_model_draws(tmp_path: Path) -> None:
    picture = np.zeros((28, 28), dtype=np.uint8)
    picture[:, 20:] = 255
    Image.fromarray(picture).save(tmp_path / "mask.png")
    hole = mask_from(str(tmp_path / "mask.png"))
    assert hole.shape == (1, 1, 28, 28) and int(hole.sum()) == 8 * 28 and bool(hole[0, 0, 0, 27])


def test_inputs_are_png_or_test_digits_never_both(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="one of them"):
        read_inputs([tmp_path / "a.png"], "0", False, FIXTURE_ROOT, False)
    images, labels, lines = read_inputs([], "3,1", False, FIXTURE_ROOT, False)
    digits, true_labels = load_mnist(FIXTURE_ROOT, train=False, download=False)
    assert torch.equal(images, digits[[3, 1]]) and torch.equal(labels, true_labels[[3, 1]]) and lines == []
    for bad in ("", "1,,2", "-1", "1.5", "٣"):
        with pytest.raises(UserError, match="give numbers"):
            indices_from(bad, "--test-digits")
