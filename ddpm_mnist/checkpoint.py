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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import ddpm_mnist
from ddpm_mnist import checkpoint_checks as checks
from ddpm_mnist import diffusers_format
from ddpm_mnist.config import Config, config_from_dict, to_dict
from ddpm_mnist.errors import CheckpointError
from ddpm_mnist.maths.unet import UNet, parameter_groups
from ddpm_mnist.paths import atomic_file, check_input_file, fsync_folder, record_written, temporary_name

if TYPE_CHECKING:
    from ddpm_mnist.trainstate import TrainState

FORMAT = "ddpm-mnist-checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
LATEST = "latest.pt"


def numbered_name(step: int) -> str:
    """`step_000001000.pt`: zero-padded so that names sort by step."""
    return f"step_{step:09d}.pt"


NUMBERED = re.compile(r"step_([0-9]{9,})\.pt")


def numbered_checkpoints(folder: Path) -> list[Path]:
    """The numbered checkpoints in a folder, newest first: exactly the names `numbered_name` writes
    (a user's `step_best.pt` is not one of them)."""
    found = []
    for path in folder.glob("step_*.pt"):
        match = NUMBERED.fullmatch(path.name)
        if match and numbered_name(int(match[1])) == path.name:
            found.append((int(match[1]), path))
    return [path for _, path in sorted(found, reverse=True)]


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
        record_written(folder / LATEST)
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


@dataclass(frozen=True)
class Checkpoint:
    """Weights to sample or resume from, read and checked as a whole by `load`: a checkpoint file of
    `ddpm train`, an exported weights file, or a diffusers DDPMPipeline folder.

    `contents` is what the file stores (see `checkpoint_contents`); an export holds only the
    weights, and cannot resume. `config` is its stored config, parsed once."""

    path: Path
    config: Config  # the config it was trained with, validated (a format 1 file's migrated)
    step: int  # the training steps behind its weights (0 where a diffusers folder does not say)
    contents: dict[str, Any]
    source: str = ""  # what its weights are, where the step does not say it (a diffusers folder)

    def weights(self, use_ema: bool) -> dict[str, torch.Tensor]:
        """The EMA weights, or the raw ones (an export holds one set, under both names)."""
        return self.contents["ema" if use_ema else "model"]

    def describe(self, use_ema: bool) -> str:
        """What the weights are, for a note line: 'EMA weights of step 4,282'."""
        return self.source or f"{'EMA' if use_ema else 'raw'} weights of step {self.step:,}"

    def build_model(self, use_ema: bool) -> UNet:
        """The config's U-Net with the EMA (or raw) weights, in eval mode on the CPU."""
        model = UNet(self.config.model)
        load_weights(model, self.weights(use_ema), self.path, "EMA" if use_ema else "raw")
        return model.eval()

    @property
    def world_size(self) -> int:
        """How many processes wrote it."""
        return self.contents.get("world_size", 1)

    @property
    def cpu_threads(self) -> int | None:
        """The CPU threads it trained with (None: not recorded, written before they were)."""
        return self.contents.get("cpu_threads") or None

    @property
    def time_budget(self) -> str | None:
        """The time budget that fixed its length ("": trained by steps; None: written before budgets were recorded)."""
        return self.contents.get("time_budget")

    def restore(self, train_state: TrainState, rank: int, world_size: int) -> None:
        """Load it into the live training state (`restore_train_state`)."""
        restore_train_state(train_state, self.contents, self.path, rank, world_size)


def load(path: str | Path) -> Checkpoint:
    """The one way in for weights: a checkpoint file, an exported `.safetensors` file or a diffusers
    folder, each read by its format's reader, then checked the same way (see `checkpoint_checks`).

    A checkpoint file is read once and verified as a whole zip archive (every record's CRC), then
    loaded from those bytes with `weights_only=True`. Its config is parsed once, and its weights,
    optimiser, lr-schedule and RNG states are checked against the model that config describes
    (built once, on the meta device). Every failure (missing, not a regular file, truncated,
    damaged, a pickle that would run code, another format or version, a field of the wrong type,
    shape or range) is a CheckpointError of one line naming the field.
    """
    path = Path(path)
    if path.is_dir():
        cfg, weights, step = _read_folder(path)
        return _checked(path, cfg, exported_contents(weights, step), f"the weights of the diffusers folder {path}")
    if path.suffix == ".safetensors":
        check_input_file(path, "weights")
        cfg, weights, step = diffusers_format.read_weights_file(path)
        return _checked(path, cfg, exported_contents(weights, step))
    contents = _read_torch_file(path)
    _check_fields(contents, path)
    return _checked(path, stored_config(contents, path), contents)


