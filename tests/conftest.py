"""Shared fixtures: the repository's paths, the MNIST fixture, a tiny config, running the CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ddpm_mnist import cli
from ddpm_mnist.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_ROOT = ROOT / "tests" / "fixtures"  # holds MNIST/raw/ with 1000 train and 1000 test digits
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture
def smoke_cfg(tmp_path: Path) -> Config:
    """configs/smoke.yaml with its data root made absolute and its run folder under tmp_path."""
    return load_config(SMOKE, [f"data.root={FIXTURE_ROOT}", f"out_dir={tmp_path / 'runs'}"])


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `ddpm ARGS` in this process; return (exit code, stdout, stderr) of this run alone."""
    capsys.readouterr()  # drop what the test printed before
    try:
        cli.main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke run trained once per session (20 steps); tests must not modify its checkpoint."""
    from ddpm_mnist.previews import training_hooks
    from ddpm_mnist.train import run_training

    out = tmp_path_factory.mktemp("trained")
    cfg = load_config(SMOKE, [f"data.root={FIXTURE_ROOT}", f"out_dir={out}", "train.sample_every=0"])
    return run_training(cfg, hooks=training_hooks(cfg))


@pytest.fixture(scope="session")
def conditional_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conditional smoke run (model.num_classes: 10) trained once per session (20 steps); tests
    must not modify it."""
    from ddpm_mnist.previews import training_hooks
    from ddpm_mnist.train import run_training

    out = tmp_path_factory.mktemp("conditional")
    cfg = load_config(SMOKE, [f"data.root={FIXTURE_ROOT}", f"out_dir={out}", "train.sample_every=0",
                              "model.num_classes=10"])
    return run_training(cfg, hooks=training_hooks(cfg))


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real filesystem of a given size (tmpfs; needs root), unmounted afterwards."""
    mounted: list[Path] = []

    def make(size_kb: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}): needs root")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
