"""Checkpoint files: one self-describing file each, written atomically, read without running code.

A checkpoint is a plain dict of tensors, numbers and strings (what `torch.load(weights_only=True)`
accepts): the format name and version, the resolved config, the step, the model and EMA weights,
the optimiser and lr-scheduler states, and the RNG states of every process. `ddpm sample` needs
only the config and the weights. This module turns a `TrainState` into that dict and back.

Format 2 (this version) moved runtime.device and runtime.mixed_precision out of the train section
and split AdamW's parameters into two groups (weight decay on weights only). Format 1 files still
sample and evaluate; training cannot resume from them.
"""

from __future__ import annotations

import copy
import io
import math
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

import ddpm_mnist
from ddpm_mnist.config import Config, config_from_dict, to_dict
from ddpm_mnist.errors import CheckpointError
from ddpm_mnist.paths import atomic_file, fsync_folder, temporary_name
from ddpm_mnist.trainstate import TrainState
from ddpm_mnist.unet import UNet

FORMAT = "ddpm-mnist-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
LATEST = "latest.pt"


def numbered_name(step: int) -> str:
    """`step_000001000.pt`: zero-padded so that names sort by step."""
    return f"step_{step:09d}.pt"


def numbered_checkpoints(folder: Path) -> list[Path]:
    """The numbered checkpoints in a folder, newest first."""
    return sorted(folder.glob("step_*.pt"), reverse=True)


