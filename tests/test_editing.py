"""Inpainting (RePaint), SDEdit and interpolation: the loops of `maths.editing` against their
definitions, and `ddpm inpaint`, `ddpm edit` and `ddpm interpolate` end to end on the smoke model."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURE_ROOT, run_cli
from helpers import one_line_error
from PIL import Image

from ddpm_mnist.config import ScheduleConfig
from ddpm_mnist.data import load_mnist
from ddpm_mnist.images import load_samples, load_samples_and_labels
from ddpm_mnist.maths.editing import edit_loop, inpaint_loop, repaint_calls, repaint_positions, slerp, start_step
from ddpm_mnist.maths.samplers import NoiseSource, make_sampler
from ddpm_mnist.maths.schedule import make_schedule
from ddpm_mnist.sample import reverse_loop

CPU = torch.device("cpu")


def lugmayr_schedule(t_T: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's `get_schedule_jump` (Lugmayr et al.'s repository, without its unused options), written
    out: the timesteps of the states visited, from t_T - 1 (the start) down to -1 (x_0)."""
    jumps = {j: jump_n_sample - 1 for j in range(0, t_T - jump_length, jump_length)}
    t, ts = t_T, []
    while t >= 1:
        t -= 1
        ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                ts.append(t)
    ts.append(-1)
    return ts


@pytest.mark.parametrize(("steps", "resample", "jump"), [(10, 1, 10), (25, 3, 5), (100, 10, 10), (12, 4, 3), (7, 2, 7)])
def test_repaint_positions_follow_lugmayr_et_als_schedule(steps: int, resample: int, jump: int) -> None:
    positions = repaint_positions(steps, resample, jump)
    # their x_t, t from T - 1 (x_T) down, is the input of our step (steps - 1 - t); t = -1 is x_0
    assert positions == [steps - 1 - t for t in lugmayr_schedule(steps, jump, resample)]
    assert positions[0] == 0 and positions[-1] == steps
    assert all(abs(b - a) == 1 for a, b in zip(positions, positions[1:], strict=False))
    if resample == 1:
        assert positions == list(range(steps + 1))


def sampler(name: str, steps: int, **kwargs):
    return make_sampler(name, make_schedule(ScheduleConfig()), steps, **kwargs)


@pytest.mark.parametrize("name", ["ancestral", "ddim", "euler", "euler_ancestral"])
def test_renoise_after_noised_is_the_closed_form_of_the_step_before(name: str) -> None:
    """q(x_i | x_(i+1)) composed with q(x_(i+1) | x_0) is q(x_i | x_0): the x_0 coefficient and the
    noise variance of the two, in float64, against the closed form of step i (within 1e-6)."""
    s = sampler(name, 20)
    for i in (0, 5, 18):
        x0, e1, z = (torch.full((1, 1, 1, 1), v, dtype=torch.float32) for v in (1.0, 0.0, 0.0))
        coef_x0 = float(s.renoise(i, s.noised(i + 1, x0, e1), z))  # e1 = z = 0: the x_0 part alone
        e1 = torch.ones_like(x0)
        via_e1 = float(s.renoise(i, s.noised(i + 1, 0 * x0, e1), 0 * z))
        via_z = float(s.renoise(i, 0 * x0, torch.ones_like(x0)))
        direct_x0, direct_eps = float(s.noised(i, x0, 0 * x0)), float(s.noised(i, 0 * x0, e1))
        assert coef_x0 == pytest.approx(direct_x0, abs=1e-6)
        assert via_e1**2 + via_z**2 == pytest.approx(direct_eps**2, rel=1e-5)


def test_noised_is_eq_4_and_the_clean_image_after_the_last_step() -> None:
    s = sampler("ancestral", 50)
    x0, eps = torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28)
    abar = s.alphas_cumprod.double()
    for i in (0, 10, 49):
        expected = abar[i].sqrt() * x0.double() + (1 - abar[i]).sqrt() * eps.double()
        torch.testing.assert_close(s.noised(i, x0, eps).double(), expected, atol=1e-6, rtol=0)
    assert torch.equal(s.noised(50, x0, eps), x0)
    assert torch.equal(sampler("euler", 50).noised(50, x0, eps), x0)