def _read_torch_file(path: Path) -> dict[str, Any]:
    """A checkpoint file's dict, loaded without running code, of our format and a version we read."""
    data = checks.read_verified(path)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_unpickling_message(path, str(exc))) from None
    except Exception as exc:  # torch.load raises many kinds (IndexError on 4 torn bytes): all read the same
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if "weights_only" in first:  # torch's advice to load unsafely is never passed on
            first = "a pickle ddpm-mnist does not read"
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or not a torch file ({first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ddpm-mnist checkpoint (no '{FORMAT}' format marker)")
    version = state.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format version {checks.brief(version)}; this ddpm-mnist reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    return state


def _read_folder(path: Path) -> tuple[Config, dict[str, torch.Tensor], int]:
    """A diffusers DDPMPipeline folder (`diffusers_format.read_folder`); any other folder is one line."""
    if (path / "unet" / "config.json").is_file():
        return diffusers_format.read_folder(path)
    if any(os.path.lexists(path / name) for name in ("model_index.json", "unet", "scheduler")):
        raise CheckpointError(f"{path}: a diffusers DDPMPipeline folder holds unet/config.json, and this one has "
                              "none (or not as a regular file)")
    raise CheckpointError(f"{path}: is a folder; give a checkpoint file such as {path / 'checkpoints' / LATEST}, "
                          "or a diffusers DDPMPipeline folder")


def _checked(path: Path, cfg: Config, contents: dict[str, Any], source: str = "") -> Checkpoint:
    try:
        _check_contents(contents, cfg)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    return Checkpoint(path, cfg, contents["step"], contents, source)


def exported_contents(weights: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
    """What an exported file or folder holds, as checkpoint contents: weights and step, no training
    state (it samples and evaluates like a checkpoint, and cannot resume)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "model": weights, "ema": weights}


def _check_contents(state: dict[str, Any], cfg: Config) -> None:
    """The weights against the config's model (built on the meta device: shapes, no memory), and,
    where present, the optimiser, lr-schedule and RNG states against what training builds."""
    with torch.device("meta"):
        model = UNet(cfg.model)
    expected = model.state_dict()
    size = sum(t.numel() for t in expected.values())
    if size > checks.MAX_PARAMETERS:
        raise ValueError(f"its config describes a model of {size:,} parameters, more than ddpm-mnist loads")
    checks.check_weights(state["model"], expected, "model", "raw")
    checks.check_weights(state["ema"], expected, "ema", "EMA")
    if state["format_version"] != FORMAT_VERSION:
        return  # an older format samples; it never resumes, so its training state is never used
    groups = [group["params"] for group in parameter_groups(model, cfg.train.weight_decay)]
    if "optimizer" in state:
        checks.check_optimizer(state["optimizer"], groups)
    if "lr_scheduler" in state:
        checks.check_lr_scheduler(state["lr_scheduler"], len(groups), LR_SCHEDULER_KEYS)
    if "rng" in state:
        checks.check_rng(state["rng"])
    budget = state.get("time_budget", "")
    if not isinstance(budget, str) or len(budget) > 40:
        raise ValueError(f"its time_budget must be a duration such as 20m, got {checks.brief(budget)}")


# What LambdaLR.state_dict() holds (load_state_dict sets each as an attribute), and older torch's 'verbose'
LR_SCHEDULER_KEYS = {"base_lrs", "last_epoch", "_step_count", "_is_initial", "_get_lr_called_within_step",
                     "_last_lr", "lr_lambdas", "verbose"}


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


def _check_fields(state: dict[str, Any], path: Path) -> None:
    missing = [key for key in ("config", "step", "model", "ema") if key not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing {', '.join(missing)}")
    for key in ("step", "ema_num_averaged", "world_size", "skipped", "epoch"):
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**62:
            raise CheckpointError(f"{path}: its {key} must be a whole number >= 0, got {checks.brief(value)}")
    threads = state.get("cpu_threads", 0)
    if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= 4096:
        raise CheckpointError(f"{path}: its cpu_threads must be a whole number from 0 to 4096, got "
                              f"{checks.brief(threads)}")
    for key in ("model", "ema"):
        weights = state[key]
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise CheckpointError(f"{path}: its {key} weights are not a mapping of names to tensors")


def stored_config(state: dict[str, Any], path: str | Path) -> Config:
    """The resolved config stored in a checkpoint file, validated like a config file (format 1 migrated)."""
    raw = state["config"]
    if state.get("format_version") == 1 and isinstance(raw, dict) and isinstance(raw.get("train"), dict):
        raw = copy.deepcopy(raw)
        runtime = {key: raw["train"].pop(key) for key in ("device", "mixed_precision") if key in raw["train"]}
        raw["runtime"] = runtime
    return config_from_dict(raw, f"{path} (its stored config)")


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    """Load a state dict that `load` checked; a mismatch with the live model is one line."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else (first[0] if first else "")
        raise CheckpointError(f"{path}: {what} weights do not fit the model its config describes ({detail})") from None


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
        "time_budget": train_state.time_budget,
        "cpu_threads": torch.get_num_threads(),  # a resume computes with as many, for the same last bits
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
    train_state.time_budget = contents.get("time_budget", train_state.time_budget)
