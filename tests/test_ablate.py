"""scripts/ablate.py: variants trained for one budget, measured with one sampler, tabled; finished runs reused."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURE_ROOT, ROOT, SMOKE

spec = importlib.util.spec_from_file_location("ablate", ROOT / "scripts" / "ablate.py")
ablate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablate)


def ablation(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ablate.py"), "--config", str(SMOKE), "--budget", "3s",
         "--runs", str(tmp_path / "runs"), "--n", "8", "--steps", "2", "--out", str(tmp_path / "ablation.json"),
         "--table", str(tmp_path / "ablation.md"),
         "--variant", f"plain data.root={FIXTURE_ROOT} train.sample_every=0 train.checkpoint_every=0", *extra],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )


@pytest.mark.slow
def test_each_variant_trains_for_the_budget_and_is_measured_once(tmp_path: Path) -> None:
    done = ablation(tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "ablation.json").read_text())
    (row,) = report["rows"]
    assert row["variant"] == "plain" and row["seed"] == 0 and row["steps"] > 0 and row["batch_size"] == 32
    assert 0 < row["train_seconds"] < row["wall_seconds"]  # the loop's own clock, inside the process's
    assert row["flops_per_step"] > 0 and 0 < row["confidence"] <= 1 and row["fid_mnist"] > 0
    stored = (tmp_path / "runs" / "plain_s0" / "config.yaml").read_text()
    assert f"steps: {row['steps']}" in stored  # the length the budget fixed, in the run's config
    tabled = f"| plain | 0 | {row['train_seconds'] / 60:.2f} min | {row['steps']:,} |"
    assert tabled in (tmp_path / "ablation.md").read_text()
    # run again: the finished run is read back, not trained again
    eval_json = tmp_path / "runs" / "plain_s0" / "eval.json"
    before = eval_json.stat().st_mtime_ns
    again = ablation(tmp_path)
    assert again.returncode == 0, again.stderr
    assert eval_json.stat().st_mtime_ns == before
    assert json.loads((tmp_path / "ablation.json").read_text())["rows"] == [row]


def test_summary_averages_seeds_sorts_by_fid_and_shows_the_spread() -> None:
    rows = [{"variant": "a", "seed": 0, "fid_mnist": 30.0, "confidence": 0.9, "steps": 100, "batch_size": 64},
            {"variant": "a", "seed": 1, "fid_mnist": 34.0, "confidence": 0.8, "steps": 110, "batch_size": 64},
            {"variant": "b", "seed": 0, "fid_mnist": 20.0, "confidence": 0.95, "steps": 50, "batch_size": 128}]
    (best, other) = ablate.summary(rows)
    assert best["variant"] == "b" and best["spread"] == 0
    assert other["fid_mnist"] == 32.0 and other["spread"] == 4.0 and other["confidence"] == pytest.approx(0.85)
    assert "| a | 2 | 32.0 | 4.0 | 0.850 |" in ablate.table(rows)


@pytest.mark.parametrize("text", ["", "bad name x=1", "name train.lr"])
def test_a_malformed_variant_is_one_line(text: str, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        ablate.parse_variant(text)
    assert stopped.value.code == 2 and capsys.readouterr().err.startswith("error: --variant")


@pytest.mark.slow
def test_a_result_is_reused_only_for_the_same_settings_and_says_so(tmp_path: Path) -> None:
    done = ablation(tmp_path)
    assert done.returncode == 0, done.stderr
    again = ablation(tmp_path)
    assert "reusing" in again.stdout and "plain_s0" in again.stdout
    before = json.loads((tmp_path / "ablation.json").read_text())["rows"][0]
    remeasured = ablation(tmp_path, "--n", "4")  # the same training, measured anew at another n
    assert remeasured.returncode == 0, remeasured.stderr
    assert "reusing" not in remeasured.stdout
    report = json.loads((tmp_path / "runs" / "plain_s0" / "eval.json").read_text())
    assert report["n"] == 4 and json.loads((tmp_path / "ablation.json").read_text())["n"] == 4
    assert json.loads((tmp_path / "ablation.json").read_text())["rows"][0]["steps"] == before["steps"]  # not retrained
    # a changed budget retrains: ablate.json and timing.json are the tool's own, which --overwrite deletes
    retrained = ablation(tmp_path, "--budget", "4s")
    assert retrained.returncode == 0, retrained.stderr
    assert "reusing" not in retrained.stdout
    assert json.loads((tmp_path / "runs" / "plain_s0" / "ablate.json").read_text())["train"]["budget"] == "4s"


def test_a_torn_record_reads_as_none_so_the_run_is_done_again(tmp_path: Path) -> None:
    for text in ('{"train": ', "[1, 2]", "[" * 100_000):
        (tmp_path / "ablate.json").write_text(text)
        assert ablate.read_json(tmp_path / "ablate.json") == {}
    assert ablate.read_json(tmp_path / "missing.json") == {}
    (tmp_path / "ablate.json").write_text('{"train": {"budget": "3s"}}')
    assert ablate.read_json(tmp_path / "ablate.json") == {"train": {"budget": "3s"}}


@pytest.mark.slow
@pytest.mark.parametrize("extra, says", [
    (["--seeds", "a"], "--seeds 'a': give distinct whole numbers"),
    (["--seeds", ""], "--seeds '': give distinct whole numbers"),
    (["--variant", "_a x=1"], "its first word names it"),
    (["--variant", "\u00e9 x=1"], "its first word names it"),
    (["--variant", "other name=other"], "ablate.py sets name, out_dir, seed"),
    (["--budget", "3x"], "--budget '3x': give a duration"),
    (["--n", "x"], "argument --n: invalid int value"),
    (["--table", "missing/dir/t.txt"], "--table missing/dir/t.txt: the file name must end in .md"),
    (["--sampler", "bogus"], "--sampler 'bogus': give one of ancestral, ddim, dpmpp_2m, euler, "),
])
def test_bad_ablation_arguments_are_one_line_before_any_training(tmp_path: Path, extra: list[str], says: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ablate.py"), "--config", str(SMOKE), "--budget", "3s",
         "--runs", str(tmp_path / "runs"), "--variant", "plain", *extra],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_failing_run_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ablate.py"), "--config", str(SMOKE), "--budget", "3s",
         "--runs", str(tmp_path / "runs"), "--variant", "bad train.lrr=1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("error: training bad_s0 failed (exit code 2; its message is "
                                                    "above); finished runs are kept")


def test_the_flops_of_a_step_count_the_models_second_channel() -> None:
    """A run that learns its variance: its config.yaml is read whole (a model section alone would
    fail the check that pairs it with sample.variance_type), and the step costs a little more."""
    from ddpm_mnist.config import apply_overrides, load_config, to_dict

    fixed = to_dict(load_config(SMOKE))
    learned = to_dict(apply_overrides(load_config(SMOKE), ["model.learn_variance=true", "train.loss=hybrid",
                                                            "sample.variance_type=learned_range"]))
    assert ablate.step_flops(learned, 4) > ablate.step_flops(fixed, 4) > 0
