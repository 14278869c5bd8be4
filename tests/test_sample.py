"""Sampling: the reverse step against the paper and diffusers, determinism, outputs, bad checkpoints."""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURE_ROOT, SMOKE, run_cli
from helpers import digest, one_line_error
from PIL import Image

from ddpm_mnist.config import SampleRequest, load_config
from ddpm_mnist.images import load_samples
from ddpm_mnist.maths.samplers import SAMPLERS
from ddpm_mnist.sample_files import sample_from_checkpoint


@pytest.mark.slow
def test_same_seed_same_bytes_and_batch_size_does_not_matter(trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "latest.pt"

    def run(name: str, **options: object) -> Path:
        return sample_from_checkpoint(ckpt, request=SampleRequest(steps=20, **options), out=tmp_path / f"{name}.png",
                                      tensor_path=tmp_path / f"{name}.pt")

    def same_up_to_rounding(x: torch.Tensor, y: torch.Tensor) -> bool:
        """Another batch shape may sum in another order: a rare pixel one uint8 level apart (docs/sampling.md)."""
        differ = (x.int() - y.int()).abs()
        return int(differ.max()) <= 1 and int((differ > 0).sum()) <= max(1, x.numel() // 1000)

    a = run("a", n=6, seed=1, batch_size=6)
    b = run("b", n=6, seed=1, batch_size=6)
    assert digest(a) == digest(b)  # the same batch size: the same bytes
    run("c", n=6, seed=1, batch_size=4)
    assert same_up_to_rounding(load_samples(tmp_path / "a.pt"), load_samples(tmp_path / "c.pt"))
    run("d", n=6, seed=1, batch_size=0)  # the fastest batch measured here, whichever it is
    assert same_up_to_rounding(load_samples(tmp_path / "a.pt"), load_samples(tmp_path / "d.pt"))
    run("d", n=6, seed=2)
    assert not same_up_to_rounding(load_samples(tmp_path / "a.pt"), load_samples(tmp_path / "d.pt"))
    # image k does not depend on how many images were asked for
    run("e", n=2, seed=1)
    assert same_up_to_rounding(load_samples(tmp_path / "e.pt"), load_samples(tmp_path / "a.pt")[:2])


@pytest.mark.slow
def test_outputs_have_the_right_count_and_shape(trained_run: Path, tmp_path: Path, capsys) -> None:
    ckpt = trained_run / "checkpoints" / "latest.pt"
    code, out, err = run_cli(
        capsys, "sample", "--ckpt", ckpt, "--n", "10", "--steps", "20", "--batch-size", "4",
        "--images-dir", tmp_path / "each", "--tensor", tmp_path / "all.npz", "--trajectory", tmp_path / "t.gif",
    )
    assert code == 0, err
    grid = trained_run / "samples" / "ancestral20_seed0_n10.png"  # the default place
    closing = out.strip().splitlines()[-1]  # names the files written, one line
    assert closing.startswith("sampled 10 images in ") and closing.endswith(f"{grid}, {tmp_path / 'each'}, "
                                                                              f"{tmp_path / 'all.npz'}, "
                                                                              f"{tmp_path / 't.gif'}, "
                                                                              f"{tmp_path / 't_strip.png'}")
    assert Image.open(grid).size == (4 * 30 + 2, 3 * 30 + 2)  # 4 x 3 grid of 28 px tiles with 2 px padding
    files = sorted((tmp_path / "each").iterdir())
    assert [f.name for f in files] == [f"{k:06d}.png" for k in range(10)]
    assert Image.open(files[0]).size == (28, 28) and Image.open(files[0]).mode == "L"
    with np.load(tmp_path / "all.npz") as data:
        assert data["images"].shape == (10, 1, 28, 28) and data["images"].dtype == np.uint8
        assert np.array_equal(np.asarray(Image.open(files[3])), data["images"][3, 0])
    gif = Image.open(tmp_path / "t.gif")
    assert gif.n_frames > 10
    assert (tmp_path / "t_strip.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_ddim_sampler_from_the_cli(trained_run: Path, tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "sample", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--sampler", "ddim",
                             "--steps", "10", "--n", "4", "--out", tmp_path / "g.png", "--no-ema")
    assert code == 0, err
    assert "ddim, 10 steps" in out and "raw weights" in out and (tmp_path / "g.png").exists()


def expect_one_line_error(capsys, ckpt: Path, *extra: str) -> str:
    code, out, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--steps", "2", "--n", "1", *extra)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.slow
def test_bad_checkpoints_give_one_line_and_exit_code_2(trained_run: Path, tmp_path: Path, capsys) -> None:
    good = trained_run / "checkpoints" / "latest.pt"
    assert "no such checkpoint" in expect_one_line_error(capsys, tmp_path / "missing.pt")
    assert "is a folder" in expect_one_line_error(capsys, tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00garbage" * 100)
    assert "not a readable checkpoint" in expect_one_line_error(capsys, garbage)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:20_000])
    assert "not a readable checkpoint" in expect_one_line_error(capsys, truncated)

    class Exploit:
        def __reduce__(self) -> tuple:
            return (print, ("this ran code",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "ddpm-mnist-checkpoint", "payload": Exploit()}, evil)
    err = expect_one_line_error(capsys, evil)
    assert "could run code" in err and "this ran code" not in capsys.readouterr().out

    state = torch.load(good, weights_only=True)
    other = tmp_path / "other.pt"
    torch.save({"weights": state["model"]}, other)
    assert "not a ddpm-mnist checkpoint" in expect_one_line_error(capsys, other)
    future = tmp_path / "future.pt"
    torch.save({**state, "format_version": 99}, future)
    assert "format version 99; this ddpm-mnist reads versions 1, 2" in expect_one_line_error(capsys, future)
    mismatched = tmp_path / "mismatched.pt"
    torch.save({**state, "config": {**state["config"], "model": {**state["config"]["model"], "base_channels": 16}}},
               mismatched)
    assert "weights do not fit the model" in expect_one_line_error(capsys, mismatched)


@pytest.mark.slow
def test_bad_sample_arguments_give_one_line(trained_run: Path, tmp_path: Path, capsys) -> None:
    ckpt = trained_run / "checkpoints" / "latest.pt"
    assert "must end in .pt or .npz" in expect_one_line_error(capsys, ckpt, "--tensor", str(tmp_path / "x.txt"))
    assert "sample.n: must be >= 1" in expect_one_line_error(capsys, ckpt, "--n", "0")
    assert "sample.steps: must be <= schedule.num_timesteps" in expect_one_line_error(capsys, ckpt, "--steps", "5000")
    assert "sample.sampler: must be one of" in expect_one_line_error(capsys, ckpt, "--sampler", "euler_maruyama")
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert "cannot write" in expect_one_line_error(capsys, ckpt, "--out", str(blocked / "g.png"))


def test_unpickling_error_from_plain_pickle_is_reported(tmp_path: Path, capsys) -> None:
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    assert "error:" in expect_one_line_error(capsys, path)


@pytest.mark.slow
def test_a_format_1_checkpoint_samples_the_same_images_and_cannot_resume(trained_run: Path, tmp_path: Path,
                                                                         capsys) -> None:
    """A checkpoint written before the runtime section and the two AdamW groups (format 1)."""
    state = torch.load(trained_run / "checkpoints" / "latest.pt", weights_only=True)
    config = {key: dict(value) if isinstance(value, dict) else value for key, value in state["config"].items()}
    runtime = config.pop("runtime")
    # format 1 kept device and mixed_precision in the train section, and had no other runtime keys
    config["train"].update({key: runtime[key] for key in ("device", "mixed_precision")})
    old = tmp_path / "old.pt"
    torch.save({**state, "format_version": 1, "config": config}, old)
    new_images = sample_from_checkpoint(trained_run / "checkpoints" / "latest.pt", request=SampleRequest(n=3, steps=5),
                                        out=tmp_path / "new.png")
    old_images = sample_from_checkpoint(old, request=SampleRequest(n=3, steps=5), out=tmp_path / "old.png")
    assert digest(new_images) == digest(old_images)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copyfile(old, run / "checkpoints" / "latest.pt")
    code, _, err = run_cli(capsys, "train", "--config", trained_run / "config.yaml", "--set", f"out_dir={tmp_path}",
                           "--set", "name=run", "--set", "train.steps=30", "--resume")
    assert code == 2 and err.strip().splitlines()[-1].endswith(
        "checkpoint format 1 was written by an earlier ddpm-mnist; it samples and evaluates, but training resumes "
        "only from format 2: start a new run")


@pytest.mark.parametrize("sampler", ["ancestral", "dpmpp_2m", "ddim"])
def test_previews_use_the_configured_sampler_and_steps(sampler: str) -> None:
    from ddpm_mnist.config import load_config
    from ddpm_mnist.device import Runtime
    from ddpm_mnist.maths.unet import UNet
    from ddpm_mnist.previews import EMASamples
    from ddpm_mnist.rng import PREVIEW_NOISE

    cfg = load_config(SMOKE, [f"data.root={FIXTURE_ROOT}", f"train.preview_sampler={sampler}", "train.preview_steps=7"])
    torch.manual_seed(0)
    model = UNet(cfg.model).eval()
    for p in model.parameters():  # the zero-initialised output layer would make every sampler agree
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    samples = EMASamples(cfg)
    images = samples(model, Runtime(torch.device("cpu"), None, "float32"), PREVIEW_NOISE, 3)
    assert isinstance(samples._sampler, SAMPLERS[sampler])
    assert samples._sampler.num_steps == 7
    again = samples(model, Runtime(torch.device("cpu"), None, "float32"), PREVIEW_NOISE, 3)
    assert torch.equal(images, again)  # the same noise at every call


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--eta", "0.5"], ["--sampler", "dpmpp_2m", "--eta", "1"],
                                  ["--set", "sample.eta=0.3"]])
