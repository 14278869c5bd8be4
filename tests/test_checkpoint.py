"""`checkpoint.load`: the one way in for weights (a checkpoint file, an exported weights file, a
diffusers folder), parsed once and built once, and every command that reads weights goes through it.

The checks of what a checkpoint may hold are in test_checkpoint_checks.py; writing, in test_train.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE_ROOT, SMOKE, run_cli

from ddpm_mnist import checkpoint
from ddpm_mnist.config import load_config


def latest(run: Path) -> Path:
    return run / "checkpoints" / "latest.pt"


@pytest.fixture
def counted(monkeypatch) -> dict[str, list[str]]:
    """Count the config parses and U-Net builds of `checkpoint`, and the calls of `checkpoint.load`."""
    calls: dict[str, list[str]] = {"config": [], "unet": [], "load": []}
    parse, unet, load = checkpoint.config_from_dict, checkpoint.UNet, checkpoint.load

    def counting_parse(*args, **kwargs):
        calls["config"].append("parsed")
        return parse(*args, **kwargs)

    class CountingUNet(unet):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            calls["unet"].append(next(self.parameters()).device.type)

    def counting_load(path):
        calls["load"].append(Path(path).name)
        return load(path)

    monkeypatch.setattr(checkpoint, "config_from_dict", counting_parse)
    monkeypatch.setattr(checkpoint, "UNet", CountingUNet)
    monkeypatch.setattr(checkpoint, "load", counting_load)
    return calls


@pytest.mark.slow
def test_a_checkpoint_is_parsed_once_and_checked_on_a_unet_built_once_on_meta(trained_run: Path, counted) -> None:
    loaded = checkpoint.load(latest(trained_run))
    assert counted["config"] == ["parsed"] and counted["unet"] == ["meta"]
    assert loaded.step == 20 and loaded.config == load_config(trained_run / "config.yaml")
    assert loaded.describe(use_ema=True) == "EMA weights of step 20"
    model = loaded.build_model(use_ema=False)  # the one real build
    assert counted["unet"] == ["meta", "cpu"] and not model.training
    assert all(torch.equal(value, loaded.weights(use_ema=False)[name]) for name, value in model.state_dict().items())
    assert loaded.world_size == 1 and loaded.time_budget == "" and loaded.cpu_threads


@pytest.mark.slow
def test_an_export_reads_back_as_a_checkpoint_that_cannot_resume(trained_run: Path, tmp_path: Path, capsys) -> None:
    ckpt = latest(trained_run)
    for out, fmt in ((tmp_path / "pipe", "diffusers"), (tmp_path / "w.safetensors", "safetensors")):
        code, _, err = run_cli(capsys, "export", "--ckpt", ckpt, "--out", out, "--format", fmt)
        assert code == 0, err
        read, trained = checkpoint.load(out), checkpoint.load(ckpt)
        assert read.config.model == trained.config.model and read.contents.keys() == {
            "format", "format_version", "step", "model", "ema"}  # no training state
        assert all(torch.equal(read.weights(use_ema=False)[k], v) for k, v in trained.weights(use_ema=True).items())
    assert checkpoint.load(tmp_path / "pipe").describe(use_ema=True) == f"the weights of the diffusers folder " \
        f"{tmp_path / 'pipe'}"


@pytest.mark.slow
def test_sample_export_and_resume_read_their_checkpoint_through_load(trained_run: Path, tmp_path: Path, capsys,
                                                                      counted) -> None:
    ckpt = latest(trained_run)
    code, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--n", "2", "--steps", "2", "--out", tmp_path / "g.png")
    assert code == 0, err
    assert counted["load"] == ["latest.pt"] and counted["config"] == ["parsed"]
    assert counted["unet"] == ["meta", "cpu"]  # checked on meta, then built once to sample
    code, _, err = run_cli(capsys, "export", "--ckpt", ckpt, "--out", tmp_path / "pipe")
    assert code == 0, err
    assert counted["load"] == ["latest.pt"] * 2
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    code, _, err = run_cli(capsys, "train", "--config", SMOKE, "--resume", "--set", f"out_dir={run.parent}",
                           "--set", f"name={run.name}", "--set", "train.steps=21", "--set", "train.sample_every=0",
                           "--set", f"data.root={FIXTURE_ROOT}")
    assert code == 0, err
    assert counted["load"][2:] == ["latest.pt"]
