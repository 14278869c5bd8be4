"""Checkpoint files: one self-describing file each, written atomically, read without running code.

A checkpoint is a plain dict of tensors, numbers and strings (what `torch.load(weights_only=True)`
accepts): the format name and version, the resolved config, the step, the model and EMA weights,
the optimiser and lr-scheduler states, and the RNG states. `ddpm sample` needs nothing else.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from ddpm_mnist.config import Config, config_from_dict
from ddpm_mnist.errors import CheckpointError

FORMAT = "ddpm-mnist-checkpoint"
FORMAT_VERSION = 1
LATEST = "latest.pt"


def numbered_name(step: int) -> str:
    """`step_000001000.pt`: zero-padded so that names sort by step."""
    return f"step_{step:09d}.pt"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not every platform opens folders; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], folder: Path, keep: int) -> Path:
    """Write `step_N.pt` atomically, point `latest.pt` at it, keep the newest `keep` numbered files.

    Each file is written to a temporary name, flushed to disk, then renamed over its final name,
    so a crash at any moment leaves the previous `latest.pt` whole. `latest.pt` is a hard link to
    the numbered file (a copy where links are not supported). Raises CheckpointError when the
    disk refuses (full, read-only); the previous checkpoints are then untouched.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / numbered_name(state["step"])
    tmp = folder / f".{path.name}.tmp"
    link = folder / f".{LATEST}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        link.unlink(missing_ok=True)
        try:
            os.link(path, link)
        except OSError:
            shutil.copyfile(path, link)
        os.replace(link, folder / LATEST)
        _fsync_dir(folder)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        link.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}") from None
    for old in sorted(folder.glob("step_*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint safely (`weights_only=True`), checking its format and version.

    Every failure (missing, truncated, not a torch file, a pickle that would run code, another
    format or version) is a CheckpointError of one line.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder; give a checkpoint file such as {path / 'checkpoints' / LATEST}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            raise CheckpointError(
                f"{path}: refused: the file holds a Python object ({found.group(1)}) that could run code when "
                "loaded; ddpm-mnist reads only tensors and plain values"
            ) from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        reason = detail.group(1).strip() if detail else (text.strip().splitlines() or ["corrupt pickle"])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or not a torch file ({reason})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or not a torch file ({first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ddpm-mnist checkpoint (no '{FORMAT}' format marker)")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r}; this ddpm-mnist reads version {FORMAT_VERSION}"
        )
    missing = [key for key in ("config", "step", "model", "ema") if key not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing {', '.join(missing)}")
    return state


def checkpoint_config(state: dict[str, Any], path: str | Path) -> Config:
    """The resolved config stored in a checkpoint, validated like a config file."""
    return config_from_dict(state["config"], f"{path} (its stored config)")


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    """Load a state dict, turning a mismatch with the config's model into one CheckpointError line."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else (first[0] if first else "")
        raise CheckpointError(f"{path}: {what} weights do not fit the model its config describes ({detail})") from None
