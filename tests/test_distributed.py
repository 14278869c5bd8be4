"""torchrun on CPU with gloo and 2 processes: same weights everywhere, one writer, exact resume."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_ROOT, ROOT, SMOKE
from helpers import smoke_run, train_args, weights

from ddpm_mnist.checkpoint import load
from ddpm_mnist.config import Config

TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside python")


def torchrun(out_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "ddpm_mnist", "train", "--config", str(SMOKE),
           "--device", "cpu", "--set", f"data.root={FIXTURE_ROOT}", "--set", f"out_dir={out_dir}",
           "--set", "train.steps=12", "--set", "train.checkpoint_every=6", "--set", "train.sample_every=6",
           "--set", "model.dropout=0.1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_train_one_model_and_one_writes(tmp_path: Path) -> None:
    result = torchrun(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch 64 (32 x 2 processes), lr 0.001" in result.stdout
    assert result.stdout.count("run ") == 1  # rank 0 alone reports
    # the runtime check: every rank ends with the same parameters (it raises otherwise)
    assert "checked: all 2 processes hold identical weights" in result.stdout
    run_dir = tmp_path / "smoke"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "latest.pt", "step_000000006.pt", "step_000000012.pt"]
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # one event file, in the run folder
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step_000000006.png", "step_000000012.png"]
    state = load(run_dir / "checkpoints" / "latest.pt").contents
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    # each rank's noise stream is its own
    assert not torch.equal(state["rng"][0]["train"], state["rng"][1]["train"])
    # an epoch is the 1000 images split between the 2 ranks: 500 // 32 = 15 steps
    assert state["epoch"] == 12 // 15


@pytest.mark.slow
def test_resume_under_torchrun_ends_where_an_uninterrupted_run_does(tmp_path: Path) -> None:
    straight = torchrun(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    halves = tmp_path / "halves" / "smoke"
    shutil.copytree(tmp_path / "straight" / "smoke", halves)
    (halves / "checkpoints" / "step_000000012.pt").unlink()
    shutil.copyfile(halves / "checkpoints" / "step_000000006.pt", halves / "checkpoints" / "latest.pt")
    resumed = torchrun(tmp_path / "halves", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 6" in resumed.stdout
    a, b = weights(tmp_path / "straight" / "smoke"), weights(halves)
    for key in a:
        assert torch.equal(a[key], b[key]), key


TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside python")
def test_resuming_on_another_process_count_is_refused_unless_asked(smoke_cfg: Config, tmp_path: Path) -> None:
    smoke_run(smoke_cfg, "train.steps=4", "train.sample_every=0")
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "ddpm_mnist",
               *map(str, train_args(smoke_cfg.out_dir, "train.steps=6", "train.sample_every=0")), "--device", "cpu",
               "--resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    refused = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    says = ("the run was trained by 1 process(es) and this is 2: the effective batch would go from 32 to 64, "
            "an epoch from 31 to 15 steps")
    assert says in refused.stderr, refused.stderr[-2000:]
    assert load(smoke_cfg.run_dir / "checkpoints" / "latest.pt").step == 4
    allowed = subprocess.run([*command, "--change-world-size"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "note: resuming a 1-process run on 2" in allowed.stderr
    assert load(smoke_cfg.run_dir / "checkpoints" / "latest.pt").world_size == 2
