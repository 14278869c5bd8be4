"""scripts/train_classifier.py: bad arguments and missing data are one line and exit code 2, before any training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


@pytest.mark.parametrize("args, says", [
    (["--epochs", "0"], "--epochs 0: train for at least 1 epoch"),
    (["--data", "missing"], "MNIST not found"),
    (["--out", "weights.txt"], "--out weights.txt: the file name must end in .pt"),
])
def test_bad_arguments_are_one_line_and_write_nothing(tmp_path: Path, args: list[str], says: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_classifier.py"),
                           "--out", str(tmp_path / "c.pt"), *args], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == []
