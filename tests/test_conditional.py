"""Class-conditional models: "no class" dropout, classifier-free guidance, digits on request, and
the checks around them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_ROOT, ROOT, SMOKE, run_cli
from helpers import smoke_run, weights
from PIL import Image

from ddpm_mnist.config import Config, ModelConfig, TrainConfig, apply_overrides
from ddpm_mnist.data import EpochBatches
from ddpm_mnist.device import Runtime
from ddpm_mnist.images import load_samples, load_samples_and_labels
from ddpm_mnist.loop import class_labels
from ddpm_mnist.maths.unet import UNet
from ddpm_mnist.sample import Guided
from ddpm_mnist.trainstate import TrainState

CONDITIONAL = ["model.num_classes=10"]
CPU = torch.device("cpu")


def conditional_model() -> UNet:
    torch.manual_seed(0)
    model = UNet(ModelConfig(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[14],
                             num_groups=4, dropout=0.0, num_classes=10)).eval()
    for p in model.parameters():  # the zero-initialised output layer would make every prediction 0
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_no_class_replaces_labels_at_the_configured_rate() -> None:
    labels = torch.arange(1000) % 10
    batches = EpochBatches(torch.zeros(1000, 1, 28, 28, dtype=torch.uint8), 50, seed=0, labels=labels)
    cfg = Config(train=TrainConfig(class_dropout=0.25, batch_size=50), model=ModelConfig(num_classes=10))
    state = TrainState(None, None, None, None, torch.Generator().manual_seed(0))  # type: ignore[arg-type]
    drawn = []
    for step in range(200):
        state.step = step
        y = class_labels(state, batches, cfg, Runtime(CPU, None, "float32"))
        kept = y != 10
        assert torch.equal(y[kept], batches.batch_labels(step)[kept])  # the rest keep their digit
        drawn.append(y)
    share = float((torch.cat(drawn) == 10).double().mean())
    assert abs(share - 0.25) < 0.02, share  # 10,000 draws: the standard error is 0.004


def test_guidance_1_is_plain_conditional_and_0_is_no_class() -> None:
    model = conditional_model()
    x, t = torch.randn(4, 1, 28, 28), torch.tensor([999, 500, 20, 0])
    labels = torch.tensor([3, 1, 4, 1])
    with torch.no_grad():
        assert torch.equal(Guided(model, labels, 1.0, 10)(x, t), model(x, t, labels))
        assert torch.equal(Guided(model, labels, 0.0, 10)(x, t), model(x, t, torch.full_like(labels, 10)))
        assert torch.equal(model(x, t, torch.full_like(labels, 10)), model(x, t))  # None means no class
        assert not torch.equal(model(x, t, labels), model(x, t))  # the label does something


def test_one_forward_of_2B_images_equals_two_forwards() -> None:
    model = conditional_model()
    x, t, labels = torch.randn(5, 1, 28, 28), torch.tensor([999, 700, 400, 100, 3]), torch.tensor([0, 2, 4, 6, 9])
    with torch.no_grad():
        cond, uncond = model(x, t, labels), model(x, t, torch.full_like(labels, 10))
        torch.testing.assert_close(Guided(model, labels, 3.0, 10)(x, t), uncond + 3.0 * (cond - uncond),
                                   rtol=0, atol=1e-5)


@pytest.mark.slow
def test_resume_with_class_dropout_is_exact(smoke_cfg: Config) -> None:
    sets = [*CONDITIONAL, "train.class_dropout=0.3", "train.checkpoint_every=8", "train.sample_every=0",
            "train.steps=16", "model.dropout=0.1"]
    straight = smoke_run(smoke_cfg, *sets, "name=straight")
    halves = smoke_cfg.run_dir.parent / "halves"
    shutil.copytree(straight, halves)
    (halves / "checkpoints" / "step_000000016.pt").unlink()
    shutil.copyfile(halves / "checkpoints" / "step_000000008.pt", halves / "checkpoints" / "latest.pt")
    smoke_run(smoke_cfg, *sets, "name=halves", resume=True)
    a, b = weights(straight), weights(halves)
    assert "model.class_embedding.weight" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_an_unconditional_checkpoint_from_before_samples_the_same_images(trained_run: Path, tmp_path: Path,
                                                                          capsys) -> None:
    """A checkpoint whose config has no model.num_classes (written before this change) is unconditional."""
    state = torch.load(trained_run / "checkpoints" / "latest.pt", weights_only=True)
    del state["config"]["model"]["num_classes"]
    for key in ("class_dropout",):
        del state["config"]["train"][key]
    for key in ("digits", "guidance"):
        del state["config"]["sample"][key]
    torch.save(state, tmp_path / "old.pt")
    for ckpt, name in ((trained_run / "checkpoints" / "latest.pt", "new.pt"), (tmp_path / "old.pt", "old_img.pt")):
        code, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--n", "3", "--steps", "5", "--out",
                               tmp_path / f"{name}.png", "--tensor", tmp_path / name)
        assert code == 0, err
    assert torch.equal(load_samples(tmp_path / "new.pt"), load_samples(tmp_path / "old_img.pt"))
    assert load_samples_and_labels(tmp_path / "new.pt")[1] is None  # an unconditional file holds no labels


@pytest.mark.slow
def test_image_k_has_digit_k_mod_10_and_its_noise_does_not_depend_on_digit_w_or_batch(
        conditional_run: Path, tmp_path: Path, capsys) -> None:
    ckpt = conditional_run / "checkpoints" / "latest.pt"

    def draw(name: str, *args: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        code, out, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--n", "12", "--steps", "5", "--out",
                                 tmp_path / f"{name}.png", "--tensor", tmp_path / f"{name}.pt", *args)
        assert code == 0, err
        return load_samples_and_labels(tmp_path / f"{name}.pt")

    images, labels = draw("default")
    assert labels.tolist() == [k % 10 for k in range(12)]
    assert Image.open(tmp_path / "default.png").size[0] == 10 * 30 + 2  # a column per digit
    small, _ = draw("small_batches", "--batch-size", "5")
    assert torch.equal(small, images)  # the batch size changes nothing
    # W = 0 ignores the digit asked for: the same noise gives the same images for any digit
    zero3, labels3 = draw("w0_digit3", "--guidance", "0", "--digit", "3")
    zero5, _ = draw("w0_digit5", "--guidance", "0", "--digit", "5")
    assert labels3.tolist() == [3] * 12 and torch.equal(zero3, zero5)
    chosen, chosen_labels = draw("digits", "--digits", "0,3,8", "--guidance", "1")
    assert chosen_labels.tolist() == [[0, 3, 8][k % 3] for k in range(12)]
    assert not torch.equal(chosen, zero3)


@pytest.mark.slow
def test_eval_of_a_conditional_model_reports_class_accuracy(conditional_run: Path, tmp_path: Path, capsys) -> None:
    ckpt = conditional_run / "checkpoints" / "latest.pt"
    code, out, err = run_cli(capsys, "eval", "--ckpt", ckpt, "--n", "20", "--steps", "5", "--data", FIXTURE_ROOT,
                             "--json", tmp_path / "e.json")
    assert code == 0, err
    report = json.loads((tmp_path / "e.json").read_text())["samples"]
    assert 0 <= report["class_accuracy"] <= 1 and len(report["class_accuracy_per_digit"]) == 10
    assert "class_accuracy" in out and "per digit" in out
    code, out, err = run_cli(capsys, "eval", "--ckpt", ckpt, "--n", "20", "--steps", "5", "--data", FIXTURE_ROOT,
                             "--guidance", "1,3", "--json", tmp_path / "g.json", "--plot", tmp_path / "g.png")
    assert code == 0, err
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert [row["guidance"] for row in rows] == [1.0, 3.0] and all("class_accuracy" in row for row in rows)
    assert (tmp_path / "g.png").stat().st_size > 0 and "W=3" in out


@pytest.mark.slow
@pytest.mark.parametrize("args, says", [
    (["--digit", "12"], "--digit 12: each must be a digit 0 to 9"),
    (["--digits", "0,3,x"], "each must be a digit 0 to 9, got 'x'"),
    (["--digits", "3,\u2466"], "each must be a digit 0 to 9, got '\u2466'"),  # str.isdigit() takes these
    (["--digits", "\u00b2"], "each must be a digit 0 to 9, got '\u00b2'"),
    (["--digit", "3", "--digits", "4"], "--digit and --digits contradict"),
    (["--guidance", "-1"], "sample.guidance: must be >= 0"),
    (["--guidance", "nan"], "sample.guidance"),
    (["--guidance", "inf"], "sample.guidance"),
])
def test_bad_conditional_options_get_one_line(conditional_run: Path, tmp_path: Path, capsys, args, says) -> None:
    code, _, err = run_cli(capsys, "sample", "--ckpt", conditional_run / "checkpoints" / "latest.pt",
                           "--out", tmp_path / "x.png", *args)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--digit", "7"], ["--digits", "1,2"], ["--guidance", "3"],
                                  ["--set", "sample.guidance=5"]])
def test_digits_and_guidance_are_refused_for_an_unconditional_checkpoint(trained_run: Path, tmp_path: Path,
                                                                          capsys, args) -> None:
    code, _, err = run_cli(capsys, "sample", "--ckpt", trained_run / "checkpoints" / "latest.pt",
                           "--out", tmp_path / "x.png", *args)
    assert code == 2 and "holds an unconditional model" in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())
    code, _, err = run_cli(capsys, "eval", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--guidance", "1,2",
                           "--n", "4", "--data", FIXTURE_ROOT)
    assert code == 2 and "holds an unconditional model" in err, err


@pytest.mark.slow
@pytest.mark.parametrize("sets, says", [
    (["model.num_classes=1"], "model.num_classes: must be 0 (unconditional) or 10"),
    (["model.num_classes=-1"], "model.num_classes: must be >= 0"),
    (["train.class_dropout=1"], "train.class_dropout: must be < 1"),
    (["train.class_dropout=-0.1"], "train.class_dropout: must be >= 0"),
    (["sample.digits=[3]"], "sample.digits: this model is unconditional"),
    ([*CONDITIONAL, "sample.digits=[3, 10]"], "sample.digits: each must be a digit 0 to 9, got 10"),
])
def test_bad_conditional_config_gets_one_line(sets: list[str], says: str, capsys, tmp_path: Path) -> None:
    args = ["train", "--config", str(SMOKE), "--set", f"out_dir={tmp_path}"]
    for item in sets:
        args += ["--set", item]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_a_conditional_preview_grid_has_a_column_per_digit(smoke_cfg: Config) -> None:
    cfg = apply_overrides(smoke_cfg, [*CONDITIONAL, "train.steps=4", "train.sample_every=0", "train.preview_n=20"])
    run = smoke_run(cfg, "name=preview")
    grid = Image.open(run / "samples" / "step_000000004.png")
    assert grid.size == (10 * 30 + 2, 2 * 30 + 2)


@pytest.mark.slow
def test_the_guidance_strip_has_a_row_per_weight(conditional_run: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "guidance_strip.py"), "--ckpt",
                           str(conditional_run / "checkpoints" / "latest.pt"), "--out", str(tmp_path / "strip.png"),
                           "--guidance", "0,1,3", "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "strip.png").size == (10 * 30 + 2, 3 * 30 + 2)
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "guidance_strip.py"), "--ckpt",
                          str(conditional_run / "checkpoints" / "latest.pt"), "--out", str(tmp_path / "b.png"),
                          "--guidance", "1,-2"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "finite number >= 0" in bad.stderr and not (tmp_path / "b.png").exists()
    late = subprocess.run([sys.executable, str(ROOT / "scripts" / "guidance_strip.py"), "--ckpt",
                           str(conditional_run / "checkpoints" / "latest.pt"), "--out", str(tmp_path / "c.png"),
                           "--guidance", "0,101", "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert late.returncode == 2 and "sample.guidance: must be <= 100" in late.stderr, late.stderr
    assert "W = 0" not in late.stdout and not (tmp_path / "c.png").exists()  # refused before the first row


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "heun", "lms"])
def test_the_sigma_samplers_draw_guided_digits_that_do_not_depend_on_the_batch(conditional_run: Path,
                                                                              tmp_path: Path, capsys,
                                                                              sampler: str) -> None:
    ckpt = conditional_run / "checkpoints" / "latest.pt"
    drawn = []
    for batch in ("6", "4"):
        code, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--sampler", sampler, "--steps", "3", "--n", "6",
                               "--guidance", "3", "--batch-size", batch, "--tensor", tmp_path / f"{batch}.pt",
                               "--out", tmp_path / f"{batch}.png", "--set", "runtime.mixed_precision=fp32")
        assert code == 0, err
        drawn.append(load_samples_and_labels(tmp_path / f"{batch}.pt"))
    assert drawn[0][1].tolist() == [0, 1, 2, 3, 4, 5]
    assert (drawn[0][0].int() - drawn[1][0].int()).abs().max() <= 1  # at most float rounding across batches