def fake_step(s):
    """step(i, x, z) with a fixed 'model' (eps_hat = x / 2), as `generate` would call it."""
    def step(i: int, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        return s.step(i, s.model_input(i, x) / 2, x, z)
    return step


@pytest.mark.parametrize("name", ["ancestral", "ddim", "euler", "euler_ancestral"])
def test_edit_at_strength_1_is_the_plain_loop_and_at_0_the_input(name: str) -> None:
    s = sampler(name, 20)
    x0 = torch.rand(2, 1, 28, 28) * 2 - 1
    plain = reverse_loop(s, NoiseSource(3, [0, 1], CPU), fake_step(s))
    edited = edit_loop(s, NoiseSource(3, [0, 1], CPU), fake_step(s), x0, start_step(s.num_steps, 1.0))
    assert torch.equal(plain, edited)
    assert torch.equal(edit_loop(s, NoiseSource(3, [0, 1], CPU), fake_step(s), x0, start_step(20, 0.0)), x0)
    assert start_step(20, 0.5) == 10 and start_step(1000, 0.3) == 700 and start_step(50, 0.99) == 1


@pytest.mark.parametrize(("name", "resample"), [("ancestral", 1), ("ancestral", 3), ("ddim", 2), ("euler", 1)])
def test_inpainting_keeps_the_known_pixels_exactly(name: str, resample: int) -> None:
    s = sampler(name, 12)
    x0 = torch.rand(2, 1, 28, 28) * 2 - 1
    known = torch.zeros(1, 1, 28, 28, dtype=torch.bool)
    known[..., 14:, :] = True
    positions, calls = repaint_positions(12, resample, 4), []
    step = fake_step(s)

    def counted(i: int, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        calls.append(i)
        return step(i, x, z)

    out = inpaint_loop(s, NoiseSource(0, [0, 1], CPU), counted, x0, known, positions)
    assert len(calls) == repaint_calls(positions) == 12 + (resample - 1) * 4 * len(range(11, 3, -4))
    assert torch.equal(out[..., 14:, :], x0[..., 14:, :])
    assert not torch.equal(out[..., :14, :], x0[..., :14, :])


def test_slerp_ends_are_exact_and_its_middle_is_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(3, 1, 28, 28, generator=g), torch.randn(3, 1, 28, 28, generator=g)
    assert torch.equal(slerp(z0, z1, 0.0), z0) and torch.equal(slerp(z0, z1, 1.0), z1)
    a, b = z0[0].double().flatten(), z1[0].double().flatten()
    theta = math.acos(float(a @ b / (a.norm() * b.norm())))
    expected = (math.sin(0.3 * theta) * a + math.sin(0.7 * theta) * b) / math.sin(theta)  # alpha = 0.7
    torch.testing.assert_close(slerp(z0, z1, 0.7)[0].double().flatten(), expected, atol=1e-6, rtol=0)
    norms = slerp(z0, z1, 0.5).flatten(1).norm(dim=1)  # about sqrt(784) = 28, as a draw's: not shrunk
    assert bool(((norms > 25) & (norms < 31)).all()), norms


# ---- the commands, on the smoke model ----

def ckpt_of(run: Path) -> Path:
    return run / "checkpoints" / "latest.pt"


def test_inpaint_completes_the_hole_and_keeps_the_rest(trained_run: Path, tmp_path: Path, capsys) -> None:
    out, tensor = tmp_path / "grid.png", tmp_path / "done.pt"
    code, stdout, err = run_cli(capsys, "inpaint", "--ckpt", ckpt_of(trained_run), "--test-digits", "0,1,2",
                                "--mask", "top", "--n", "2", "--steps", "20", "--out", out, "--tensor", tensor,
                                "--resample", "2", "--jump", "5")
    assert code == 0, err
    images, labels = load_samples_and_labels(tensor)
    digits, true_labels = load_mnist(FIXTURE_ROOT, train=False, download=False)
    assert images.shape == (6, 1, 28, 28)
    expected = digits[[0, 0, 1, 1, 2, 2]]
    assert torch.equal(images[:, :, 14:], expected[:, :, 14:])  # the kept half, byte for byte
    assert not torch.equal(images[:, :, :14], expected[:, :, :14])
    assert torch.equal(labels, true_labels[[0, 0, 1, 1, 2, 2]])  # for ddpm eval --samples: class_accuracy
    assert Image.open(out).size == (3 * 30 + 2, 3 * 30 + 2)  # 3 rows of the input and 2 completions
    assert "RePaint, resample 2, jump 5" in stdout


def test_conditional_inpainting_asks_for_the_digit(conditional_run: Path, tmp_path: Path, capsys) -> None:
    args = ["inpaint", "--ckpt", ckpt_of(conditional_run), "--test-digits", "0,1", "--mask", "left", "--n", "1",
            "--steps", "10"]
    code, _, err = run_cli(capsys, *args, "--digit", "3", "--tensor", tmp_path / "three.pt")
    assert code == 0, err
    code, _, err = run_cli(capsys, *args, "--tensor", tmp_path / "free.pt")
    assert code == 0, err
    three, labels = load_samples_and_labels(tmp_path / "three.pt")
    free = load_samples(tmp_path / "free.pt")
    assert labels.tolist() == [3, 3]
    assert torch.equal(three[..., 14:], free[..., 14:])  # the kept half
    assert not torch.equal(three, free)  # guided towards 3, not the unconditional half


def test_edit_at_strength_1_is_ddpm_sample_and_at_0_the_input(trained_run: Path, tmp_path: Path, capsys) -> None:
    ckpt = ckpt_of(trained_run)
    common = ["--steps", "10", "--seed", "5", "--batch-size", "4"]
    assert run_cli(capsys, "sample", "--ckpt", ckpt, "--n", "4", *common, "--tensor", tmp_path / "plain.pt",
                   "--out", tmp_path / "plain.png")[0] == 0
    code, stdout, err = run_cli(capsys, "edit", "--ckpt", ckpt, "--test-digits", "0,1", "--n", "2",
                                "--strength", "1", *common, "--tensor", tmp_path / "s1.pt",
                                "--out", tmp_path / "s1.png")
    assert code == 0, err
    assert torch.equal(load_samples(tmp_path / "s1.pt"), load_samples(tmp_path / "plain.pt"))
    code, stdout, err = run_cli(capsys, "edit", "--ckpt", ckpt, "--test-digits", "0,1", "--strength", "0", "--n", "1",
                                *common, "--tensor", tmp_path / "s0.pt", "--out", tmp_path / "s0.png")
    assert code == 0, err
    digits, _ = load_mnist(FIXTURE_ROOT, train=False, download=False)
    assert torch.equal(load_samples(tmp_path / "s0.pt"), digits[:2])
    assert "strength 0" in stdout


def test_an_edit_from_a_png_of_any_size(trained_run: Path, tmp_path: Path, capsys) -> None:
    sketch = np.full((90, 60, 3), 255, dtype=np.uint8)
    sketch[20:70, 25:35] = 0  # a dark stroke on white paper: a 1
    Image.fromarray(sketch).save(tmp_path / "one.png")
    code, stdout, err = run_cli(capsys, "edit", "--ckpt", ckpt_of(trained_run), "--image", tmp_path / "one.png",
                                "--invert", "--strength", "0.3", "--steps", "10", "--out", tmp_path / "edit.png")
    assert code == 0, err
    assert "one.png: 60x90 RGB, read as a dark digit on light paper, inverted" in stdout
    assert (tmp_path / "edit.png").is_file()


def test_interpolation_ends_are_what_ddpm_sample_draws(trained_run: Path, tmp_path: Path, capsys) -> None:
    ckpt = ckpt_of(trained_run)
    common = ["--sampler", "ddim", "--steps", "10", "--batch-size", "1"]
    for seed in (3, 8):
        assert run_cli(capsys, "sample", "--ckpt", ckpt, "--n", "1", "--seed", str(seed), *common,
                       "--tensor", tmp_path / f"s{seed}.pt", "--out", tmp_path / f"s{seed}.png")[0] == 0
    code, stdout, err = run_cli(capsys, "interpolate", "--ckpt", ckpt, "--seeds", "3,8", "--frames", "5", *common,
                                "--out", tmp_path / "strip.png", "--tensor", tmp_path / "frames.pt")
    assert code == 0, err
    frames = load_samples(tmp_path / "frames.pt")
    assert frames.shape == (5, 1, 28, 28)
    assert torch.equal(frames[0], load_samples(tmp_path / "s3.pt")[0])
    assert torch.equal(frames[-1], load_samples(tmp_path / "s8.pt")[0])
    assert not torch.equal(frames[2], frames[0]) and not torch.equal(frames[2], frames[-1])
    assert Image.open(tmp_path / "strip.gif").n_frames == 8  # there and back: 5 + 3


def test_interpolation_between_two_digits(trained_run: Path, tmp_path: Path, capsys) -> None:
    code, stdout, err = run_cli(capsys, "interpolate", "--ckpt", ckpt_of(trained_run), "--mode", "images",
                                "--test-digits", "0,1", "--t", "300", "--frames", "4", "--steps", "20",
                                "--out", tmp_path / "mix.png", "--tensor", tmp_path / "mix.pt")
    assert code == 0, err
    assert "noised to t = 300" in stdout
    frames = load_samples(tmp_path / "mix.pt")
    assert frames.shape == (4, 1, 28, 28) and not torch.equal(frames[0], frames[-1])


@pytest.mark.parametrize(("args", "says"), [
    (["inpaint", "--test-digits", "0", "--mask", "middle"], "--mask middle: give one of top, bottom"),
    (["inpaint", "--test-digits", "0", "--mask", "top", "--resample", "0"], "--resample 0: give 1 to 100"),
    (["inpaint", "--test-digits", "0", "--mask", "top", "--steps", "10", "--jump", "11"], "--jump 11: give 1 to 10"),
    (["inpaint", "--test-digits", "0", "--mask", "top", "--sampler", "dpmpp_2m", "--steps", "10"],
     "the dpmpp_2m sampler keeps state from step to step"),
    (["inpaint", "--test-digits", "99999", "--mask", "top"], "--test-digits: 99999 is past the 1,000 MNIST test"),
    (["inpaint", "--mask", "top"], "give the inputs as --image FILE.png (repeatable) or --test-digits"),
    (["inpaint", "--test-digits", "0", "--mask", "top", "--n", "0"], "--n 0: give 1 to"),
    (["inpaint", "--test-digits", "0", "--mask", "top", "--digit", "3"], "holds an unconditional model"),
    (["edit", "--test-digits", "0", "--strength", "1.5"], "--strength 1.5: give 0 to 1"),
    (["edit", "--test-digits", "0", "--strength", "nan"], "--strength nan: give 0 to 1"),
    (["edit", "--test-digits", "0,x"], "--test-digits 0,x: give numbers"),
    (["edit", "--test-digits", "0", "--invert"], "--invert is for --image PNGs"),
    (["interpolate", "--seeds", "1,2", "--sampler", "ancestral", "--steps", "10"], "needs a deterministic sampler"),
    (["interpolate", "--seeds", "1,2", "--sampler", "ddim", "--eta", "0.5", "--steps", "10"],
     "ddim with eta 0.5 adds fresh noise"),
    (["interpolate", "--seeds", "1"], "--seeds 1: give two seeds"),
    (["interpolate", "--seeds", "1,2", "--seed", "3"], "--seed is for --mode images"),
    (["interpolate", "--seeds", "1,2", "--frames", "1"], "--frames 1: give 2 to 100"),
    (["interpolate", "--mode", "images", "--test-digits", "0,1,2"], "--mode images: give two inputs, got 3"),
    (["interpolate", "--mode", "images", "--test-digits", "0,1", "--t", "1000"], "--t 1000: give 0 to 999"),
    (["interpolate", "--mode", "sideways", "--seeds", "1,2"], "--mode sideways: give noise or images"),
    (["interpolate", "--test-digits", "0,1"], "--mode noise interpolates between two seeds' noise"),
])
def test_bad_arguments_are_one_line_and_nothing_is_written(trained_run: Path, tmp_path: Path, capsys, args: list,
                                                           says: str) -> None:
    out = tmp_path / "out.png"
    code, _, err = run_cli(capsys, *args, "--ckpt", ckpt_of(trained_run), "--out", out)
    one_line_error(code, err, says)
    assert not out.exists() and not out.with_suffix(".gif").exists()


def test_bad_masks_and_images_are_one_line(trained_run: Path, tmp_path: Path, capsys) -> None:
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(tmp_path / "empty.png")
    (tmp_path / "text.png").write_text("not a picture")
    ckpt = ckpt_of(trained_run)
    for args, says in [
        (["--test-digits", "0", "--mask", tmp_path / "small.png"], "a mask PNG must be 28x28"),
        (["--test-digits", "0", "--mask", tmp_path / "empty.png"], "it hides no pixel"),
        (["--image", tmp_path / "text.png", "--mask", "top"], "text.png: not an image file"),
        (["--image", tmp_path / "missing.png", "--mask", "top"], "missing.png: no such image file"),
    ]:
        code, _, err = run_cli(capsys, "inpaint", "--ckpt", ckpt, *args, "--out", tmp_path / "out.png")
        one_line_error(code, err, says)
    assert not (tmp_path / "out.png").exists()


def test_an_output_never_replaces_an_input(trained_run: Path, tmp_path: Path, capsys) -> None:
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(tmp_path / "in.png")
    before = (tmp_path / "in.png").read_bytes()
    code, _, err = run_cli(capsys, "edit", "--ckpt", ckpt_of(trained_run), "--image", tmp_path / "in.png",
                           "--out", tmp_path / "in.png")
    one_line_error(code, err, "in.png")
    assert (tmp_path / "in.png").read_bytes() == before
    mask = np.zeros((28, 28), dtype=np.uint8)
    mask[:14] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    before = (tmp_path / "mask.png").read_bytes()
    code, _, err = run_cli(capsys, "inpaint", "--ckpt", ckpt_of(trained_run), "--test-digits", "0",
                           "--mask", tmp_path / "mask.png", "--out", tmp_path / "mask.png")
    one_line_error(code, err, "mask.png")
    assert (tmp_path / "mask.png").read_bytes() == before


@pytest.mark.parametrize(("command", "shown"), [
    ("inpaint", ["Completions of each input. [default: 4]", "1 is no resampling. [default: 1]",
                 "in steps. [default: 10]", "ancestral (default)", "(default: off)"]),
    ("edit", ["ordinary sample. [default: 0.5]", "Variations of each input. [default: 4]", "(default: sample.steps"]),
    ("interpolate", ["then denoised. [default: noise]", "Frames, ends included. [default: 8]", "(default: T/2)",
                     "ddim (default, eta 0)"]),
])
def test_help_gives_every_default(command: str, shown: list[str], capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    flat = " ".join(out.replace("│", " ").split())  # the help's boxes and line breaks out of the way
    for text in shown:
        assert text in flat, (text, flat)
    assert not re.search(r"\w \.(\s|$)", out), out  # a word, a space, a full stop: a default was dropped


def test_fixed_buffers_take_the_loops_x_at_every_step(trained_run: Path) -> None:
    """On CUDA the steps replay a graph on fixed buffers; an inpainting loop changes x between steps
    (the known pixels), so the buffers must take it each time. Eagerly on the CPU, the same body."""
    import functools

    from ddpm_mnist import editing
    from ddpm_mnist.config import SampleRequest
    from ddpm_mnist.sample import generate

    request = SampleRequest(steps=10, seed=0, batch_size=2, n=2)
    checkpoint, _ = editing.configured(ckpt_of(trained_run), request, None, "inpaint")
    job = editing.prepared(checkpoint, request, None, "cpu")
    x0 = torch.rand(2, 1, 28, 28) * 2 - 1
    known = torch.zeros(1, 1, 28, 28, dtype=torch.bool)
    known[..., 14:, :] = True
    loop = functools.partial(inpaint_loop, x0=x0, known=known, positions=repaint_positions(10, 2, 3))
    eager, fixed = (generate(job.model, job.sampler, NoiseSource(0, [0, 1], CPU), job.runtime, static=static,
                             loop=loop) for static in (False, True))
    assert torch.equal(fixed, eager)
    assert torch.equal(fixed[..., 14:, :], x0[..., 14:, :].clamp(-1, 1))
