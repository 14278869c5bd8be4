"""cli.main and the commands: a requested stop exits 130 (Ctrl-C) or 143 (SIGTERM), with one line
on what was kept, and never exits 0 or with a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FIXTURE_ROOT, ROOT, SMOKE, run_cli

pytestmark = pytest.mark.slow


def stopped_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err[-2000:]
    return lines[-1].split("\r")[-1].strip()


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum, code, name", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_signal_during_sampling_exits_with_its_code_and_says_what_was_kept(trained_run: Path, tmp_path: Path,
                                                                            signum: int, code: int, name: str) -> None:
    cmd = [sys.executable, "-m", "ddpm_mnist", "sample", "--ckpt", str(trained_run / "checkpoints" / "latest.pt"),
           "--n", "64", "--steps", "1000", "--batch-size", "8", "--out", str(tmp_path / "g.png"),
           "--images-dir", str(tmp_path / "each")]
    # a terminal's Ctrl-C reaches a foreground process: SIGINT at its default, even where this test
    # runs as a background job (which a shell starts with SIGINT ignored, and the child would inherit)
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            preexec_fn=default_sigint,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("sampling 64 images")  # the loop has begun
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "each").glob("*.png")) and proc.poll() is None:
        time.sleep(0.1)  # the first batch is written
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    line = stopped_line(err)
    assert line.startswith(f"stopped by {name}: the first ") and f"images are in {tmp_path / 'each'}" in line
    assert line.endswith(f"{tmp_path / 'g.png'} was not written") and not (tmp_path / "g.png").exists()


def test_ctrl_c_during_eval_exits_130(trained_run: Path, monkeypatch, capsys) -> None:
    from ddpm_mnist.sample import SamplingJob

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(SamplingJob, "images", interrupted)
    code, _, err = run_cli(capsys, "eval", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "4",
                           "--steps", "2", "--data", FIXTURE_ROOT)
    assert code == 130 and stopped_line(err) == "stopped by Ctrl-C: nothing was written by this command"


def test_ctrl_c_before_the_first_step_exits_130(tmp_path: Path, monkeypatch, capsys) -> None:
    import ddpm_mnist.loop as loop

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "setup_training", interrupted)
    code, _, err = run_cli(capsys, "train", "--config", SMOKE, "--set", f"data.root={FIXTURE_ROOT}",
                           "--set", f"out_dir={tmp_path}")
    assert code == 130 and stopped_line(err) == "stopped by Ctrl-C: no checkpoint was written"


def test_a_second_ctrl_c_within_a_step_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    import ddpm_mnist.loop as loop

    real = loop.train_step

    def second_ctrl_c(state, *args: object):
        if state.step == 7:
            raise KeyboardInterrupt  # what StopFlag raises on a second Ctrl-C
        return real(state, *args)
    monkeypatch.setattr(loop, "train_step", second_ctrl_c)
    code, _, err = run_cli(capsys, "train", "--config", SMOKE, "--set", f"data.root={FIXTURE_ROOT}",
                           "--set", f"out_dir={tmp_path}", "--set", "train.checkpoint_every=5",
                           "--set", "train.sample_every=0")
    latest = tmp_path / "smoke" / "checkpoints" / "latest.pt"
    assert code == 130
    assert stopped_line(err) == (f"stopped by Ctrl-C: the run's last checkpoint, {latest}, is kept; "
                                 "continue with --resume")


def test_sigterm_during_training_saves_and_exits_143(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "ddpm_mnist", "train", "--config", str(SMOKE), "--set", f"data.root={FIXTURE_ROOT}",
           "--set", f"out_dir={tmp_path}", "--set", "train.steps=100000", "--set", "train.sample_every=0",
           "--set", "train.checkpoint_every=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "smoke").glob("events*")):
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    line = stopped_line(err)
    assert line.startswith(f"stopped by SIGTERM: saved {tmp_path / 'smoke' / 'checkpoints' / 'latest.pt'} at step ")
