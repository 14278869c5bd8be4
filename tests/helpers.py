"""Helpers shared by the training and sampling tests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from conftest import FIXTURE_ROOT, SMOKE

from ddpm_mnist.config import Config, apply_overrides
from ddpm_mnist.previews import training_hooks
from ddpm_mnist.train import run_training


def smoke_run(cfg: Config, *overrides: str, **kwargs: object) -> Path:
    """Train configs/smoke.yaml (with overrides) with the CLI's preview and metric hooks; return the run folder."""
    cfg = apply_overrides(cfg, list(overrides))
    return run_training(cfg, hooks=training_hooks(cfg), **kwargs)


def weights(run_dir: Path, name: str = "latest.pt") -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / name, weights_only=True)
    return {**{f"model.{k}": v for k, v in state["model"].items()}, **{f"ema.{k}": v for k, v in state["ema"].items()}}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(code: int, err: str, says: str) -> str:
    """Assert exit code 2 and exactly one line on stderr (after any progress bar) that says `says`."""
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert says in lines[0], lines[0]
    return lines[0]


def step_at(sampler, model_output, t: int, x_t, noise=None):
    """One step of a sampler from timestep t, as diffusers' `scheduler.step(model_output, t, sample)`
    (the package steps by index i; a multistep sampler starts afresh at its first timestep)."""
    i = sampler.timesteps.tolist().index(int(t))
    if i == 0 or getattr(sampler, "x0_hat_last", 0) is None:
        sampler.start(x_t)
    return sampler.step(i, model_output, x_t, noise if sampler.needs_noise[i] else None)


def train_args(out_dir: Path, *sets: str) -> list[str]:
    args = ["train", "--config", SMOKE, "--set", f"data.root={FIXTURE_ROOT}", "--set", f"out_dir={out_dir}"]
    for item in sets:
        args += ["--set", item]
    return args


def fill(disk: Path) -> None:
    """Fill a filesystem to the last byte."""
    for name, block in (("filler", 65536), ("filler-tail", 1)):
        try:
            with open(disk / name, "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * block)
        except OSError:
            pass


def copy_fixture(tmp_path: Path) -> Path:
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(FIXTURE_ROOT / "MNIST" / "raw", raw)
    return raw


# torch on one thread, convolutions until the block ends (or its parent, the test process, is gone)
BURNER = """import os, sys, torch
torch.set_num_threads(1)
x, conv = torch.randn(64, 16, 28, 28), torch.nn.Conv2d(16, 16, 3, padding=1)
with torch.no_grad():
    conv(x)
    print("burning", flush=True)
    while os.getppid() == int(sys.argv[1]):
        conv(x)
"""


@contextlib.contextmanager
def cpu_burner() -> Iterator[None]:
    """A second process that keeps one core busy while the block runs: a machine that is not quiet."""
    proc = subprocess.Popen([sys.executable, "-c", BURNER, str(os.getpid())], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "burning"
        yield
    finally:
        proc.kill()
        proc.wait()
