"""Training: a smoke run's outputs, exact resume, non-finite losses, run-folder safety, schedules."""

from __future__ import annotations

import copy
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_ROOT, ROOT, SMOKE, run_cli
from helpers import digest, smoke_run, weights
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ddpm_mnist.loop as loop
import ddpm_mnist.train as train_module
from ddpm_mnist.checkpoint import FORMAT, FORMAT_VERSION, load
from ddpm_mnist.config import Config, apply_overrides, config_from_dict
from ddpm_mnist.device import setup_runtime
from ddpm_mnist.errors import RunError
from ddpm_mnist.maths.unet import parameter_groups
from ddpm_mnist.trainstate import (
    build_train_state,
    ema_avg_fn,
    ema_decay_at,
    lr_factor,
    setup_training,
)


@pytest.mark.slow
def test_smoke_run_writes_a_complete_checkpoint_and_logs(smoke_cfg: Config) -> None:
    run_dir = smoke_run(smoke_cfg)
    assert run_dir == smoke_cfg.run_dir
    resolved = apply_overrides(smoke_cfg, ["train.channels_last=false"])  # auto, as the run chose it
    assert config_from_dict(
        __import__("yaml").safe_load((run_dir / "config.yaml").read_text()), "config.yaml"
    ) == resolved
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["latest.pt", "step_000000010.pt", "step_000000020.pt"]
    state = load(run_dir / "checkpoints" / "latest.pt").contents  # weights_only=True
    assert state["format"] == FORMAT and state["format_version"] == FORMAT_VERSION
    assert state["step"] == 20 and state["epoch"] == 20 // (1000 // 32)
    assert config_from_dict(state["config"], "ckpt") == resolved
    for key in ("model", "ema", "optimizer", "lr_scheduler", "rng", "ema_num_averaged"):
        assert key in state
    assert state["ema_num_averaged"] == 20
    assert state["optimizer"]["state"] and state["lr_scheduler"]["last_epoch"] == 20
    assert len(state["rng"]) == 1 and set(state["rng"][0]) == {"torch", "cuda", "train"}  # one per process
    # latest.pt is the last numbered checkpoint
    assert digest(run_dir / "checkpoints" / "latest.pt") == digest(run_dir / "checkpoints" / "step_000000020.pt")
    # the EMA differs from the raw weights (it averages them)
    assert any(not torch.equal(state["model"][k], state["ema"][k]) for k in state["model"])

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/images_per_s", "train/ema_decay",
                "train/loss_t_quarter1", "train/loss_t_quarter4"):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20]
    assert "train_samples/ema" in events.Tags()["images"] and "train_setup/schedule" in events.Tags()["images"]
    assert [e.step for e in events.Images("train_samples/ema")] == [10, 20]
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_000000010.png", "step_000000020.png"]
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses[-1] < losses[0]  # it learns, even in 20 steps


RECIPE = ["model.time_conditioning=scale_shift", "model.patch_size=2", "train.timestep_sampling=stratified",
          "train.adam_beta2=0.99"]  # every option a recipe may turn on
HYBRID = ["model.learn_variance=true", "train.loss=hybrid", "sample.variance_type=learned_range",
          "train.min_snr_gamma=5"]  # a learned variance and the loss that trains it


@pytest.mark.slow
@pytest.mark.parametrize("options", [[], RECIPE, HYBRID], ids=["defaults", "recipe-options", "hybrid-loss"])
def test_resume_gives_the_weights_of_an_uninterrupted_run(smoke_cfg: Config, options: list[str]) -> None:
    # dropout and the cosine lr make every source of state matter: RNG, optimiser, scheduler, EMA
    sets = ["train.lr_schedule=cosine", "model.dropout=0.1", "train.checkpoint_every=8", "train.sample_every=0",
            "train.steps=16", *options]
    straight = smoke_run(smoke_cfg, *sets, "name=straight")
    # a run stopped right after its step-8 checkpoint: the same folder as it was then
    halves = smoke_cfg.run_dir.parent / "halves"
    shutil.copytree(straight, halves)
    checkpoints = halves / "checkpoints"
    (checkpoints / "step_000000016.pt").unlink()
    shutil.copyfile(checkpoints / "step_000000008.pt", checkpoints / "latest.pt")
    smoke_run(smoke_cfg, *sets, "name=halves", resume=True)
    assert load(checkpoints / "latest.pt").step == 16
    a, b = weights(straight), weights(halves)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_resume_applies_the_optimiser_settings_it_is_given_and_says_so(smoke_cfg: Config, capsys) -> None:
    """The optimiser's saved state once brought the old lr and betas back while the log said the new ones."""
    sets = ["train.sample_every=0", "train.lr_schedule=constant", "train.warmup_steps=0"]
    run = smoke_run(smoke_cfg, *sets, "train.steps=4")
    capsys.readouterr()
    smoke_run(smoke_cfg, *sets, "train.steps=6", "train.lr=0.0001", "train.adam_beta2=0.9",
              "train.weight_decay=0.01", resume=True)
    err = capsys.readouterr().err
    assert ("note: --resume applies train.lr 0.0001 (the run had 0.001), train.adam_beta2 0.9 (the run had 0.999), "
            "train.weight_decay 0.01 (the run had 0)") in err
    state = load(run / "checkpoints" / "latest.pt").contents
    decay, no_decay = state["optimizer"]["param_groups"]
    assert decay["lr"] == no_decay["lr"] == 0.0001 and decay["betas"] == no_decay["betas"] == (0.9, 0.9)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert state["lr_scheduler"]["base_lrs"] == [0.0001, 0.0001]


@pytest.mark.slow
def test_a_checkpoint_from_before_the_recipe_options_resumes_as_it_was_trained(smoke_cfg: Config) -> None:
    """A checkpoint (and config.yaml) without model.time_conditioning, model.patch_size,
    model.learn_variance, train.timestep_sampling, train.adam_beta2, train.vlb_weight and
    train.channels_last resumes with what they were before they existed (contiguous memory, for the last)."""
    sets = ["train.checkpoint_every=4", "train.sample_every=0", "train.steps=8"]
    straight = smoke_run(smoke_cfg, *sets, "name=straight")
    old = smoke_cfg.run_dir.parent / "old"
    shutil.copytree(straight, old)
    checkpoints = old / "checkpoints"
    (checkpoints / "step_000000008.pt").unlink()
    state = torch.load(checkpoints / "step_000000004.pt", weights_only=True)
    for section, key in (("model", "time_conditioning"), ("model", "patch_size"), ("train", "timestep_sampling"),
                         ("train", "adam_beta2"), ("model", "learn_variance"), ("train", "vlb_weight"),
                         ("train", "channels_last")):
        del state["config"][section][key]
    torch.save(state, checkpoints / "latest.pt")
    text = (old / "config.yaml").read_text()
    for key in ("time_conditioning", "patch_size", "timestep_sampling", "adam_beta2", "learn_variance", "vlb_weight",
                "channels_last"):
        text = "".join(line for line in text.splitlines(keepends=True) if not line.strip().startswith(f"{key}:"))
    (old / "config.yaml").write_text(text)
    smoke_run(smoke_cfg, *sets, "name=old", resume=True)
    a, b = weights(straight), weights(old)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_channels_last_auto_follows_the_timings_records_the_choice_and_resume_keeps_it(
        smoke_cfg: Config, monkeypatch, capsys) -> None:
    """Fake timings decide train.channels_last: auto. The run then trains exactly as with the layout
    set by hand (the timing touches no generator of the run), config.yaml and the checkpoints record
    the choice, the opening line says it and why, and --resume keeps it without timing again."""
    faster = {"layout": True}
    timed: list[bool] = []

    def fake_seconds(states, schedule, batches, cfg, runtime, channels_last: bool) -> float:
        timed.append(channels_last)
        return 1.0 if channels_last == faster["layout"] else 2.0

    monkeypatch.setattr(loop, "layout_seconds", fake_seconds)
    sets = ["runtime.deterministic=false", "train.sample_every=0", "train.checkpoint_every=4", "train.steps=8",
            "model.dropout=0.1"]
    for layout in (True, False):
        faster["layout"] = layout
        capsys.readouterr()
        auto = smoke_run(smoke_cfg, *sets, f"name=auto_{layout}")
        opening = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("run "))
        said = "channels_last memory" if layout else "contiguous memory"
        assert f"{said} (train.channels_last: auto; " in opening and "timed here" in opening
        by_hand = smoke_run(smoke_cfg, *sets, f"train.channels_last={str(layout).lower()}", f"name=hand_{layout}")
        a, b = weights(auto), weights(by_hand)
        assert all(torch.equal(a[key], b[key]) for key in a)
        assert load(auto / "checkpoints" / "latest.pt").config.train.channels_last is layout
        assert f"channels_last: {str(layout).lower()}" in (auto / "config.yaml").read_text()
    assert len(timed) == 12  # two runs, three rounds of the two layouts each
    # resumed from step 4 while the timings now favour contiguous: the run keeps channels_last
    resumed = smoke_cfg.run_dir.parent / "auto_resumed"
    shutil.copytree(smoke_cfg.run_dir.parent / "auto_True", resumed)
    (resumed / "checkpoints" / "step_000000008.pt").unlink()
    shutil.copyfile(resumed / "checkpoints" / "step_000000004.pt", resumed / "checkpoints" / "latest.pt")
    timed.clear()
    smoke_run(smoke_cfg, *sets, "name=auto_resumed", resume=True)
    assert not timed
    a, b = weights(smoke_cfg.run_dir.parent / "auto_True"), weights(resumed)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_channels_last_auto_is_not_timed_under_runtime_deterministic(smoke_cfg: Config, monkeypatch, capsys) -> None:
    def refuse(*args, **kwargs) -> float:
        raise AssertionError("timed under runtime.deterministic")

    monkeypatch.setattr(loop, "layout_seconds", refuse)
    capsys.readouterr()
    run = smoke_run(smoke_cfg, "train.sample_every=0", "train.steps=2")
    assert "contiguous memory (train.channels_last: auto; not timed under runtime.deterministic)" in \
        capsys.readouterr().out
    assert load(run / "checkpoints" / "latest.pt").config.train.channels_last is False


