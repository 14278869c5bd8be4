"""runfolder: one writer per run folder, and what --resume finds in it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, run_cli
from helpers import digest, one_line_error, smoke_run, train_args, weights

from ddpm_mnist.checkpoint import load_checkpoint
from ddpm_mnist.config import Config
from ddpm_mnist.errors import RunError
from ddpm_mnist.runfolder import RunFolder


@pytest.mark.slow
def test_resume_without_latest_continues_from_the_newest_numbered_checkpoint(smoke_cfg: Config, capsys) -> None:
    sets = ["train.checkpoint_every=5", "train.keep_checkpoints=5", "train.sample_every=0", "model.dropout=0.1"]
    straight = smoke_run(smoke_cfg, *sets, "name=straight")
    broken = smoke_cfg.run_dir.parent / "broken"
    shutil.copytree(straight, broken)
    checkpoints = broken / "checkpoints"
    for name in ("latest.pt", "step_000000020.pt"):
        (checkpoints / name).unlink()
    (checkpoints / "step_000000015.pt").write_bytes(b"torn")  # the newest numbered one does not load
    step10 = digest(checkpoints / "step_000000010.pt")
    capsys.readouterr()
    smoke_run(smoke_cfg, *sets, "name=broken", resume=True)
    out = capsys.readouterr().out
    assert "resuming from step_000000010.pt, the newest checkpoint that loads (1 newer one(s) do not load)" in out
    assert digest(checkpoints / "step_000000010.pt") == step10  # not overwritten by a fresh run
    a, b = weights(straight), weights(broken)
    assert all(torch.equal(a[key], b[key]) for key in a)  # the run continued, bit for bit


@pytest.mark.slow
def test_resume_refuses_when_no_checkpoint_loads(smoke_cfg: Config) -> None:
    run_dir = smoke_run(smoke_cfg, "train.steps=10", "train.checkpoint_every=5", "train.sample_every=0")
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "latest.pt").unlink()
    for path in checkpoints.glob("step_*.pt"):
        path.write_bytes(b"\0" * 10)
    before = sorted(p.name for p in checkpoints.iterdir())
    with pytest.raises(Exception, match=r"no checkpoint in .* loads; the newest says"):
        smoke_run(smoke_cfg, "train.steps=10", "train.checkpoint_every=5", resume=True)
    assert sorted(p.name for p in checkpoints.iterdir()) == before


@pytest.mark.slow
def test_a_second_writer_is_refused_with_the_pid_of_the_first(smoke_cfg: Config, capsys) -> None:
    run_dir = smoke_run(smoke_cfg, "train.steps=5", "train.sample_every=0")
    before = {p.name: digest(p) for p in (run_dir / "checkpoints").iterdir()}
    with RunFolder(run_dir):  # another `ddpm train` of this run, still going
        code, _, err = run_cli(capsys, *train_args(smoke_cfg.out_dir, "train.steps=10"), "--resume")
        one_line_error(code, err, f"{run_dir} is in use by process {os.getpid()}")
        code, _, err = run_cli(capsys, *train_args(smoke_cfg.out_dir, "train.steps=10"), "--overwrite")
        one_line_error(code, err, "is in use by process")
    assert {p.name: digest(p) for p in (run_dir / "checkpoints").iterdir()} == before  # nothing deleted


@pytest.mark.slow
def test_a_lock_left_by_a_killed_process_does_not_block(smoke_cfg: Config) -> None:
    run_dir = smoke_cfg.run_dir
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from ddpm_mnist.runfolder import RunFolder; "
        f"RunFolder(Path({str(run_dir)!r})).lock(); print('locked', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunError, match=f"in use by process {holder.pid}"):
        RunFolder(run_dir).lock()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    smoke_run(smoke_cfg, "train.steps=2", "train.sample_every=0")  # the OS released the lock
    assert load_checkpoint(run_dir / "checkpoints" / "latest.pt")["step"] == 2
