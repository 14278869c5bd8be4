"""The README stays true: its config reference matches the code, its commands exist."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_config_reference_is_current() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/config_reference.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_readme_shows_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