@pytest.mark.slow
def test_resume_refuses_a_damaged_training_state_in_one_line(smoke_cfg: Config, capsys) -> None:
    run_dir = smoke_run(smoke_cfg, "train.steps=10", "train.sample_every=0")
    latest = run_dir / "checkpoints" / "latest.pt"
    state = torch.load(latest, weights_only=True)
    state["rng"] = state["rng"][0]  # one process's dict where the list of them belongs
    torch.save(state, latest)
    config = run_dir / "config.yaml"
    code, _, err = run_cli(capsys, "train", "--config", config, "--set", "train.steps=12", "--resume")
    assert code == 2
    assert err.strip().splitlines() == [f"error: {latest}: rng: must be a list of one state per process; "
                                        "delete it to resume from the newest numbered checkpoint"]


@pytest.mark.slow
def test_a_run_folder_is_not_overwritten_by_accident(smoke_cfg: Config) -> None:
    run_dir = smoke_run(smoke_cfg, "train.steps=2", "train.sample_every=0")
    before = digest(run_dir / "checkpoints" / "latest.pt")
    with pytest.raises(RunError, match="already holds a run: add --resume .* --overwrite"):
        smoke_run(smoke_cfg, "train.steps=2")
    assert digest(run_dir / "checkpoints" / "latest.pt") == before
    with pytest.raises(RunError, match="the config's model differs"):
        smoke_run(smoke_cfg, "train.steps=4", "model.base_channels=16", resume=True)
    smoke_run(smoke_cfg, "train.steps=3", "train.sample_every=0", overwrite=True)
    assert load(run_dir / "checkpoints" / "latest.pt").step == 3
    assert not (run_dir / "checkpoints" / "step_000000002.pt").exists()


@pytest.mark.slow
def test_cli_refuses_an_existing_run_with_exit_code_2(smoke_cfg: Config, capsys) -> None:
    args = ["train", "--config", SMOKE, "--set", f"data.root={FIXTURE_ROOT}", "--set", f"out_dir={smoke_cfg.out_dir}",
            "--set", "train.steps=2"]
    assert run_cli(capsys, *args)[0] == 0
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "already holds a run" in err and len(err.strip().splitlines()) == 1