def test_eta_is_refused_where_the_sampler_would_ignore_it(trained_run: Path, tmp_path: Path, capsys, args) -> None:
    code, _, err = run_cli(capsys, "sample", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--steps", "4",
                           "--out", tmp_path / "x.png", *args)
    assert code == 2 and "eta is DDIM's" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(capsys, "sample", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--steps", "4",
                           "--n", "2", "--out", tmp_path / "x.png", "--sampler", "ddim", "--eta", "0.5")
    assert code == 0, err


def test_sample_help_shows_each_default(capsys, monkeypatch) -> None:
    """Rich reads "[default: ...]" as markup and drops it, which once left "Number of images ."."""
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli(capsys, "sample", "--help")
    assert code == 0
    assert "Number of images (default: sample.n, 64)" in out and "Reverse steps (default: sample.steps" in out
    assert not re.search(r"\w \.(\s|$)", out), out  # a word, a space, a full stop: a default was dropped


@pytest.mark.slow
def test_an_impossible_sample_size_is_refused_before_sampling(trained_run: Path, tmp_path: Path, capsys) -> None:
    ckpt = trained_run / "checkpoints" / "latest.pt"
    code, out, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--n", "10000000", "--batch-size", "65536",
                             "--out", tmp_path / "g.png", "--tensor", tmp_path / "all.pt")
    one_line_error(code, err, "GiB")
    assert "sampling" not in out and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_images_stream_to_their_files_batch_by_batch(trained_run: Path, tmp_path: Path, monkeypatch) -> None:
    import ddpm_mnist.sample_files as sample_files

    calls: list[tuple[int, int]] = []
    real = sample_files.save_each

    def recording(images: torch.Tensor, folder: Path, first: int) -> Path:
        calls.append((first, len(images)))
        return real(images, folder, first)

    monkeypatch.setattr(sample_files, "save_each", recording)
    sample_files.sample_from_checkpoint(trained_run / "checkpoints" / "latest.pt",
                                        request=SampleRequest(n=10, steps=2, batch_size=4),
                                        out=tmp_path / "g.png", images_dir=tmp_path / "each")
    assert calls == [(0, 4), (4, 4), (8, 2)]
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == [f"{k:06d}.png" for k in range(10)]


