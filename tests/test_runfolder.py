"""runfolder: one writer per run folder, what --resume finds in it, and what --overwrite may delete:
only the files the folder's manifest lists, in a folder that nests in no other."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_ROOT, ROOT, SMOKE, run_cli
from helpers import digest, one_line_error, smoke_run, train_args, weights

from ddpm_mnist.checkpoint import load, numbered_checkpoints
from ddpm_mnist.config import Config
from ddpm_mnist.errors import RunError, UserError
from ddpm_mnist.paths import MANIFEST, recorded
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
    err = capsys.readouterr().err
    assert "resuming from step_000000010.pt, the newest checkpoint that loads (1 newer one(s) do not load)" in err
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
    assert load(run_dir / "checkpoints" / "latest.pt").step == 2


def latest(run: Path) -> Path:
    return run / "checkpoints" / "latest.pt"


def tree(folder: Path) -> dict[str, bytes]:
    """Every regular file under a folder (but the lock) with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and not p.is_symlink() and p.name != ".lock"}


def smoke_args(out_dir: Path, name: str, *more: str) -> list[str]:
    return ["train", "--config", SMOKE, "--set", f"data.root={FIXTURE_ROOT}", "--set", f"out_dir={out_dir}",
            "--set", f"name={name}", "--set", "train.steps=2", "--set", "train.sample_every=0", *more]


@pytest.mark.slow
def test_overwrite_refuses_a_folder_holding_files_the_tool_did_not_write(smoke_cfg: Config, capsys) -> None:
    run = smoke_run(smoke_cfg, "train.steps=2", "train.sample_every=0")
    (run / "samples").mkdir(exist_ok=True)
    (run / "samples" / "mine.txt").write_text("m\n")
    (run / "checkpoints" / "other.ckpt").write_text("o\n")
    before = tree(run)
    code, _, err = run_cli(capsys, *smoke_args(smoke_cfg.out_dir, "smoke", "--overwrite"))
    one_line_error(code, err, "holds 2 file(s) ddpm-mnist did not write (checkpoints/other.ckpt, samples/mine.txt)")
    assert tree(run) == before


def test_overwrite_never_guesses_which_files_of_a_folder_without_a_manifest_are_its_own(tmp_path: Path,
                                                                                         capsys) -> None:
    """A user's experiment folder: their commented config and a photo named like a sample grid."""
    exp = tmp_path / "exp1"
    (exp / "samples").mkdir(parents=True)
    (exp / "config.yaml").write_text("# my notes\n" + SMOKE.read_text())
    (exp / "samples" / "holiday_photo.png").write_bytes(b"\x89PNG photo")
    before = tree(exp)
    code, _, err = run_cli(capsys, "train", "--config", exp / "config.yaml", "--set", f"data.root={FIXTURE_ROOT}",
                           "--set", f"out_dir={tmp_path}", "--set", "name=exp1", "--overwrite")
    one_line_error(code, err, "is the run's own config.yaml, which --overwrite or a --set override would replace")
    code, _, err = run_cli(capsys, "train", "--config", SMOKE, "--set", f"data.root={FIXTURE_ROOT}",
                           "--set", f"out_dir={tmp_path}", "--set", "name=exp1", "--overwrite")
    one_line_error(code, err, "holds files and no .ddpm-manifest")
    code, _, err = run_cli(capsys, "train", "--config", exp / "config.yaml", "--set", f"data.root={FIXTURE_ROOT}",
                           "--set", f"out_dir={tmp_path}", "--set", "name=exp1", "--resume")
    one_line_error(code, err, "is the run's own config.yaml")
    assert tree(exp) == before
    (exp / "config.yaml").write_text(f"# my notes\nname: exp1\nout_dir: {tmp_path}\ndata:\n  root: {FIXTURE_ROOT}\n"
                                     "train:\n  steps: 2\n  sample_every: 0\n")
    noted = (exp / "config.yaml").read_text()
    code, _, err = run_cli(capsys, "train", "--config", exp / "config.yaml", "--resume")  # nothing would replace it
    assert code == 0, err
    assert (exp / "config.yaml").read_text() == noted and (exp / "samples" / "holiday_photo.png").exists()
    assert {"config.yaml", "samples/holiday_photo.png"}.isdisjoint(recorded(exp))  # never the tool's to delete


@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [True, False])
def test_a_manifest_that_is_a_symlink_is_refused_and_its_target_never_written(smoke_cfg: Config, tmp_path: Path,
                                                                              capsys, overwrite: bool) -> None:
    run = smoke_run(smoke_cfg, "train.steps=2", "train.sample_every=0")
    thesis = tmp_path / "thesis.txt"
    thesis.write_text("three years of work\n")
    (run / ".ddpm-manifest").unlink()
    (run / ".ddpm-manifest").symlink_to(thesis)
    code, _, err = run_cli(capsys, *smoke_args(smoke_cfg.out_dir, "smoke", "--overwrite" if overwrite else "--resume"))
    one_line_error(code, err, "cannot use it as ddpm-mnist's record of the files it wrote (a symlink): remove it")
    assert thesis.read_text() == "three years of work\n"
    assert (run / "checkpoints" / "latest.pt").exists()


