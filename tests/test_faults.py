"""Faults: killed processes, full disks, unwritable folders, non-finite gradients, malformed input."""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_ROOT, ROOT, SMOKE, run_cli
from helpers import cpu_burner, digest, fill, one_line_error, smoke_run, train_args, weights

import ddpm_mnist.checkpoint as checkpoint_module
import ddpm_mnist.loop as loop
from ddpm_mnist.checkpoint import load
from ddpm_mnist.config import SECTIONS, Config, apply_overrides, config_from_dict
from ddpm_mnist.errors import CheckpointError, ConfigError, RunError, UserError


def train_command(out_dir: Path, *sets: str) -> list[str]:
    args = [sys.executable, "-m", "ddpm_mnist", "train", "--config", str(SMOKE), "--set", f"data.root={FIXTURE_ROOT}",
            "--set", f"out_dir={out_dir}"]
    for item in sets:
        args += ["--set", item]
    return args


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_ends_where_an_uninterrupted_run_does(smoke_cfg: Config, tmp_path) -> None:
    """Kill a training process with SIGKILL at random moments, mid-step or mid-save (it saves
    every step), check each time that latest.pt loads, resume, and compare with a straight run; all
    of it beside another process that keeps a core busy, with the default runtime.threads."""
    assert smoke_cfg.runtime.threads == 0
    with cpu_burner():
        sigkill_and_resume(smoke_cfg, tmp_path)