@pytest.mark.slow
def test_non_finite_images_stop_sampling(trained_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from ddpm_mnist.maths.unet import UNet

    real = UNet.forward
    monkeypatch.setattr(UNet, "forward", lambda self, x, t: real(self, x, t) * float("inf"))
    code, _, err = run_cli(capsys, "sample", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "3",
                           "--steps", "3", "--out", tmp_path / "g.png", "--set", "sample.clip_sample=false")
    one_line_error(code, err, "sampling produced NaN or infinite values in 3 of 3 images")
    assert not (tmp_path / "g.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("override", ["schedule.num_timesteps=10", "schedule.beta_schedule=cosine",
                                      "model.prediction_type=x0", "train.lr=1"])
def test_sample_time_set_cannot_change_the_trained_model(trained_run: Path, tmp_path: Path, capsys,
                                                           override: str) -> None:
    key = override.split("=")[0]
    for command in ("sample", "eval"):
        code, _, err = run_cli(capsys, command, "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "2",
                               "--steps", "2", "--set", override)
        one_line_error(code, err, f"{key} belongs to the trained model")


@pytest.mark.slow
def test_sample_and_runtime_keys_can_change(trained_run: Path, tmp_path: Path, capsys) -> None:
    code, out, err = run_cli(capsys, "sample", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "2",
                             "--out", tmp_path / "g.png", "--set", "sample.steps=3", "--set", "runtime.device=cpu",
                             "--set", "seed=5")
    assert code == 0, err
    assert "3 steps (leading), seed 5" in out


