"""`ddpm eval --nll`: the bound of a checkpoint in bits per dimension, its parts, and its checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import FIXTURE_ROOT, run_cli
from helpers import one_line_error


def ckpt_of(run: Path) -> Path:
    return run / "checkpoints" / "latest.pt"


def test_the_bound_in_bits_per_dim_with_its_parts(trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "nll.json"
    code, stdout, err = run_cli(capsys, "eval", "--ckpt", ckpt_of(trained_run), "--nll", "--n", "6",
                                "--nll-timesteps", "20", "--data", FIXTURE_ROOT, "--json", out)
    assert code == 0, err
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert report["n"] == 6 and report["timesteps"] == "20 stratified"
    assert math.isclose(sum(part["bits_per_dim"] for part in parts.values()), report["bits_per_dim"], rel_tol=1e-9)
    assert math.isclose(sum(part["share"] for part in parts.values()), 1.0, rel_tol=1e-9)
    assert report["bits_per_dim"] > 0 and report["standard_error"] > 0
    assert parts["prior"]["bits_per_dim"] < 1e-3  # q(x_T | x_0) is nearly N(0, I) at T = 1000
    assert "total: the bound on -log p(x)" in stdout and "shrinks as 1/sqrt(n)" in stdout


def test_the_same_seed_gives_the_same_bound_and_the_exact_one_is_the_default(trained_run: Path, capsys) -> None:
    args = ["eval", "--ckpt", ckpt_of(trained_run), "--nll", "--n", "2", "--data", FIXTURE_ROOT]
    code, first, err = run_cli(capsys, *args, "--nll-timesteps", "5")
    assert code == 0, err
    assert run_cli(capsys, *args, "--nll-timesteps", "5")[1] == first
    code, exact, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "timesteps: all 1000" in exact


def test_a_conditional_model_is_measured_by_its_unconditional_half(conditional_run: Path, capsys) -> None:
    code, stdout, err = run_cli(capsys, "eval", "--ckpt", ckpt_of(conditional_run), "--nll", "--n", "2",
                                "--nll-timesteps", "3", "--data", FIXTURE_ROOT)
    assert code == 0, err
    assert "bits/dim" in stdout


@pytest.mark.parametrize(("args", "says"), [
    (["--nll", "--samples", "x.pt"], "without --samples"),
    (["--nll", "--sweep", "ddim:10"], "without --sweep"),
    (["--nll", "--steps", "10"], "without --steps"),
    (["--nll-timesteps", "10"], "--nll-timesteps without --nll"),
    (["--nll", "--nll-timesteps", "0"], "--nll-timesteps 0: give 1 to 999"),
    (["--nll", "--n", "1"], "--n 1: --nll measures 2 to 1,000 test digits"),
    (["--nll", "--n", "5000"], "--n 5000: --nll measures 2 to 1,000"),
])
def test_bad_nll_arguments_are_one_line(trained_run: Path, tmp_path: Path, capsys, args: list, says: str) -> None:
    code, _, err = run_cli(capsys, "eval", "--ckpt", ckpt_of(trained_run), "--data", FIXTURE_ROOT, *args,
                           "--json", tmp_path / "nll.json")
    one_line_error(code, err, says)
    assert not (tmp_path / "nll.json").exists()