def sigkill_and_resume(smoke_cfg: Config, tmp_path: Path) -> None:
    sets = ["train.steps=16", "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.sample_every=0",
            "model.dropout=0.1", "train.lr_schedule=cosine"]
    straight = smoke_run(smoke_cfg, *sets, "name=straight")
    out = tmp_path / "killed"
    latest = out / "smoke" / "checkpoints" / "latest.pt"
    rng = random.Random(0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    steps_at_kill = []
    for _ in range(5):
        proc = subprocess.Popen([*train_command(out, *sets), "--resume"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # let it start (torch's import) and write one checkpoint, then kill it a random moment later
        before = latest.stat().st_mtime_ns if latest.exists() else 0
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if latest.exists() and latest.stat().st_mtime_ns != before:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = load(latest).contents  # whole, whenever the kill landed
        steps_at_kill.append(state["step"])
    assert steps_at_kill == sorted(steps_at_kill) and steps_at_kill[-1] < 16, steps_at_kill
    finish = subprocess.run([*train_command(out, *sets), "--resume"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert load(latest).step == 16
    a, b = weights(straight), weights(out / "smoke")
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_a_crash_while_writing_never_touches_the_previous_checkpoint(smoke_cfg: Config, monkeypatch) -> None:
    run_dir = smoke_run(smoke_cfg, "train.steps=10", "train.sample_every=0")
    before = digest(run_dir / "checkpoints" / "latest.pt")

    def dies_halfway(obj: object, f: object) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_halfway)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*step_000000020.pt: No space left on device"):
        smoke_run(smoke_cfg, "train.steps=20", "train.sample_every=0", resume=True)
    assert digest(run_dir / "checkpoints" / "latest.pt") == before
    assert load(run_dir / "checkpoints" / "latest.pt").step == 10
    assert not list((run_dir / "checkpoints").glob(".*"))  # no temporary files left behind


@pytest.mark.slow
def test_disk_full_from_the_cli_is_one_line(smoke_cfg: Config, monkeypatch, capsys) -> None:
    def full(obj: object, f: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full)
    code, _, err = run_cli(capsys, "train", "--config", SMOKE, "--set", f"data.root={FIXTURE_ROOT}",
                           "--set", f"out_dir={smoke_cfg.out_dir}", "--set", "train.sample_every=0")
    # the progress bar was running: the error is the last line, and one line
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: cannot write checkpoint") and "No space left on device" in last


@pytest.mark.slow
def test_unwritable_output_folder_is_reported(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "train", "--config", SMOKE, "--set", f"data.root={FIXTURE_ROOT}",
                           "--set", f"out_dir={blocker}")
    assert code == 2 and f"cannot write the run folder {blocker / 'smoke'}" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_corrupt_latest_checkpoint_on_resume_is_one_line(smoke_cfg: Config, capsys) -> None:
    run_dir = smoke_run(smoke_cfg, "train.steps=2", "train.sample_every=0")
    (run_dir / "checkpoints" / "latest.pt").write_bytes(b"\x00" * 100)
    code, _, err = run_cli(capsys, "train", "--config", SMOKE, "--set", f"data.root={FIXTURE_ROOT}",
                           "--set", f"out_dir={smoke_cfg.out_dir}", "--resume")
    assert code == 2 and "not a readable checkpoint" in err and len(err.strip().splitlines()) == 1


class NanGradient(torch.autograd.Function):
    """Identity forward, nan gradient backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad * torch.nan


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_gradient_with_a_finite_loss(smoke_cfg: Config, monkeypatch, policy: str) -> None:
    real = loop.training_losses
    calls = {"n": 0}

    def poisoned(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        out = real(*args, **kwargs)
        return NanGradient.apply(out) if calls["n"] == 13 else out

    monkeypatch.setattr(loop, "training_losses", poisoned)
    if policy == "stop":
        with pytest.raises(RunError, match="between steps 11 and 15"):
            smoke_run(smoke_cfg)
        state = load(smoke_cfg.run_dir / "checkpoints" / "latest.pt").contents
        assert state["step"] == 10
    else:
        run_dir = smoke_run(smoke_cfg, "train.nan_policy=skip")
        state = load(run_dir / "checkpoints" / "latest.pt").contents
        assert state["step"] == 20 and state["ema_num_averaged"] == 19
    for part in ("model", "ema"):
        assert all(torch.isfinite(v).all() for v in state[part].values()), part


# --- fuzzing the config and the arguments ---------------------------------------------------------

BAD_VALUES = ["text", -1, -(10**30), 10**30, 1.5, True, None, [], {}, [1, "x"], float("inf"), ""]


def malformed_configs() -> list[tuple[str, object]]:
    """(description, parsed YAML) pairs: every key with every odd value, and broken structure."""
    cases: list[tuple[str, object]] = [
        ("empty", None), ("a list", [1, 2]), ("a string", "train"), ("a number", 3),
        ("null section", {"train": None}), ("list section", {"train": [1]}), ("unknown section", {"trian": {}}),
        ("unknown key", {"train": {"lr_rate": 1}}), ("non-string key", {1: 2}),
        ("nested too deep", {"train": {"lr": {"a": 1}}}),
    ]
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            cases += [(f"{section}.{f.name}={bad!r}", {section: {f.name: bad}}) for bad in BAD_VALUES]
    for key in ("name", "out_dir", "seed"):
        cases += [(f"{key}={bad!r}", {key: bad}) for bad in BAD_VALUES]
    return cases


def test_fuzzed_configs_fail_with_one_line_naming_the_key() -> None:
    cases = malformed_configs()
    rejected = 0
    for description, raw in cases:
        try:
            config_from_dict(raw, "fuzz.yaml")
        except ConfigError as exc:  # anything else (a TypeError, a traceback) fails the test
            rejected += 1
            message = str(exc)
            assert message.startswith("fuzz.yaml:") and "\n" not in message, (description, message)
            if "=" in description:
                key = description.split("=")[0].split(".")[-1]
                assert key in message, (description, message)
    # some odd values are fine for some keys (1.5 for grad_clip, "text" for name); most are not
    assert rejected > 0.85 * len(cases), f"{rejected} of {len(cases)} rejected"


def test_fuzzed_yaml_files_through_the_cli(tmp_path: Path, capsys) -> None:
    texts = ["", "\x00\x01\x02", "train: [", ":", "- a\n- b", "train:\n  lr: 1e999\n", "train:\n  steps: -5\n",
             "model:\n  channel_mult: [0]\n", "model:\n  base_channels: 99999999999999999999\n",
             "data: {limit: -3}\n", "sample: {n: 0}\n", "schedule: {num_timesteps: 1.0e9}\n", "name: ''\n",
             "seed: -1\n", "train: {device: tpu}\n", "train: {batch_size: 0}\n", "*x", "!!python/object:os.system {}"]
    for i, text in enumerate(texts):
        path = tmp_path / f"c{i}.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        code, out, err = run_cli(capsys, "config", "--config", path)
        assert code == 2, (text, out, err)
        assert err.startswith(f"error: {path}") and len(err.strip().splitlines()) == 1, (text, err)


# where CUDA exists, cuda:99 is a GPU that does not
NO_SUCH_GPU = "CUDA device(s)" if torch.cuda.is_available() else "CUDA is not available"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["train"], "Missing option '--config'"),
        (["train", "--config", "missing.yaml"], "config file not found"),
        (["train", "--config", SMOKE, "--set", "train.lr"], "expected key=value"),
        (["train", "--config", SMOKE, "--set", "train.lr=-1"], "train.lr: must be > 0"),
        (["train", "--config", SMOKE, "--device", "tpu"], "unknown device"),
        (["train", "--config", SMOKE, "--device", "cuda:99"], NO_SUCH_GPU),
        (["train", "--config", SMOKE, "--resume", "--overwrite"], "contradict"),
        (["sample", "--ckpt", "x.pt", "--n", "many"], "Invalid value for '--n'"),
        (["sample", "--ckpt", "x.pt", "--steps", "-3"], "no such checkpoint"),
        (["sample"], "Missing option '--ckpt'"),
        (["eval", "--ckpt", "x.pt", "--samples", "y.pt"], "give one of --ckpt"),
        (["schedule", "--schedule", "quadratic"], "must be one of linear"),
        (["nonsense"], "No such command"),
    ],
)
def test_malformed_arguments_fail_with_one_line(args: list[str], expected: str, capsys) -> None:
    code, _, err = run_cli(capsys, *args)
    assert code == 2, err
    assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_user_errors_are_all_one_line() -> None:
    assert issubclass(ConfigError, UserError) and issubclass(CheckpointError, UserError)
    with pytest.raises(ConfigError):
        apply_overrides(Config(), ["train.steps=x"])


@pytest.mark.slow
def test_training_onto_a_full_disk_keeps_the_last_checkpoint(small_disk, capsys) -> None:
    disk = small_disk(1500)  # room for one smoke checkpoint (0.9 MB), not two
    args = train_args(disk, "train.sample_every=0", "train.keep_checkpoints=1")
    code, _, err = run_cli(capsys, *args)
    line = one_line_error(code, err, "cannot write checkpoint")
    assert "No space left on device" in line
    checkpoints = disk / "smoke" / "checkpoints"
    assert load(checkpoints / "latest.pt").step == 10
    assert [p.name for p in checkpoints.iterdir() if p.name.startswith(".")] == []
    fill(disk)
    code, _, err = run_cli(capsys, *args, "--resume")  # the event file cannot even be opened now
    one_line_error(code, err, "No space left on device")
    assert load(checkpoints / "latest.pt").step == 10


@pytest.mark.slow
def test_outputs_on_a_full_disk_leave_older_files_whole(trained_run: Path, small_disk, capsys) -> None:
    disk = small_disk(64)
    old_csv, old_png = disk / "s.csv", disk / "s.png"
    old_csv.write_text("an older schedule\n")
    old_png.write_bytes(b"an older plot")
    (disk / "each").mkdir()
    fill(disk)
    code, _, err = run_cli(capsys, "schedule", "--csv", old_csv)
    one_line_error(code, err, f"cannot write {old_csv}")
    code, _, err = run_cli(capsys, "schedule", "--plot", old_png)
    one_line_error(code, err, f"cannot write {old_png}")
    assert old_csv.read_text() == "an older schedule\n" and old_png.read_bytes() == b"an older plot"
    ckpt = trained_run / "checkpoints" / "latest.pt"
    for extra in (["--images-dir", disk / "each"], ["--tensor", disk / "t.pt"]):
        code, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--n", "2", "--steps", "2", "--out",
                               trained_run.parent / "grid.png", *extra)
        one_line_error(code, err, "cannot write")
    code, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--n", "2", "--steps", "2", "--out", disk / "g.png")
    one_line_error(code, err, f"cannot write {disk / 'g.png'}")
    leftovers = [p.name for p in disk.rglob("*") if p.name not in ("s.csv", "s.png", "each", "filler", "filler-tail")]
    assert leftovers == []  # no 0-byte PNG, no .tmp


def test_a_killed_writer_leaves_no_partial_png(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    from ddpm_mnist.images import save_each

    def dies_halfway(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        Path(fp).write_bytes(b"\x89PNG half")  # type: ignore[arg-type]
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(Image.Image, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_each(torch.zeros(3, 1, 28, 28, dtype=torch.uint8), tmp_path)
    assert list(tmp_path.iterdir()) == []