@pytest.mark.slow
def test_a_manifest_that_is_a_pipe_is_refused_instead_of_blocking(smoke_cfg: Config, capsys) -> None:
    run = smoke_run(smoke_cfg, "train.steps=2", "train.sample_every=0")
    (run / ".ddpm-manifest").unlink()
    os.mkfifo(run / ".ddpm-manifest")
    code, _, err = run_cli(capsys, *smoke_args(smoke_cfg.out_dir, "smoke", "--overwrite"))
    one_line_error(code, err, "not a regular file (a pipe, socket or device)")
    assert (run / "checkpoints" / "latest.pt").exists()


@pytest.mark.slow
def test_run_folders_never_nest(tmp_path: Path, capsys) -> None:
    """One run inside another's folder once had its checkpoints recorded, then deleted, by the other."""
    code, _, err = run_cli(capsys, *smoke_args(tmp_path / "nA", "checkpoints"))  # B: runs/nA/checkpoints
    assert code == 0, err
    code, _, err = run_cli(capsys, *smoke_args(tmp_path, "nA"))  # A: runs/nA, around B
    one_line_error(code, err, f"lies around {tmp_path / 'nA' / 'checkpoints'}, a folder ddpm-mnist writes")
    code, _, err = run_cli(capsys, *smoke_args(tmp_path / "nA" / "checkpoints" / "deeper", "c"))
    one_line_error(code, err, f"lies inside {tmp_path / 'nA' / 'checkpoints'}")
    assert load(tmp_path / "nA" / "checkpoints" / "checkpoints" / "latest.pt").step == 2


@pytest.mark.slow
def test_a_symlink_inside_the_run_folder_stops_overwrite_before_anything_is_deleted(smoke_cfg: Config,
                                                                                    tmp_path: Path, capsys) -> None:
    run = smoke_run(smoke_cfg, "train.steps=2", "train.sample_every=0")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "linked").symlink_to(elsewhere)
    before = tree(run)
    code, _, err = run_cli(capsys, *smoke_args(smoke_cfg.out_dir, "smoke", "--overwrite"))
    one_line_error(code, err, "did not write (linked)")
    assert tree(run) == before and elsewhere.is_dir()


@pytest.mark.slow
def test_overwrite_deletes_exactly_what_the_manifest_lists(smoke_cfg: Config, tmp_path: Path, capsys) -> None:
    run = smoke_run(smoke_cfg, "train.steps=10")
    ours = recorded(run)
    assert {"config.yaml", "checkpoints/latest.pt", "checkpoints/step_000000010.pt",
            "samples/step_000000010.png"} <= ours and any(name.startswith("events.out") for name in ours)
    code, _, err = run_cli(capsys, "sample", "--ckpt", latest(run), "--n", "2", "--steps", "2")
    assert code == 0, err  # its default grid goes to <run>/samples/ and is recorded too
    smoke_run(smoke_cfg, "train.steps=4", overwrite=True)
    assert load(latest(run)).step == 4
    assert not (run / "checkpoints" / "step_000000010.pt").exists() and not list((run / "samples").glob("ancestral*"))
    (run / "samples" / "notes.txt").write_text("mine\n")  # now a file of the user's
    with pytest.raises(UserError, match=r"did not write \(samples/notes.txt\)"):
        smoke_run(smoke_cfg, "train.steps=4", overwrite=True)
    assert (run / "samples" / "notes.txt").exists() and (run / MANIFEST).exists()


@pytest.mark.slow
def test_a_users_step_best_checkpoint_is_never_taken_for_the_newest(smoke_cfg: Config, capsys) -> None:
    run = smoke_run(smoke_cfg, "train.steps=10", "train.checkpoint_every=5", "train.sample_every=0",
                    "train.keep_checkpoints=2")
    checkpoints = run / "checkpoints"
    shutil.copyfile(checkpoints / "step_000000005.pt", checkpoints / "step_best.pt")
    assert [p.name for p in numbered_checkpoints(checkpoints)] == ["step_000000010.pt", "step_000000005.pt"]
    (checkpoints / "latest.pt").unlink()
    smoke_run(smoke_cfg, "train.steps=15", "train.checkpoint_every=5", "train.sample_every=0",
              "train.keep_checkpoints=2", resume=True)
    assert "resuming from step_000000010.pt" in capsys.readouterr().err
    # rotation kept the two newest real checkpoints and left the user's file alone
    assert sorted(p.name for p in checkpoints.glob("step_*.pt")) == ["step_000000010.pt", "step_000000015.pt",
                                                                    "step_best.pt"]
    assert torch.load(checkpoints / "step_best.pt", weights_only=True)["step"] == 5
