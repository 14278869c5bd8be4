"""Config loading is strict: each kind of bad input fails with one line naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from helpers import one_line_error

from ddpm_mnist.config import (
    Config,
    apply_overrides,
    config_from_dict,
    dump_yaml,
    load_config,
    parse_yaml,
    reference_rows,
    to_dict,
)
from ddpm_mnist.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    return message


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_mirror_the_dataclasses(path: Path) -> None:
    cfg = load_config(path)
    raw = parse_yaml(path.read_text(), str(path))
    # every key of every section is written out, so the file documents the whole schema
    assert raw == to_dict(cfg)


def test_unknown_key_suggests_the_nearest(tmp_path: Path) -> None:
    message = error_of(tmp_path, "train:\n  lrr: 0.001\n")
    assert "train.lrr: unknown key; did you mean train.lr?" in message


def test_unknown_section_suggests_the_nearest(tmp_path: Path) -> None:
    assert "did you mean schedule?" in error_of(tmp_path, "schedul:\n  num_timesteps: 10\n")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train:\n  batch_size: 12.5\n", "train.batch_size: must be an integer, got 12.5"),
        ("train:\n  batch_size: true\n", "train.batch_size: must be an integer, got True"),
        ("train:\n  lr: fast\n", "train.lr: must be a number, got 'fast'"),
        ("data:\n  download: 1\n", "data.download: must be true or false, got 1"),
        ("model:\n  channel_mult: 2\n", "model.channel_mult: must be a list of integers"),
        ("model:\n  channel_mult: [1, x]\n", "model.channel_mult[1]: must be an integer"),
        ("runtime:\n  device: 0\n", "runtime.device: must be a non-empty string"),
        ("runtime:\n  mixed_precision: off\n", "quote the value"),
        ("train:\n  lr: .nan\n", "train.lr: must be a finite number"),
    ],
)
def test_wrong_types(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("schedule:\n  beta_end: 1.0\n", "schedule.beta_end: must be < 1, got 1.0"),
        ("schedule:\n  beta_start: 0.03\n", "schedule.beta_start: must be <= schedule.beta_end (0.02)"),
        ("schedule:\n  num_timesteps: 0\n", "schedule.num_timesteps: must be >= 1, got 0"),
        ("schedule:\n  beta_schedule: cosin\n", "must be one of linear, scaled_linear, cosine, sigmoid"),
        ("train:\n  batch_size: -4\n", "train.batch_size: must be >= 1, got -4"),
        ("train:\n  batch_size: 100000000000000000000\n", "train.batch_size: must be <= 65536"),
        ("model:\n  channel_mult: [1, 2, 2, 2]\n", "model.channel_mult: must list 1 to 3 levels"),
        ("model:\n  attention_resolutions: [16]\n", "16 is not a level of this U-Net"),
        ("model:\n  num_groups: 5\n", "model.num_groups: 5 must divide every channel count"),
        ("train:\n  epochs: 3\n", "exactly one of train.steps and train.epochs"),
        ("name: ../escape\n", "name: must be a folder name"),
        ("schedule:\n  rescale_zero_terminal_snr: true\n", "needs model.prediction_type v or x0"),
        ("sample:\n  steps: 5000\n", "sample.steps: must be <= schedule.num_timesteps (1000)"),
        ("model:\n  patch_size: 2\n  channel_mult: [1, 2, 2]\n",
         "model.channel_mult: must list 1 to 2 levels (14, 7 with model.patch_size 2)"),
        ("model:\n  patch_size: 2\n  channel_mult: [1, 2]\n  attention_resolutions: [28]\n",
         "28 is not a level of this U-Net; allowed: 14, 7"),
        ("model:\n  patch_size: 4\n", "model.patch_size: must be <= 2, got 4"),
        ("model:\n  time_conditioning: film\n", "model.time_conditioning: must be one of add, scale_shift"),
        ("train:\n  timestep_sampling: sobol\n", "train.timestep_sampling: must be one of uniform, stratified"),
        ("train:\n  adam_beta2: 1.0\n", "train.adam_beta2: must be < 1, got 1.0"),
    ],
)
def test_out_of_range_values(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "file is empty"),
        ("- 1\n- 2\n", "must be a YAML mapping of sections"),
        ("train: [1, 2]\n", "train: must be a mapping of keys"),
        ("train:\n  lr: [\n", "not valid YAML (line"),
    ],
)
def test_malformed_files(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_exponent_floats_read_as_numbers(tmp_path: Path) -> None:
    # PyYAML reads `1e-4` as a string (YAML 1.1); users write it that way, so it must work
    cfg = load_config(write(tmp_path, "train:\n  lr: 1e-4\nschedule:\n  beta_start: 2E-5\n"))
    assert cfg.train.lr == 1e-4 and cfg.schedule.beta_start == 2e-5


def test_overrides_are_validated_the_same_way() -> None:
    overrides = ["train.lr=3e-4", "model.channel_mult=[1, 2]", "model.attention_resolutions=[]", "seed=7"]
    cfg = apply_overrides(Config(), overrides)
    assert (cfg.train.lr, cfg.model.channel_mult, cfg.seed) == (3e-4, [1, 2], 7)
    with pytest.raises(ConfigError, match=r"^--set train\.lr=x: train\.lr: must be a number"):
        apply_overrides(Config(), ["train.lr=x"])
    with pytest.raises(ConfigError, match="did you mean train.batch_size"):
        apply_overrides(Config(), ["train.batchsize=3"])
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides(Config(), ["train.lr"])


def test_overrides_are_checked_together_for_cross_key_rules(tmp_path: Path) -> None:
    # moving beta_start above the old beta_end is fine when beta_end moves too
    path = write(tmp_path, "schedule:\n  beta_start: 0.05\n  beta_end: 0.06\n")
    cfg = load_config(path, ["schedule.beta_start=0.03", "schedule.beta_end=0.04"])
    assert (cfg.schedule.beta_start, cfg.schedule.beta_end) == (0.03, 0.04)


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = apply_overrides(Config(), ["schedule.beta_schedule=cosine", "model.attention_resolutions=[14, 7]"])
    assert config_from_dict(parse_yaml(dump_yaml(cfg), "dump"), "dump") == cfg


def test_every_field_is_documented() -> None:
    rows = reference_rows()
    assert len(rows) == len({key for key, _, _ in rows}) > 40
    assert all(meaning.strip() for _, _, meaning in rows)


def test_cli_reports_config_errors_in_one_line_with_exit_code_2(tmp_path: Path, capsys) -> None:
    path = write(tmp_path, "schedule:\n  beta_end: 2\n")
    code, out, err = run_cli(capsys, "config", "--config", path)
    assert code == 2
    assert err.strip() == f"error: {path}: schedule.beta_end: must be < 1, got 2"
    assert "Traceback" not in out + err


def test_cli_config_prints_the_resolved_yaml(capsys) -> None:
    code, out, _ = run_cli(capsys, "config", "--set", "train.lr=0.5")
    assert code == 0
    assert config_from_dict(parse_yaml(out, "stdout"), "stdout").train.lr == 0.5


@pytest.mark.parametrize("sets, says", [
    (["sample.clip_sample_range=1e39"], "sample.clip_sample_range: must be <= 1000"),
    (["schedule.num_timesteps=1", "schedule.rescale_zero_terminal_snr=true", "model.prediction_type=v",
      "sample.steps=0"], "needs schedule.num_timesteps >= 2"),
    (["train.steps=0", "train.time_budget=" + "9" * 400 + "h"], "train.time_budget: must be a duration from 1s"),
    (["train.steps=0", "train.time_budget=0.0000001s"], "train.time_budget: must be a duration from 1s"),
])
def test_values_that_would_overflow_or_give_nan_later_are_refused_at_load(sets: list[str], says: str, capsys) -> None:
    args = ["config"]
    for item in sets:
        args += ["--set", item]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


LEARNS = ["model.learn_variance=true", "train.loss=hybrid", "sample.variance_type=learned_range"]


@pytest.mark.parametrize("sets, says", [
    (["sample.variance_type=learned_range"], "sample.variance_type: learned_range reads a variance this model does "
                                             "not output (model.learn_variance: false)"),
    (["model.learn_variance=true", "train.loss=hybrid"], "sample.variance_type: fixed_small would ignore the "
                                                         "variance this model learns"),
    (["train.loss=hybrid"], "train.loss: hybrid trains a learned variance"),
    ([*LEARNS, "sample.variance_type=learned"], "learned reads the output as the variance itself"),
    ([*LEARNS, "train.vlb_weight=-1"], "train.vlb_weight: must be >= 0, got -1"),
    ([*LEARNS, "train.vlb_weight=nan"], "train.vlb_weight: must be a number, got 'nan'"),
])
def test_a_learned_variance_is_sampled_and_trained_as_one(sets: list[str], says: str, capsys) -> None:
    args = ["config"]
    for item in sets:
        args += ["--set", item]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert apply_overrides(Config(), LEARNS).model.learn_variance


def test_training_a_learned_variance_needs_the_hybrid_loss(tmp_path: Path, capsys) -> None:
    """A model read from diffusers may learn its variance without saying how: its config loads, and
    `ddpm train` refuses it in one line before any work."""
    path = write(tmp_path, "model:\n  learn_variance: true\nsample:\n  variance_type: learned\n")
    assert load_config(path).train.loss == "mse"
    code, _, err = run_cli(capsys, "train", "--config", path, "--set", f"out_dir={tmp_path}")
    assert code == 2 and "model.learn_variance: true needs train.loss: hybrid" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "mnist").exists()


def test_a_length_on_the_command_line_replaces_the_files_and_says_so(capsys) -> None:
    cpu = ROOT / "configs" / "cpu.yaml"  # trains for a time budget
    code, out, err = run_cli(capsys, "config", "--config", cpu, "--set", "train.steps=3000")
    assert code == 0, err
    assert load_config(cpu, ["train.steps=3000"]).train.time_budget == ""
    assert err.strip() == "note: --set train.steps=3000 replaces the config's train.time_budget: 20m"
    assert "steps: 3000" in out and "time_budget: ''" in out  # stdout stays the YAML alone
    smoke = ROOT / "configs" / "smoke.yaml"  # trains for 20 steps
    replaced = load_config(smoke, ["train.time_budget=1m"])
    assert (replaced.train.steps, replaced.train.time_budget) == (0, "1m")
    code, _, err = run_cli(capsys, "config", "--config", smoke, "--set", "train.time_budget=1m",
                           "--set", "train.steps=5")
    assert code == 2 and "--set train.time_budget='' turns the budget off" in err


BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9))


def test_alias_bombs_and_deep_nesting_are_one_short_line(tmp_path: Path, capsys) -> None:
    cases = {"bomb.yaml": (BILLION_LAUGHS, "aliases (*a) are not allowed"),
             "deep.yaml": ("train: " + "[" * 5000 + "]" * 5000 + "\n", "nested more than 8 levels deep"),
             "huge.yaml": ("seed: " + "x" * 5_000_000 + "\n", "5,000,007 bytes; a config is at most 1,048,576")}
    for name, (text, says) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        code, _, err = run_cli(capsys, "config", "--config", path)
        line = one_line_error(code, err, says)
        assert len(line) < 400, line


def test_a_stored_config_bomb_is_described_briefly() -> None:
    bomb: list = ["lol"] * 9
    for _ in range(9):
        bomb = [bomb] * 9  # 9**10 leaves, shared: cheap to hold, ruinous to repr()
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    for value in (bomb, deep):
        with pytest.raises(ConfigError) as info:
            config_from_dict({"train": {"lr": value}}, "ckpt (its stored config)")
        assert "train.lr: must be a number" in str(info.value) and len(str(info.value)) < 300


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  batch_size: 32\n  lr: 0.001\nmodel: {}\ntrain:\n  batch_size: 128\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'train' \(lines 1 and 5\)"):
        load_config(path)
    path.write_text("train:\n  lr: 0.001\n  lr: 0.0002\n")
    with pytest.raises(ConfigError, match=r"duplicate key 'lr' \(lines 2 and 3\)"):
        load_config(path)


@pytest.mark.parametrize("override, says", [
    ("train.lr=1" + "0" * 400, "train.lr: must be a finite number"),
    ("seed=" + "1" * 5000, "not a value a config can hold"),
    ("train.lr=!!float abc", "not a value a config can hold"),
    ("train.steps=" + "[" * 3000 + "]" * 3000, "nested more than 8 levels deep"),
    ("out_dir=a\0b", "not valid YAML"),
    ('data.root="a\\0b"', "must not contain a NUL character"),
])
def test_override_values_that_raised_are_one_line(override: str, says: str, capsys) -> None:
    code, _, err = run_cli(capsys, "config", "--set", override)
    line = one_line_error(code, err, says)
    assert len(line) < 400


def test_a_date_like_name_is_a_name(capsys) -> None:
    code, out, err = run_cli(capsys, "config", "--set", "name=2001-13-45")
    assert code == 0 and "name: '2001-13-45'" in out, err  # quoted, so that any YAML reader sees a string