class FakeCompile:
    """Stands in for torch.compile: records the call, and the compiled model fails if `broken`."""

    def __init__(self, broken: bool = False) -> None:
        self.calls, self.broken = 0, broken

    def __call__(self, model: torch.nn.Module, **options: object) -> torch.nn.Module:
        self.calls += 1
        fake = self

        class Compiled(torch.nn.Module):
            def forward(self, *args: object) -> torch.Tensor:
                if fake.broken:
                    raise RuntimeError("no C++ compiler")
                return model(*args)

        return Compiled()


@pytest.mark.parametrize("setting, n, steps, device, bf16, rate, compiles", [
    ("auto", 300, 1000, "cpu", False, 800.0, True),  # 375 s eager at 800 image-steps/s: worth compiling
    ("auto", 300, 1000, "cpu", False, 900.0, False),  # 333 s: under 6 minutes
    ("auto", 64, 1000, "cpu", False, 800.0, False),  # a grid of 64: the compile would cost more than it saves
    ("auto", 1000, 1000, "cpu", True, 100.0, False),  # bf16 autocast: compiling gained nothing
    ("auto", 1000, 1000, "cuda", False, 100.0, False),  # CUDA replays CUDA graphs instead
    (False, 1000, 1000, "cpu", False, 100.0, False),
    (True, 4, 10, "cpu", False, 1e6, True),
])
def test_sample_compile_auto_compiles_only_jobs_long_enough(monkeypatch, setting: object, n: int, steps: int,
                                                              device: str, bf16: bool, rate: float,
                                                              compiles: bool) -> None:
    """Fake rates (image-steps/s of the job's batch, as the batch probe times them); no timing is measured."""
    from ddpm_mnist.device import Runtime
    from ddpm_mnist.maths.unet import UNet
    from ddpm_mnist.sample import compiled_for

    fake = FakeCompile()
    monkeypatch.setattr(torch, "compile", fake)
    cfg = load_config(SMOKE, [f"sample.compile={str(setting).lower()}", f"sample.n={n}", f"sample.steps={steps}",
                              "sample.batch_size=2"])
    model = UNet(cfg.model).eval()
    runtime = Runtime(torch.device(device), torch.bfloat16 if bf16 else None, "bf16" if bf16 else "float32")
    chosen, eager, note = compiled_for(model, cfg, runtime, rate)
    assert fake.calls == int(compiles) and (chosen is not model) == compiles
    assert ("compiled" in note) == compiles
    assert (eager is model) == (compiles and setting == "auto")  # only auto falls back, if it must
    if compiles and setting == "auto":
        why = f"about {n * steps / rate / 60:.0f} minutes eager at {rate:,.0f} image-steps/s"
        assert note == f", compiled (sample.compile: auto: {why})"


def test_sample_compile_auto_times_a_batch_given_by_hand(monkeypatch) -> None:
    """With sample.batch_size pinned, nothing was timed: auto times that batch (fake timings here) and
    decides from its rate."""
    import ddpm_mnist.sample as sample
    from ddpm_mnist.device import Runtime
    from ddpm_mnist.maths.unet import UNet

    timed: list[list[int]] = []

    def fake_rates(model, cfg, runtime, sizes, rounds):
        timed.append(list(sizes))
        return {size: 500.0 for size in sizes}

    monkeypatch.setattr(sample, "probe_rates", fake_rates)
    monkeypatch.setattr(torch, "compile", FakeCompile())
    cfg = load_config(SMOKE, ["sample.compile=auto", "sample.n=200", "sample.steps=1000", "sample.batch_size=50"])
    chosen, eager, note = sample.compiled_for(UNet(cfg.model).eval(), cfg, Runtime(torch.device("cpu"), None, "f32"))
    assert timed == [[50]] and eager is not None and "about 7 minutes eager at 500 image-steps/s" in note


