"""`ddpm export`: a checkpoint as a diffusers DDPMPipeline folder, or as one safetensors weights file.

    ddpm export --ckpt runs/cpu/checkpoints/latest.pt --out exports/cpu            # a DDPMPipeline folder
    ddpm export --ckpt runs/cpu/checkpoints/latest.pt --out cpu.safetensors --format safetensors

Both hold the EMA weights (the raw ones with `--no-ema`) and nothing that can run code; both read
back with `ddpm sample --ckpt` and `ddpm eval --ckpt`. Every argument is checked before a file is
written, and a model that diffusers' UNet2DModel cannot represent is refused in one line.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ddpm_mnist import checkpoint as ckpt
from ddpm_mnist import diffusers_format
from ddpm_mnist.errors import UserError
from ddpm_mnist.maths.schedule import make_betas
from ddpm_mnist.paths import (
    MANIFEST,
    check_input_file,
    check_paths,
    check_suffix,
    enclosing_output_folder,
    ensure_writable,
    folder_entries,
    recorded,
    resolved,
    start_manifest,
    temporary_name,
)

FORMATS = ("diffusers", "safetensors")


def export_checkpoint(ckpt_path: Path, out: Path, *, fmt: str = "diffusers", use_ema: bool = True,
           overwrite: bool = False) -> list[Path]:
    """Write the export; return the files written."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: must be one of {', '.join(FORMATS)}")
    if fmt == "safetensors":
        check_suffix(out, "--out", (".safetensors",))
    elif out.suffix or not resolved(out).name:
        raise UserError(f"--out {out}: a diffusers export is a folder; give a folder name (or --format safetensors)")
    check_paths({"--out": out}, inputs={"--ckpt": ckpt_path})
    check_replaceable(out, fmt, overwrite)
    checkpoint = ckpt.load(ckpt_path)
    cfg, weights = checkpoint.config, checkpoint.weights(use_ema)
    if fmt == "diffusers":
        diffusers_format.unet_config(cfg.model)  # refuses a model UNet2DModel cannot hold, before writing
        ensure_writable(out.parent, folder=True)
        schedule = cfg.schedule  # unrescaled: diffusers applies rescale_betas_zero_snr to trained_betas itself
        betas = make_betas(schedule.beta_schedule, schedule.num_timesteps, schedule.beta_start, schedule.beta_end,
                           schedule.cosine_s, schedule.max_beta)
        return write_whole_folder(out, lambda folder: diffusers_format.write_folder(
            folder, cfg, weights, betas, checkpoint.step, run_facts(ckpt_path)))
    ensure_writable(out)
    return [diffusers_format.write_weights_file(out, cfg, weights, checkpoint.step)]


def check_replaceable(out: Path, fmt: str, overwrite: bool) -> None:
    """Refuse, before any work, an --out that holds anything but an earlier export of this tool (which
    --overwrite replaces), or that lies inside a folder the tool writes (a run folder)."""
    outer = enclosing_output_folder(out)
    if outer is not None:
        raise UserError(f"--out {out} lies inside {outer}, a folder ddpm-mnist writes (a run folder; its --overwrite "
                        "would delete the export): give a path outside it")
    if not os.path.lexists(out):
        return
    if fmt == "safetensors":
        if out.is_symlink() or not out.is_file() or not diffusers_format.is_weights_file(out):
            raise UserError(f"--out {out} exists and is not a weights file of ddpm export, the only file it replaces: "
                            "give another path")
        if not overwrite:
            raise UserError(f"--out {out} exists: add --overwrite to replace it, or give another path")
        return
    if out.is_symlink() or not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder: give another path")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"--out {out} exists and is not empty: add --overwrite to replace an earlier export, or "
                        "give another path")
    files, others = folder_entries(out)
    foreign = sorted(others | {name for name in files if name not in recorded(out)})
    if foreign or not os.path.lexists(out / MANIFEST):
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"--out {out} holds files ddpm export did not write ({shown or 'no ' + MANIFEST}): "
                        "--overwrite replaces only an earlier export; move them away or give another path")


def write_whole_folder(out: Path, write: Callable[[Path], list[Path]]) -> list[Path]:
    """Let `write` fill a temporary folder beside `out` (recording its files in the folder's manifest),
    then put it in place of `out` by renames: a failure (a full disk) leaves `out` as it was and no
    temporary folder behind. Returns the files under their final names."""
    staging = temporary_name(out)
    replaced = temporary_name(out.with_name(out.name + ".old"))
    try:
        staging.mkdir()
        start_manifest(staging)
        files = write(staging)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if out.exists():
            os.replace(out, replaced)
        os.replace(staging, out)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        for leftover in (staging, replaced):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return [out / path.relative_to(staging) for path in files]


def run_facts(ckpt_path: Path) -> dict[str, Any]:
    """What the run folder around a checkpoint tells the model card: training time and eval numbers
    (each left out where its file does not read as this tool writes it)."""
    facts: dict[str, Any] = {}
    if ckpt_path.parent.name != "checkpoints":
        return facts
    run = ckpt_path.parent.parent
    events = sorted(run.glob("events.out.tfevents.*"))
    if events and all(path.is_file() and not path.is_symlink() for path in events):  # a pipe would block
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        try:
            accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0})
            accumulator.Reload()
            if "train/loss" in accumulator.Tags()["scalars"]:
                points = accumulator.Scalars("train/loss")
                facts["train_seconds"] = points[-1].wall_time - points[0].wall_time
        except Exception:  # a damaged or foreign event file: the card goes without the training time
            pass
    report = eval_report(run / "eval.json")
    if report is not None:
        facts["eval"] = report
    return facts


def eval_report(path: Path) -> dict[str, Any] | None:
    """`ddpm eval --json`'s report, if the file is one: n, and finite numbers under samples and floor."""
    try:
        check_input_file(path, "eval report")
        if path.stat().st_size > 1 << 20:
            return None
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UserError, OSError, ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or isinstance(value.get("n"), bool) or not isinstance(value.get("n"), int):
        return None
    for part in ("samples", "floor"):
        numbers = value.get(part)
        if not isinstance(numbers, dict) or not all(
                isinstance(numbers.get(key), (int, float)) and not isinstance(numbers.get(key), bool)
                and math.isfinite(numbers[key]) for key in ("fid_mnist", "confidence")):
            return None
    if not isinstance(value.get("source", {}), dict):
        return None
    return value


def describe(files: list[Path], started: float) -> str:
    """The closing line: what was written, how big, how long it took."""
    size = sum(path.stat().st_size for path in files)
    return (f"exported in {time.perf_counter() - started:.1f} s, {size / 2**20:.1f} MiB: "
            + ", ".join(str(path) for path in files))
