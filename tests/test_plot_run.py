"""scripts/plot_run.py: the run folder's own event file as a PNG; bad input is one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from PIL import Image


def plot(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_run.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_plot_run_reads_the_run_folders_event_file(trained_run: Path, tmp_path: Path) -> None:
    done = plot(trained_run, "--out", tmp_path / "training.png")
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "training.png").size[0] > 1000


@pytest.mark.slow
@pytest.mark.parametrize("out, says", [("missing/t.png", None), ("t.jpg", "must end in .png")])
def test_plot_run_outputs_are_checked(trained_run: Path, tmp_path: Path, out: str, says: str | None) -> None:
    done = plot(trained_run, "--out", tmp_path / out)
    if says is None:  # a missing folder is made, as for every other output
        assert done.returncode == 0 and (tmp_path / out).exists(), done.stderr
    else:
        assert done.returncode == 2 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_folder_without_events_is_one_line(tmp_path: Path) -> None:
    for run, says in ((tmp_path / "nothing", "not a run folder"), (tmp_path, "holds no TensorBoard event file")):
        done = plot(run, "--out", tmp_path / "t.png")
        assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr
    done = plot(tmp_path / "missing" / "run")  # its default --out lies in the missing folder
    assert done.returncode == 2 and "not a run folder" in done.stderr, done.stderr
    assert not (tmp_path / "missing").exists()  # refused before any folder is made