def test_a_compile_that_fails_under_auto_samples_eagerly_and_says_so(monkeypatch, capsys) -> None:
    from ddpm_mnist.device import Runtime
    from ddpm_mnist.maths.unet import UNet
    from ddpm_mnist.sample import SamplingJob, compiled_for, sampler_for

    monkeypatch.setattr(torch, "compile", FakeCompile(broken=True))
    cfg = load_config(SMOKE, ["sample.n=1000", "sample.steps=300", "sample.batch_size=2", "sample.compile=auto"])
    model = UNet(cfg.model).eval()
    runtime = Runtime(torch.device("cpu"), None, "float32")
    chosen, eager, _ = compiled_for(model, cfg, runtime, 100.0)  # a fake rate: 50 minutes eager
    run = SamplingJob(cfg, 0, chosen, sampler_for(cfg, "cpu"), runtime, False, "", eager, compiled=True)
    images = torch.cat([batch for _, batch in run.batches(3, 0, 2)])
    assert run.model is model and not run.compiled and images.shape == (3, 1, 28, 28)
    assert "note: sample.compile: auto: not compiled (RuntimeError: no C++ compiler)" in capsys.readouterr().err


@pytest.mark.parametrize("value, ok", [("auto", True), ("true", True), ("false", True), ("maybe", False),
                                       ("1", False)])
def test_sample_compile_takes_true_false_or_auto(value: str, ok: bool, capsys) -> None:
    code, out, err = run_cli(capsys, "config", "--config", SMOKE, "--set", f"sample.compile={value}")
    if ok:
        assert code == 0 and f"compile: {value}" in out
    else:
        one_line_error(code, err, "sample.compile: must be true, false or auto")


@pytest.mark.parametrize("asked, n, allowed", [(0, 40, {16, 32}), (0, 5, {5}), (0, 300, {16, 32, 64, 128, 256}),
                                               (7, 40, {7})])
def test_batch_size_0_times_the_candidates_up_to_n(asked: int, n: int, allowed: set[int]) -> None:
    from ddpm_mnist.device import Runtime
    from ddpm_mnist.maths.unet import UNet
    from ddpm_mnist.sample import with_batch_size

    cfg = load_config(SMOKE, [f"sample.batch_size={asked}", f"sample.n={n}"])
    resolved, note, _ = with_batch_size(UNet(cfg.model).eval(), cfg, Runtime(torch.device("cpu"), None, "float32"))
    assert resolved.sample.batch_size in allowed and note.startswith(f"batch {resolved.sample.batch_size}")
    assert ("of the fastest of" in note) == (asked == 0 and len(allowed) > 1)


@pytest.mark.parametrize("rates, chosen", [
    ({16: 800, 32: 950, 64: 1000, 128: 1010, 256: 990}, 64),  # 32 is more than 5% slower than 128
    ({16: 1000, 32: 990, 64: 700}, 16),
    ({16: 500, 32: 600, 64: 700, 128: 800, 256: 1000}, 256),
    ({16: 910, 32: 950}, 16),  # 16 is within 5% of 32
])
def test_the_smallest_batch_within_five_percent_of_the_fastest_is_chosen(rates: dict, chosen: int) -> None:
    from ddpm_mnist.sample import pick_batch

    assert pick_batch(rates) == chosen


def test_the_batch_probe_times_the_jobs_own_loop_and_keeps_each_sizes_best_round(monkeypatch) -> None:
    """Fake timings: a size's steps cost `cost[size]` seconds per image-step, and the first timed round
    of batch 64 is slowed fourfold (a busy moment); the choice follows the best rounds."""
    import ddpm_mnist.sample as sample
    from ddpm_mnist.device import Runtime
    from ddpm_mnist.maths.unet import UNet

    cost = {16: 0.01, 32: 0.009, 64: 0.006, 128: 0.0062, 256: 0.007}  # seconds per image-step
    clock, calls = [0.0], []

    def fake_generate(model, sampler, noise, runtime, **kwargs):
        size = len(noise.generators)
        calls.append((size, sampler.num_steps))
        slowed = 4.0 if size == 64 and sum(1 for c in calls if c[0] == 64) == 2 else 1.0
        clock[0] += cost[size] * size * sampler.num_steps * slowed
        return torch.zeros(size, 1, 28, 28)

    monkeypatch.setattr(sample, "generate", fake_generate)
    monkeypatch.setattr(sample.time, "perf_counter", lambda: clock[0])
    cfg = load_config(SMOKE, ["sample.batch_size=0", "sample.n=1000", "sample.steps=200", "sample.sampler=ddim"])
    resolved, note, rate = sample.with_batch_size(UNet(cfg.model).eval(), cfg, Runtime(torch.device("cpu"), None,
                                                                                       "float32"))
    sizes = [16, 32, 64, 128, 256]
    assert calls == [(size, sample.PROBE_STEPS) for size in sizes] * 3  # an untimed round, then two in turn
    assert resolved.sample.batch_size == 64  # its slowed round is not its best
    rates = ", ".join(f"{size} {1 / cost[size]:,.0f}" for size in sizes)  # image-steps/s: PROBE_STEPS / cost
    assert note == f"batch 64 (the smallest within 5% of the fastest of {rates} image-steps/s timed here)"
    assert rate == pytest.approx(1 / cost[64])  # the chosen batch's rate, for sample.compile: auto


