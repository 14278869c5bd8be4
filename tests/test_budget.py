"""train.time_budget: parsing, a length fixed once from the measured rate, exact resume, bad input."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from conftest import SMOKE, run_cli
from helpers import smoke_run, weights

from ddpm_mnist.checkpoint import load
from ddpm_mnist.config import Config, TrainConfig, duration_seconds, load_config
from ddpm_mnist.errors import RunError
from ddpm_mnist.trainstate import StepBudget

BUDGET = ["train.steps=0", "train.time_budget=6s", "train.lr_schedule=cosine", "train.warmup_steps=3",
          "train.sample_every=0", "train.checkpoint_every=2", "train.keep_checkpoints=1000", "model.dropout=0.1"]


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("1.5h", 5400), (" 2m ", 120), ("1.5s", 1.5)])
def test_durations_parse(text: str, seconds: float) -> None:
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize("text", ["20", "20 min", "-5m", "0s", "1e3s", "", "m", "5d", "1,5h",
                                  "0.5s", "0.0000001s", "9" * 400 + "h", "1001h"])
def test_malformed_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        duration_seconds(text)


@pytest.mark.slow
@pytest.mark.parametrize("sets, says", [
    (["train.steps=0", "train.time_budget=20"], "train.time_budget: must be a duration from 1s to 1000h such as 90s"),
    (["train.time_budget=1m", "train.steps=5"], "a budget replaces train.steps and train.epochs"),
    (["train.steps=0", "train.epochs=2", "train.time_budget=1m"], "got steps=0, epochs=2"),
])
def test_bad_budgets_get_one_line_and_exit_2(sets: list[str], says: str, capsys, tmp_path) -> None:
    args = ["train", "--config", str(SMOKE), "--set", f"out_dir={tmp_path}"]
    for item in sets:
        args += ["--set", item]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())  # nothing written


def test_reading_fixes_the_length_from_the_measured_rate(monkeypatch) -> None:
    """Readings come at fixed steps; the first one after MEASURE_SECONDS fixes steps + rest * rate."""
    now = [100.0]
    monkeypatch.setattr("ddpm_mnist.trainstate.time.perf_counter", lambda: now[0])
    training = TrainConfig(steps=0, time_budget="100s", sample_every=0, batch_size=64)
    budget = StepBudget(training, first_step=0)  # the clock starts at 100
    cpu = torch.device("cpu")
    due = [step for step in range(200) if budget.due(step)]
    assert due == [5]
    now[0] = 101.0  # 5 untimed steps took 1 s
    assert budget.reading(5, cpu) is None and budget.due(25)
    now[0] = 105.0  # 20 steps in 4 s: under MEASURE_SECONDS, keep measuring
    assert budget.reading(25, cpu) is None and budget.due(45) and not budget.due(26)
    now[0] = 109.0
    assert budget.reading(45, cpu) is None and budget.due(85)
    now[0] = 117.0  # 80 steps in 16 s: 5 steps/s; 83 s of the budget left
    fixed = budget.reading(85, cpu)
    assert fixed == 85 + int(83 * 5)
    budget.fixed(85, fixed)  # every process hears of the length: one more reading, halfway to it
    halfway = 85 + (fixed - 85) // 2
    assert [step for step in range(86, fixed) if budget.due(step)] == [halfway]
    now[0] = 165.0  # 207 steps in 48 s since step 85: slower than measured (a preview, a busy machine)
    corrected = budget.reading(halfway, cpu)
    rate = (halfway - 85) / (165.0 - 117.0)  # over every step since the first fix
    assert corrected == halfway + int(35 * rate) and corrected < fixed
    budget.fixed(halfway, corrected)
    assert not any(budget.due(step) for step in range(halfway + 1, 10_000))  # never measured again


@pytest.mark.parametrize("busy_until", [101.0, 109.0, 117.0])
def test_a_machine_busy_for_a_moment_at_the_start_does_not_shorten_the_run(monkeypatch, busy_until: float) -> None:
    """Half speed until `busy_until`, then 5 steps/s: the run ends within 1% of its 100 s (a correction
    from the rate since timing began ends it early)."""
    def time_at(step: int) -> float:  # 5 untimed steps in the first second, then the machine's pace
        busy_steps = 2.5 * (busy_until - 101.0)
        if step - 5 <= busy_steps:
            return 101.0 + (step - 5) / 2.5
        return busy_until + (step - 5 - busy_steps) / 5.0

    now = [100.0]
    monkeypatch.setattr("ddpm_mnist.trainstate.time.perf_counter", lambda: now[0])
    budget = StepBudget(TrainConfig(steps=0, time_budget="100s", sample_every=0, batch_size=64), first_step=0)
    cpu, total = torch.device("cpu"), 10**9
    for step in range(1, 10**6):
        if step >= total:
            break
        if budget.due(step):
            now[0] = time_at(step)
            fixed = budget.reading(step, cpu)
            if fixed is not None:
                budget.fixed(step, fixed)
                total = fixed
    assert budget.fixes == 2
    assert time_at(total) - 100.0 == pytest.approx(100.0, rel=0.01)


def test_previews_are_counted_in_the_length() -> None:
    """A preview of 64 images x 50 steps costs about 64 * 50 / (3 * 64) training steps."""
    plain = StepBudget(TrainConfig(steps=0, time_budget="1m", sample_every=0, batch_size=64), 0)
    previews = StepBudget(TrainConfig(steps=0, time_budget="1m", sample_every=100, preview_n=64, preview_steps=50,
                                      batch_size=64), 0)
    assert plain.overhead == 0
    assert previews.overhead == pytest.approx(64 * 50 / (3 * 64) / 100)


def budget_run(cfg: Config, name: str, monkeypatch, **kwargs: object):
    # a short run: fix the length at the first reading after the mark (step 25), so that the
    # correction halfway to the end, and any reading after it, fall inside the run
    monkeypatch.setattr(StepBudget, "MEASURE_SECONDS", 0.0)
    monkeypatch.setattr(StepBudget, "MEASURE_SHARE", 0.0)
    return smoke_run(cfg, *BUDGET, f"name={name}", **kwargs)


@pytest.mark.slow
def test_the_length_is_fixed_corrected_once_and_recorded(smoke_cfg: Config, capsys, monkeypatch) -> None:
    run = budget_run(smoke_cfg, "budget", monkeypatch)
    out = capsys.readouterr()
    fixed_lines = re.findall(r"time budget [^:]*: (corrected to )?([0-9,]+) steps", out.err + out.out)
    assert [corrected for corrected, _ in fixed_lines] == ["", "corrected to "], out  # never measured again
    steps = int(fixed_lines[-1][1].replace(",", ""))
    checkpoint = load(run / "checkpoints" / "latest.pt")
    assert checkpoint.step == steps
    stored = checkpoint.config
    assert stored.train.steps == steps and stored.train.time_budget == ""
    assert load_config(run / "config.yaml").train.steps == steps  # config.yaml was rewritten with the length
    # the cosine was laid out over the fixed length: it ends at lr * min_lr_ratio, not near lr
    lr = checkpoint.contents["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(smoke_cfg.train.lr * smoke_cfg.train.min_lr_ratio)
    assert re.search(r"done: [0-9,]+ steps in 0:0[0-9] of a 0:06 budget \([+-][0-9.]+%\)", out.out), out.out


@pytest.mark.slow
def test_resume_after_the_length_is_fixed_is_exact(smoke_cfg: Config, capsys, monkeypatch) -> None:
    straight = budget_run(smoke_cfg, "straight", monkeypatch)
    out = capsys.readouterr()
    fixed_at = int(re.findall(r"over steps 5 to ([0-9,]+)\)", out.err + out.out)[-1].replace(",", ""))  # corrected
    total = load(straight / "checkpoints" / "latest.pt").step
    # the first checkpoint after the length was fixed, with steps still to go
    candidates = [s for s in range(fixed_at + 1, total) if (straight / "checkpoints" / f"step_{s:09d}.pt").exists()]
    assert candidates, (fixed_at, total)
    halves = straight.parent / "halves"
    shutil.copytree(straight, halves)
    checkpoints = halves / "checkpoints"
    for later in checkpoints.glob("step_*.pt"):
        if int(later.stem.split("_")[1]) > candidates[0]:
            later.unlink()
    shutil.copyfile(checkpoints / f"step_{candidates[0]:09d}.pt", checkpoints / "latest.pt")
    # resumed with the same config the user gave (a budget, steps 0): the checkpoint's length wins
    budget_run(smoke_cfg, "halves", monkeypatch, resume=True)
    assert load(checkpoints / "latest.pt").step == total
    a, b = weights(straight), weights(halves)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_a_budget_on_resume_applies_or_says_why_not(smoke_cfg: Config, capsys, monkeypatch) -> None:
    run = budget_run(smoke_cfg, "fixed", monkeypatch)
    total = load(run / "checkpoints" / "latest.pt").step
    capsys.readouterr()
    # another budget for a run whose length its first budget fixed: said in one line, the length kept
    smoke_run(smoke_cfg, *BUDGET, "name=fixed", "train.time_budget=1h", resume=True)
    out, err = capsys.readouterr()
    assert (f"note: --resume: this run's length was fixed at {total:,} steps by its time budget 6s; the budget 1h "
            "given now does not apply") in err
    assert "nothing to train" in out
    # a run trained by steps cannot take a budget on resume: one line, not a length silently kept
    smoke_run(smoke_cfg, "train.steps=4", "train.sample_every=0", "name=bysteps")
    with pytest.raises(RunError, match=r"this run trains by steps \(train.steps: 4\), and a time budget \(1h\)"):
        smoke_run(smoke_cfg, "train.steps=0", "train.time_budget=1h", "train.sample_every=0", "name=bysteps",
                  resume=True)

