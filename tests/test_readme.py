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


def test_every_test_the_guarantees_section_names_exists() -> None:
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## What the tool guarantees"):readme.index("## Performance")]
    named = re.findall(r"`(test_\w+\.py)::(test_\w+?)(\*?)`", section)
    assert len(named) >= 20
    for file, name, star in named:
        text = (ROOT / "tests" / file).read_text()
        assert (f"def {name}" if star else f"def {name}(") in text, f"{file}::{name}{star}"
