"""paths: an output never destroys an input, and every file is written whole.

Inputs must be regular files; outputs are compared with every input and with each other (by name
and inode) before any work; temporary names are a writer's own. What `--overwrite` may delete in
a run folder is tested in test_runfolder.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SMOKE, run_cli
from helpers import digest, one_line_error

from ddpm_mnist.errors import UserError
from ddpm_mnist.paths import atomic_file, check_paths, ensure_writable, temporary_name


def latest(run: Path) -> Path:
    return run / "checkpoints" / "latest.pt"


@pytest.mark.slow
def test_sample_never_writes_over_the_checkpoint_it_reads(trained_run: Path, tmp_path: Path, capsys) -> None:
    numbered = trained_run / "checkpoints" / "step_000000020.pt"
    before = digest(numbered)
    for option in ("--tensor", "--out"):
        target = numbered.with_suffix(".png") if option == "--out" else numbered
        if option == "--out":  # latest.pt is a hard link to the newest numbered file: one inode, two names
            target = tmp_path / "link.png"
            os.link(numbered, target)
        code, _, err = run_cli(capsys, "sample", "--ckpt", latest(trained_run), "--n", "2", "--steps", "2",
                               option, target)
        one_line_error(code, err, "that is the file --ckpt reads; an output never replaces an input")
    assert digest(numbered) == before


@pytest.mark.slow
@pytest.mark.parametrize("option", ["--out", "--tensor"])
def test_an_images_dir_that_is_another_output_is_refused_before_sampling(trained_run: Path, tmp_path: Path, capsys,
                                                                        option: str) -> None:
    same = tmp_path / ("out.png" if option == "--out" else "all.pt")
    args = ["--out", same] if option == "--out" else ["--out", tmp_path / "g.png", "--tensor", same]
    code, _, err = run_cli(capsys, "sample", "--ckpt", latest(trained_run), "--n", "2", "--steps", "2",
                           *args, "--images-dir", same)
    one_line_error(code, err, f"{option} and --images-dir both write {same}")
    assert not same.exists() and "sampling" not in capsys.readouterr().out


def test_outputs_that_are_inputs_or_each_other_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("seed: 1\n")
    with pytest.raises(UserError, match="that is the file --config reads"):
        check_paths({"--json": tmp_path / "." / "cfg.yaml"}, inputs={"--config": config})
    with pytest.raises(UserError, match="--a and --b both write"):
        check_paths({"--a": tmp_path / "x.png", "--b": tmp_path / "sub" / ".." / "x.png"})
    check_paths({"--a": tmp_path / "x.png"}, inputs={"--config": config, "--other": config})  # two reads are fine


def test_bench_json_never_replaces_the_config(tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    shutil.copyfile(SMOKE, config)
    for json_path, says in ((config, "--json"), (tmp_path / "report.txt", "must end in .json")):
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--config", str(config),
                               "--json", str(json_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 2 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert config.read_text() == SMOKE.read_text()


def test_unwritable_and_impossible_output_folders_fail_before_any_work(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(UserError, match="symlink loop|Too many levels of symbolic links"):
        ensure_writable(loop / "x.png")
    dangling = tmp_path / "gone"
    dangling.symlink_to(tmp_path / "missing")
    with pytest.raises(UserError, match="is a symlink to .*missing, which is missing"):
        ensure_writable(dangling / "x.png")
    if Path("/proc/self").exists():  # root passes os.access there; creating a file does not
        with pytest.raises(UserError, match="refuses new files"):
            ensure_writable(Path("/proc/x.png"))


@pytest.mark.slow
def test_inputs_that_are_not_regular_files_are_refused_instead_of_blocking(tmp_path: Path, capsys) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for args, says in ((["sample", "--ckpt", fifo], "give a checkpoint file"),
                       (["eval", "--samples", fifo], "give a samples file"),
                       (["config", "--config", fifo], "give a config file"),
                       (["config", "--config", "/dev/zero"], "not a regular file")):
        code, _, err = run_cli(capsys, *args)
        one_line_error(code, err, says)
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (2 << 20) + "\n")
    code, _, err = run_cli(capsys, "config", "--config", huge)
    one_line_error(code, err, "a config is at most 1,048,576")


def test_temporary_files_have_names_no_other_writer_picks(tmp_path: Path) -> None:
    target = tmp_path / "latest.pt"
    names = {temporary_name(target) for _ in range(100)}
    assert len(names) == 100 and all(str(os.getpid()) in n.name and n.name.startswith(".latest.pt.") for n in names)
    with pytest.raises(ZeroDivisionError), atomic_file(target) as tmp:
        tmp.write_bytes(b"half")
        raise ZeroDivisionError  # any failure while writing
    assert list(tmp_path.iterdir()) == []  # no final file, no temporary left


@pytest.mark.slow
@pytest.mark.parametrize("args, says", [
    (["--out", "x.jpg"], "--out x.jpg: the file name must end in .png"),
    (["--trajectory", "traj.png"], "--trajectory traj.png: the file name must end in .gif"),
    (["--tensor", "x.txt"], "--tensor x.txt: the file name must end in .pt or .npz"),
    (["--out", "t_strip.png", "--trajectory", "t.gif"], "--out and --trajectory's strip both write t_strip.png"),
])
def test_output_names_are_checked(trained_run: Path, tmp_path: Path, capsys, monkeypatch, args: list[str],
                                     says: str) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "sample", "--ckpt", trained_run / "checkpoints" / "latest.pt", "--n", "2",
                             "--steps", "2", *args)
    one_line_error(code, err, says)
    assert list(tmp_path.iterdir()) == []


def test_schedule_outputs_and_eval_json_are_checked(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "schedule", "--csv", tmp_path / "s.png")
    one_line_error(code, err, "the file name must end in .csv")
    code, _, err = run_cli(capsys, "schedule", "--plot", tmp_path / "s.csv")
    one_line_error(code, err, "the file name must end in .png")
    code, _, err = run_cli(capsys, "eval", "--samples", tmp_path / "x.pt", "--json", tmp_path / "m.txt")
    one_line_error(code, err, "the file name must end in .json")
    assert list(tmp_path.iterdir()) == []