def nan_after(calls: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the training loss non-finite from call `calls` on (the model's math is untouched)."""
    real = loop.training_losses
    count = {"n": 0}

    def losses(*args: object, **kwargs: object) -> torch.Tensor:
        count["n"] += 1
        out = real(*args, **kwargs)
        return out * math.nan if count["n"] > calls else out

    monkeypatch.setattr(loop, "training_losses", losses)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(smoke_cfg: Config, monkeypatch) -> None:
    nan_after(12, monkeypatch)
    with pytest.raises(RunError, match=r"diverged: non-finite loss or gradient between steps 11 and 15"):
        smoke_run(smoke_cfg)
    run_dir = smoke_cfg.run_dir
    state = load(run_dir / "checkpoints" / "latest.pt").contents
    assert state["step"] == 10
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (run_dir / "checkpoints" / "step_000000020.pt").exists()


@pytest.mark.slow
def test_nan_policy_skip_skips_the_step(smoke_cfg: Config, monkeypatch) -> None:
    real = loop.training_losses
    count = {"n": 0}

    def one_bad_step(*args: object, **kwargs: object) -> torch.Tensor:
        count["n"] += 1
        out = real(*args, **kwargs)
        return out * math.inf if count["n"] == 7 else out

    monkeypatch.setattr(loop, "training_losses", one_bad_step)
    run_dir = smoke_run(smoke_cfg, "train.nan_policy=skip")
    state = load(run_dir / "checkpoints" / "latest.pt").contents
    assert state["step"] == 20 and state["ema_num_averaged"] == 19  # one update skipped
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [e.value for e in events.Scalars("train/skipped_steps")][-1] == 1
    assert all(math.isfinite(e.value) for e in events.Scalars("train/loss"))


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "ddpm_mnist", "train", "--config", str(SMOKE), "--set", f"data.root={FIXTURE_ROOT}",
           "--set", f"out_dir={tmp_path}", "--set", "train.steps=100000", "--set", "train.sample_every=0",
           "--set", "train.checkpoint_every=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "smoke").glob("events*")):
        time.sleep(0.2)
    time.sleep(2)  # some steps in
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "continue with --resume" in err.strip().splitlines()[-1]
    state = load(tmp_path / "smoke" / "checkpoints" / "latest.pt").contents
    assert 0 < state["step"] < 100000


def test_lr_warmup_then_cosine_to_the_floor() -> None:
    factors = [lr_factor(s, warmup=4, total=14, kind="cosine", min_ratio=0.1) for s in range(14)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:], strict=False))
    assert lr_factor(100, warmup=4, total=14, kind="constant", min_ratio=0.1) == 1.0


def test_ema_decay_warms_up_to_the_configured_value() -> None:
    assert ema_decay_at(1, 0.9999, True) == pytest.approx(2 / 11)
    assert ema_decay_at(10**6, 0.9999, True) == 0.9999
    assert ema_decay_at(1, 0.9999, False) == 0.9999


def test_ema_update_is_the_lerp_of_the_formula() -> None:
    from torch.optim.swa_utils import AveragedModel

    model = torch.nn.Linear(2, 2)
    ema = AveragedModel(model, multi_avg_fn=ema_avg_fn(0.9, warmup=True), use_buffers=True)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)  # first update copies
    assert torch.equal(ema.module.weight, model.weight)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update_parameters(model)  # n = 1: decay = min(0.9, 2/11)
    d = 2 / 11
    torch.testing.assert_close(ema.module.weight, d * (start + 1) + (1 - d) * (start + 2))


