"""Helpers shared by the training and sampling tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ddpm_mnist.config import Config, apply_overrides
from ddpm_mnist.previews import training_hooks
from ddpm_mnist.train import train


def smoke_run(cfg: Config, *overrides: str, **kwargs: object) -> Path:
    """Train configs/smoke.yaml (with overrides) with the CLI's preview and metric hooks; return the run folder."""
    cfg = apply_overrides(cfg, list(overrides))
    return train(cfg, hooks=training_hooks(cfg), **kwargs)


def weights(run_dir: Path, name: str = "latest.pt") -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / name, weights_only=True)
    return {**{f"model.{k}": v for k, v in state["model"].items()}, **{f"ema.{k}": v for k, v in state["ema"].items()}}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