def test_a_compiled_run_fills_up_its_last_batch_and_keeps_the_same_images() -> None:
    """A compiled model keeps one shape: the last batch runs full, and the images past n are dropped."""
    from ddpm_mnist.device import Runtime
    from ddpm_mnist.maths.unet import UNet
    from ddpm_mnist.sample import SamplingJob, sampler_for

    cfg = load_config(SMOKE, ["sample.steps=5"])
    torch.manual_seed(0)
    model = UNet(cfg.model).eval()
    shapes: list[int] = []
    model.register_forward_pre_hook(lambda module, args: shapes.append(len(args[0])))
    runtime = Runtime(torch.device("cpu"), None, "float32")

    def images(compiled: bool) -> torch.Tensor:
        run = SamplingJob(cfg, 0, model, sampler_for(cfg, "cpu"), runtime, False, "", compiled=compiled)
        return torch.cat([batch for _, batch in run.batches(5, 0, 3)])

    eager = images(False)
    assert sorted(set(shapes)) == [2, 3]
    shapes.clear()
    filled = images(True)
    assert set(shapes) == {3} and torch.equal(filled, eager)
    shapes.clear()  # a batch larger than n: one shape, n, and no images past n
    run = SamplingJob(cfg, 0, model, sampler_for(cfg, "cpu"), runtime, False, "", compiled=True)
    assert torch.equal(torch.cat([batch for _, batch in run.batches(5, 0, 8)]), eager) and set(shapes) == {5}


def test_a_model_that_learns_its_variance_samples_with_it_and_not_without(smoke_cfg, tmp_path: Path, capsys) -> None:
    """Trained with the hybrid loss, it samples with learned_range (and the samplers that read only its
    prediction); asked for a fixed variance, it is one line and exit 2, before any work."""
    from helpers import smoke_run

    run = smoke_run(smoke_cfg, "model.learn_variance=true", "train.loss=hybrid", "sample.variance_type=learned_range",
                    "train.steps=4", "train.sample_every=0")
    ckpt = run / "checkpoints" / "latest.pt"
    for sampler in ("ancestral", "ddim", "euler"):
        code, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--sampler", sampler, "--steps", "5", "--n", "3",
                               "--out", tmp_path / f"{sampler}.png")
        assert code == 0 and (tmp_path / f"{sampler}.png").exists(), err
    code, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--steps", "5", "--n", "3", "--out", tmp_path / "x.png",
                           "--set", "sample.variance_type=fixed_small")
    one_line_error(code, err, "would ignore the variance this model learns")
    assert not (tmp_path / "x.png").exists()


def test_guidance_guides_the_prediction_and_keeps_the_conditional_variance() -> None:
    from ddpm_mnist.sample import Guided

    def model(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        conditional = (labels < 10).float().view(-1, 1, 1, 1)  # (2B, 1, 1, 1)
        return torch.cat([x + conditional, torch.full_like(x, -0.5) + conditional], dim=1)

    x = torch.zeros(2, 1, 4, 4)
    out = Guided(model, torch.tensor([3, 7]), guidance=3.0, num_classes=10)(x, torch.tensor([5, 5]))
    assert torch.equal(out[:, 0], torch.full_like(x[:, 0], 3.0))  # uncond 0 + 3 * (1 - 0)
    assert torch.equal(out[:, 1], torch.full_like(x[:, 0], 0.5))  # the conditional half's v