def test_the_fused_optimiser_step_is_adamw(smoke_cfg: Config) -> None:
    """The trainer's fused AdamW (one kernel on CPU and CUDA) moves the weights as the
    per-parameter reference AdamW does, given the same (clipped) gradients."""
    cfg = apply_overrides(smoke_cfg, ["train.weight_decay=0.01", "train.warmup_steps=0", "train.adam_beta2=0.99"])
    runtime = setup_runtime(cfg.runtime, "cpu")
    batches, schedule, _, state = setup_training(cfg, runtime)
    assert state.optimizer.defaults["fused"] is True and state.optimizer.defaults["betas"] == (0.9, 0.99)
    for _ in range(3):  # past the zero-initialised output layer, so that every weight has a gradient
        loop.train_step(state, state.model, schedule, batches, cfg, runtime)
    reference_model = copy.deepcopy(state.model)
    reference = torch.optim.AdamW(parameter_groups(reference_model, 0.01), foreach=False, fused=False)
    reference.load_state_dict(copy.deepcopy(state.optimizer.state_dict()))  # moments, step, lr, betas, decay
    for group in reference.param_groups:
        group["fused"] = False  # the saved groups would make it fused again
    loop.train_step(state, state.model, schedule, batches, cfg, runtime)
    for p, ref in zip(state.model.parameters(), reference_model.parameters(), strict=True):
        ref.grad = p.grad.clone()
    before = [ref.detach().clone() for ref in reference_model.parameters()]
    reference.step()
    for p, ref in zip(state.model.parameters(), reference_model.parameters(), strict=True):
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-7)
    assert all(not torch.equal(ref, b) for ref, b in zip(reference_model.parameters(), before, strict=True))


def test_weight_decay_applies_to_weights_only(smoke_cfg: Config) -> None:
    """As nanoGPT's configure_optimizers: matrices and convolution kernels decay, biases and norms do not."""
    cfg = apply_overrides(smoke_cfg, ["train.weight_decay=0.05"])
    state = build_train_state(cfg, setup_runtime(cfg.runtime, "cpu"), 0, cfg.train.steps)
    names = {id(p): name for name, p in state.model.named_parameters()}
    decayed = {names[id(p)] for g in state.optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    plain = {names[id(p)] for g in state.optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed | plain == set(names.values()) and not decayed & plain
    assert "input_conv.weight" in decayed and "time_mlp.0.weight" in decayed
    assert "input_conv.bias" in plain and "out_norm.weight" in plain and "out_norm.bias" in plain


@pytest.mark.slow
def test_epochs_set_the_length(smoke_cfg: Config) -> None:
    cfg = apply_overrides(smoke_cfg, ["train.steps=0", "train.epochs=1", "data.limit=128", "train.sample_every=0"])
    run_dir = train_module.run_training(cfg)  # no hooks: no previews, and nothing else missing
    assert load(run_dir / "checkpoints" / "latest.pt").step == 128 // 32
    assert not (run_dir / "samples").exists()


@pytest.mark.slow
def test_periodic_evaluation_is_logged(smoke_cfg: Config) -> None:
    run_dir = smoke_run(smoke_cfg, "train.eval_every=10", "train.eval_n=8", "train.sample_every=0")
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    for key in ("fid_mnist", "inception_score", "confidence", "class_kl"):
        assert [e.step for e in events.Scalars(f"eval/{key}")] == [10, 20], key
    assert all(e.value > 0 for e in events.Scalars("eval/fid_mnist"))


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the switches runtime.deterministic sets")
def test_deterministic_runtime_switches_cuda_to_deterministic_kernels() -> None:
    """Without these, two CUDA runs (and so a run and its resumed copy) differ in the last bits:
    found on an H100, where the bit-exact resume tests failed with cuDNN's autotuner on."""
    from ddpm_mnist.config import RuntimeConfig

    try:
        setup_runtime(RuntimeConfig(device="cuda", deterministic=False))
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        setup_runtime(RuntimeConfig(device="cuda", deterministic=True))
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


@pytest.mark.slow
def test_tensorboard_scalars_are_curves_and_single_values_are_text_or_hparams(trained_run: Path) -> None:
    """TensorBoard's Time Series lists groups by name and opens the first: a one-point `hparam/` or
    `model/` card, or the image groups `samples` and `schedule`, sorted above the training curves."""
    events = EventAccumulator(str(trained_run))
    events.Reload()
    tags = events.Tags()
    assert tags["scalars"] and all(tag.startswith(("train/", "eval/")) for tag in tags["scalars"]), tags["scalars"]
    assert all(len(events.Scalars(tag)) > 1 for tag in tags["scalars"])  # curves, not single points
    assert {"config", "model"} <= {tag.split("/")[0] for tag in tags["tensors"]}  # the texts
    groups = sorted({tag.split("/")[0] for kind in ("scalars", "images") for tag in tags[kind]})
    assert groups[0] == "train", groups  # the first group the page shows, open
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.SummaryMetadata("_hparams_/experiment").plugin_data.content
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["train/loss"]
