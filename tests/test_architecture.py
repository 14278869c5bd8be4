"""The house rules of the layout, checked on the code itself so that they cannot quietly erode.

The maths (`ddpm_mnist/maths/`) imports nothing of the package but the config dataclasses and
`rng`; training sits below sampling and evaluation (train.py imports none of them); no module
leans on more than 6 others at run time; no function is over 40 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "ddpm_mnist"


def module_name(path: Path) -> str:
    """`maths.samplers`, `config` (a package counts as one), `train`."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0] if parts[0] == "config" else ".".join(p for p in parts if p != "__init__")


def runtime_imports(path: Path) -> set[str]:
    """The package modules a file imports when it runs (not those under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only or not isinstance(node, ast.ImportFrom) or not node.module:
            continue
        if node.module.startswith("ddpm_mnist."):
            parts = node.module.split(".")[1:]
            found.add(parts[0] if parts[0] == "config" else ".".join(parts[:2]))
        elif node.module == "ddpm_mnist":
            found.update(alias.name for alias in node.names if not alias.name.startswith("__"))
    return found - {module_name(path)}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "config" not in p.relative_to(PACKAGE).parts[:-1])


def test_the_maths_imports_nothing_but_the_config_and_rng() -> None:
    for path in (PACKAGE / "maths").glob("*.py"):
        outside = {m for m in runtime_imports(path) if not m.startswith("maths.") and m != "maths"}
        assert outside <= {"config", "rng"}, (path.name, outside)


def test_training_does_not_depend_on_sampling_or_evaluation() -> None:
    for name in ("train.py", "loop.py", "trainstate.py"):
        assert not runtime_imports(PACKAGE / name) & {"sample", "sample_files", "evaluate", "classifier", "plots",
                                                      "previews"}, name


def test_no_module_imports_more_than_six_others() -> None:
    counts = {module_name(path): len(runtime_imports(path)) for path in modules()}
    assert max(counts.values()) <= 6, {name: n for name, n in counts.items() if n > 6}


def test_every_function_fits_on_a_screen() -> None:
    long = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 40:
                long[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert not long, long
