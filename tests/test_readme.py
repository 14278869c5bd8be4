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


def test_every_test_the_guarantees_name_exists() -> None:
    import re

    section = (ROOT / "docs" / "guarantees.md").read_text()  # linked from the README's guarantees section
    assert "docs/guarantees.md" in (ROOT / "README.md").read_text()
    named = re.findall(r"`(test_\w+\.py)::(test_\w+?)(\*?)`", section)
    assert len(named) >= 20
    for file, name, star in named:
        text = (ROOT / "tests" / file).read_text()
        assert (f"def {name}" if star else f"def {name}(") in text, f"{file}::{name}{star}"


def test_links_between_the_readme_and_docs_resolve() -> None:
    """Every relative link and #anchor of the README and docs/ points at a file or a heading that exists."""
    import re

    def anchors(text: str) -> set[str]:
        return {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}

    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: {target}"
            if anchor and linked.suffix == ".md":
                assert anchor in anchors(linked.read_text()), f"{page.name}: {target}"

