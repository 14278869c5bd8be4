"""`ddpm export`: a checkpoint as a diffusers DDPMPipeline folder, or as one safetensors weights file.

    ddpm export --ckpt runs/cpu/checkpoints/latest.pt --out exports/cpu            # a DDPMPipeline folder
    ddpm export --ckpt runs/cpu/checkpoints/latest.pt --out cpu.safetensors --format safetensors

Both hold the EMA weights (the raw ones with `--no-ema`) and nothing that can run code; both read
back with `ddpm sample --ckpt` and `ddpm eval --ckpt`. Every argument is checked before a file is
written, and a model that diffusers' UNet2DModel cannot represent is refused in one line.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ddpm_mnist import checkpoint as ckpt
from ddpm_mnist import diffusers_format
from ddpm_mnist.errors import UserError
from ddpm_mnist.maths.schedule import make_schedule
from ddpm_mnist.paths import check_paths, check_suffix, ensure_writable

FORMATS = ("diffusers", "safetensors")


def export(ckpt_path: Path, out: Path, *, fmt: str = "diffusers", use_ema: bool = True,
           overwrite: bool = False) -> list[Path]:
    """Write the export; return the files written."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: must be one of {', '.join(FORMATS)}")
    if fmt == "safetensors":
        check_suffix(out, "--out", (".safetensors",))
    elif out.suffix:
        raise UserError(f"--out {out}: a diffusers export is a folder; give a folder name (or --format safetensors)")
    check_paths({"--out": out}, inputs={"--ckpt": ckpt_path})
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not empty: add --overwrite to replace the files export writes, "
                        "or give another path")
    contents = ckpt.load_checkpoint(ckpt_path)
    cfg = ckpt.checkpoint_config(contents, ckpt_path)
    weights = contents["ema" if use_ema else "model"]
    if fmt == "diffusers":
        diffusers_format.unet_config(cfg.model)  # refuses a model UNet2DModel cannot hold, before writing
        ensure_writable(out, folder=True)
        betas = make_schedule(cfg.schedule).betas
        return diffusers_format.write_folder(out, cfg, weights, betas, contents["step"], run_facts(ckpt_path))
    ensure_writable(out)
    return [diffusers_format.write_weights_file(out, cfg, weights, contents["step"])]


def run_facts(ckpt_path: Path) -> dict[str, Any]:
    """What the run folder around a checkpoint tells the model card: training time and eval numbers."""
    facts: dict[str, Any] = {}
    if ckpt_path.parent.name != "checkpoints":
        return facts
    run = ckpt_path.parent.parent
    events = sorted(run.glob("events.out.tfevents.*"))
    if events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0})
        accumulator.Reload()
        if "train/loss" in accumulator.Tags()["scalars"]:
            points = accumulator.Scalars("train/loss")
            facts["train_seconds"] = points[-1].wall_time - points[0].wall_time
    report = run / "eval.json"
    if report.is_file():
        try:
            value = json.loads(report.read_text())
            if isinstance(value, dict) and {"samples", "floor", "n"} <= set(value):
                facts["eval"] = value
        except ValueError:
            pass
    return facts


def describe(files: list[Path], started: float) -> str:
    """The closing line: what was written, how big, how long it took."""
    size = sum(path.stat().st_size for path in files)
    return (f"exported in {time.perf_counter() - started:.1f} s, {size / 2**20:.1f} MiB: "
            + ", ".join(str(path) for path in files))