def save_checkpoint(contents: dict[str, Any], folder: Path, keep: int) -> Path:
    """Write `step_N.pt` atomically, point `latest.pt` at it, keep the newest `keep` numbered files.

    The file is serialised in memory, written to a temporary name of its own, flushed to disk,
    then renamed over its final name, so a crash or a full disk at any moment leaves the previous
    `latest.pt` whole and no temporary file behind. `latest.pt` is a hard link to the numbered file
    (a copy where links are not supported). Raises CheckpointError when the disk refuses.
    """
    path = folder / numbered_name(contents["step"])
    try:
        buffer = io.BytesIO()
        torch.save(contents, buffer)  # in memory: a full disk then fails below as an OSError with its errno
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, fsync=True) as tmp:
            tmp.write_bytes(buffer.getbuffer())
        link = temporary_name(folder / LATEST)
        try:
            try:
                os.link(path, link)
            except OSError:
                shutil.copyfile(path, link)
            os.replace(link, folder / LATEST)
        finally:
            link.unlink(missing_ok=True)
        fsync_folder(folder)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    for old in numbered_checkpoints(folder)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint safely (`weights_only=True`), checking its format, version and fields.

    Every failure (missing, truncated, not a torch file, a pickle that would run code, another
    format or version, fields of the wrong type) is a CheckpointError of one line.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give a checkpoint file such as {path / 'checkpoints' / LATEST}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_unpickling_message(path, str(exc))) from None
    except Exception as exc:  # torch.load raises many kinds (IndexError on 4 torn bytes): all read the same
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or not a torch file ({first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ddpm-mnist checkpoint (no '{FORMAT}' format marker)")
    version = state.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format version {_short(version)}; this ddpm-mnist reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    _check_fields(state, path)
    return state


def _unpickling_message(path: Path, text: str) -> str:
    """One line for a refused pickle: the global it names, never torch's advice to load it unsafely."""
    # torch 2.5: "Unsupported global: GLOBAL builtins.eval"; torch 2.14: "unsupported GLOBAL posix.system"
    found = re.search(r"unsupported (?:global:\s*)?GLOBAL\s+([\w.]+)", text, flags=re.IGNORECASE)
    if found:
        return (f"{path}: refused: the file asks to load the Python object {found.group(1)}, which could run code; "
                "ddpm-mnist reads only tensors and plain values")
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    reason = detail.group(1).strip() if detail else "a pickle ddpm-mnist does not read"
    return f"{path}: not a readable checkpoint, truncated or not a torch file ({reason[:200]})"


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, (int, float, str, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _check_fields(state: dict[str, Any], path: Path) -> None:
    missing = [key for key in ("config", "step", "model", "ema") if key not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing {', '.join(missing)}")
    for key in ("step", "ema_num_averaged", "world_size", "skipped"):
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{path}: its {key} must be a whole number >= 0, got {_short(value)}")
    for key in ("model", "ema"):
        weights = state[key]
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise CheckpointError(f"{path}: its {key} weights are not a mapping of names to tensors")


def checkpoint_config(state: dict[str, Any], path: str | Path) -> Config:
    """The resolved config stored in a checkpoint, validated like a config file (format 1 migrated)."""
    raw = state["config"]
    if state.get("format_version") == 1 and isinstance(raw, dict) and isinstance(raw.get("train"), dict):
        raw = copy.deepcopy(raw)
        runtime = {key: raw["train"].pop(key) for key in ("device", "mixed_precision") if key in raw["train"]}
        raw["runtime"] = runtime
    return config_from_dict(raw, f"{path} (its stored config)")


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    """Load a state dict, refusing non-finite values and a mismatch with the config's model, in one line."""
    bad = [name for name, value in weights.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise CheckpointError(
            f"{path}: its {what} weights hold NaN or infinite values ({len(bad)} tensor(s), e.g. {bad[0]}): "
            "the run diverged before this checkpoint; sample from an earlier one"
        )
    try:
        module.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else (first[0] if first else "")
        raise CheckpointError(f"{path}: {what} weights do not fit the model its config describes ({detail})") from None


def load_model(contents: dict[str, Any], cfg: Config, path: str | Path, use_ema: bool) -> UNet:
    """The config's U-Net with the checkpoint's EMA (or raw) weights, in eval mode on the CPU."""
    model = UNet(cfg.model)
    load_weights(model, contents["ema"] if use_ema else contents["model"], path, "EMA" if use_ema else "raw")
    return model.eval()


def rng_state(train_state: TrainState, device: torch.device) -> dict[str, Any]:
    """This process's random streams: torch's global generator (dropout), CUDA's, and the training noise."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "train": train_state.generator.get_state().cpu(),
    }


def checkpoint_contents(
    train_state: TrainState, cfg: Config, steps_per_epoch: int, rngs: list[dict[str, Any]]
) -> dict[str, Any]:
    """Everything a checkpoint holds (plain types only, for weights_only loading); `rngs` has one state per process."""
    step = train_state.step
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": to_dict(cfg),
        "step": step,
        "epoch": step // steps_per_epoch,
        "world_size": len(rngs),
        "skipped": train_state.skipped,
        "model": train_state.model.state_dict(),
        "ema": train_state.ema.module.state_dict(),
        "ema_num_averaged": int(train_state.ema.n_averaged),
        "optimizer": train_state.optimizer.state_dict(),
        "lr_scheduler": train_state.lr_scheduler.state_dict(),
        "rng": rngs,
        "versions": {"ddpm_mnist": ddpm_mnist.__version__, "torch": str(torch.__version__)},
    }


def restore_train_state(
    train_state: TrainState, contents: dict[str, Any], path: Path, rank: int, world_size: int
) -> None:
    """Load a checkpoint into the live state. The RNG streams are restored only when the checkpoint
    was saved by as many processes (the caller decides whether another count may resume)."""
    if contents.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {contents.get('format_version')} was written by an earlier ddpm-mnist; "
            f"it samples and evaluates, but training resumes only from format {FORMAT_VERSION}: start a new run"
        )
    load_weights(train_state.model, contents["model"], path, "model")
    load_weights(train_state.ema.module, contents["ema"], path, "EMA")
    try:
        train_state.ema.n_averaged.fill_(contents["ema_num_averaged"])
        train_state.optimizer.load_state_dict(contents["optimizer"])
        train_state.lr_scheduler.load_state_dict(contents["lr_scheduler"])
        rngs = contents["rng"]
        if not isinstance(rngs, list) or not all(isinstance(r, dict) for r in rngs):
            raise TypeError("'rng' is not a list of one state per process")
        if len(rngs) == world_size:
            mine = rngs[rank]
            torch.set_rng_state(mine["torch"])
            if mine["cuda"] is not None and train_state.generator.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], train_state.generator.device)
            train_state.generator.set_state(mine["train"])
        for lr in [g["lr"] for g in train_state.optimizer.param_groups] + list(train_state.lr_scheduler.base_lrs):
            if not math.isfinite(float(lr)):
                raise ValueError(f"a learning rate of {lr!r}")
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError, OverflowError, AttributeError) as exc:
        raise CheckpointError(f"{path}: training state cannot be restored ({str(exc)[:200]})") from None
    train_state.step = contents["step"]
    train_state.skipped = contents.get("skipped", 0)
